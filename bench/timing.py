"""Timing and dtype helpers shared by the benches, for the CPU and for a CUDA device alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def time_ms(fn: Callable[[], object], device: str | torch.device) -> float:
    """Milliseconds one call of ``fn`` takes on ``device``.

    CPU: wall time. CUDA: the time between two events recorded on the current stream around the call (work queued
    before it is drained first, so it is not counted); this is the device's time for what ``fn`` enqueues, host
    launch gaps included, without timing the host's own synchronisation.
    """
    if not is_cuda(device):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000
    torch.cuda.synchronize(device)
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    fn()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event)
