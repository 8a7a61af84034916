"""``python -m visionzip_tune data {subset,check,preview,demo}``."""

from __future__ import annotations

import argparse
import json
import sys

from transformers import AutoConfig

from visionzip_tune import families
from visionzip_tune.training import build
from visionzip_tune.data.check import check_data
from visionzip_tune.data.config import (
    DEFAULT_IMAGE_ASPECT,
    DEFAULT_TEMPLATE,
    DEFAULT_VIDEO_FRAMES,
    IMAGE_ASPECTS,
    TEMPLATES,
    DataConfig,
)
from visionzip_tune.data.dataset import SupervisedDataset
from visionzip_tune.demo.dataset import make_demo_dataset
from visionzip_tune.data.source import load_samples
from visionzip_tune.data.subset import manifest_path, parse_fraction, write_subset
from visionzip_tune.data.validate import BadSample
from visionzip_tune.errors import UserError
from visionzip_tune.cli.common import FlagRule, refuse_unused_flags
from visionzip_tune.data.processing import load_processing


def _subset(args: argparse.Namespace) -> int:
    fraction = parse_fraction(args.fraction) if args.fraction is not None else None
    if args.count is not None and args.count < 1:
        raise UserError(f"--count must be at least 1, not {args.count}")
    manifest = write_subset(args.data, args.output, seed=args.seed, fraction=fraction, count=args.count)
    print(
        f"wrote {manifest['output_samples']} of {manifest['input_samples']} samples to {args.output} "
        f"(manifest: {manifest_path(args.output)})"
    )
    for name, counts in manifest["sources"].items():
        print(f"  {name:<20} {counts['in']:>8} -> {counts['out']:>7}")
    return 0


