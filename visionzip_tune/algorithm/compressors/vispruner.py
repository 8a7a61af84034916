"""``vispruner``: VisPruner's important + diverse tokens (Zhang et al., Beyond Text-Visual Attention: Exploiting Visual
Cues for Effective Token Pruning in VLMs, ICCV 2025; Theia-4869/VisPruner, ``llava_arch.py: encode_images``).

Rule (CLS-attention towers): the patches are ranked by the attention the CLS token pays them at the feature layer,
averaged over heads (descending, a stable sort: ties to the lower index). The first ``floor(K * important_ratio)``
(0.5 in the official code) are the important ones; the rest are candidates, in that ranked order. Duplicates are
removed from the candidates by feature similarity until K - important remain: while more remain, with
r = min(8, remaining - needed), the candidates at even places of the list are compared with those at odd places by
the cosine similarity of their feature-layer features, each even one scored by its most similar odd one, the r
highest-scoring even ones are dropped, and the list becomes the other even ones (in descending score order)
followed by the odd ones. Important and surviving candidates are emitted in positional order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visionzip_tune.algorithm.compress import ZipResult, take_tokens
from visionzip_tune.algorithm.compressors.base import CLS_ATTENTION, Compressor, Signals, kept_rows, patch_selection


def remove_duplicates(features: Tensor, candidates: Tensor, keep: int) -> Tensor:
    """VisPruner's duplicate removal: ``candidates`` (B, R) patch indices into ``features`` (B, P, F), cut to
    ``keep`` by dropping the even-place candidates most similar to an odd-place one, at most 8 per round."""
    if keep == 0:
        return candidates[:, :0]
    unit = F.normalize(features, dim=-1)
    while (drop := min(8, candidates.shape[1] - keep)) > 0:
        tokens = take_tokens(unit, candidates)
        even, odd = tokens[:, ::2], tokens[:, 1::2]
        similarity = torch.bmm(even, odd.transpose(1, 2)).max(dim=-1).values  # (B, ceil(R / 2))
        distinct = similarity.argsort(dim=-1, descending=True)[:, drop:]
        candidates = torch.cat([candidates[:, ::2].gather(1, distinct), candidates[:, 1::2]], dim=1)
    return candidates


class VisPruner(Compressor):
    name = "vispruner"
    reads = frozenset({CLS_ATTENTION})
    parameters = {"tokens": None, "important_ratio": 0.5}
    source = "Zhang et al., VisPruner (ICCV 2025), Theia-4869/VisPruner"

    def check(self, params: dict) -> None:
        super().check(params)
        ratio = params["important_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"vispruner: important_ratio must be a number in [0, 1], got {ratio!r}")

    def select(self, signals: Signals, params: dict) -> ZipResult:
        tokens = params["tokens"]
        important = int(tokens * params["important_ratio"])
        attention = signals.cls_attention  # summed over heads: the order of their mean
        ranked = torch.sort(attention, dim=-1, descending=True, stable=True).indices
        diverse = remove_duplicates(signals.patch_features, ranked[:, important:], tokens - important)
        kept = torch.cat([ranked[:, :important], diverse], dim=1).sort(dim=1).values
        return patch_selection(kept, signals.has_cls, signals.hidden.shape[1], scores=attention)

    def combine(self, hidden: Tensor, selection: ZipResult) -> Tensor:
        return kept_rows(hidden, selection)
