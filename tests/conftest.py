"""Shared fixtures: tiny random LLaVA models (CLIP and SigLIP towers) and a local tokenizer. No downloads.

Session-scoped fixtures save each tiny model once with ``save_pretrained``; tests that mutate a model load a fresh
copy through the ``load_tiny`` helper so they never leak state into each other.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path

import pytest
import torch

from visionzip_tune.demo.tiny import TinySpec, build_tiny_with_processor, save_tiny

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "tiny" / "demo.yaml"  # the demo recipe the training tests override


def records(run_dir, kind: str) -> list[dict]:
    """The ``kind`` ("train" or "eval") records of a run's metrics.jsonl, in order."""
    from visionzip_tune.training.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def load_tiny(path):
    """A fresh ``(model, processor)`` from a directory written by ``save_tiny``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path)
    model.eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP-tower LLaVA on disk: 224 px, patch 14 -> 256 patches + CLS, 4 vision layers."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-clip", TinySpec(tower="clip"))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """A tiny SigLIP-tower LLaVA on disk: 224 px, patch 14 -> 256 patches, no CLS."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-siglip", TinySpec(tower="siglip"))


@pytest.fixture
def tiny_clip(tiny_clip_dir):
    """A fresh ``(model, processor)`` pair with a CLIP tower."""
    return load_tiny(tiny_clip_dir)


