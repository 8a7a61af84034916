"""``python -m visionzip_tune export --run DIR [--checkpoint NAME] [--output DIR]``: export a checkpoint of a run
(:func:`visionzip_tune.training.export_run.export_run`)."""

from __future__ import annotations

import argparse

from visionzip_tune.training.export_run import export_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune export",
        description="Export the trained projector of a run directory: projector.safetensors (HF names), "
        "mm_projector.bin (original LLaVA / Mini-Gemini names; Mini-Gemini adds the same in mm_projector.safetensors "
        "with model.safetensors.index.json) and visionzip.json (budget, base model fingerprint, recipe).",
    )
    parser.add_argument("--run", required=True, help="run directory (the output.dir of a training run)")
    parser.add_argument("--checkpoint", help="checkpoint name under RUN/checkpoints (default: the latest)")
    parser.add_argument("--output", help="export directory (default: RUN/export; replaced atomically)")
    args = parser.parse_args(argv)
    print(export_run(args.run, args.checkpoint, args.output))
    return 0
