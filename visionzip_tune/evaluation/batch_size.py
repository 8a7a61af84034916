"""How many requests go into one batch: a number, or ``auto``.

``auto``: on a GPU, the largest batch that fits, found on the work itself: batches start at ``max_batch_size``
(default 64) and a batch that runs out of GPU memory is split in halves, which run instead, and the size is halved
for the rest. What it picked is printed once, and again if it has to go down later. On a CPU, where running out of
memory cannot be caught, ``auto`` is :data:`CPU_AUTO`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from visionzip_tune.errors import UserError

T = TypeVar("T")
DEFAULT_MAX = 64
CPU_AUTO = 8


def parse_batch_size(value) -> int | str:
    """lmms-eval's ``--batch_size`` (``1``, ``"8"``, ``"auto"``; ``"auto:N"`` counts as ``auto``) -> an int >= 1 or
    ``"auto"``; :class:`UserError` otherwise."""
    text = str(value).strip()
    if text == "auto" or text.startswith("auto:"):
        return "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise UserError(f"batch_size={value!r}: give a number of requests per batch (>= 1) or auto")


class BatchSize:
    """How many requests go into one batch on ``device``: fixed, or found by ``auto`` (module docstring)."""

    def __init__(self, value, device: torch.device, max_batch_size: int | None = None, announce=print):
        self.auto = parse_batch_size(value) == "auto"
        self.cuda = device.type == "cuda"
        self.announce = announce
        if not self.auto:
            self.size = parse_batch_size(value)
        elif self.cuda:
            self.size = int(max_batch_size or DEFAULT_MAX)
        else:
            self.size = CPU_AUTO
            announce(f"[visionzip] batch_size=auto on a CPU: {CPU_AUTO} requests per batch")
        self._fitted: int | None = None

    def run(self, items: Sequence[T], run_batch: Callable[[Sequence[T]], list[Any]]) -> list[Any]:
        """``run_batch(items)``, split in halves (recursively) where ``auto`` finds that it does not fit."""
        if not items:
            return []
        if not (self.auto and self.cuda):
            return run_batch(items)
        try:
            results = run_batch(items)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise UserError(
                    "batch_size=auto: a single request does not fit in GPU memory; use a smaller model or dtype"
                ) from None
            results = None  # retried below, after the exception (and the tensors its frames hold) is gone
        if results is None:
            gc.collect()
            torch.cuda.empty_cache()
            half = len(items) // 2
            self.size = min(self.size, half)
            return self.run(items[:half], run_batch) + self.run(items[half:], run_batch)
        if self._fitted is None or len(items) < self._fitted:
            self._fitted = len(items)
            self.announce(f"[visionzip] batch_size=auto: {len(items)} requests per batch fit in GPU memory")
        return results
