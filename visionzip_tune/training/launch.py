"""Train a checked recipe under torchrun: what ``python -m visionzip_tune launch`` (and so ``bash train.sh``) runs;
``python -m visionzip_tune cache`` starts its workers the same way.

One node: ``NPROC_PER_NODE`` processes (default: one per visible GPU, else one on the CPU) and a free rendezvous
port, so two runs on one machine never fight over 29500. Several nodes: the same command on every node with
``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.

Exit status: 0 done; 2 a user error (its one paragraph, whichever rank found it, and no launcher traceback);
75 interrupted by a signal after every rank wrote a checkpoint together (run the same command again to resume);
anything else a crash, whose traceback the failing rank printed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from visionzip_tune.errors import ERROR_DIR_ENV, UserError, paragraph
from visionzip_tune.training.preemption import EXIT_INTERRUPTED, INTERRUPTED_FILE

# How long the launcher lets workers finish their step and checkpoint after a signal before it kills them.
SHUTDOWN_TIMEOUT_S = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "180"))
HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def torchrun_args(argv: list[str], command: str = "train") -> list[str]:
    """torchrun's arguments for this node, from the environment (see the module docstring): every worker runs
    ``python -m visionzip_tune COMMAND ARGV``."""
    gpus = torch.cuda.device_count()
    nnodes = os.environ.get("NNODES", "1")
    args = [f"--nproc-per-node={os.environ.get('NPROC_PER_NODE', gpus or 1)}", f"--nnodes={nnodes}"]
    if nnodes != "1":
        args += [
            f"--node-rank={os.environ['NODE_RANK']}",
            f"--master-addr={os.environ['MASTER_ADDR']}",
            f"--master-port={os.environ.get('MASTER_PORT', '29500')}",
        ]  # one node: no port given, so torchrun takes a free one
    # Workers get the launcher's signals and this long to checkpoint before SIGKILL (recent torch only).
    known = {action.dest for action in torchrun.get_args_parser()._actions}
    if "signals_to_handle" in known:
        args.append(f"--signals-to-handle={HANDLED_SIGNALS}")
    if "shutdown_timeout" in known:
        args.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
    return [*args, "-m", "visionzip_tune", command, *argv]


def _first_error(error_dir: Path) -> str | None:
    """The paragraph of the lowest rank that left one."""
    files = sorted(error_dir.glob("error-rank*.txt"), key=lambda p: int(p.stem.removeprefix("error-rank")))
    return files[0].read_text().strip() if files else None


def _interrupted_since(run_dir: Path, started: float) -> bool:
    marker = run_dir / INTERRUPTED_FILE
    return marker.is_file() and marker.stat().st_mtime >= started


def launch(argv: list[str], run_dir: Path, command: str = "train") -> int:
    """Run ``visionzip_tune COMMAND ARGV`` under torchrun; returns the exit status (module docstring). ``run_dir``
    is where a run records that a signal stopped it after a checkpoint."""
    missing = [key for key in ("NODE_RANK", "MASTER_ADDR") if key not in os.environ]
    if os.environ.get("NNODES", "1") != "1" and missing:
        raise UserError(f"NNODES={os.environ['NNODES']} needs {' and '.join(missing)} set on every node")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # We report failures ourselves: the agent's error log and ChildFailedError's table would bury the paragraph.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vzt-errors-") as error_dir:
        os.environ[ERROR_DIR_ENV] = error_dir
        try:
            torchrun.run(torchrun.parse_args(torchrun_args(argv, command)))
        except ChildFailedError as failed:
            message = _first_error(Path(error_dir))
            codes = {failure.exitcode for failure in failed.failures.values()}
            if message is not None:
                print("error: " + paragraph(message), file=sys.stderr)
                return 2
            if EXIT_INTERRUPTED in codes and codes <= {EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGKILL}:
                return EXIT_INTERRUPTED
            rank, failure = min(failed.failures.items())
            print(
                f"error: {command} failed on rank {rank} (exit status {failure.exitcode}); see its output above",
                file=sys.stderr,
            )
            return 1
        except SignalException as stopped:
            if _interrupted_since(run_dir, started):
                return EXIT_INTERRUPTED
            return 128 + int(stopped.sigval)
    return 0
