"""Resumable training state, written atomically: only what changes during training.

Layout (``<run>/checkpoints/``)::

    latest                        name of the newest complete checkpoint (replaced last, atomically)
    step-000050/trainable.safetensors   trainable parameters, gathered, fp32, named as in model.named_parameters()
    step-000050/state.json        step, epoch, sampler position, world size, ...
    step-000050/rng-rank000.pt    RNG states of each rank (python, numpy, torch, cuda)
    step-000050/ds/               DeepSpeed engine checkpoint: optimizer, scheduler, trainable module weights

A checkpoint is first written to ``step-N.tmp`` by all ranks, then renamed by rank 0, then ``latest`` is
replaced: a process killed at any moment leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import save_file

from visionzip_tune.distributed import barrier, is_main
from visionzip_tune.errors import UserError

LATEST = "latest"
TRAINABLE_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def gather_trainable(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the trainable parameters. Collective under ZeRO: call on every rank, same order."""
    from deepspeed.utils import safe_get_full_fp32_param  # lazy: slow to import; only saving a checkpoint needs it

    tensors = {}
    for name, param in named_params:
        full = safe_get_full_fp32_param(param)  # the optimizer's fp32 master, gathered across ranks
        if full is None:  # no ZeRO partitioning and no mixed precision: the parameter is its own master
            full = param.detach()
        tensors[name] = full.detach().float().cpu().contiguous()
    return tensors


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    step: int,
    trainable: list[tuple[str, torch.nn.Parameter]],
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write ``step-{step:06d}`` (collective: every rank calls it) and point ``latest`` at it; returns its path."""
    root = checkpoints_root(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f"{final.name}.tmp"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing this same step
        tmp.mkdir(parents=True)
    barrier()
    # Frozen weights never change: they stay out of the checkpoint (the base model is reloaded from its source).
    engine.save_checkpoint(str(tmp), tag="ds", exclude_frozen_parameters=True, save_latest=False)
    tensors = gather_trainable(trainable)
    torch.save(_rng_state(), tmp / f"rng-rank{engine.global_rank:03d}.pt")
    if is_main():
        save_file(tensors, tmp / TRAINABLE_FILE)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    barrier()
    if is_main():
        if final.exists():  # re-saving a step after a resume from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep)
    barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    """Remove stale ``*.tmp`` dirs and all but the ``keep`` newest checkpoints (``keep=0``: keep all)."""
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None when the run has none yet."""
    root = checkpoints_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise UserError(
            f"{pointer} names {path.name}, which is not a complete checkpoint; point train.resume at another "
            f"checkpoint of {root} or set train.resume=never to start over"
        )
    return path


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``train.resume``: 'auto' = the latest checkpoint of ``run_dir`` if any, 'never' = None, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    if (path / "checkpoints" / LATEST).is_file():  # a run directory: its newest checkpoint
        return latest_checkpoint(path)
    raise UserError(
        f"train.resume={resume!r} is neither 'auto', 'never', a checkpoint directory (with state.json, e.g. "
        "runs/x/checkpoints/step-000100) nor a run directory with checkpoints/latest"
    )


def load_checkpoint(engine: Any, path: str | Path, world_size: int) -> dict[str, Any]:
    """Restore optimizer, scheduler, trainable weights and this rank's RNG from ``path``; returns state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("world_size", world_size) != world_size:
        raise UserError(
            f"checkpoint {path} was written by {state['world_size']} processes but this run has {world_size}; "
            "the data order is sharded per process, so resume with the same number of processes"
        )
    loaded, _ = engine.load_checkpoint(
        str(path), tag="ds", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise UserError(f"DeepSpeed could not read the checkpoint in {path / 'ds'}")
    _set_rng_state(torch.load(path / f"rng-rank{engine.global_rank:03d}.pt", weights_only=False))
    return state


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
