"""``python -m visionzip_tune eval``: lmms-eval benchmarks for the stock model, each training-free VisionZip budget and
the tuned projector, in one process, reported as the VisionZip paper does (Tables 1, 2, 14): each benchmark's score
and each budget's average as a percentage of the stock model.

    python -m visionzip_tune eval --projector runs/x/export --tasks gqa,pope,mme,scienceqa_img,textvqa_val
    python -m visionzip_tune eval --model llava-hf/llava-1.5-7b-hf --tasks gqa --budgets 54+10,108+20,162+30
    python -m visionzip_tune eval --model data/tiny-llava-demo --projector runs/tiny-demo/export \\
        --held-out data/demo/eval.json --image-folder data/demo/images

Runs, in order: stock; VisionZip at each ``--budgets`` entry, training-free (default: the export's budget); the
tuned projector at the export's budget (``--projector``). One :class:`~visionzip_tune.prompts.Prompter` setting
serves every run (the export's recipe, else the model's chat template), so the runs differ only in the budget and
the projector. Writes ``OUTPUT/results.json`` (every run's lmms-eval results and the table's numbers) and
``OUTPUT/table.md``, and prints the table. A failure inside lmms-eval stops the command with exit status 2, its
message, and its traceback in ``OUTPUT/error.log`` (lmms-eval's own command line would log it and exit 0).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visionzip_tune.errors import UserError
from visionzip_tune.families import family_of, tokens_per_image
from visionzip_tune.lmms_tasks import write_choice_tasks
from visionzip_tune.variants import add_model_arguments, check_model_arguments, parse_budgets, plan, prepared

try:  # the eval extra; without it the command explains how to install it instead of failing on import
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
    from loguru import logger as lmms_logger

    from visionzip_tune.lmms import ZippedModel
except ModuleNotFoundError as missing:
    LMMS_EVAL_MISSING: ModuleNotFoundError | None = missing
else:
    LMMS_EVAL_MISSING = None

# The metric the paper reports where it is not the task's first one (POPE: LLaVA's F1, not accuracy). MMBench's
# first metric, gpt_eval_score, matches answers with an OpenAI model when its heuristics fail.
PAPER_METRICS = {"pope": "pope_f1_score"}
TABLE_FILE = "table.md"
RESULTS_FILE = "results.json"
ERROR_LOG = "error.log"


@dataclass
class Run:
    """What one variant (stock, a training-free budget, the tuned projector) scored."""

    label: str
    tuned: bool
    budget: dict | None  # the model's config.visionzip while it ran; None: stock tokens
    vision_tokens: int | str | None = None  # per (untiled) image, fed to the LLM (Qwen: a share, see vision_tokens)
    seconds: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # task -> the table's metric
    lmms_eval: dict[str, Any] = field(default_factory=dict)  # task -> lmms-eval's result entry


def vision_tokens(config) -> int | str:
    """The tokens the LLM gets per (untiled) image: a count; for Qwen, whose count follows each image's size, the
    share of the image's merged tokens the budget keeps ("50%"; "100%" stock)."""
    if "dominant_ratio" not in family_of(config).budget.keys:
        return tokens_per_image(config)
    budget = getattr(config, "visionzip", None)
    return f"{budget['dominant_ratio'] + budget['contextual_ratio']:.0%}" if budget else "100%"


def parse_metrics(items: list[str]) -> dict[str, str]:
    """``["pope=pope_accuracy", ...]`` -> ``{"pope": "pope_accuracy"}``."""
    chosen = {}
    for item in items:
        task, eq, metric = item.partition("=")
        if not (eq and task.strip() and metric.strip()):
            raise UserError(f"--metric {item!r}: give TASK=METRIC, e.g. --metric pope=pope_accuracy")
        chosen[task.strip()] = metric.strip()
    return chosen


def table_metric(task: str, result: dict[str, Any], chosen: dict[str, str]) -> tuple[str, float]:
    """``(metric key, value)`` of a task's lmms-eval result: ``--metric``, else the paper's, else the task's first
    metric (lmms-eval keys are ``"metric,filter"``)."""
    wanted = chosen.get(task) or PAPER_METRICS.get(task)
    keys = [k for k in result if "," in k and "_stderr" not in k]
    if wanted is not None:
        keys = [k for k in keys if k.split(",")[0] == wanted]
    for key in keys:
        if isinstance(result[key], (int, float)):
            return key, float(result[key])
    raise UserError(
        f"task {task}: lmms-eval reported no numeric metric {wanted or ''} (it reported "
        f"{', '.join(k for k in result if k != 'alias')}); choose one with --metric {task}=METRIC"
    )


