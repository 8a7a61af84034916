"""``divprune``: DivPrune's greedy max-min diversity selection (Alvar et al., DivPrune: Diversity-based Visual Token
Pruning for Large Multimodal Models, CVPR 2025; vbdi/divprune).

Rule, on the feature-layer features of the patches (CLS dropped; pre-projector, so that the choice does not drift
while the projector trains: the official code selects among the projected LLM inputs): with the cosine distance
d(i, j) = 1 - cos(f_i, f_j), the first patch kept is the one whose nearest other patch is farthest (the second
smallest distance of its column); each next one maximises its smallest distance to the patches kept so far; K
patches in all, ties to the lower index (argmax), distances in float32, then emitted in positional order. A kept
patch is never chosen again (the official loop can pick one twice when many patches are identical, as in a flat
image region, whose distances to the kept set are all about 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visionzip_tune.algorithm.compress import ZipResult
from visionzip_tune.algorithm.compressors.base import Compressor, Signals, kept_rows, patch_selection


def max_min_diverse(features: Tensor, count: int) -> Tensor:
    """(B, count) int64: the greedy max-min diverse subset of ``features`` (B, P, F), in selection order."""
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - torch.bmm(unit, unit.transpose(1, 2))  # (B, P, P), symmetric
    batch = features.shape[0]
    rows = torch.arange(batch, device=features.device)
    nearest = distance.topk(2, dim=1, largest=False).values[:, 1]  # each patch's distance to its nearest other
    chosen = [nearest.argmax(dim=1)]
    closest = distance[rows, chosen[0]].clone()  # (B, P) distance of every patch to the kept set
    for _ in range(count - 1):
        closest[rows, chosen[-1]] = -torch.inf
        chosen.append(closest.argmax(dim=1))
        closest = torch.minimum(closest, distance[rows, chosen[-1]])
    return torch.stack(chosen, dim=1)


class DivPrune(Compressor):
    name = "divprune"
    source = "Alvar et al., DivPrune (CVPR 2025), vbdi/divprune"

    def select(self, signals: Signals, params: dict) -> ZipResult:
        kept = max_min_diverse(signals.patch_features, params["tokens"]).sort(dim=1).values
        return patch_selection(kept, signals.has_cls, signals.hidden.shape[1])

    def combine(self, hidden: Tensor, selection: ZipResult) -> Tensor:
        return kept_rows(hidden, selection)
