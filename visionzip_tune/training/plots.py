"""``metrics.png``: a run's curves at a glance (training loss, learning rate, held-out accuracy overall and per kind
of sample), drawn from its ``metrics.jsonl`` at the end of training.

matplotlib's object API with its Agg canvas: no pyplot, no global backend, no display needed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from visionzip_tune.training.metrics import read_metrics

PLOT_FILE = "metrics.png"


def plot_metrics(run_dir: str | Path) -> Path:
    """Write ``run_dir/metrics.png`` from ``run_dir/metrics.jsonl``; returns its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    loss, lr, accuracy = figure.subplots(1, 3)
    steps = [r["step"] for r in train]
    loss.plot(steps, [r["loss"] for r in train], linewidth=1)
    loss.set(title="training loss", xlabel="step")
    lr.plot(steps, [r["lr"] for r in train], linewidth=1)
    lr.set(title="learning rate", xlabel="step")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    kinds = sorted({key for r in evals for key in r if key.startswith("accuracy_")})
    accuracy.set(title="held-out accuracy", xlabel="step", ylim=(0, 1))
    if evals:
        for key in ["accuracy", *kinds]:
            points = [(r["step"], r[key]) for r in evals if key in r]
            label = "all" if key == "accuracy" else key.removeprefix("accuracy_")
            accuracy.plot(*zip(*points), marker="o", linewidth=2 if key == "accuracy" else 1, label=label)
        accuracy.legend(loc="lower right")
    else:  # an empty plot() would collapse the constrained layout
        accuracy.text(0.5, 0.5, "no held-out set (data.eval_path)", ha="center", va="center")
    path = run_dir / PLOT_FILE
    figure.savefig(path, dpi=100)
    return path
