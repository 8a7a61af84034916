"""``python -m visionzip_tune train [RECIPE] [key=value ...]``: fine-tune a VLM with VisionZip in the data path (one
process of the run; ``bash train.sh`` starts them under torchrun). The run is :mod:`visionzip_tune.training.loop`."""

from __future__ import annotations

import argparse

from visionzip_tune.cli.common import add_recipe_arguments, recipe_and_overrides
from visionzip_tune.training.config import help_table, load_config, to_yaml
from visionzip_tune.training.loop import run_worker
from visionzip_tune.training.preflight import preflight

DESCRIPTION = "Fine-tune a VLM with VisionZip in the data path."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune train",
        description=DESCRIPTION,
        epilog="example: bash train.sh recipes/llava-1.5-7b/projector.yaml visionzip.dominant=108 "
        "visionzip.contextual=20   (--help-config lists every key)",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its doc and exit")
    parser.add_argument(
        "--check", action="store_true", help="check the config and input paths, print output.dir and exit"
    )
    args = parser.parse_args(argv)
    if args.help_config:
        print(help_table())
        return 0
    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(recipe, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.check:  # cheap checks, before torchrun starts anything (the launcher runs them too)
        preflight(cfg)
        print(cfg.output.dir)
        return 0
    return run_worker(cfg, recipe)
