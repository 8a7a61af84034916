"""``python -m visionzip_tune show``: which patches VisionZip keeps, as a picture
(:mod:`visionzip_tune.inference.picture`).

    python -m visionzip_tune show --model llava-hf/llava-1.5-7b-hf --image cat.jpg --dominant 54 --contextual 10
    python -m visionzip_tune show --projector runs/x/export --image cat.jpg --output kept.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from visionzip_tune.cli.common import (
    VIDEO_FRAMES_RULE,
    refuse_unused_flags,
    add_budget_argument,
    add_media_arguments,
    add_model_arguments,
    budget_of_args,
    checked_media,
    export_record_of,
    prompter_for,
)
from visionzip_tune.errors import UserError
from visionzip_tune.families import family_of, recorded_zips
from visionzip_tune.inference.load import load_model
from visionzip_tune.inference.picture import render, units_of
from visionzip_tune.inference.prompts import image_of, video_frames_of


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune show",
        description="Draw the image (each anyres crop, each video frame) with its patch grid: VisionZip's dominant "
        "patches outlined, each contextual group in its own colour, and the attention scores as a heat map.",
    )
    add_model_arguments(parser)
    add_media_arguments(parser)
    parser.add_argument("--dominant", type=int, help="training-free budget: dominant tokens (default: the export's)")
    parser.add_argument("--contextual", type=int, help="training-free budget: contextual tokens")
    add_budget_argument(parser)
    parser.add_argument("--output", default="kept.png", help="PNG to write (default: kept.png)")
    parser.add_argument("--cell", type=int, help="pixels per patch (default: a unit about 336 px wide)")
    args = parser.parse_args(argv)
    if args.cell is not None and args.cell < 3:
        parser.error("--cell must be >= 3 (an outline needs 2 pixels inside a cell)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_unused_flags(args, (VIDEO_FRAMES_RULE,))
    if args.image is None and args.video is None:
        raise UserError("give an image (--image FILE) and/or a video (--video FILE_OR_DIR) to draw.")
    record = export_record_of(args)
    media = checked_media(args)  # before any weight is read
    budget = budget_of_args(args, ("dominant", "contextual"))
    model, processing, _ = load_model(args.model, args.projector, dtype=args.dtype, device=args.device, **budget)
    if not family_of(model.config).drawable:
        raise UserError(
            f"show draws square patch grids of CLIP / SigLIP towers; {type(model).__name__} zips merged 2 x 2 patch "
            "groups on each image's own grid, which it does not draw yet. Time or score Qwen budgets with "
            "bench-infer or eval."
        )
    if getattr(model.config, "visionzip", None) is None:
        raise UserError(
            "no budget to show: give --dominant and --contextual (e.g. 54 and 10), --budget (e.g. divprune:64), or a "
            "projector export (--projector) tuned with one."
        )
    prompter = prompter_for(model, processing, record, args)
    images = [image_of(media.image)] if media.image else []
    frames = video_frames_of(media.video, prompter.video_frames) if media.video else None
    inputs = prompter.media(images, frames)
    ids = torch.tensor([prompter.prompt([], "Describe it.", inputs)], device=model.device)
    with recorded_zips(model) as recorded, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **prompter.model_inputs(inputs, ids))
    units = units_of(recorded, prompter.transform.image_processor)
    picture, _ = render(units, args.cell)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.output)
    for unit in units:
        print(unit.caption)
    print(f"[show] wrote {args.output} ({len(units)} units)")
    return 0
