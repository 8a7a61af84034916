"""``python -m visionzip_tune cache [RECIPE] [key=value ...]``: build the compressed-feature cache of a recipe's
training data into ``train.feature_cache`` (README: Feature cache), under torchrun on this node's GPUs like ``train.sh``
(``NPROC_PER_NODE``, ``NNODES``, ... as for ``launch``); each torchrun worker runs this command again and builds its
share (:mod:`visionzip_tune.training.cache_command`)."""

from __future__ import annotations

import argparse
from visionzip_tune.cli.common import add_recipe_arguments, recipe_and_overrides
from visionzip_tune.errors import UserError
from visionzip_tune.feature_cache import BATCH_SIZE, SHARD_ENTRIES
from visionzip_tune.training.cache import build_options
from visionzip_tune.training.cache_command import run_cache_command, under_torchrun
from visionzip_tune.training.config import load_config
from visionzip_tune.training.preflight import preflight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune cache",
        description="Run the frozen tower and the compression once over a recipe's training data and store their "
        "rows in train.feature_cache, for training to read (train.feature_cache=DIR). Inference only, on every "
        "visible GPU (NPROC_PER_NODE), resumable: a killed build goes on from its complete shards. Exit status: 0 "
        "done, 2 user error.",
        epilog="example: python -m visionzip_tune cache recipes/llava-1.5-7b/projector.yaml "
        "train.feature_cache=cache/llava-1.5-7b   (then train with the same train.feature_cache)",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--batch-size", type=int, help=f"samples per tower call (default {BATCH_SIZE})")
    parser.add_argument("--shard-entries", type=int, help=f"entries per shard file (default {SHARD_ENTRIES})")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "shard_entries"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a number of at least 1")
    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(recipe, overrides)
    options = build_options(cfg, args.batch_size, args.shard_entries)
    if not under_torchrun():  # checked once, before any rank starts
        if not cfg.train.feature_cache:
            raise UserError(
                "the cache command builds train.feature_cache: set it to a directory (train.feature_cache=DIR)"
            )
        preflight(cfg)
    return run_cache_command(cfg, options, list(argv) if argv is not None else [])