def percent_table(runs: list[Run], tasks: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The paper's table as markdown, and each run's percentages of stock (``runs[0]`` is stock): per task
    ``score (pct%)``, and the average of the task percentages."""
    stock = runs[0].scores
    header = ["run", "vision tokens", *tasks, "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for run in runs:
        percents = {t: 100 * run.scores[t] / stock[t] for t in tasks if stock.get(t)}
        average = sum(percents.values()) / len(percents) if percents else None
        cells = [
            f"{run.scores[t]:.4g} ({percents[t]:.1f}%)" if t in percents else f"{run.scores[t]:.4g} (n/a)"
            for t in tasks
        ]
        average_cell = f"{average:.1f}%" if average is not None else "n/a"
        lines.append("| " + " | ".join([run.label, str(run.vision_tokens), *cells, average_cell]) + " |")
        rows.append({"label": run.label, "percent_of_stock": percents, "average_percent": average})
    return "\n".join(lines), rows


def _check_tasks(manager, tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        named = "; ".join(f"{t} (close: {', '.join(h)})" if h else t for t, h in hints.items())
        raise UserError(
            f"--tasks: lmms-eval knows no task {named}. Task names are lmms-eval's (python -m lmms_eval --tasks "
            "list) or those of the YAML files under --include-path."
        )


def _evaluate(run: Run, lm, tasks: list[str], manager, args, out_dir: Path) -> None:
    """One lmms-eval pass over ``tasks``; fills ``run``. Any failure becomes a :class:`UserError`."""
    start = time.perf_counter()
    try:
        results = evaluator.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=args.limit, log_samples=False, batch_size=1
        )
    except Exception as err:  # lmms-eval, its tasks' code and the model: any failure ends the command
        (out_dir / ERROR_LOG).write_text(traceback.format_exc())
        raise UserError(
            f"lmms-eval failed while evaluating {run.label} on {', '.join(tasks)}: {type(err).__name__}: {err} "
            f"(traceback in {out_dir / ERROR_LOG})"
        ) from None
    reported = (results or {}).get("results") or {}
    missing = [t for t in tasks if t not in reported]
    if missing:
        raise UserError(f"lmms-eval returned no results for {', '.join(missing)} ({run.label}); see the log above")
    run.seconds = time.perf_counter() - start
    for task in tasks:
        run.lmms_eval[task] = reported[task]
        run.scores[task] = table_metric(task, reported[task], args.metrics)[1]


def _json_safe(value):
    """lmms-eval's numbers are numpy scalars at times; JSON gets plain ones."""
    return value.item() if hasattr(value, "item") else str(value)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if LMMS_EVAL_MISSING is not None:
        raise UserError(
            f"the eval command needs lmms-eval ({LMMS_EVAL_MISSING}): pip install 'visionzip-tune[eval]' "
            "(with a CUDA torch), or bash tools/install_eval.sh (any torch, the CPU build included)"
        )
    args.metrics = parse_metrics(args.metric)
    record = check_model_arguments(args)
    variants = plan(None if args.budgets is None else parse_budgets(args.budgets), record)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.held_out and not args.image_folder:
        raise UserError("--held-out needs --image-folder, the folder its samples' 'image' paths are relative to.")
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
    if not args.verbose:
        lmms_logger.remove()
        lmms_logger.add(sys.stderr, level="WARNING")
    manager = TaskManager("WARNING", include_path=include or None)
    _check_tasks(manager, tasks)

    runs, template = [], None
    started = time.perf_counter()
    for k, (variant, model, prompter) in enumerate(prepared(variants, args, record)):
        run = Run(variant.label, variant.tuned, dict(getattr(model.config, "visionzip", None) or {}) or None)
        run.vision_tokens = vision_tokens(model.config)
        template = prompter.templater.template
        print(
            f"[eval] run {k + 1}/{len(variants)}: {run.label} ({run.vision_tokens} vision tokens per image)", flush=True
        )
        _evaluate(run, ZippedModel(model, prompter), tasks, manager, args, out_dir)
        runs.append(run)
        left = len(variants) - k - 1
        eta = (time.perf_counter() - started) / (k + 1) * left
        print(f"[eval] {run.label}: done in {run.seconds:.0f} s" + (f"; ETA {eta / 60:.1f} min" if left else ""))

    table, rows = percent_table(runs, tasks)
    report = {
        "model": args.model or record["base_model"],
        "projector": args.projector,
        "tasks": tasks,
        "metrics": {t: table_metric(t, runs[0].lmms_eval[t], args.metrics)[0] for t in tasks},
        "template": template,
        "limit": args.limit,
        "runs": [{**asdict(run), **row} for run, row in zip(runs, rows)],
        "table": table,
    }
    (out_dir / RESULTS_FILE).write_text(json.dumps(report, indent=2, default=_json_safe) + "\n")
    (out_dir / TABLE_FILE).write_text(table + "\n")
    print(table)
    print(f"[eval] wrote {out_dir / RESULTS_FILE} and {out_dir / TABLE_FILE}", flush=True)
    return 0
