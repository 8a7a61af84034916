"""``python -m visionzip_tune convert mini-gemini``: an original Mini-Gemini checkpoint -> a transformers-5 model
directory (:mod:`visionzip_tune.models.mini_gemini.convert_mini_gemini`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from visionzip_tune.models.mini_gemini.convert_mini_gemini import convert_mini_gemini


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune convert",
        description="Convert an original checkpoint of another code base into a transformers-5 model directory.",
    )
    models = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    mgm = models.add_parser(
        "mini-gemini",
        help="an original Mini-Gemini (dvlab-research/MGM) checkpoint",
        description="Convert an original Mini-Gemini checkpoint (config.json with mm_* keys, weights, tokenizer) "
        "into a directory that AutoModelForImageTextToText loads after `import visionzip_tune`.",
    )
    mgm.add_argument("--checkpoint", type=Path, required=True, help="the MGM checkpoint directory")
    mgm.add_argument("--output", type=Path, required=True, help="directory to create (must not exist)")
    mgm.add_argument("--clip", type=Path, help="a transformers CLIP save, for a checkpoint without CLIP weights")
    mgm.add_argument(
        "--convnext", type=Path, help="LAION's open_clip ConvNeXt file, for a checkpoint without ConvNeXt weights"
    )
    args = parser.parse_args(argv)
    output = convert_mini_gemini(args.checkpoint, args.output, args.clip, args.convnext)
    print(f"[convert] done: {output}")
    return 0
