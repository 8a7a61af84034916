"""Every compressor side by side: what its selection and merge cost next to the vision tower, and the demo's held-out
accuracy training-free and after projector tuning at the same K (the table the paper's claim needs: is the loss at
K tokens a projector misalignment that tuning repairs, for every compressor or for VisionZip alone?).

    python bench/bench_compressors.py [--rounds 7] [--threads 2] [--device cpu] [--dtype float32]
    python bench/bench_compressors.py --no-training          # the cost table only (seconds, not minutes)

Cost: a random CLIP tower at LLaVA-1.5's geometry (336 px / patch 14: 576 patches + CLS, layer -2 of 12 layers,
hidden 256, batch 4) and a SigLIP tower of the same size (no CLS: the compressors that need the CLS attention row
are refused there); each compressor's ``compress`` on the captured layer (its signals computed on first use, as
the families compute them) against the tower run to that layer, K = 64 (VisionZip 54 + 10), interleaved rounds,
medians. CUDA events with ``--device cuda``.

Accuracy: the demo recipe (``recipes/tiny/demo.yaml``: a tiny LLaVA, 64 patches per image, 1,000 synthetic
samples, 300 projector steps) once per compressor at K = 16 (VisionZip 12 + 4, the recipe's), each in its own
process; the held-out accuracy at step 0 is training-free (the untrained projector; the demo's LLM never saw
images) and the last one is after tuning. Runs land in ``runs/bench-compressors/<method>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_visionzip import build_tower, interleaved

from visionzip_tune.algorithm import capture
from visionzip_tune.algorithm.compressors import COMPRESSORS
from visionzip_tune.families.base import layer_signals
from timing import DTYPES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "tiny" / "demo.yaml"


def params_for(name: str, tokens: int) -> dict:
    """The compressor's parameters at ``tokens`` rows per unit (VisionZip split as the paper splits 64 = 54 + 10)."""
    compressor = COMPRESSORS[name]
    if name == "visionzip":
        contextual = round(tokens * 10 / 64)
        return {"dominant": tokens - contextual, "contextual": contextual}
    return compressor.resolve({"tokens": tokens})


def cost_table(args) -> list[str]:
    rows = ["| tower | compressor | selection + merge | share of the tower |", "|---|---|---|---|"]
    for kind in ("clip", "siglip"):
        dtype = DTYPES[args.dtype]
        tower = build_tower(kind, 336, args.hidden, args.layers, args.heads, args.device, dtype)
        layer = capture.resolve_layer(args.layers, -2)
        pixels = torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=dtype)
        has_cls = kind == "clip"
        with torch.no_grad():
            captured = capture.run_until(tower, pixels, layer)
        usable = {
            name: c
            for name, c in COMPRESSORS.items()
            if c.needs(has_cls) <= layer_signals(captured, (24, 24), pixels).available()
        }
        variants = {"tower": lambda: capture.run_until(tower, pixels, layer)}
        for name, compressor in usable.items():
            params = params_for(name, 64)
            # Fresh signals every call: their attention scores and keys are part of the selection's cost.
            variants[name] = lambda c=compressor, p=params: c.compress(layer_signals(captured, (24, 24), pixels), p)
        times = interleaved(variants, args)
        tower_ms = statistics.median(times["tower"])
        for name in COMPRESSORS:
            if name not in usable:
                rows.append(f"| {kind} | {name} | refused (needs the CLS attention row) | - |")
                continue
            ms = statistics.median(times[name])
            rows.append(f"| {kind} | {name} | {ms:.2f} ms | {100 * ms / tower_ms:.1f}% of {tower_ms:.0f} ms |")
    return rows


def demo_accuracy(name: str, tokens: int) -> tuple[float, float, float]:
    """(training-free, tuned accuracy, minutes) of the demo recipe with ``name`` at ``tokens`` rows per image."""
    out = ROOT / "runs" / "bench-compressors" / name
    budget = [f"visionzip.method={name}"] + ([f"visionzip.tokens={tokens}"] if name != "visionzip" else [])
    command = [sys.executable, "-m", "visionzip_tune", "train", str(DEMO), *budget, f"output.dir={out}"]
    command += ["train.resume=never", "logging.progress_bar=false"]
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - started) / 60
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    return evals[0]["accuracy"], evals[-1]["accuracy"], minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--no-training", action="store_true", help="the cost table only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"selection + merge cost, K = 64, medians of {args.rounds} rounds on {args.device} ({args.dtype}):")
    print("\n".join(cost_table(args)))
    if args.no_training:
        return
    print("\ndemo held-out accuracy at K = 16 of 64 patches (chance ~0.24), projector tuned for 300 steps:")
    print("| compressor | training-free | tuned | minutes |\n|---|---|---|---|")
    for name in COMPRESSORS:
        free, tuned, minutes = demo_accuracy(name, 16)
        print(f"| {name} | {free:.3f} | {tuned:.3f} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()
