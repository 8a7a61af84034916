"""``python -m visionzip_tune eval``: lmms-eval benchmarks for the stock model, each training-free VisionZip budget and
the tuned projector, reported as the VisionZip paper does: each score and each budget's average as a percentage of
stock (:mod:`visionzip_tune.evaluation.benchmarks`).

    python -m visionzip_tune eval --projector runs/x/export --tasks gqa,pope,mme,scienceqa_img,textvqa_val
    python -m visionzip_tune eval --model llava-hf/llava-1.5-7b-hf --tasks gqa --budgets 54+10,108+20,162+30
    python -m visionzip_tune eval --model data/tiny-llava-demo --projector runs/tiny-demo/export \\
        --held-out data/demo/eval.json --image-folder data/demo/images
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from visionzip_tune.cli.common import add_model_arguments, export_record_of, prompter_for
from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.benchmarks import (
    RESULTS_FILE,
    TABLE_FILE,
    TableRow,
    as_lmms_model,
    check_tasks,
    evaluate,
    json_safe,
    parse_metrics,
    percent_table,
    require_lmms_eval,
    table_metric,
    task_manager,
    vision_tokens,
)
from visionzip_tune.evaluation.lmms_tasks import write_choice_tasks
from visionzip_tune.inference.variants import parse_budgets, plan, prepared
from visionzip_tune.loading import check_model_source


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune eval",
        description="Evaluate the stock model, training-free VisionZip budgets and a tuned projector with lmms-eval; "
        "report each score and each budget's average as a percentage of stock (the VisionZip paper's tables).",
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
    parser.add_argument("--output-dir", default="eval", help="where results.json and table.md go (default: eval)")
    parser.add_argument("--verbose", action="store_true", help="show lmms-eval's INFO log lines")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        parser.error("--limit must be > 0")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


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
    args = parse_args(argv)
    require_lmms_eval()
    metrics = parse_metrics(args.metric)
    record = export_record_of(args)
    _check_inputs(args)
    settings = plan(None if args.budgets is None else parse_budgets(args.budgets), record)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = [str(Path(p).resolve()) for p in args.include_path]
    if args.held_out:
        held_out_tasks, skipped = write_choice_tasks(args.held_out, args.image_folder, out_dir / "tasks")
        print(f"[eval] {args.held_out}: tasks {', '.join(held_out_tasks)} ({skipped} samples skipped)", flush=True)
        tasks += held_out_tasks
        include.append(str((out_dir / "tasks").resolve()))
    if not tasks:
        raise UserError("give lmms-eval tasks (--tasks gqa,pope,...) and/or a held-out JSON (--held-out).")
    manager = task_manager(include, args.verbose)
    check_tasks(manager, tasks)

    rows, template = [], None
    started = time.perf_counter()
    runs = prepared(
        settings,
        args.model,
        args.projector,
        record,
        lambda model, processing: prompter_for(model, processing, record, args),
        dtype=args.dtype,
        device=args.device,
    )
    for k, (setting, model, prompter) in enumerate(runs):
        row = TableRow(setting.label, setting.tuned, dict(getattr(model.config, "visionzip", None) or {}) or None)
        row.vision_tokens = vision_tokens(model.config)
        template = prompter.templater.template
        print(
            f"[eval] run {k + 1}/{len(settings)}: {row.label} ({row.vision_tokens} vision tokens per image)", flush=True
        )
        evaluate(
            row, as_lmms_model(model, prompter), tasks, manager, limit=args.limit, metrics=metrics, out_dir=out_dir
        )
        rows.append(row)
        left = len(settings) - k - 1
        eta = (time.perf_counter() - started) / (k + 1) * left
        print(f"[eval] {row.label}: done in {row.seconds:.0f} s" + (f"; ETA {eta / 60:.1f} min" if left else ""))

    table, percents = percent_table(rows, tasks)
    report = {
        "model": args.model or record["base_model"],
        "projector": args.projector,
        "tasks": tasks,
        "metrics": {t: table_metric(t, rows[0].lmms_eval[t], metrics)[0] for t in tasks},
        "template": template,
        "limit": args.limit,
        "runs": [{**asdict(row), **percent} for row, percent in zip(rows, percents)],
        "table": table,
    }
    (out_dir / RESULTS_FILE).write_text(json.dumps(report, indent=2, default=json_safe) + "\n")
    (out_dir / TABLE_FILE).write_text(table + "\n")
    print(table)
    print(f"[eval] wrote {out_dir / RESULTS_FILE} and {out_dir / TABLE_FILE}", flush=True)
    return 0
