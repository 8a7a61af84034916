"""Process group, rank helpers and DeepSpeed ZeRO helpers.

Works the same under ``torchrun`` (any number of processes and nodes) and as a plain single process (tests,
``python -m visionzip_tune train``), where a world of one is set up without opening a port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from visionzip_tune.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int


def init_distributed() -> Dist:
    """Join the torchrun process group (env://), or create a world of one; returns this process's ranks."""
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if not launched:
        # DeepSpeed's engine reads these even for a single process.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank=dist.get_rank(), local_rank=int(os.environ["LOCAL_RANK"]), world_size=dist.get_world_size())


def cleanup_distributed() -> None:
    """Destroy a torchrun process group. A world of one is kept for the life of the process: DeepSpeed caches its
    groups globally, so a later in-process run (tests, notebooks) must find the same group again."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()


def exit_worker(status: int) -> NoReturn:
    """End a torchrun worker with ``status`` now, once its output is flushed, skipping the interpreter's teardown.

    The process group outlives :func:`cleanup_distributed` (DeepSpeed keeps references to it), so gloo's C++ side
    is destroyed during that teardown, where it can abort a run that succeeded ("terminate called without an
    active exception", exit status -6). Every file the run writes is complete and closed before this point.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_main() -> bool:
    """Rank 0 (also outside a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed: torchrun interleaves ranks' buffered output otherwise)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def _collective_device() -> torch.device | None:
    """Where a collective's tensor must live: the current GPU under NCCL, anywhere under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64: gloo has no bf16 and the counts must stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = _collective_device()
        tensor = tensor.to(device) if device is not None else tensor
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


class PeerFailed(UserError):
    """Raised on the ranks that did not fail themselves when another rank hit a :class:`UserError` (its own message
    says what went wrong)."""


def together(action: Callable[[], T]) -> T:
    """Run ``action()`` on every rank; if it raised a :class:`UserError` on any rank, raise on every rank (that
    rank's own error there, :class:`PeerFailed` elsewhere), so no rank goes on to a collective the others skip."""
    error = None
    try:
        result = action()
    except UserError as err:
        error = err
    (failed,) = all_reduce_sum([float(error is not None)])
    if failed:
        raise error or PeerFailed(f"{int(failed)} other process(es) stopped with an error (their message says why)")
    return result


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (anything picklable) on every rank; the others' ``obj`` is ignored. A collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=_collective_device())
    return holder[0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place where it lives (no host round trip); returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# Wrappers and ZeRO-3 partitioned parameters


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The module inside a DeepSpeed engine / DDP wrapper (``.module``); others pass through."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def is_partitioned(param: torch.Tensor) -> bool:
    """ZeRO-3 partitions a parameter in place and tags it with ``ds_id``; its ``.data`` is empty outside a gather."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also when ZeRO-3 holds only this rank's shard of it."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    """A parameter's whole element count, also when ZeRO-3 holds only this rank's shard of it."""
    return getattr(param, "ds_numel", param.numel())


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block; a collective when any is ZeRO-3 partitioned, a no-op otherwise.

    ``modifier_rank``: the rank whose in-block changes are kept (broadcast to the others when the block closes).
    """
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed  # lazy: optional until DeepSpeed has partitioned a model, which it then has imported

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield
