"""lmms-eval benchmarks for the stock model, each training-free VisionZip budget and the tuned projector (what
``python -m visionzip_tune eval`` runs), reported as the VisionZip paper does (Tables 1, 2, 14): each benchmark's
score and each budget's average as a percentage of the stock model.

Runs, in order: stock; VisionZip at each ``--budgets`` entry, training-free (default: the export's budget); the tuned
projector at the export's budget (``--projector``). One :class:`~visionzip_tune.inference.prompts.Prompter` setting
serves every run (the export's recipe, else the model's chat template), so the runs differ only in the budget and the
projector. Writes ``OUTPUT/results.json`` (every run's lmms-eval results and the table's numbers) and
``OUTPUT/table.md``, and prints the table. A failure inside lmms-eval stops the command with exit status 2, its message,
and its traceback in ``OUTPUT/error.log`` (lmms-eval's own command line would log it and exit 0).
"""

from __future__ import annotations

import difflib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionzip_tune import watchdog
from visionzip_tune.distributed import PeerFailed
from visionzip_tune.errors import UserError
from visionzip_tune.families import family_of
from visionzip_tune.launcher import another_rank_reported

try:  # the eval extra; without it the command explains how to install it instead of failing on import
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
    from loguru import logger as lmms_logger
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
class TableRow:
    """What one setting (stock, a training-free budget, the tuned projector) scored."""

    label: str
    tuned: bool
    budget: dict | None  # the model's config.visionzip while it ran; None: stock tokens
    vision_tokens: int | str | None = None  # per (untiled) image, fed to the LLM (Qwen: a share, see vision_tokens)
    seconds: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # task -> the table's metric
    lmms_eval: dict[str, Any] = field(default_factory=dict)  # task -> lmms-eval's result entry
    throughput: dict[str, Any] = field(default_factory=dict)  # Throughput.summary() over every rank


def vision_tokens(config) -> int | str:
    """The tokens the LLM gets per (untiled) image: a count; for Qwen, whose count follows each image's size, the
    share of the image's merged tokens the budget keeps ("50%"; "100%" stock)."""
    family = family_of(config)
    return family.budget_of(getattr(config, "visionzip", None) or {}).share(family, config)


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


def percent_table(runs: list[TableRow], tasks: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The paper's table as markdown, and each run's percentages of stock (``runs[0]`` is stock): per task
    ``score (pct%)``, the average of the task percentages, then what the run cost (:func:`speed_cells`)."""
    stock = runs[0].scores
    header = ["run", "vision tokens", *tasks, "Avg.", *SPEED_COLUMNS]
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
        speed = speed_cells(run.throughput, runs[0].throughput)
        lines.append("| " + " | ".join([run.label, str(run.vision_tokens), *cells, average_cell, *speed]) + " |")
        rows.append({"label": run.label, "percent_of_stock": percents, "average_percent": average})
    return "\n".join(lines), rows


SPEED_COLUMNS = ("req/s", "speed-up", "prompt tokens", "TTFT ms")


def speed_cells(throughput: dict[str, Any], stock: dict[str, Any]) -> list[str]:
    """A run's :data:`SPEED_COLUMNS`: requests the model answered per second, that as a multiple of stock's, the
    mean prompt length (vision tokens included) and the mean time to first token ("n/a" where not measured)."""
    rate, stock_rate = throughput.get("requests_per_s"), stock.get("requests_per_s")
    prompt, ttft = throughput.get("prompt_tokens"), throughput.get("ttft_ms")
    return [
        f"{rate:.3g}" if rate else "n/a",
        f"{rate / stock_rate:.2f}x" if rate and stock_rate else "n/a",
        f"{prompt:.0f}" if prompt is not None else "n/a",
        f"{ttft:.1f}" if ttft is not None else "n/a",
    ]


def require_lmms_eval() -> None:
    """:class:`UserError` saying how to install lmms-eval where it is missing."""
    if LMMS_EVAL_MISSING is not None:
        raise UserError(
            f"the eval command needs lmms-eval ({LMMS_EVAL_MISSING}): pip install 'visionzip-tune[eval]' "
            "(with a CUDA torch), or bash tools/install_eval.sh (any torch, the CPU build included)"
        )


def task_manager(include_paths: list[str], verbose: bool):
    """lmms-eval's task registry with the task YAML folders ``include_paths``; its INFO log quietened unless
    ``verbose``."""
    if not verbose:
        lmms_logger.remove()
        lmms_logger.add(sys.stderr, level="WARNING")
    return TaskManager("WARNING", include_path=include_paths or None)


def check_tasks(manager, tasks: list[str]) -> None:
    """:class:`UserError` naming every task lmms-eval does not know, with the closest names it does."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        named = "; ".join(f"{t} (close: {', '.join(h)})" if h else t for t, h in hints.items())
        raise UserError(
            f"--tasks: lmms-eval knows no task {named}. Task names are lmms-eval's (python -m lmms_eval --tasks "
            "list) or those of the YAML files under --include-path."
        )


def evaluate(
    row: TableRow, lm, tasks: list[str], manager, *, limit, metrics: dict[str, str], out_dir: Path, rank: int = 0
) -> None:
    """One lmms-eval pass of ``lm`` over ``tasks`` on every rank (lmms-eval shards the documents); fills ``row`` on
    rank 0, where lmms-eval gathers the results (``metrics``: the ``--metric`` choices). Any failure becomes a
    :class:`UserError`, its traceback in ``out_dir``'s error log (one per rank)."""
    start = time.perf_counter()
    error_log = out_dir / (ERROR_LOG if rank == 0 else f"error-rank{rank}.log")
    # Until the model gets its first request, lmms-eval loads the tasks' datasets (downloads, the datasets cache and
    # its locks) and builds the requests, printing nothing at the WARNING level the command keeps it at.
    loading = f"lmms-eval, loading the datasets of {', '.join(tasks)} (through the datasets cache and its locks)"
    try:
        with watchdog.phase("lmms-eval: loading the tasks", loading) as loaded:
            lm.before_first_request = loaded
            results = evaluator.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                log_samples=False,
                distributed_executor_backend="torchrun",  # the process group is ours (or there is none: one process)
            )
    except UserError:  # the model's own (a document it cannot read, ...): its message says what is wrong
        raise
    except Exception as err:  # lmms-eval, its tasks' code and the model: any failure ends the command
        if rank_failed_elsewhere():
            raise PeerFailed(f"{row.label}: another process stopped with an error") from None
        error_log.write_text(traceback.format_exc())
        raise UserError(
            f"lmms-eval failed while evaluating {row.label} on {', '.join(tasks)}: {type(err).__name__}: {err} "
            f"(traceback in {error_log})"
        ) from None
    row.seconds = time.perf_counter() - start
    if rank != 0:
        return
    reported = (results or {}).get("results") or {}
    missing = [t for t in tasks if t not in reported]
    if missing:
        raise UserError(f"lmms-eval returned no results for {', '.join(missing)} ({row.label}); see the log above")
    for task in tasks:
        row.lmms_eval[task] = reported[task]
        row.scores[task] = table_metric(task, reported[task], metrics)[1]


def rank_failed_elsewhere() -> bool:
    """Whether this failure is another rank's: a collective broken because a peer stopped, which reported why."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and another_rank_reported()


def json_safe(value):
    """lmms-eval's numbers are numpy scalars at times; JSON gets plain ones."""
    return value.item() if hasattr(value, "item") else str(value)
