"""Run logging: ``metrics.jsonl``, Weights & Biases and one console line per step, as a context manager.

Rank 0 logs through :class:`MetricLogger`; the other ranks get a :class:`NullLogger` with the same methods, so the
training loop never asks which rank it is on. Leaving the ``with`` block always closes the W&B run and the progress
bar, also when training stops on an error (a NaN loss, a bad sample).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from visionzip_tune import watchdog
from visionzip_tune.training.config import Config, to_dict
from visionzip_tune.distributed import is_main
from visionzip_tune.files import atomic_write

METRICS_FILE = "metrics.jsonl"


def format_step(record: dict[str, Any], total: int) -> str:
    """The console line of a training record."""
    grad = f" | grad {record['grad_norm']:.3f}" if record["grad_norm"] is not None else ""
    unit = record.get("vision_tokens_per_unit")
    line = (
        f"step {record['step']:>{len(str(total))}}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e}{grad}"
        f" | {record['samples_per_s']:.1f} samples/s | {record['tokens_per_s']:.0f} tok/s"
    )
    if record["images"] == 0 and record["videos"] == 0:  # says why the gradient is zero in projector mode
        return line + " | text-only step: no image or video reached the projector"
    if unit is not None:
        return line + f" | {unit} vision tok/unit"
    return line + f" | {record['vision_tokens_per_image']:.1f} vision tok/image (mean)"


def format_eval(record: dict[str, Any]) -> str:
    """The console line of an evaluation record: accuracy, counts, and accuracy per kind of sample when mixed."""
    kinds = [key.removeprefix("accuracy_") for key in record if key.startswith("accuracy_")]
    by_kind = "; " + ", ".join(f"{kind} {record['accuracy_' + kind]:.3f}" for kind in kinds) if len(kinds) > 1 else ""
    return (
        f"[eval] step {record['step']}: accuracy {record['accuracy']:.3f} "
        f"({record['correct']}/{record['total']}{by_kind})"
    )


def kept_on_resume(line: str, resume_step: int) -> bool:
    """Whether a metrics.jsonl line stays when resuming at ``resume_step``: training records up to it, evaluations
    before it (the one at the step runs again); never a line cut short by a kill."""
    try:
        record = json.loads(line)
        step, kind = record["step"], record["kind"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return step < resume_step or (step == resume_step and kind != "eval")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def step(self, record: dict[str, Any]) -> None:
        pass

    def eval(self, record: dict[str, Any]) -> None:
        pass

    def print(self, line: str) -> None:
        pass


class MetricLogger:
    """``metrics.jsonl`` (+ W&B when ``logging.wandb``) and the console, on rank 0.

    On resume the records after the resumed step (written before the process died) are dropped, and so is an
    evaluation at that step (it ran after the checkpoint was written, and runs again), so the file holds one
    continuous curve with one evaluation per evaluated step.
    """

    def __init__(self, run_dir: Path, cfg: Config, total_steps: int, start_step: int, resumed: bool):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.total_steps = total_steps
        self.start_step = start_step
        self.resumed = resumed
        self.path = self.run_dir / METRICS_FILE
        self.wandb = None
        self.progress = None

    def __enter__(self) -> MetricLogger:
        kept = []
        if self.resumed and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if kept_on_resume(line, self.start_step)]
        atomic_write(self.path, "".join(line + "\n" for line in kept).encode())
        if self.cfg.logging.wandb:
            self.wandb = _init_wandb(self.cfg, self.run_dir)
        if self.cfg.logging.progress_bar:
            # disable=None: no bar when stderr is not a terminal (log files keep one clean line per step)
            self.progress = tqdm(
                total=self.total_steps,
                initial=self.start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=None,
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            import wandb  # lazy: optional (the wandb extra)

            self.wandb.finish(exit_code=0 if exc_type is None else 1)
            wandb.teardown()  # waits for the W&B service to flush the run files (finish alone may return first)

    def step(self, record: dict[str, Any]) -> None:
        self._write(record, "train/")
        self.print(format_step(record, self.total_steps))
        if self.progress is not None:
            self.progress.update(1)

    def eval(self, record: dict[str, Any]) -> None:
        self._write(record, "eval/")
        self.print(format_eval(record))

    def print(self, line: str) -> None:
        """A console line that does not break the progress bar."""
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            values = {prefix + k: v for k, v in record.items() if k not in ("kind", "step") and _is_number(v)}
            self.wandb.log(values, step=record["step"])


def open_logger(
    run_dir: Path, cfg: Config, total_steps: int, start_step: int, resumed: bool
) -> MetricLogger | NullLogger:
    """The logger of this rank: a :class:`MetricLogger` on rank 0, a :class:`NullLogger` elsewhere."""
    return MetricLogger(run_dir, cfg, total_steps, start_step, resumed) if is_main() else NullLogger()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _init_wandb(cfg: Config, run_dir: Path):
    """A W&B run that continues across resumes (id kept in the run dir); offline when no credentials exist."""
    import wandb  # lazy: optional (the wandb extra)

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    atomic_write(id_file, run_id.encode())
    mode = (
        None if os.environ.get("WANDB_MODE") else ("online" if wandb.login(prompt=False, verify=False) else "offline")
    )
    with watchdog.phase("starting W&B", f"its service process (wandb-core), writing under {run_dir / 'wandb'}"):
        return wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.logging.wandb_run_name or run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=to_dict(cfg),
            mode=mode,
        )
