"""``prumerge_plus``: LLaVA-PruMerge+'s outlier and spatially uniform tokens, each merged with its most similar
tokens (Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models, ICCV 2025;
42Shawn/LLaVA-PruMerge, ``clip_encoder.py: token_prune_merge_advanced_plus``), at a fixed K.

The official count is adaptive: the patches whose CLS attention is an outlier (above Q3 + 1.5 IQR) are kept, plus
about three times as many spatially uniform patches (every step/3-th position, step = 1 / outlier ratio), plus one
extra token. Here K is fixed and split in the same proportions: ``important = max(1, round((K - 1) / 4))`` patches
of highest CLS attention, ``K - 1 - important`` spatially uniform ones, one extra token.

Rule (CLS-attention towers; CLS dropped; attention a = the CLS row of the feature layer, per-head softmax averaged
over heads, where the official code reads the tower's last layer as one full-width head, which a tower stopped after
its feature layer does not run):
* important: the top patches by a (a stable sort: ties to the lower index);
* uniform: of the R other patches in raster order, those at places floor(i R / m), i = 0..m-1 (m of them, evenly
  spread, never a duplicate; the official arithmetic sequence skips positions already kept);
* each kept patch i (positional order) becomes x_i + sum_j a_j x_j over the ``neighbours`` (32) other patches j whose
  feature-layer keys (averaged over heads, where the official code uses full-width keys) are most cosine-similar to
  its own: kept and pruned alike, the weights a_j unnormalised, as in the official code;
* the extra token is sum_j a_j x_j over the pruned patches.
Rows: the kept patches in positional order (the official code emits the important ones by descending attention,
then the uniform ones), then the extra token, which stands at the most attended pruned patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visionzip_tune.algorithm.compress import DOMINANT, DROPPED, ZipResult, remaining_positions, take_tokens
from visionzip_tune.algorithm.compressors.base import CLS_ATTENTION, KEYS, Compressor, Signals


def split(tokens: int) -> tuple[int, int]:
    """(important, uniform) kept patches of K rows: PruMerge+'s 1 : 3 proportion, and one extra token."""
    important = max(1, round((tokens - 1) / 4))
    return important, tokens - 1 - important


def uniform_places(remaining: int, count: int, device=None) -> Tensor:
    """(count,) int64: places floor(i R / m) of a list of R = ``remaining`` items, evenly spread."""
    return torch.arange(count, device=device) * remaining // max(count, 1)


class PruMergePlus(Compressor):
    name = "prumerge_plus"
    reads = frozenset({CLS_ATTENTION, KEYS})
    parameters = {"tokens": None, "neighbours": 32}
    source = "Shang et al., LLaVA-PruMerge (ICCV 2025), 42Shawn/LLaVA-PruMerge"

    def check(self, params: dict) -> None:
        super().check(params)
        if params["tokens"] < 2:
            raise ValueError(
                f"prumerge_plus: tokens must be >= 2 (kept patches and the extra token), got {params['tokens']}"
            )
        neighbours = params["neighbours"]
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"prumerge_plus: neighbours must be an int >= 1, got {neighbours!r}")

    def fits(self, params: dict, positions: int, has_cls: bool) -> None:
        patches = positions - int(has_cls)
        if params["tokens"] - 1 > patches - 1:
            raise ValueError(
                f"prumerge_plus: tokens={params['tokens']} needs {params['tokens'] - 1} kept patches and at least one "
                f"pruned one, but a unit has only {patches} patches"
            )

    def select(self, signals: Signals, params: dict) -> ZipResult:
        offset = int(signals.has_cls)
        attention = signals.cls_attention / signals.heads  # (B, P): the mean over heads
        keys = signals.keys[:, offset:]  # (B, P, d)
        batch, patches = attention.shape
        important_count, uniform_count = split(params["tokens"])
        important = torch.sort(attention, dim=-1, descending=True, stable=True).indices[:, :important_count]
        others = remaining_positions(important, patches)
        uniform = others.index_select(1, uniform_places(others.shape[1], uniform_count, others.device))
        kept = torch.cat([important, uniform], dim=1).sort(dim=1).values  # (B, k) patch indices
        pruned = remaining_positions(kept, patches)
        unit = F.normalize(keys.float(), dim=-1)
        similarity = torch.bmm(take_tokens(unit, kept), unit.transpose(1, 2))  # (B, k, P)
        similarity.scatter_(2, kept.unsqueeze(-1), -torch.inf)  # never its own neighbour
        neighbours = min(params["neighbours"], patches - 1)
        clusters = similarity.topk(neighbours, dim=-1).indices  # (B, k, M)
        weights = attention.gather(1, clusters.flatten(1)).view_as(clusters)
        extra = torch.zeros(batch, patches, dtype=attention.dtype, device=attention.device)
        extra.scatter_(1, pruned, attention.gather(1, pruned))
        groups = torch.zeros(batch, patches, dtype=torch.long, device=kept.device)  # pruned: the extra row (0)
        groups.scatter_(1, kept, DOMINANT)
        stands_at = pruned.gather(1, attention.gather(1, pruned).argmax(dim=1, keepdim=True))
        if offset:
            groups = torch.cat([groups.new_full((batch, 1), DROPPED), groups], dim=1)
            extra = torch.cat([extra.new_zeros(batch, 1), extra], dim=1)
        mixing = {"clusters": clusters + offset, "weights": weights, "extra": extra}
        return ZipResult(None, kept + offset, stands_at + offset, groups, attention, mixing)

    def combine(self, hidden: Tensor, selection: ZipResult) -> Tensor:
        mixing = selection.mixing
        clusters, weights = mixing["clusters"], mixing["weights"].to(hidden.dtype)
        batch, kept, neighbours = clusters.shape
        members = take_tokens(hidden, clusters.flatten(1)).view(batch, kept, neighbours, -1)
        rows = take_tokens(hidden, selection.dominant_indices) + (members * weights.unsqueeze(-1)).sum(dim=2)
        extra = torch.bmm(mixing["extra"].to(hidden.dtype).unsqueeze(1), hidden)  # (B, 1, D)
        return torch.cat([rows, extra], dim=1)
