"""``python -m visionzip_tune bench-infer``: where inference time goes, per stage, for the stock model, VisionZip
budgets and a tuned projector, on one image (and/or video) and one prompt (:mod:`visionzip_tune.inference.timing`).

    python -m visionzip_tune bench-infer --model llava-hf/llava-1.5-7b-hf --image cat.jpg --budgets 64,128,192
    python -m visionzip_tune bench-infer --projector runs/x/export --image cat.jpg --json bench.json

``--warmup`` untimed rounds, then ``--repeats`` timed rounds of every setting; prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visionzip_tune.cli.common import (
    VIDEO_FRAMES_RULE,
    refuse_unused_flags,
    add_media_arguments,
    add_model_arguments,
    checked_media,
    export_record_of,
    prompter_for,
)
from visionzip_tune.errors import UserError
from visionzip_tune.inference.load import load_model
from visionzip_tune.inference.prompts import image_of, video_frames_of
from visionzip_tune.inference.timing import add_ratios, summary, table, timed_rounds
from visionzip_tune.inference.variants import Switcher, parse_budgets, plan


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune bench-infer",
        description="Time inference per stage (vision tower, VisionZip, projector, LLM prefill, TTFT, decode) for "
        "the stock model and each budget; medians after warm-up; the paper's FLOP estimate next to the measured "
        "ratios.",
    )
    add_model_arguments(parser)
    add_media_arguments(parser)
    parser.add_argument(
        "--budgets",
        help="comma-separated budgets, DOMINANT+CONTEXTUAL or a token total split as the paper does, e.g. 64,128,192; "
        "Qwen: ratios of each image's tokens, e.g. 0.45+0.05 (default: the export's budget; none without --projector)",
    )
    parser.add_argument("--prompt", default="Describe the image in detail.", help="the question asked")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per measurement (default 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations before measuring (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations; medians reported (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    for flag, value, least in (("--new-tokens", args.new_tokens, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            parser.error(f"{flag} must be >= {least}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_unused_flags(args, (VIDEO_FRAMES_RULE,))
    if args.image is None and args.video is None:
        raise UserError("give an image (--image FILE) and/or a video (--video FILE_OR_DIR) to run inference on.")
    record = export_record_of(args)
    settings = plan(None if args.budgets is None else parse_budgets(args.budgets), record)
    media = checked_media(args)  # before any weight is read
    images = [image_of(media.image)] if media.image else []
    model, processing, _ = load_model(args.model or record["base_model"], None, dtype=args.dtype, device=args.device)
    prompter = prompter_for(model, processing, record, args)
    switch = Switcher(model, args.projector, record)
    frames = video_frames_of(media.video, prompter.video_frames) if media.video else None
    rounds = dict(new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats)
    samples = timed_rounds(settings, switch, prompter, images, frames, args.prompt, **rounds)
    rows = []
    for setting in settings:
        switch.to(setting)
        peak = max(s["peak"] for s in samples[setting.label]) if model.device.type == "cuda" else None
        rows.append(
            summary(
                setting, model, prompter, images, frames, args.prompt, args.new_tokens, samples[setting.label], peak
            )
        )
    add_ratios(rows)
    device = str(model.device)
    report = {
        "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "timer": "cuda events" if device.startswith("cuda") else "perf_counter",
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "runs": rows,
    }
    print(
        f"device {device}, {report['dtype']}, {report['timer']}; medians of {args.repeats} after {args.warmup} warm-up"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"[bench-infer] wrote {args.json}", file=sys.stderr)
    return 0
