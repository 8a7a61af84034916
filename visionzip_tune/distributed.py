"""Process group, rank helpers and the DeepSpeed config built from a recipe.

Works the same under ``torchrun`` (any number of processes and nodes) and as a plain single process (tests,
``python -m visionzip_tune train``), where a world of one is set up without opening a port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from visionzip_tune.config import Config


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed: torchrun interleaves ranks' buffered output otherwise)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64 on CPU: gloo has no bf16 and the counts must stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        tensor = tensor.to(device) if device is not None else tensor
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def use_bf16(cfg: Config) -> bool:
    """bf16 where the hardware supports it ('auto'), fp32 on CPU."""
    if cfg.deepspeed.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(cfg.deepspeed.bf16)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this recipe (LLaVA's scripts/zero2.json / zero3.json with the numbers filled)."""
    t = cfg.train
    zero: dict[str, Any] = {
        "stage": cfg.deepspeed.zero_stage,
        "overlap_comm": torch.cuda.is_available(),  # overlap needs CUDA streams; on CPU it only adds copies
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if cfg.deepspeed.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e8,
            stage3_param_persistence_threshold=1e6,
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
        )
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": use_bf16(cfg)},
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW over the trainable parameters only (param groups for projector_lr).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we print our own one line per step
        "wall_clock_breakdown": False,
    }
