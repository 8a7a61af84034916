"""Question-agnostic visual-token compressors behind one interface (:class:`~.base.Compressor`): VisionZip and five
rivals, each a pure function of one unit's tower signals at the feature layer, K rows per unit.

Adding a compressor means one module here and one line in :data:`COMPRESSORS`. The families (``visionzip_tune.
families``) give each compressor the signals its tower has and refuse a compressor that needs one it lacks (the
CLS-attention ones on towers without CLS).
"""

from __future__ import annotations

from visionzip_tune.algorithm.compressors.base import (
    CLS_ATTENTION,
    GRID,
    KEYS,
    RECEIVED_ATTENTION,
    SEEDS,
    SIGNAL_NAMES,
    Compressor,
    Signals,
)
from visionzip_tune.algorithm.compressors.divprune import DivPrune
from visionzip_tune.algorithm.compressors.pool import Pool
from visionzip_tune.algorithm.compressors.prumerge_plus import PruMergePlus
from visionzip_tune.algorithm.compressors.random_choice import Random, pixel_seeds
from visionzip_tune.algorithm.compressors.vispruner import VisPruner
from visionzip_tune.algorithm.compressors.visionzip import VisionZip

COMPRESSORS: dict[str, Compressor] = {
    compressor.name: compressor
    for compressor in (VisionZip(), Random(), Pool(), DivPrune(), VisPruner(), PruMergePlus())
}


def compressor_named(name: str) -> Compressor:
    """The compressor called ``name``; ``ValueError`` listing them for another name."""
    if name not in COMPRESSORS:
        raise ValueError(f"no compressor named {name!r}; the compressors are {', '.join(COMPRESSORS)}")
    return COMPRESSORS[name]


__all__ = [
    "CLS_ATTENTION",
    "COMPRESSORS",
    "GRID",
    "KEYS",
    "RECEIVED_ATTENTION",
    "SEEDS",
    "SIGNAL_NAMES",
    "Compressor",
    "Signals",
    "compressor_named",
    "pixel_seeds",
]
