"""Every recipe in recipes/ loads and opens with what a recipe must say: its purpose, what to download, the launch
command and an override example (config level only: nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionzip_tune.algorithm.compress import validate_budget
from visionzip_tune.training.config import load_config
from visionzip_tune.training.keys import judge_keys
from visionzip_tune.algorithm.capture import tokens_per_tower_output
from visionzip_tune.families import FAMILIES, resolve_budget, tokens_per_image, tokens_per_video
from visionzip_tune.models.mini_gemini.configuration_mini_gemini import MiniGeminiConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
LLAVA = [r for r in RECIPES if r.parent.name.startswith("llava-1.5-")]
NEXT = [r for r in RECIPES if r.parent.name.startswith("llava-next-")]
VIDEO_LLAVA = [r for r in RECIPES if r.parent.name.startswith("video-llava-")]
ONEVISION = [r for r in RECIPES if r.parent.name.startswith("llava-onevision-")]
MINI_GEMINI = [r for r in RECIPES if r.parent.name.startswith("mini-gemini-")]
QWEN = [r for r in RECIPES if r.parent.name.startswith("qwen")]
GPU_RECIPES = LLAVA + NEXT + VIDEO_LLAVA + ONEVISION
GPUS = 8  # the recipes' global batch is stated for one 8-GPU node
# LLaVA-NeXT, paper Table 9: total tokens over 5 crops -> (dominant, contextual) per crop.
TABLE_9 = {160: (27, 5), 320: (54, 10), 640: (108, 20)}


def _small(config_class, **geometry):
    """A vision config with a released checkpoint's geometry (image_size, patch_size) and tiny widths: token counts
    depend on the geometry only."""
    return config_class(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **geometry)


def released_config(recipe: Path):
    """The config geometry of the checkpoint a recipe names (nothing downloaded): towers, crops, pinpoints."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        SiglipVisionConfig,
        VideoLlavaConfig,
    )

    family = recipe.parent.name.rsplit("-", 1)[0]
    if family == "llava-1.5":
        return LlavaConfig(vision_config=_small(CLIPVisionConfig, image_size=336, patch_size=14))
    if family == "llava-next":  # llava-v1.6 anyres grids: 1x2, 2x1, 2x2, 3x1, 1x3 crops of 336 px
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        return LlavaNextConfig(
            vision_config=_small(CLIPVisionConfig, image_size=336, patch_size=14), image_grid_pinpoints=pinpoints
        )
    if family == "video-llava":  # LanguageBind towers: CLIP-L/14 at 224 px, 256 patches + CLS per frame
        return VideoLlavaConfig(vision_config=_small(CLIPVisionConfig, image_size=224, patch_size=14))
    if family == "llava-onevision":  # SigLIP-so400m at 384 px (729 tokens), grids up to 6x6, anyres_max_9
        pinpoints = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
        return LlavaOnevisionConfig(
            vision_config=_small(SiglipVisionConfig, image_size=384, patch_size=14),
            image_grid_pinpoints=pinpoints,
            vision_aspect_ratio="anyres_max_9",
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    raise AssertionError(f"no released geometry for {recipe}")


def zipped(recipe: Path, cfg):
    """The released config of ``recipe`` with the recipe's budget recorded, as apply_visionzip records it."""
    config = released_config(recipe)
    config.visionzip = {"dominant": cfg.visionzip.dominant, "contextual": cfg.visionzip.contextual, "eager": False}
    return config


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
        "llava-next-7b/projector.yaml",
        "llava-next-7b/full.yaml",
        "llava-next-13b/projector.yaml",
        "video-llava-7b/projector.yaml",
        "llava-onevision-0.5b/projector.yaml",
        "llava-onevision-7b/projector.yaml",
        "mini-gemini-7b/projector.yaml",
        "mini-gemini-7b/full.yaml",
        "mini-gemini-13b/projector.yaml",
        "mini-gemini-7b-hd/projector.yaml",
        "qwen2.5-vl-7b/projector.yaml",
        "qwen2.5-vl-7b/full.yaml",
        "qwen3-vl-8b/projector.yaml",
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


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_gpu_recipes_share_the_llava_training_setup(recipe):
    cfg = load_config(recipe)
    assert cfg.train.mode == recipe.stem and cfg.visionzip.enabled
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * GPUS == 128
    assert (cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.train.epochs) == (0.03, 0.0, 1)
    assert cfg.train.lr == {"projector": 2e-5, "full": 2e-5, "lora": 2e-4}[cfg.train.mode]
    assert cfg.deepspeed.zero_stage == {"projector": 2, "full": 3, "lora": 3}[cfg.train.mode]
    assert cfg.deepspeed.bf16 == "auto" and cfg.data.group_by_modality and cfg.train.activation_checkpointing
    assert cfg.output.dir == f"runs/{recipe.parent.name}-{recipe.stem}"
    # The budget fits the released tower: D + C <= the tokens it emits per image / crop / frame.
    validate_budget(
        cfg.visionzip.dominant, cfg.visionzip.contextual, tokens_per_tower_output(released_config(recipe).vision_config)
    )


@pytest.mark.parametrize("recipe", NEXT, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_next_recipes_zip_every_crop_with_a_table_9_budget(recipe):
    cfg = load_config(recipe)
    size = recipe.parent.name.removeprefix("llava-next-")
    assert cfg.model.name_or_path == f"llava-hf/llava-v1.6-vicuna-{size}-hf"
    total = {"projector": 320, "full": 640}[cfg.train.mode]  # full: Table 17 trained at 640
    assert (cfg.visionzip.dominant, cfg.visionzip.contextual) == TABLE_9[total]
    # 5 crops (a 2x2 grid: the paper's 2,880-token case) x the per-crop budget = the Table 9 total; 3 for 1x2.
    assert tokens_per_image(zipped(recipe, cfg), (672, 672)) == total
    assert tokens_per_image(zipped(recipe, cfg), (336, 672)) == 3 * total // 5
    assert cfg.visionzip.token_order in ("flat", "grid")
    assert (cfg.data.template, cfg.data.image_aspect) == ("vicuna_v1", "processor")
    text = recipe.read_text()
    assert all(f"{d}+{c}" in text for d, c in TABLE_9.values()), "document every Table 9 budget"


def test_next_table_9_budget_overrides_give_the_totals():
    for total, (dominant, contextual) in TABLE_9.items():
        cfg = load_config(
            NEXT[0],
            [f"visionzip.dominant={dominant}", f"visionzip.contextual={contextual}", "visionzip.token_order=grid"],
        )
        assert tokens_per_image(zipped(NEXT[0], cfg), (672, 672)) == total


@pytest.mark.parametrize("recipe", VIDEO_LLAVA, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_video_llava_recipe_zips_every_frame_to_17(recipe):
    cfg = load_config(recipe)
    assert cfg.model.name_or_path == "LanguageBind/Video-LLaVA-7B-hf"
    assert cfg.visionzip.dominant + cfg.visionzip.contextual == 17 and cfg.data.video_frames == 8
    assert tokens_per_video(zipped(recipe, cfg), cfg.data.video_frames) == 136  # paper Sec. 3.2
    assert tokens_per_video(released_config(recipe), 8) == 8 * 257  # stock: every frame token, CLS included
    assert cfg.data.video_folder is not None and (cfg.data.template, cfg.data.image_aspect) == ("vicuna_v1", "pad")
    assert "17" in header(recipe) and "136" in header(recipe)


@pytest.mark.parametrize("recipe", ONEVISION, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_onevision_recipes_zip_every_crop_and_frame(recipe):
    cfg = load_config(recipe)
    size = recipe.parent.name.removeprefix("llava-onevision-")
    assert cfg.model.name_or_path == f"llava-hf/llava-onevision-qwen2-{size}-ov-hf"
    assert (cfg.data.template, cfg.data.image_aspect) == ("chat_template", "processor")
    config = zipped(recipe, cfg)
    per_crop = cfg.visionzip.dominant + cfg.visionzip.contextual
    assert tokens_per_image(config, (768, 768)) == 5 * per_crop < tokens_per_image(released_config(recipe), (768, 768))
    largest = tokens_per_image(config, (2304, 2304))  # 1 + 6 x 6 crops
    video = tokens_per_video(config, cfg.data.video_frames)
    assert largest == 37 * per_crop and max(largest, video) + 256 <= cfg.data.max_length, "room for the text"
    assert video < tokens_per_video(released_config(recipe), cfg.data.video_frames)
    text = " ".join(header(recipe).split())
    assert "No official VisionZip recipe exists" in text and "no CLS" in text, "say the budget is a choice, and why"


@pytest.mark.parametrize("recipe", MINI_GEMINI, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_mini_gemini_recipes_zip_every_view_with_a_table_8_budget(recipe):
    """MGM-7B/13B: 54+10 of 576 tokens per image (paper Table 8); HD: the same per view, 5 x 64 of 2,880. The model
    is the directory `convert mini-gemini` writes; the training setup is the LLaVA-1.5 recipes' (MGM's stage 2
    agrees)."""
    cfg = load_config(recipe)
    hd = recipe.parent.name.endswith("-hd")
    config = MiniGeminiConfig(image_size_aux=1536, image_grid=2, image_global=True) if hd else MiniGeminiConfig()
    assert tokens_per_image(config) == (2880 if hd else 576)
    config.visionzip = resolve_budget(config, cfg.visionzip.dominant, cfg.visionzip.contextual)
    assert tokens_per_image(config) == (320 if hd else 64)
    assert cfg.model.name_or_path == f"models/{recipe.parent.name}"
    text = header(recipe)
    assert "convert mini-gemini --checkpoint" in text and f"--output models/{recipe.parent.name}" in text
    assert cfg.train.mode == recipe.stem and cfg.train.projector_modules == "all"
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * GPUS == 128
    assert (cfg.train.lr, cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.train.epochs) == (2e-5, 0.03, 0.0, 1)
    assert cfg.deepspeed.zero_stage == {"projector": 2, "full": 3}[cfg.train.mode]
    assert (cfg.data.template, cfg.data.image_aspect) == ("vicuna_v1", "pad")
    if cfg.train.mode == "projector":
        assert cfg.data.path == "data/llava_v1_5_mix665k_10pct.json"
    assert cfg.output.dir == f"runs/{recipe.parent.name}-{recipe.stem}"
    assert all(budget in recipe.read_text() for budget in ("108+20", "162+30")), "document the budgets"


def test_every_budget_override_is_valid():
    for dominant, contextual in [(54, 10), (108, 20), (162, 30)]:
        cfg = load_config(LLAVA[0], [f"visionzip.dominant={dominant}", f"visionzip.contextual={contextual}"])
        assert cfg.visionzip.dominant + cfg.visionzip.contextual in (64, 128, 192)


def test_demo_recipe_is_self_contained():
    cfg = load_config(ROOT / "recipes/tiny/demo.yaml")
    assert cfg.model.build_tiny_if_missing and cfg.data.build_demo_if_missing
    assert cfg.data.eval_path and cfg.train.mode == "projector" and cfg.visionzip.enabled
    assert cfg.deepspeed.bf16 is False  # CPU


def _qwen_config(recipe: Path, cfg):
    """The released Qwen config's token geometry (patch 14 for Qwen2.5-VL, 16 for Qwen3-VL; 2 x 2 merge) with the
    recipe's budget recorded as apply_visionzip records it."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    patch = 14 if recipe.parent.name.startswith("qwen2.5") else 16
    config_class = Qwen2_5_VLConfig if patch == 14 else Qwen3VLConfig
    config = config_class(vision_config={"patch_size": patch, "spatial_merge_size": 2})
    config.visionzip = {
        "dominant_ratio": cfg.visionzip.dominant_ratio,
        "contextual_ratio": cfg.visionzip.contextual_ratio,
        "merge_space": cfg.visionzip.merge_space,
    }
    return config


@pytest.mark.parametrize("recipe", QWEN, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_qwen_recipes_zip_half_of_each_image_with_the_models_chat_template(recipe):
    cfg = load_config(recipe)
    model = {"qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct"}
    assert cfg.model.name_or_path == model[recipe.parent.name] and cfg.train.mode == recipe.stem
    assert (cfg.visionzip.dominant_ratio, cfg.visionzip.contextual_ratio, cfg.visionzip.merge_space) == (
        0.45,
        0.05,
        "post",
    )
    assert (cfg.data.template, cfg.data.image_aspect) == ("chat_template", "processor")
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * GPUS == 128 and cfg.train.lr == 2e-5
    assert cfg.deepspeed.zero_stage == {"projector": 2, "full": 3}[cfg.train.mode]
    assert cfg.output.dir == f"runs/{recipe.parent.name}-{recipe.stem}"
    # An image the processor resizes to 32 x 32 patches (448 px for patch 14): 256 merged tokens -> 115 + 12.
    config = _qwen_config(recipe, cfg)
    assert tokens_per_image(config, (1, 32, 32)) == 127 and tokens_per_video(config, (4, 32, 32)) == 4 * 127
    text = " ".join(header(recipe).split())
    assert "Where upstream and the paper are silent" in text and "min/max pixels" in text
    if recipe.parent.name == "qwen3-vl-8b":
        assert cfg.train.projector_modules == "all" and "train.projector_modules=merger" in text


RECIPE_FAMILIES = {
    "tiny": "llava",
    "llava-1.5": "llava",
    "llava-next": "llava_next",
    "video-llava": "video_llava",
    "llava-onevision": "llava_onevision",
    "mini-gemini": "mini_gemini",
    "qwen2.5-vl": "qwen2_5_vl",
    "qwen3-vl": "qwen3_vl",
}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: str(r.relative_to(ROOT / "recipes")))
def test_every_key_a_recipe_sets_applies_to_its_family(recipe):
    model = recipe.parent.name if recipe.parent.name == "tiny" else recipe.parent.name.rsplit("-", 1)[0]
    family = RECIPE_FAMILIES[model.removesuffix("-7b")]  # (mini-gemini-7b-hd)
    cfg = load_config(recipe)
    judged = judge_keys(cfg, FAMILIES[family])
    assert not judged.refused and not judged.notices and not cfg.notices
