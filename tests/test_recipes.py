"""Every recipe in recipes/ loads and carries what DESIGN §6 asks of it (config level only: nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionzip_tune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
LLAVA = [r for r in RECIPES if r.parent.name.startswith("llava-1.5-")]
GPUS = 8  # the recipes' global batch is stated for one 8-GPU node


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])


def test_the_expected_recipes_exist():
    names = {str(r.relative_to(ROOT / "recipes")) for r in RECIPES}
    assert {
        "tiny/demo.yaml",
        "llava-1.5-7b/projector.yaml",
        "llava-1.5-7b/full.yaml",
        "llava-1.5-7b/lora.yaml",
        "llava-1.5-13b/projector.yaml",
        "llava-1.5-13b/full.yaml",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_recipe_loads_and_documents_its_launch(recipe):
    cfg = load_config(recipe)
    text = header(recipe)
    rel = str(recipe.relative_to(ROOT))
    assert "bash train.sh" in text and rel in text, "the header must give the exact launch command"
    assert "override" in text.lower() and "=" in text, "the header must show one override example"
    assert "download" in text.lower(), "the header must say what to download (or that nothing is needed)"
    assert cfg.output.dir.startswith("runs/")


@pytest.mark.parametrize("recipe", LLAVA, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_llava_recipes_follow_the_paper_and_llava_scripts(recipe):
    cfg = load_config(recipe)
    size = recipe.parent.name.removeprefix("llava-1.5-")
    assert cfg.model.name_or_path == f"llava-hf/llava-1.5-{size}-hf"
    assert cfg.train.mode == recipe.stem
    assert cfg.visionzip.enabled and (cfg.visionzip.dominant, cfg.visionzip.contextual) == (54, 10)
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * GPUS == 128
    assert (cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.train.epochs) == (0.03, 0.0, 1)
    assert (cfg.data.template, cfg.data.image_aspect, cfg.data.max_length) == ("vicuna_v1", "pad", 2048)
    assert cfg.data.group_by_modality and cfg.train.activation_checkpointing
    assert cfg.deepspeed.bf16 == "auto"
    expected_lr = {"projector": 2e-5, "full": 2e-5, "lora": 2e-4}[cfg.train.mode]
    assert cfg.train.lr == expected_lr
    if cfg.train.mode == "projector":
        assert cfg.data.path == "data/llava_v1_5_mix665k_10pct.json"
        assert cfg.deepspeed.zero_stage == 2
    else:
        assert cfg.deepspeed.zero_stage == 3
    if cfg.train.mode == "lora":
        assert (cfg.train.lora_r, cfg.train.lora_alpha, cfg.train.projector_lr) == (128, 256, 2e-5)
    assert "108+20 = 128" in recipe.read_text() and "162+30 = 192" in recipe.read_text(), "document the budgets"


def test_every_budget_override_is_valid():
    for dominant, contextual in [(54, 10), (108, 20), (162, 30)]:
        cfg = load_config(LLAVA[0], [f"visionzip.dominant={dominant}", f"visionzip.contextual={contextual}"])
        assert cfg.visionzip.dominant + cfg.visionzip.contextual in (64, 128, 192)


def test_demo_recipe_is_self_contained():
    cfg = load_config(ROOT / "recipes/tiny/demo.yaml")
    assert cfg.model.build_tiny_if_missing and cfg.data.build_demo_if_missing
    assert cfg.data.eval_path and cfg.train.mode == "projector" and cfg.visionzip.enabled
    assert cfg.deepspeed.bf16 is False  # CPU
