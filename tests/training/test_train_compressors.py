"""Every family with every compressor its tower can feed, end to end through the same loop: train the projector
(held-out accuracy before and after), export, load the export onto a fresh base, and answer from it as the trained
model does. The demo recipe with ``visionzip.method`` set; tiny random models, demo data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DEMO, records
from transformers import AutoModelForImageTextToText

from visionzip_tune.algorithm.compressors import COMPRESSORS
from visionzip_tune.data.processing import load_processing
from visionzip_tune.distributed import init_distributed
from visionzip_tune.export import load_projector
from visionzip_tune.families import FAMILIES, projector_parameters
from visionzip_tune.inference.chat import Chat
from visionzip_tune.inference.prompts import Prompter
from visionzip_tune.training.config import load_config
from visionzip_tune.training.loop import train

TOKENS = 4  # rows per unit; a square, for pool
QWEN = ("qwen2_5_vl", "qwen3_vl")
CLS_FREE = ("llava_onevision", *QWEN)
PAIRS = [
    (family, name)
    for family in FAMILIES
    for name in COMPRESSORS
    if name != "visionzip" and not (family in CLS_FREE and name in ("vispruner", "prumerge_plus"))
]
QUICK = {("llava", "pool"), ("qwen2_5_vl", "divprune")}


def run_args(family: str, name: str, root: Path, out: Path) -> list[str]:
    """A short run of a tiny ``family`` model on demo data, compressed by ``name`` to TOKENS rows per unit."""
    return [
        f"model.name_or_path={root / family}",
        f"model.tiny.family={family}",
        "model.tiny.tower=null",
        "model.tiny.image_size=112" if family in QWEN else "model.tiny.image_size=56",
        "model.tiny.vision_layers=2",
        f"data.path={root / 'demo' / 'train.json'}",
        f"data.image_folder={root / 'demo' / 'images'}",
        f"data.eval_path={root / 'demo' / 'eval.json'}",
        "data.demo_samples=16",
        "data.template=chat_template",
        "data.image_aspect=processor",
        "data.max_length=512",
        f"visionzip.method={name}",
        f"visionzip.tokens={TOKENS}",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "train.save_every=0",
        "logging.progress_bar=false",
        f"output.dir={out}",
    ]


@pytest.mark.parametrize(
    ("family", "name"), [pytest.param(*pair, marks=() if pair in QUICK else pytest.mark.slow) for pair in PAIRS]
)
def test_every_pair_trains_exports_loads_and_answers(family, name, tmp_path):
    out = tmp_path / "run"
    trained = train(load_config(DEMO, run_args(family, name, tmp_path, out)), init_distributed(), recipe=str(DEMO))
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["vision_tokens_per_unit"] == TOKENS for r in steps)
    assert [r["step"] for r in records(out, "eval")] == [0, 2]  # held-out accuracy before and after

    record = json.loads((out / "export" / "visionzip.json").read_text())
    assert (record["method"], record["tokens"]) == (name, TOKENS)
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / family).eval()
    processing = load_processing(tmp_path / family)
    load_projector(base, out / "export", image_processor=processing.image_processor)
    assert base.config.visionzip == trained.config.visionzip
    tuned = projector_parameters(trained)
    assert all(torch.equal(p, tuned[n].detach()) for n, p in projector_parameters(base).items())

    image = tmp_path / "demo" / "images" / sorted(p.name for p in (tmp_path / "demo" / "images").iterdir())[0]
    answers = []
    for model in (trained.eval(), base):
        chat = Chat(model, Prompter.for_recipe(model, processing, record), image=image, max_new_tokens=3)
        answers.append(chat.ask("What colour is the background?"))
    assert answers[0] == answers[1]
