"""Train a checked recipe under torchrun: what ``python -m visionzip_tune launch`` (and so ``bash train.sh``) runs.

The ranks of this node are started by :mod:`visionzip_tune.launcher` (``NPROC_PER_NODE``, default one per visible
GPU, else one on the CPU; a free rendezvous port on one node; ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` for several nodes), which prints the phase of every rank that waits longer than
``VZT_WAIT_REPORT_S`` seconds while they start. Before that, the DeepSpeed ops the recipe uses are built here
(:mod:`~visionzip_tune.training.ops`), once per node, so that no rank compiles them.

Exit status: 0 done; 2 a user error (its one paragraph, whichever rank found it, and no launcher traceback);
75 interrupted by a signal after every rank wrote a checkpoint together (run the same command again to resume);
anything else a crash, whose traceback the failing rank printed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing import SignalException

from visionzip_tune.errors import paragraph
from visionzip_tune.launcher import RanksFailed, known_option, launch_ranks
from visionzip_tune.training import ops
from visionzip_tune.training.config import Config
from visionzip_tune.training.preemption import EXIT_INTERRUPTED, INTERRUPTED_FILE

# How long the launcher lets workers finish their step and checkpoint after a signal before it kills them.
SHUTDOWN_TIMEOUT_S = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "180"))
HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def signal_options() -> list[str]:
    """Workers get the launcher's signals and this long to checkpoint before SIGKILL (recent torch only)."""
    options = []
    if known_option("signals-to-handle"):
        options.append(f"--signals-to-handle={HANDLED_SIGNALS}")
    if known_option("shutdown-timeout"):
        options.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
    return options


def _interrupted_since(run_dir: Path, started: float) -> bool:
    marker = run_dir / INTERRUPTED_FILE
    return marker.is_file() and marker.stat().st_mtime >= started


def launch(train_argv: list[str], cfg: Config) -> int:
    """Run ``visionzip_tune train TRAIN_ARGV`` (whose config is ``cfg``) under torchrun; returns the exit status
    (module docstring)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ops.build_ops(cfg)  # here, once per node: the ranks then only load them (each would build them, in turn)
    started = time.time()
    try:
        launch_ranks(["-m", "visionzip_tune", "train", *train_argv], signal_options())
    except RanksFailed as failed:
        codes = set(failed.codes.values())
        if failed.message is not None:
            print("error: " + paragraph(failed.message), file=sys.stderr)
            return 2
        if EXIT_INTERRUPTED in codes and codes <= {EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGKILL}:
            return EXIT_INTERRUPTED
        rank, code = min(failed.codes.items())
        print(f"error: training failed on rank {rank} (exit status {code}); see its output above", file=sys.stderr)
        return 1
    except SignalException as stopped:
        if _interrupted_since(Path(cfg.output.dir), started):
            return EXIT_INTERRUPTED
        return 128 + int(stopped.sigval)
    return 0