@pytest.fixture
def tiny_siglip(tiny_siglip_dir):
    """A fresh ``(model, processor)`` pair with a SigLIP tower."""
    return load_tiny(tiny_siglip_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The locally built Llama-shaped tokenizer (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``, ``<image>``)."""
    return build_tiny_with_processor(TinySpec())[1].tokenizer


def fed_to_llm(model, **inputs) -> tuple[object, dict[str, torch.Tensor]]:
    """``(output, rows)``: run ``model(**inputs)`` and return, per kind of placeholder (``"image"``, ``"video"``), the
    rows of the LLM's input embeddings at its placeholder positions, i.e. the vision features the model actually
    feeds its language model, (n, text hidden) in order. Read from the language model's own input, so it does not
    depend on how a transformers release reports features in its outputs (5.23 vs 5.24 ``image_hidden_states``).
    """
    from visionzip_tune.families import language_model

    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach()

    handle = language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    ids, config = inputs["input_ids"], model.config
    kinds = {"image": config.image_token_id, "video": getattr(config, "video_token_id", None)}
    rows = {kind: captured["embeds"][ids == token] for kind, token in kinds.items() if token is not None}
    return out, rows


def perturb_projector(model, seed: int = 1) -> dict:
    """Change the projector as training would; returns its new tensors by in-projector name (``linear_1.weight``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.model.multi_modal_projector.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return {name: p.detach().clone() for name, p in model.model.multi_modal_projector.named_parameters()}


@pytest.fixture
def tiny_clip_export(tiny_clip, tiny_clip_dir, tmp_path):
    """``(model, processor, tensors, export_dir)``: a tiny CLIP LLaVA zipped to 54 + 10 whose projector was
    perturbed as if trained (``tensors``), exported to ``tmp_path / "export"`` (recorded step 7)."""
    from visionzip_tune.export import export_projector
    from visionzip_tune.families import apply_visionzip

    model, processor = tiny_clip
    apply_visionzip(model, 54, 10, processor=processor)
    tensors = perturb_projector(model)
    out = export_projector(model, tmp_path / "export", metadata={"base_model": str(tiny_clip_dir), "step": 7})
    return model, processor, tensors, out


# ---------------------------------------------------------------------------------------------------------------
# Training (tests/training/): a model and data small enough for many short runs.

TRAIN_SPEC = TinySpec(tower="clip", image_size=56, patch_size=14, vision_layers=2)  # 16 patches + CLS


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """``(model_dir, demo_paths)``: a tiny CLIP LLaVA at 56 px (16 patches + CLS) saved with ``save_pretrained``,
    and a demo dataset of 24 training samples (a few text-only) and 8 held-out samples with choices."""
    from visionzip_tune.demo.dataset import make_demo_dataset

    root = tmp_path_factory.mktemp("train-assets")
    model_dir = save_tiny(root / "tiny-llava", TRAIN_SPEC)
    return model_dir, make_demo_dataset(root / "demo", n=24, seed=0, n_eval=8)


def train_args(assets, out_dir, *overrides: str) -> list[str]:
    """``key=value`` overrides for a short CPU run of the demo recipe on ``train_assets`` into ``out_dir``."""
    model_dir, paths = assets
    return [
        f"model.name_or_path={model_dir}",
        "model.build_tiny_if_missing=false",
        f"data.path={paths.train}",
        f"data.image_folder={paths.images}",
        f"data.eval_path={paths.eval}",
        "data.build_demo_if_missing=false",
        "data.num_workers=0",
        "visionzip.dominant=6",
        "visionzip.contextual=2",
        "train.max_steps=3",
        "train.micro_batch_size=4",
        "train.lr=1e-2",
        "train.warmup_ratio=0",
        "train.save_every=0",
        "logging.progress_bar=false",
        f"output.dir={out_dir}",
        *overrides,
    ]


def text_only_samples(n: int) -> list[dict]:
    """``n`` LLaVA-format samples without an image (like the ShareGPT part of the LLaVA-1.5 mix)."""
    qa = [("What is the capital of France?", "Paris"), ("How many sides does a triangle have?", "three")]
    return [
        {"id": f"text-{k}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for k, (q, a) in enumerate(qa[k % len(qa)] for k in range(n))
    ]


def greedy_answer(model, tokenizer, item: dict, max_new_tokens: int) -> tuple[str, list[int]]:
    """``(answer, prompt ids)``: the greedy answer to a training item's last question, the prompt being the item
    cut where its last answer's supervised labels begin (what ``generate`` must build from the same media)."""
    from visionzip_tune.data.template import IGNORE_INDEX

    labels = item["labels"].tolist()
    start = len(labels)
    while labels[start - 1] != IGNORE_INDEX:
        start -= 1
    from visionzip_tune.families import id_inputs

    prompt = item["input_ids"][:start]
    config = model.config
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt[None],
            attention_mask=torch.ones_like(prompt[None]),
            **item["vision"],
            **id_inputs(config, prompt[None]),  # Qwen: mm_token_type_ids
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=[
                t for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None
            ],
        )
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip(), prompt.tolist()


def cli_error(argv: list[str], capsys) -> str:
    """The one-paragraph error of ``python -m visionzip_tune ARGV``, which must exit with status 2, no traceback."""
    from visionzip_tune.__main__ import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    return " ".join(err.split())


# ---------------------------------------------------------------------------------------------------------------
# Inference tools and evaluation (tests/inference/, tests/evaluation/).


def lmms_eval_or_skip():
    """lmms-eval, or a skip where it is not installed (bash tools/install_eval.sh); CI sets VZT_REQUIRE_LMMS_EVAL=1
    so that a broken install fails instead of skipping."""
    if os.environ.get("VZT_REQUIRE_LMMS_EVAL"):
        import lmms_eval

        return lmms_eval
    return pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (bash tools/install_eval.sh)")


EVAL_SPEC = TinySpec(tower="clip", image_size=56, patch_size=14, vision_layers=2)  # 4 x 4 patches + CLS


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory):
    """``(model_dir, export_dir, demo_paths)``: a tiny CLIP LLaVA at 56 px, an export of it zipped to 6 + 2 with a
    projector changed as training would, and a demo dataset with 12 held-out samples (choices)."""
    from visionzip_tune.demo.dataset import make_demo_dataset
    from visionzip_tune.export import export_projector
    from visionzip_tune.families import apply_visionzip

    root = tmp_path_factory.mktemp("eval-assets")
    model_dir = save_tiny(root / "tiny-llava", EVAL_SPEC)
    model, _ = load_tiny(model_dir)
    apply_visionzip(model, 6, 2)
    perturb_projector(model, seed=3)
    export = export_projector(model, root / "export", metadata={"base_model": str(model_dir)})
    return model_dir, export, make_demo_dataset(root / "demo", n=8, seed=0, n_eval=12)
