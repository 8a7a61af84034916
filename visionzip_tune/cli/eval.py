"""``python -m visionzip_tune eval``: lmms-eval benchmarks for the stock model, each training-free VisionZip budget and
the tuned projector, reported as the VisionZip paper does: each score and each budget's average as a percentage of
stock, next to what each run cost (:mod:`visionzip_tune.evaluation.runner`).

    python -m visionzip_tune eval --projector runs/x/export --tasks gqa,pope,mme,scienceqa_img,textvqa_val
    NPROC_PER_NODE=8 python -m visionzip_tune eval --model llava-hf/llava-1.5-7b-hf --tasks gqa --budgets 64,128
    python -m visionzip_tune eval --model data/tiny-llava-demo --projector runs/tiny-demo/export \\
        --held-out data/demo/eval.json --image-folder data/demo/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

from visionzip_tune.cli.common import FlagRule, add_model_arguments, export_record_of, refuse_unused_flags
from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.batch_size import parse_batch_size
from visionzip_tune.evaluation.benchmarks import parse_metrics, require_lmms_eval
from visionzip_tune.evaluation.runner import EvalPlan, run
from visionzip_tune.evaluation.tower_share import DEFAULT_GIB
from visionzip_tune.inference.variants import parse_budgets, plan
from visionzip_tune.loading import check_model_source


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune eval",
        description="Evaluate the stock model, training-free VisionZip budgets and a tuned projector with lmms-eval; "
        "report each score and each budget's average as a percentage of stock (the VisionZip paper's tables), with "
        "requests/s, prompt tokens and time to first token. NPROC_PER_NODE processes (default: the visible GPUs, or "
        "1 on the CPU) share the requests; the same command run again resumes from OUTPUT/answers/.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--tasks",
        default="",
        help="comma-separated lmms-eval tasks, e.g. gqa,pope,mme,scienceqa_img,textvqa_val,vqav2_val_lite,"
        "mmmu_val,seedbench,mmbench_en_dev",
    )
    parser.add_argument(
        "--budgets",
        help="comma-separated training-free budgets, DOMINANT+CONTEXTUAL or a token total split as the paper does, "
        "e.g. 54+10,108+20 or 64,128,192; Qwen: ratios of each image's tokens, e.g. 0.45+0.05 (default: the export's "
        "budget; none without --projector)",
    )
    parser.add_argument("--include-path", action="append", default=[], help="folder of extra task YAMLs (repeatable)")
    parser.add_argument(
        "--held-out",
        metavar="JSON",
        help="also evaluate a held-out LLaVA JSON with 'choices' (the demo's eval.json) as two local tasks, "
        "heldout_gen (exact answer) and heldout_mc (likelihood of the choices)",
    )
    parser.add_argument("--image-folder", help="with --held-out: the folder its 'image' paths are relative to")
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="TASK=METRIC",
        help="the metric the table shows for TASK (repeatable; default: the paper's, else the task's first)",
    )
    parser.add_argument("--limit", type=float, help="documents per task (an int), or a fraction of each task")
    parser.add_argument(
        "--batch-size",
        default="auto",
        help="requests per batch on each process, or auto (default): the largest that fits the GPU (8 on a CPU)",
    )
    parser.add_argument("--max-batch-size", type=int, help="with --batch-size auto: the size to start from (64)")
    parser.add_argument(
        "--tower-share-gib",
        type=float,
        default=DEFAULT_GIB,
        help="CPU memory per process for the frozen part of the media seen (the tower and the compression), so the "
        "settings at one budget (training-free, tuned) and the choices of a question run the tower once per image "
        f"(default {DEFAULT_GIB:g}; 0: off)",
    )
    parser.add_argument("--output-dir", default="eval", help="where results.json and table.md go (default: eval)")
    parser.add_argument("--verbose", action="store_true", help="show lmms-eval's INFO log lines")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        parser.error("--limit must be > 0")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    if args.max_batch_size is not None and args.max_batch_size < 1:
        parser.error("--max-batch-size must be >= 1")
    if args.tower_share_gib < 0:
        raise UserError(f"--tower-share-gib {args.tower_share_gib:g}: give a size of at least 0 GiB (0 turns it off)")
    return args


FLAG_RULES = (
    FlagRule(
        ("image_folder",),
        lambda args: args.held_out is not None,
        "it is the folder of --held-out's images, and no --held-out is given: give --held-out, or leave it out",
    ),
    FlagRule(
        ("max_batch_size",),
        lambda args: args.batch_size == "auto",
        "it is where --batch-size auto starts its search, and --batch-size is a number: leave one of them out",
    ),
)


def _check_inputs(args: argparse.Namespace) -> None:
    """The paths of the command line, checked before lmms-eval indexes its tasks and before any weight is read:
    :class:`UserError` naming the flag."""
    if args.model is not None:
        check_model_source(args.model, key="--model")
    if args.held_out and not args.image_folder:
        raise UserError("--held-out needs --image-folder, the folder its samples' 'image' paths are relative to.")
    if args.held_out and not Path(args.held_out).is_file():
        raise UserError(f"--held-out {args.held_out}: no such file (relative paths start at {Path.cwd()}).")
    folders = [("--image-folder", args.image_folder)] + [("--include-path", path) for path in args.include_path]
    for flag, folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder}: no such folder (relative paths start at {Path.cwd()}).")


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    args = parse_args(argv)
    refuse_unused_flags(args, FLAG_RULES)
    require_lmms_eval()
    record = export_record_of(args)
    _check_inputs(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks and not args.held_out:
        raise UserError("give lmms-eval tasks (--tasks gqa,pope,...) and/or a held-out JSON (--held-out).")
    eval_plan = EvalPlan(
        model=args.model,
        projector=args.projector,
        record=record,
        settings=plan(None if args.budgets is None else parse_budgets(args.budgets), record),
        tasks=tasks,
        include=[str(Path(p).resolve()) for p in args.include_path],
        held_out=args.held_out,
        image_folder=args.image_folder,
        metrics=parse_metrics(args.metric),
        limit=args.limit,
        out_dir=Path(args.output_dir),
        batch_size=parse_batch_size(args.batch_size),
        max_batch_size=args.max_batch_size,
        tower_share_gib=args.tower_share_gib,
        dtype=args.dtype,
        device=args.device,
        template=args.template,
        image_aspect=args.image_aspect,
        video_frames=args.video_frames,
        verbose=args.verbose,
    )
    return run(eval_plan, argv)
