"""``python -m visionzip_tune launch [RECIPE] [key=value ...]``: check a recipe, then train it under torchrun (what
``bash train.sh`` runs; :mod:`visionzip_tune.training.launch`)."""

from __future__ import annotations

import argparse

from visionzip_tune.cli.common import add_recipe_arguments, recipe_and_overrides
from visionzip_tune.training.config import load_config
from visionzip_tune.training.launch import launch
from visionzip_tune.training.preemption import EXIT_INTERRUPTED
from visionzip_tune.training.preflight import preflight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune launch",
        description="Check a recipe, then train it under torchrun on this node (what bash train.sh runs). "
        "NPROC_PER_NODE (default: the visible GPUs, or 1 on the CPU), NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT "
        "come from the environment. Exit status: 0 done, 2 user error, 75 interrupted after a checkpoint "
        "(run the same command to resume).",
    )
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(recipe, overrides)
    preflight(cfg)
    status = launch([recipe, *overrides] if recipe else overrides, cfg)
    if status in (0, EXIT_INTERRUPTED):
        print(f"run directory: {cfg.output.dir}")
    return status
