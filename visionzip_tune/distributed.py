"""Process group, rank helpers and DeepSpeed ZeRO helpers.

Works the same under ``torchrun`` (any number of processes and nodes) and as a plain single process (tests,
``python -m visionzip_tune train``), where a world of one is set up without opening a port.

The ranks meet in a rendezvous of their own before the process group connects (:func:`init_distributed`): each
leaves its name in torch's TCP store, so a rank that does not come is named while the others wait (the watchdog's
reports) and when they give up after ``VZT_PROCESS_GROUP_TIMEOUT_S`` seconds, in one paragraph (exit status 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

from visionzip_tune import watchdog
from visionzip_tune.errors import UserError

T = TypeVar("T")
PROCESS_GROUP_TIMEOUT_ENV = "VZT_PROCESS_GROUP_TIMEOUT_S"


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
            _join(backend, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank=dist.get_rank(), local_rank=int(os.environ["LOCAL_RANK"]), world_size=dist.get_world_size())


def process_group_timeout() -> timedelta | None:
    """``VZT_PROCESS_GROUP_TIMEOUT_S``: how long a rank waits for the others, at the rendezvous and in every
    collective, before it stops with an error; None (unset) for torch's defaults: 30 minutes, 10 for NCCL's
    collectives."""
    value = os.environ.get(PROCESS_GROUP_TIMEOUT_ENV, "")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UserError(
            f"{PROCESS_GROUP_TIMEOUT_ENV}={value!r}: give the seconds a rank waits for the others before it gives up "
            "(> 0)"
        )
    return timedelta(seconds=seconds)


def _join(backend: str, rank: int, world_size: int) -> None:
    """The process group env:// would make (the same store, its keys under the same prefix, the same timeouts
    unless ``VZT_PROCESS_GROUP_TIMEOUT_S`` is set), joined after a rendezvous that names the missing ranks
    (:class:`_Rendezvous`)."""
    timeout = process_group_timeout()
    # Unset, torch's own default (30 minutes; 10 for NCCL, when it has one) for the store as for the group.
    torch_default = default_pg_nccl_timeout if backend == "nccl" and default_pg_nccl_timeout else default_pg_timeout
    rendezvous = _Rendezvous(rank, world_size, timeout or torch_default)
    store = rendezvous.meet()
    connections = f"the {backend} connections between all {world_size} ranks (all are at the rendezvous)"
    with watchdog.phase("joining the process group", connections):
        try:
            dist.init_process_group(
                backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world_size, timeout=timeout
            )
        except dist.DistError as err:
            waited = watchdog.duration(rendezvous.timeout.total_seconds())
            raise UserError(
                f"rank {rank} of {world_size} could not connect to every other rank within {waited} "
                f"({PROCESS_GROUP_TIMEOUT_ENV}), although all of them reached the rendezvous: a rank stopped in "
                f"between (its output says why) ({err})."
            ) from None


class _Rendezvous:
    """The ranks meet in torch's TCP store at ``MASTER_ADDR:MASTER_PORT`` (torchrun's agent hosts it; without
    torchrun, rank 0 does), each leaving its host and pid under a key of its own, so a rank that does not come is
    named: in the watchdog's reports while the others wait, and in the error when they give up."""

    def __init__(self, rank: int, world_size: int, timeout: timedelta):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.host, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
        # torchrun's store outlives a restart of its workers: each attempt meets under keys of its own.
        self.prefix = f"visionzip_tune/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store: dist.TCPStore | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def meet(self) -> dist.TCPStore:
        """The store, once every rank has come; :class:`UserError` naming the missing ranks after the timeout."""
        hosted_by = "torchrun's agent on the first node" if self.by_agent else "rank 0"
        with watchdog.phase("the process group's rendezvous", f"the rendezvous store at {self.address} ({hosted_by})"):
            try:
                self.store = dist.TCPStore(
                    self.host,
                    self.port,
                    self.world_size,
                    is_master=self.rank == 0 and not self.by_agent,
                    timeout=self.timeout,
                    wait_for_workers=False,
                    multi_tenant=True,
                )
            except dist.DistError as err:
                raise UserError(
                    f"rank {self.rank} could not reach the rendezvous store at {self.address} ({hosted_by}) within "
                    f"{watchdog.duration(self.timeout.total_seconds())} ({PROCESS_GROUP_TIMEOUT_ENV}): check that the "
                    f"first node runs and that MASTER_ADDR and MASTER_PORT are the same on every node ({err})."
                ) from None
        self.store.set(f"{self.prefix}rank{self.rank}", f"{socket.gethostname()} pid {os.getpid()}")
        if self.store.add(f"{self.prefix}arrived", 1) == self.world_size:
            self.store.set(f"{self.prefix}complete", "yes")
        deadline = time.monotonic() + self.timeout.total_seconds()
        with watchdog.phase("the process group's rendezvous", self.waits_on):
            while True:
                try:
                    self.store.wait([f"{self.prefix}complete"], timedelta(seconds=1))
                    return self.store
                except dist.DistStoreError:  # not complete within the second: still waiting
                    if time.monotonic() > deadline:
                        raise UserError(self.timed_out()) from None

    def missing(self) -> list[int]:
        """The ranks that have not come yet (a round trip to the store per rank)."""
        return [r for r in range(self.world_size) if not self.store.check([f"{self.prefix}rank{r}"])]

    def waits_on(self) -> str:
        """What this rank waits on, for the watchdog: rank 0 names the missing ranks, the others count them."""
        if self.rank == 0:
            return f"rank(s) {_listed(self.missing())} of {self.world_size}, not at the rendezvous {self.address} yet"
        arrived = self.store.add(f"{self.prefix}arrived", 0)
        return f"{self.world_size - arrived} of {self.world_size} ranks, not at the rendezvous {self.address} yet"

    def timed_out(self) -> str:
        return (
            f"the process group's rendezvous at {self.address} timed out after "
            f"{watchdog.duration(self.timeout.total_seconds())} ({PROCESS_GROUP_TIMEOUT_ENV}): rank(s) "
            f"{_listed(self.missing())} of {self.world_size} never came. A rank that crashed or hangs before the "
            "rendezvous says why in its own output (under bash train.sh, the launcher's [wait] lines say where each "
            "rank of its node stands); on several nodes every node must run the same command with the same NNODES, "
            "MASTER_ADDR and MASTER_PORT."
        )


def _listed(ranks: list[int], most: int = 16) -> str:
    shown = ", ".join(map(str, ranks[:most]))
    return shown if len(ranks) <= most else f"{shown}, ... ({len(ranks)} in all)"


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


def _all_reduce(values: list[float], op) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = _collective_device()
        tensor = tensor.to(device) if device is not None else tensor
        dist.all_reduce(tensor, op=op)
    return tensor.cpu().tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64: gloo has no bf16 and the counts must stay exact)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest of a few floats over all ranks (each position on its own)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


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
