"""DeepSpeed's C++ CPU ops: the one a run never uses is never built, the one it uses is built before DeepSpeed
initialises (by the launcher, once per node, before any rank starts), and a lock a killed build left is recovered
first (:mod:`~visionzip_tune.training.build_lock`).

DeepSpeed JIT-builds two ops for a run here: ``deepspeed_shm_comm`` whenever its communication backend starts
(``deepspeed.comm.torch.TorchBackend``, at ``deepspeed.initialize`` and at ZeRO-3's ``zero.Init``), and
``cpu_adam`` for ZeRO-Offload's optimizer (``DeepSpeedCPUAdam``, with ``deepspeed.offload_optimizer``).
"""

from __future__ import annotations

from visionzip_tune import watchdog
from visionzip_tune.training.build_lock import clear_build_locks, extensions_root
from visionzip_tune.training.config import Config


def skip_shared_memory_comm() -> None:
    """Never build ``deepspeed_shm_comm``: this package never uses it.

    DeepSpeed builds it only where ``deepspeed.ops.__compatible_ops__`` marks it compatible
    (``deepspeed.comm.torch.build_shm_op``), and marking it incompatible is how DeepSpeed itself leaves it out where
    it cannot build: the backend then keeps no shm op, and nothing else changes. The op serves one collective,
    ``inference_all_reduce``, which only DeepSpeed inference's tensor-parallel layers call (training never does),
    and it sets up its shared memory only when every rank runs on one host by the count of DeepSpeed's own launcher
    (``LOCAL_SIZE``, which torchrun does not set): under torchrun it is built, then initialised to do nothing.
    Leaving it out also leaves out its start-up wait for the peers' shared memory under DeepSpeed's launcher.
    """
    import deepspeed.ops  # lazy: slow to import; only runs that initialise DeepSpeed call this
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder  # lazy: part of deepspeed (above)

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def needed_builders(cfg: Config) -> list[type]:
    """The op builders a run of ``cfg`` loads: ``cpu_adam``'s with ZeRO-Offload (``deepspeed.offload_optimizer``)."""
    if not cfg.deepspeed.offload_optimizer:
        return []
    from deepspeed.ops.op_builder import CPUAdamBuilder  # lazy: slow to import; only offloading runs need it

    return [CPUAdamBuilder]


def prepare_ops(cfg: Config) -> None:
    """In a rank, before DeepSpeed initialises: the unused op left out, then :func:`build_ops`."""
    skip_shared_memory_comm()
    build_ops(cfg)


def build_ops(cfg: Config) -> None:
    """Stale build locks removed (live ones waited for), then the ops a run of ``cfg`` uses built (when built
    already: loaded, a second or so)."""
    clear_build_locks()
    for builder in needed_builders(cfg):
        where = f"the C++ compiler, building {builder.NAME} under {extensions_root()}"
        with watchdog.phase(f"building DeepSpeed's {builder.NAME} op (once per environment)", where):
            builder().load()