def _check(args: argparse.Namespace) -> int:
    report = check_data(
        args.data,
        args.image_folder,
        video_folder=args.video_folder,
        video_frames=DEFAULT_VIDEO_FRAMES if args.video_frames is None else args.video_frames,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(report.summary(args.data))
    return 1 if report.bad else 0


def _render(tokenizer, ids: list[int], labels: list[int], image_token_id: int, video_token_id: int | None) -> str:
    """The decoded sample with supervised spans in «» and each image / video run shown as <image×K> / <video×K>."""
    placeholders = {image_token_id: "image", video_token_id: "video"}
    kinds = [placeholders.get(t, "answer" if y != -100 else "prompt") for t, y in zip(ids, labels)]
    out, done, start = [], "", 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and kinds[end] == kinds[start]:
            continue
        text = tokenizer.decode(ids[:end], skip_special_tokens=False)
        piece, done = text[len(done) :], text
        if kinds[start] in ("image", "video"):
            piece = f"<{kinds[start]}×{end - start}>"
        elif kinds[start] == "answer":
            piece = f"«{piece}»"
        out.append(piece)
        start = end
    return "".join(out)


PREVIEW_BUDGET_FLAGS = ("dominant", "contextual", "dominant_ratio", "contextual_ratio")


def _preview_budget(args: argparse.Namespace, family: families.Family) -> dict:
    """The budget the preview counts with: the family's pair (tokens per image, or Qwen's ratios), both given or
    neither; a flag of the other pair is refused, not ignored."""
    budget = {key: getattr(args, key) for key in PREVIEW_BUDGET_FLAGS if getattr(args, key) is not None}
    pair = [f"--{key.replace('_', '-')}" for key in family.budget.keys[:2]]
    other = [f"--{key.replace('_', '-')}" for key in budget if key not in family.budget.keys]
    if other:
        raise UserError(
            f"--model {args.model} is a {family.model_class}: {' and '.join(other)} do(es) not apply to it; give its "
            f"VisionZip budget as {' and '.join(pair)}"
        )
    if budget and len(budget) != 2:
        raise UserError(f"give both {pair[0]} and {pair[1]} (the VisionZip budget), or neither")
    return budget


def _preview(args: argparse.Namespace) -> int:
    try:
        config = AutoConfig.from_pretrained(args.model)
        processing = load_processing(args.model)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {args.model}: cannot load a saved model config and processor ({err})") from None
    family = families.family_of(config)
    budget = _preview_budget(args, family)
    no_video = f"{family.model_class} has no video input: leave it out"
    refuse_unused_flags(args, [FlagRule(("video_folder", "video_frames"), lambda _: family.has_video, no_video)])
    if budget:
        config.visionzip = budget
    data = DataConfig(
        image_folder=args.image_folder,
        video_folder=args.video_folder,
        video_frames=DEFAULT_VIDEO_FRAMES if args.video_frames is None else args.video_frames,
        template=args.template,
        image_aspect=args.image_aspect,
        max_length=args.max_length,
        on_bad_sample="skip",
    )
    dataset = SupervisedDataset(load_samples(args.data), data, processing, build.placeholders(config))
    tokenizer, placeholders = processing.tokenizer, dataset.placeholders
    for row in dataset.rows[: args.n]:
        sample = dataset.samples[row]
        try:
            example = dataset.example(sample)
        except BadSample as bad:
            print(
                json.dumps({"id": sample["id"], "dropped": bad.reason})
                if args.json
                else f"=== id {sample['id']}: dropped: {bad.reason}\n"
            )
            continue
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        if args.json:
            print(json.dumps({"id": example["id"], "input_ids": ids, "labels": labels}))
        else:
            supervised = sum(1 for y in labels if y != -100)
            print(f"=== id {example['id']}: {len(ids)} tokens, {supervised} supervised (in «»)")
            print(_render(tokenizer, ids, labels, placeholders.image_token_id, placeholders.video_token_id) + "\n")
    if dataset.read_skipped():
        print(dataset.skip_summary(), file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UserError(f"--n must be at least 1, not {args.n}")
    if not 0 <= args.videos <= args.n:
        raise UserError(f"--videos must be between 0 and --n ({args.n}), not {args.videos}")
    paths = make_demo_dataset(args.output, n=args.n, seed=args.seed, n_eval=args.n_eval, videos=args.videos)
    what = "images and video frames" if args.videos else "images"
    print(f"wrote {paths.train}, {paths.eval} and {what} in {paths.images} (use it as the image folder)")
    return 0


def _video_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video-folder", help="folder the samples' video paths are relative to (default: image folder)")
    p.add_argument(
        "--video-frames",
        type=int,
        help=f"frames sampled per video (default {DEFAULT_VIDEO_FRAMES})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune data", description="Prepare and inspect LLaVA-format training data."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("subset", help="seeded subset stratified by source (the image's first folder)")
    p.add_argument("--data", required=True, help="LLaVA JSON array or JSONL file")
    p.add_argument("--output", required=True, help="subset JSON to write; a .manifest.json is written next to it")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--fraction", help="share of samples to keep, e.g. 0.1 or 1/10")
    amount.add_argument("--count", type=int, help="number of samples to keep")
    p.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    p.set_defaults(run=_subset)

    p = commands.add_parser("check", help="validate every sample, decode every image and video; lists unusable ones")
    p.add_argument("--data", required=True, help="LLaVA JSON array or JSONL file")
    p.add_argument("--image-folder", help="folder the samples' image paths are relative to")
    _video_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="processes that decode images (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_check)

    p = commands.add_parser("preview", help="show how samples are templated, supervised spans marked")
    p.add_argument("--data", required=True, help="LLaVA JSON array or JSONL file")
    p.add_argument("--image-folder", help="folder the samples' image paths are relative to")
    _video_arguments(p)
    p.add_argument("--model", required=True, help="local directory written by save_pretrained (config + processor)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES)
    p.add_argument("--dominant", type=int, help="VisionZip dominant tokens per image (with --contextual)")
    p.add_argument("--contextual", type=int, help="VisionZip contextual tokens per image (with --dominant)")
    p.add_argument("--dominant-ratio", type=float, help="Qwen: VisionZip dominant tokens as a fraction of each image's")
    p.add_argument("--contextual-ratio", type=float, help="Qwen: VisionZip contextual tokens as a fraction of them")
    p.add_argument("--n", type=int, default=3, help="number of samples to show (default 3)")
    p.add_argument("--max-length", type=int, default=2048, help="token budget per sample (default 2048)")
    p.add_argument("--image-aspect", default=DEFAULT_IMAGE_ASPECT, choices=IMAGE_ASPECTS)
    p.add_argument("--json", action="store_true", help='one {"id", "input_ids", "labels"} object per line')
    p.set_defaults(run=_preview)

    p = commands.add_parser("demo", help="write the synthetic shapes dataset (train.json, eval.json, images/)")
    p.add_argument("--output", required=True, help="directory to create (a previous demo there is replaced)")
    p.add_argument("--n", type=int, default=1000, help="training samples (default 1000)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out samples (default max(8, n/4))")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    p.add_argument("--videos", type=int, default=0, help="how many of the --n samples are videos (default 0)")
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
