"""``random``: K patches uniformly at random, the baseline UniPruneBench (arXiv 2511.02650) finds "a surprisingly strong
baseline".

Rule: the unit's seed is a hash of its pixels (their bfloat16 bits, so the same image gives the same seed in float32
and bfloat16, on any device; an evenly strided sample of at most 65,536 of them, which keeps the hash at a fraction
of a millisecond) and of the ``seed`` parameter; each patch j gets the pseudo-random score
``h(seed, j)`` of a chain of multiplicative congruential steps modulo the prime 2^31 - 1 (a bijection of j, so no two
patches tie), and the K patches of lowest score are kept, in positional order; the others (and CLS) are dropped.
The same image therefore keeps the same patches in every epoch and on every machine. With ``resample=true`` the K
patches are drawn anew at every call from torch's random generator (different every epoch; seeded by the run).
All integer arithmetic stays below 2^63, so it is exact on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visionzip_tune.algorithm.compress import ZipResult
from visionzip_tune.algorithm.compressors.base import SEEDS, Compressor, Signals, kept_rows, patch_selection

_PRIME = 2**31 - 1
_STEPS = (48271, 69621, 40692)  # multipliers of the minimal-standard generators: x -> a x + 11 mod P is a bijection
_HASHED = 1 << 16  # pixel values hashed per unit, at most


def _mix(x: Tensor) -> Tensor:
    """A pseudo-random bijection of int64 values in [0, P)."""
    for multiplier in _STEPS:
        x = (x * multiplier + 11) % _PRIME
    return x


def pixel_seeds(pixels: Tensor) -> Tensor:
    """(B,) int64 in [0, P): a hash of each unit's pixels (B, ...), read as their bfloat16 bits (a strided sample of
    at most 65,536 values per unit)."""
    flat = pixels.detach().reshape(pixels.shape[0], -1)
    flat = flat[:, :: -(-flat.shape[1] // _HASHED)]  # ceil division: at most _HASHED values
    bits = flat.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int64) + 32768
    index = torch.arange(bits.shape[1], device=pixels.device, dtype=torch.int64)
    weights = (index * 2654435761 + 12345) % _PRIME
    return _mix((bits * weights % _PRIME).sum(dim=1) % _PRIME)


def patch_scores(seeds: Tensor, seed: int, patches: int) -> Tensor:
    """(B, P) int64: the score of each patch of units with pixel ``seeds`` (B,) under the ``seed`` parameter."""
    unit = _mix((seeds + seed % _PRIME) % _PRIME)
    index = torch.arange(patches, device=seeds.device, dtype=torch.int64)
    return _mix((unit.unsqueeze(1) * 1_000_003 + index) % _PRIME)


class Random(Compressor):
    name = "random"
    reads = frozenset({SEEDS})
    parameters = {"tokens": None, "seed": 0, "resample": False}
    source = "UniPruneBench (Peng et al., arXiv 2511.02650): random pruning as a baseline"

    def check(self, params: dict) -> None:
        super().check(params)
        if isinstance(params["seed"], bool) or not isinstance(params["seed"], int):
            raise ValueError(f"random: seed must be an int, got {params['seed']!r}")
        if not isinstance(params["resample"], bool):
            raise ValueError(f"random: resample must be true or false, got {params['resample']!r}")

    def select(self, signals: Signals, params: dict) -> ZipResult:
        patches = signals.patch_features.shape[1]
        if params["resample"]:
            order = torch.rand(signals.hidden.shape[0], patches, device=signals.hidden.device).argsort(dim=1)
        else:
            order = patch_scores(signals.seeds, params["seed"], patches).argsort(dim=1)
        kept = order[:, : params["tokens"]].sort(dim=1).values
        return patch_selection(kept, signals.has_cls, signals.hidden.shape[1])

    def combine(self, hidden: Tensor, selection: ZipResult) -> Tensor:
        return kept_rows(hidden, selection)
