"""``python -m visionzip_tune eval`` as a run: its settings (stock, training-free budgets, the tuned export) one after
the other on one loaded base model, on every process, and one ``results.json`` / ``table.md`` at the end.

Processes: ``NPROC_PER_NODE`` (default: the visible GPUs, else 1; ``NNODES`` etc. for several nodes, as for
``train.sh``). One process runs in place; more, and the command starts itself again under torchrun on a free port
(:mod:`visionzip_tune.launcher`), each rank on the GPU of its local rank; lmms-eval shards every task's documents
over the ranks and gathers the results on rank 0. A user error on any rank ends the command with that rank's one
paragraph and exit status 2.

Resume: every answer is kept in ``OUTPUT/answers/`` (:mod:`~visionzip_tune.evaluation.answers`), per setting and
request, so the same command run again after a kill (or with another number of processes or batch size) answers
from there what was answered and computes the rest. ``results.json`` and ``table.md`` are written last, atomically,
by rank 0, and a previous run's are removed first: an eval that fails leaves no results that look complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from visionzip_tune.distributed import barrier, cleanup_distributed, exit_worker, init_distributed, print0
from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.answers import AnswerStore, setting_identity
from visionzip_tune.evaluation.benchmarks import (
    RESULTS_FILE,
    TABLE_FILE,
    TableRow,
    check_tasks,
    evaluate,
    json_safe,
    percent_table,
    table_metric,
    task_manager,
    vision_tokens,
)
from visionzip_tune.evaluation.lmms_tasks import choice_task_names, write_choice_tasks
from visionzip_tune.evaluation.tower_share import TowerShare
from visionzip_tune.files import atomic_write
from visionzip_tune.inference.prompts import Prompter
from visionzip_tune.inference.variants import Setting, prepared
from visionzip_tune.launcher import RanksFailed, launch_ranks, nodes, processes_per_node

try:  # the eval extra: the eval command says how to install it (benchmarks.require_lmms_eval) before it runs
    from visionzip_tune.evaluation.lmms import ZippedModel
except ModuleNotFoundError:
    ZippedModel = None

ANSWERS_DIR = "answers"
HELD_OUT_DIR = "tasks"


@dataclass(frozen=True)
class EvalPlan:
    """What one eval does: the command line, checked (see ``cli/eval.py`` for each option)."""

    model: str | None
    projector: str | None
    record: dict | None  # the export's visionzip.json
    settings: list[Setting]
    tasks: list[str]  # lmms-eval tasks, without the held-out ones
    include: list[str]  # task YAML folders
    held_out: str | None
    image_folder: str | None
    metrics: dict[str, str]
    limit: int | float | None
    out_dir: Path
    batch_size: int | str
    max_batch_size: int | None
    tower_share_gib: float
    dtype: str
    device: str | None
    template: str | None
    image_aspect: str | None
    video_frames: int | None
    verbose: bool


def run(plan: EvalPlan, argv: list[str]) -> int:
    """The eval ``plan`` (``argv``: the command's arguments, to start the ranks with); returns the exit status."""
    if os.environ.get("RANK", "0") == "0":
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        for name in (RESULTS_FILE, TABLE_FILE):
            (plan.out_dir / name).unlink(missing_ok=True)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torchrun (ours, or the user's)
        return _rank(plan)
    if processes_per_node() == 1 and nodes() == 1:
        evaluate_settings(plan, rank=0, world_size=1)
        return 0
    print(f"[eval] starting {processes_per_node()} processes on this node", flush=True)
    try:
        launch_ranks(["-m", "visionzip_tune", "eval", *argv])
    except RanksFailed as failed:
        if failed.message is not None:
            raise UserError(failed.message) from None
        rank, code = min(failed.codes.items())
        print(f"error: eval failed on rank {rank} (exit status {code}); see its output above", flush=True)
        return 1
    return 0


def _rank(plan: EvalPlan) -> int:
    """One rank under torchrun: join the process group, evaluate, leave together (see ``exit_worker``)."""
    ranks = init_distributed()
    try:
        evaluate_settings(plan, rank=ranks.rank, world_size=ranks.world_size)
        barrier()
    finally:
        cleanup_distributed()
    exit_worker(0)


def rank_device(device: str | None, local_rank: int) -> str | None:
    """The device of a rank: ``device`` if given, else its local GPU when there is one (else the CPU)."""
    if device is None and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


def evaluate_settings(plan: EvalPlan, *, rank: int, world_size: int) -> None:
    """Every setting of ``plan`` through lmms-eval on this rank; rank 0 writes the results."""
    out_dir = plan.out_dir
    tasks, include = list(plan.tasks), list(plan.include)
    if plan.held_out:
        folder = out_dir / HELD_OUT_DIR
        if rank == 0:
            held_out_tasks, skipped = write_choice_tasks(plan.held_out, plan.image_folder, folder)
            print(f"[eval] {plan.held_out}: tasks {', '.join(held_out_tasks)} ({skipped} samples skipped)", flush=True)
        barrier()  # the other ranks read the tasks rank 0 wrote
        tasks += choice_task_names()
        include.append(str(folder.resolve()))
    manager = task_manager(include, plan.verbose)
    check_tasks(manager, tasks)

    def prompter_of(model, processing) -> Prompter:
        return Prompter.for_recipe(
            model,
            processing,
            plan.record,
            template=plan.template,
            image_aspect=plan.image_aspect,
            video_frames=plan.video_frames,
        )

    device = rank_device(plan.device, int(os.environ.get("LOCAL_RANK", 0)))
    runs = prepared(
        plan.settings, plan.model, plan.projector, plan.record, prompter_of, dtype=plan.dtype, device=device
    )
    rows, template = [], None
    share = TowerShare(plan.tower_share_gib)  # one tower pass per medium for the settings at one budget
    started = time.perf_counter()
    for k, (setting, model, prompter) in enumerate(runs):
        row = TableRow(setting.label, setting.tuned, dict(getattr(model.config, "visionzip", None) or {}) or None)
        row.vision_tokens = vision_tokens(model.config)
        template = prompter.templater.template
        print0(f"[eval] run {k + 1}/{len(plan.settings)}: {row.label} ({row.vision_tokens} vision tokens per image)")
        checksum = (plan.record or {}).get("checksum") if setting.tuned else None
        store = AnswerStore(
            out_dir / ANSWERS_DIR, setting.label, setting_identity(model, export_checksum=checksum), rank
        )
        if store.loaded:
            print0(f"[eval] {row.label}: {store.loaded} answers kept from an earlier run ({store.folder})")
        lm = ZippedModel(
            model,
            prompter,
            batch_size=plan.batch_size,
            max_batch_size=plan.max_batch_size,
            answers=store,
            tower_share=share,
        )
        try:
            evaluate(row, lm, tasks, manager, limit=plan.limit, metrics=plan.metrics, out_dir=out_dir, rank=rank)
        finally:
            store.close()
        row.throughput = lm.throughput.reduced().summary()
        if lm.tower is not None:
            print0(f"[eval] {row.label}: {lm.tower.report()} (this process)")
        rows.append(row)
        left = len(plan.settings) - k - 1
        eta = (time.perf_counter() - started) / (k + 1) * left
        print0(f"[eval] {row.label}: done in {row.seconds:.0f} s" + (f"; ETA {eta / 60:.1f} min" if left else ""))
    if rank == 0:
        _write_report(plan, rows, tasks, template, world_size)


def _write_report(plan: EvalPlan, rows: list[TableRow], tasks: list[str], template: str | None, world_size: int):
    table, percents = percent_table(rows, tasks)
    report = {
        "model": plan.model or plan.record["base_model"],
        "projector": plan.projector,
        "tasks": tasks,
        "metrics": {t: table_metric(t, rows[0].lmms_eval[t], plan.metrics)[0] for t in tasks},
        "template": template,
        "limit": plan.limit,
        "processes": world_size,
        "batch_size": plan.batch_size,
        "runs": [{**asdict(row), **percent} for row, percent in zip(rows, percents)],
        "table": table,
    }
    atomic_write(plan.out_dir / TABLE_FILE, (table + "\n").encode())
    atomic_write(plan.out_dir / RESULTS_FILE, (json.dumps(report, indent=2, default=json_safe) + "\n").encode())
    print(table)
    print(f"[eval] wrote {plan.out_dir / RESULTS_FILE} and {plan.out_dir / TABLE_FILE}", flush=True)
