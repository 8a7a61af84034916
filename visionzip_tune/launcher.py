"""Start this node's ranks of a command under torchrun, and report a rank's user error once (train and eval).

One node: ``NPROC_PER_NODE`` processes (default: one per visible GPU, else one on the CPU) and no port given, so
torchrun takes a free one and two runs on one machine never fight over 29500. Several nodes: the same command on
every node with ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.

A rank that stops on a :class:`~visionzip_tune.errors.UserError` leaves its paragraph in a folder the launcher
names in ``ERROR_DIR_ENV`` (``__main__.report_user_error`` writes ``error-rank<R>.txt``); the launcher then prints
the lowest rank's paragraph once instead of torchrun's tracebacks. The same folder carries each rank's current
phase (:mod:`visionzip_tune.watchdog`): while the ranks run, the launcher prints every one that has waited longer
than ``VZT_WAIT_REPORT_S`` seconds, and on what (:class:`~visionzip_tune.watchdog.RankBoard`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from visionzip_tune.errors import ERROR_DIR_ENV, UserError
from visionzip_tune.watchdog import RankBoard, report_after_s


class RanksFailed(Exception):
    """Some rank ended with a non-zero exit status: ``message`` is the user-error paragraph of the lowest rank that
    left one (None when none did: a crash, whose traceback that rank printed), ``codes`` every failed rank's status."""

    def __init__(self, message: str | None, codes: dict[int, int]):
        super().__init__(message or f"rank(s) {sorted(codes)} failed")
        self.message = message
        self.codes = codes


def processes_per_node() -> int:
    """``NPROC_PER_NODE``, default: the visible GPUs, else 1 (on a CPU)."""
    return int(os.environ.get("NPROC_PER_NODE", torch.cuda.device_count() or 1))


def nodes() -> int:
    return int(os.environ.get("NNODES", "1"))


def node_args() -> list[str]:
    """torchrun's arguments for this node, from the environment (see the module docstring)."""
    missing = [key for key in ("NODE_RANK", "MASTER_ADDR") if key not in os.environ]
    if nodes() != 1 and missing:
        raise UserError(f"NNODES={os.environ['NNODES']} needs {' and '.join(missing)} set on every node")
    args = [f"--nproc-per-node={processes_per_node()}", f"--nnodes={nodes()}"]
    if nodes() != 1:
        args += [
            f"--node-rank={os.environ['NODE_RANK']}",
            f"--master-addr={os.environ['MASTER_ADDR']}",
            f"--master-port={os.environ.get('MASTER_PORT', '29500')}",
        ]  # one node: no port given, so torchrun takes a free one
    return args


def rank_board(folder: Path) -> RankBoard:
    """The reports of this node's ranks while they run (what a rank does before it names its first phase: with
    several nodes, torchrun first waits for all of them)."""
    starting = "starting Python and importing torch"
    if nodes() != 1:
        address = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"
        starting = f"torchrun's rendezvous of the {nodes()} nodes at {address}, then {starting}"
    return RankBoard(folder, processes_per_node(), report_after_s(), starting)


def known_option(name: str) -> bool:
    """Whether this torch's torchrun takes ``--NAME`` (some options exist in recent releases only)."""
    return name.replace("-", "_") in {action.dest for action in torchrun.get_args_parser()._actions}


def first_rank_error(error_dir: Path) -> str | None:
    """The paragraph of the lowest rank that left one in ``error_dir``."""
    files = sorted(error_dir.glob("error-rank*.txt"), key=lambda p: int(p.stem.removeprefix("error-rank")))
    return files[0].read_text().strip() if files else None


def another_rank_reported(wait_s: float = 10.0) -> bool:
    """Whether, under the launcher, another rank reports a user error within ``wait_s`` seconds (it writes its report
    before it leaves the process group, which is what breaks this rank's collective)."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir or not Path(error_dir).is_dir():
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if any(Path(error_dir).glob("error-rank*.txt")):
            return True
        time.sleep(0.2)
    return False


def launch_ranks(worker_argv: Sequence[str], options: Sequence[str] = ()) -> None:
    """Run ``python WORKER_ARGV`` (e.g. ``-m visionzip_tune eval ...``) on this node's ranks under torchrun with
    ``options`` besides :func:`node_args`, and wait for them; :class:`RanksFailed` when any rank fails. Signals
    reaching the launcher come out as torchrun's ``SignalException``."""
    argv = [*node_args(), *options, *worker_argv]
    # We report failures ourselves: the agent's error log and ChildFailedError's table would bury the paragraph.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    previous = os.environ.get(ERROR_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="vzt-errors-") as error_dir:
        os.environ[ERROR_DIR_ENV] = error_dir
        board = rank_board(Path(error_dir)).start()
        try:
            torchrun.run(torchrun.parse_args(argv))
        except ChildFailedError as failed:
            codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
            raise RanksFailed(first_rank_error(Path(error_dir)), codes) from None
        finally:
            board.stop()
            if previous is None:
                os.environ.pop(ERROR_DIR_ENV, None)
            else:
                os.environ[ERROR_DIR_ENV] = previous
