"""Resumable training state, written atomically: only what changes during training.

Layout (``<run>/checkpoints/``)::

    latest                        name of the newest complete checkpoint (replaced last, atomically)
    step-000050/trainable.safetensors   trainable parameters, gathered, fp32, named as in model.named_parameters()
    step-000050/state.json        step, epoch, sampler position, world size, ...
    step-000050/rng-rank000.pt    RNG states of each rank (python, numpy, torch, cuda)
    step-000050/ds/               DeepSpeed engine checkpoint: optimizer, scheduler, trainable module weights

A checkpoint is first written to ``.step-N.tmp-write`` by all ranks, then renamed by rank 0, then ``latest`` is
replaced: a process killed at any moment leaves either the previous complete checkpoint or the new one (and a
temporary directory that the next start or save removes).
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

from visionzip_tune.distributed import is_main, together
from visionzip_tune.docfields import resume_safe_keys
from visionzip_tune.errors import UserError
from visionzip_tune.files import atomic_write, disk_errors, remove_stale_temps, share_as_created
from visionzip_tune.training.config import Config

LATEST = "latest"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
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
    """Write ``step-{step:06d}`` (collective: every rank calls it) and point ``latest`` at it; returns its path.

    A checkpoint that cannot be written (no space, quota, permissions) raises :class:`UserError` on every rank,
    naming the path and the free space; its temporary directory is removed and the previous checkpoint stays.
    """
    root = checkpoints_root(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp-write"

    def prepare() -> None:
        with disk_errors(root, f"the checkpoint of step {step}"):
            if is_main():
                remove_stale_temps(root)  # also a leftover of a run killed while writing this same step
                tmp.mkdir(parents=True)

    def write(tensors: dict[str, torch.Tensor]) -> None:
        with disk_errors(final, f"the checkpoint of step {step}"):
            # Frozen weights never change: they stay out (the base model is reloaded from its source).
            engine.save_checkpoint(str(tmp), tag="ds", exclude_frozen_parameters=True, save_latest=False)
            torch.save(_rng_state(), tmp / f"rng-rank{engine.global_rank:03d}.pt")
            if is_main():
                save_file(tensors, tmp / TRAINABLE_FILE)
                (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))

    def publish() -> None:
        with disk_errors(final, f"the checkpoint of step {step}"):
            if is_main():
                if final.exists():  # re-saving a step after a resume from an older checkpoint
                    shutil.rmtree(final)
                share_as_created(tmp)
                os.replace(tmp, final)
                atomic_write(root / LATEST, (final.name + "\n").encode())
                _prune(root, keep)

    together(prepare)
    tensors = gather_trainable(trainable)  # collective under ZeRO
    try:
        together(lambda: write(tensors))
        together(publish)
    except UserError:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _prune(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints (``keep=0``: keep all)."""
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
    if not (path / STATE_FILE).is_file():
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
    if (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints" / LATEST).is_file():  # a run directory: its newest checkpoint
        return latest_checkpoint(path)
    raise UserError(
        f"train.resume={resume!r} is neither 'auto', 'never', a checkpoint directory (with state.json, e.g. "
        "runs/x/checkpoints/step-000100) nor a run directory with checkpoints/latest"
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of checkpoint ``path``: step, sampler position, world size, config, fingerprints."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def resume_problems(state: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the run that wrote a checkpoint (its ``state``) and this one (``now``: any of
    ``config`` (the config as a dict), ``world_size``, ``data_fingerprint``, ``base_fingerprint``) in a way that
    changes the result, one ``key: then -> now`` line each (the config keys declared ``resume_safe`` may change;
    paths among them because the data and the base model are compared by content, their fingerprints)."""
    problems = []
    if "config" in now and "config" in state:
        then, current = _flatten(state["config"]), _flatten(now["config"])
        safe = resume_safe_keys(Config)
        for key in sorted(then.keys() | current.keys()):
            covered = key in safe or any(key.startswith(f"{parent}.") for parent in safe)
            if not covered and then.get(key) != current.get(key):
                problems.append(f"{key}: {then.get(key)!r} -> {current.get(key)!r}")
    for key, what in (("data_fingerprint", "the training data"), ("base_fingerprint", "the base model's weights")):
        if key in now and key in state and now[key] != state[key]:
            problems.append(f"{what} changed ({key} {state[key]} -> {now[key]})")
    if "world_size" in now and state.get("world_size", now["world_size"]) != now["world_size"]:
        problems.append(
            f"written by {state['world_size']} processes but this run has {now['world_size']} (the data order and the "
            f"optimizer state are sharded per process): resume with {state['world_size']} processes, e.g. "
            f"NPROC_PER_NODE={state['world_size']} bash train.sh ... (NNODES x NPROC_PER_NODE on several nodes)"
        )
    return problems


def refuse_incompatible_resume(path: str | Path, state: dict[str, Any], now: dict[str, Any]) -> None:
    """:class:`UserError` naming every difference :func:`resume_problems` finds, if any."""
    problems = resume_problems(state, now)
    if problems:
        raise UserError(
            f"cannot resume from checkpoint {path}, which this run would not continue faithfully: "
            f"{'; '.join(problems)}. Run with the checkpoint's settings to resume it, or start a new run in another "
            "output.dir (or set train.resume=never there)."
        )


def load_checkpoint(engine: Any, path: str | Path, world_size: int) -> dict[str, Any]:
    """Restore optimizer, scheduler, trainable weights and this rank's RNG from ``path``; returns state.json."""
    path = Path(path)
    state = read_state(path)
    refuse_incompatible_resume(path, state, {"world_size": world_size})
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
