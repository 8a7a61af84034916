"""metrics.png: written at the end of a demo training run, and drawn from any run's metrics.jsonl."""

from __future__ import annotations

import json

from conftest import DEMO, train_args
from PIL import Image

from visionzip_tune.training.config import load_config
from visionzip_tune.distributed import init_distributed
from visionzip_tune.training.plots import plot_metrics
from visionzip_tune.training.loop import train


def test_a_demo_run_ends_with_metrics_png(train_assets, tmp_path):
    out = tmp_path / "run"
    train(load_config(DEMO, train_args(train_assets, out, "train.max_steps=2")), init_distributed(), recipe=str(DEMO))
    with Image.open(out / "metrics.png") as picture:
        assert picture.format == "PNG" and picture.size == (1300, 360)


def test_plot_metrics_draws_training_and_per_kind_accuracy(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 5.0 / s, "lr": 1e-3 * s} for s in range(1, 6)]
    records += [
        {"kind": "eval", "step": s, "accuracy": a, "accuracy_image": a, "accuracy_video": a / 2}
        for s, a in ((0, 0.2), (5, 0.6))
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = plot_metrics(tmp_path)
    assert path == tmp_path / "metrics.png"
    with Image.open(path) as picture:
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # curves and text, not a blank canvas


def test_plot_metrics_without_a_held_out_set(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    assert plot_metrics(tmp_path).is_file()
