"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip) as a compressor: the rule of
:mod:`visionzip_tune.algorithm.compress`, exactly.

Dominant tokens by the attention the CLS token pays them (summed over heads; a tower without CLS: the attention each
token receives), CLS kept as dominant token #0; the rest merged into ``contextual`` tokens by key similarity to
uniformly spaced targets. Parameters: ``dominant`` (CLS included) and ``contextual`` tokens per unit.
"""

from __future__ import annotations

from torch import Tensor

from visionzip_tune.algorithm import compress
from visionzip_tune.algorithm.compress import ZipResult
from visionzip_tune.algorithm.compressors.base import CLS_ATTENTION, KEYS, RECEIVED_ATTENTION, Compressor, Signals


class VisionZip(Compressor):
    name = "visionzip"
    reads = frozenset({KEYS})
    parameters = {"dominant": None, "contextual": None}
    source = "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"

    def needs(self, has_cls: bool) -> frozenset[str]:
        """The keys, and the CLS row of the attention with CLS, else the attention each token receives."""
        return self.reads | {CLS_ATTENTION if has_cls else RECEIVED_ATTENTION}

    def check(self, params: dict) -> None:
        for key in ("dominant", "contextual"):
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"VisionZip {key} must be an int, got {value!r} ({type(value).__name__})")

    def rows(self, params: dict) -> int:
        return params["dominant"] + params["contextual"]

    def fits(self, params: dict, positions: int, has_cls: bool) -> None:
        compress.validate_budget(params["dominant"], params["contextual"], positions)

    def select(self, signals: Signals, params: dict) -> ZipResult:
        scores = signals.cls_attention if signals.has_cls else signals.received_attention
        return compress.select(
            signals.keys, scores, dominant=params["dominant"], contextual=params["contextual"], has_cls=signals.has_cls
        )

    def combine(self, hidden: Tensor, selection: ZipResult) -> Tensor:
        return compress.combine(hidden, selection)
