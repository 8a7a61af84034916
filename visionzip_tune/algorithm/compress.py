"""VisionZip as pure tensor functions: scoring, dominant selection, contextual merging.

Everything works on one encoder layer L of a vision tower: its output hidden states and the queries/keys of its
self-attention, batched over images. Nothing here knows about nn.Modules or transformers; ``capture.py`` captures
the inputs and the families (``visionzip_tune.families``) wire the result into a VLM.

Shape letters: B images, N tokens (CLS first when the encoder has one), D hidden size, H heads of size d
(``D == H * d``), K = dominant + contextual tokens kept.

Selection uses sort/index ops only: no boolean masks or ``masked_select`` (slower, and on GPU they sync with
the host), and every index set that depends only on the budget is built from Python ints, once per budget.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one fp32 attention-map chunk in ``received_attention_scores`` (2**24 * 4 bytes = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


class ZipResult(NamedTuple):
    """What a compressor made of a batch of units (VisionZip's :func:`visionzip`, and every compressor of
    :mod:`visionzip_tune.algorithm.compressors`); with ``tokens=None`` it is a selection, whose tokens the compressor
    makes for any hidden states of the same positions.

    tokens: (B, K, D) — the rows fed to the projector: the kept tokens (``dominant_indices`` order), then the merged
        rows (``contextual_indices`` order). VisionZip: dominant tokens in positional order, then contextual tokens
        in target order.
    dominant_indices: (B, kept) int64 — sequence positions of the tokens kept as rows of their own, ascending (with
        CLS, VisionZip keeps it as position 0).
    contextual_indices: (B, merged) int64 — the sequence position each merged row stands for (VisionZip: its target,
        ascending), in row order.
    groups: (B, N) int64 — what became of each sequence position: :data:`DOMINANT` (kept), the index ``c`` of the
        merged row it went into (a VisionZip target included), or :data:`DROPPED`.
    scores: the selection scores, fp32: (B, N - 1) for the patches 1..N-1 of an encoder with CLS (CLS is kept
        unscored), else (B, N); None for a compressor that scores nothing.
    mixing: None, or what else a compressor needs to make its rows from other hidden states (PruMerge+'s clusters).
    """

    tokens: Tensor | None
    dominant_indices: Tensor
    contextual_indices: Tensor
    groups: Tensor
    scores: Tensor | None
    mixing: dict[str, Tensor] | None = None


# Values of ``ZipResult.groups`` for positions that are not in a contextual group.
DOMINANT = -1
DROPPED = -2


def validate_budget(dominant: int, contextual: int, num_tokens: int) -> None:
    """Raise ``ValueError`` naming the numbers unless ``1 <= dominant``, ``0 <= contextual`` and D + C <= N."""
    for name, value in (("dominant", dominant), ("contextual", contextual)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"VisionZip {name} must be an int, got {value!r} ({type(value).__name__})")
    if dominant < 1 or contextual < 0 or dominant + contextual > num_tokens:
        raise ValueError(
            f"invalid VisionZip budget dominant={dominant}, contextual={contextual} for N={num_tokens} tokens per "
            f"image: need dominant >= 1, contextual >= 0 and dominant + contextual <= N"
        )


def validate_ratios(dominant_ratio: float, contextual_ratio: float) -> None:
    """Raise ``ValueError`` naming the numbers unless both ratios are numbers with ``0 < dominant_ratio``,
    ``0 <= contextual_ratio`` and ``dominant_ratio + contextual_ratio <= 1`` (ratio budgets, :func:`ratio_budget`)."""
    for name, value in (("dominant_ratio", dominant_ratio), ("contextual_ratio", contextual_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"VisionZip {name} must be a number, got {value!r} ({type(value).__name__})")
    if not (0 < dominant_ratio and 0 <= contextual_ratio and dominant_ratio + contextual_ratio <= 1):
        raise ValueError(
            f"invalid VisionZip ratios dominant_ratio={dominant_ratio}, contextual_ratio={contextual_ratio}: need "
            "dominant_ratio > 0, contextual_ratio >= 0 and dominant_ratio + contextual_ratio <= 1 (fractions of each "
            "image's merged tokens, e.g. 0.45 and 0.05 for 50%)"
        )


def ratio_budget(num_tokens: int, dominant_ratio: float, contextual_ratio: float) -> tuple[int, int]:
    """``(dominant, contextual)`` of a unit of N tokens under a ratio budget: ``D = max(1, floor(dominant_ratio * N))``
    and ``C = max(1, floor(contextual_ratio * N))`` (upstream VisionZip's rule for Qwen2.5-VL, float products as it
    computes them). ``ValueError`` naming the numbers when ``D + C > N`` (a unit too small for the budget)."""
    dominant = max(1, math.floor(dominant_ratio * num_tokens))
    contextual = max(1, math.floor(contextual_ratio * num_tokens))
    if dominant + contextual > num_tokens:
        raise ValueError(
            f"VisionZip ratios dominant_ratio={dominant_ratio}, contextual_ratio={contextual_ratio} give "
            f"dominant={dominant} + contextual={contextual} tokens for a unit of N={num_tokens} merged tokens: need "
            "dominant + contextual <= N (each is at least 1); give the images (frames) more pixels"
        )
    return dominant, contextual


def group_mean(x: Tensor, group: int) -> Tensor:
    """Mean over consecutive groups of ``group`` rows: x (..., S, F) -> (..., S // group, F), in x's dtype.

    A Qwen merge group's patches (its 2 x 2 patches, fused by the merger into one token) are consecutive rows of
    the vision tower, so this turns per-patch scores and keys into per-merged-token ones."""
    *lead, rows, width = x.shape
    return x.reshape(*lead, rows // group, group, width).mean(dim=-2)


def key_metric(keys: Tensor, num_heads: int) -> Tensor:
    """Keys averaged over heads, the similarity metric of the contextual merge.

    keys: (B, N, H*d) as produced by the attention's ``k_proj``. Returns (B, N, d) in the keys' dtype.
    """
    batch, tokens, width = keys.shape
    return keys.view(batch, tokens, num_heads, width // num_heads).mean(dim=2)


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, M, H*d) -> (B, H, M, d) in fp32: scores are always computed in fp32, whatever the model dtype."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2).float()


def cls_attention_scores(cls_query: Tensor, keys: Tensor, num_heads: int, scale: float) -> Tensor:
    """Attention the CLS token pays to each patch, summed over heads (encoders with a CLS token).

    Only the CLS row of the attention map is computed: O(N) per head instead of O(N^2).
    cls_query: (B, H*d) — the query of token 0. keys: (B, N, H*d). Returns (B, N - 1) fp32 scores for patches
    1..N-1 (the softmax runs over all N keys, CLS included, as in the attention layer itself).
    """
    q = _split_heads(cls_query.unsqueeze(1), num_heads)  # (B, H, 1, d)
    k = _split_heads(keys, num_heads)  # (B, H, N, d)
    attention = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1)  # (B, H, 1, N)
    return attention[:, :, 0, 1:].sum(dim=1)


def received_attention_scores(
    queries: Tensor, keys: Tensor, num_heads: int, scale: float, chunk_elements: int = _CHUNK_ELEMENTS
) -> Tensor:
    """Attention each token receives, averaged over heads and queries (encoders without a CLS token).

    The full N x N map of the layer is needed, so it is built in query chunks of at most ``chunk_elements`` fp32
    values and reduced as it goes: memory stays bounded for many crops or frames.
    queries, keys: (B, N, H*d). Returns (B, N) fp32.
    """
    q = _split_heads(queries, num_heads)  # (B, H, N, d)
    k = _split_heads(keys, num_heads).transpose(-1, -2)  # (B, H, d, N)
    batch, heads, tokens, _ = q.shape
    rows = max(1, chunk_elements // (batch * heads * tokens))
    received = q.new_zeros(batch, tokens)
    for start in range(0, tokens, rows):
        logits = torch.matmul(q[:, :, start : start + rows], k).mul_(scale)  # (B, H, rows, N); in place: no copy
        received += logits.softmax(dim=-1).sum(dim=(1, 2))
    return received / (heads * tokens)


def select_dominant(scores: Tensor, dominant: int, has_cls: bool) -> Tensor:
    """Positions of the dominant tokens, ascending.

    scores: (B, N - 1) patch scores when ``has_cls`` (CLS is then always kept as position 0 and counts towards
    ``dominant``), else (B, N). Ties go to the lower position (a stable sort, unlike ``topk``, is deterministic
    across devices). Returns (B, dominant) int64.
    """
    picked = dominant - 1 if has_cls else dominant
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :picked]
    if has_cls:
        top = torch.cat([top.new_zeros(top.shape[0], 1), top + 1], dim=1)
    return top.sort(dim=-1).values


def take_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``x[b, index[b]]``: x (B, N, C), index (B, K) -> (B, K, C).

    One index_select on the flattened batch; on CPU it is 5-10x faster than ``gather`` with an expanded index.
    """
    batch, tokens, width = x.shape
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * tokens
    return x.reshape(batch * tokens, width).index_select(0, (index + offsets).flatten()).view(batch, -1, width)


def remaining_positions(dominant_indices: Tensor, num_tokens: int) -> Tensor:
    """Positions not among ``dominant_indices``, ascending. dominant_indices: (B, K) -> (B, N - K) int64."""
    batch, kept = dominant_indices.shape
    flags = torch.zeros(batch, num_tokens, dtype=torch.int8, device=dominant_indices.device)
    flags.scatter_(1, dominant_indices, 1)
    # A stable sort of the 0/1 flags lists the unflagged positions first, in their original order.
    return torch.sort(flags, dim=-1, stable=True).indices[:, : num_tokens - kept]


def contextual_targets(remaining: int, contextual: int) -> tuple[list[int], list[int]]:
    """Split ``remaining`` positions (indices into the remaining list) into merge targets and merged tokens.

    Targets are ``0, step, 2*step, ...`` with ``step = max(1, remaining // contextual)``, the first ``contextual``
    of them; everything else is merged into a target. Pure Python: the split depends only on the budget.
    """
    if contextual == 0:
        return [], list(range(remaining))
    step = max(1, remaining // contextual)
    targets = list(range(0, remaining, step))[:contextual]
    target_set = set(targets)
    return targets, [i for i in range(remaining) if i not in target_set]


@functools.lru_cache(maxsize=128)
def _target_split(remaining: int, contextual: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`contextual_targets` as int64 index tensors on ``device``, built once per budget: a host-to-device
    copy of a fresh Python list would synchronise a CUDA stream on every call."""
    targets, merged = contextual_targets(remaining, contextual)
    return (
        torch.tensor(targets, dtype=torch.long, device=device),
        torch.tensor(merged, dtype=torch.long, device=device),
    )


def assign_contextual(metric: Tensor, contextual: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which target each non-target remaining token merges into.

    metric: (B, R, d) of the R remaining tokens in positional order. Targets are fixed by the budget
    (:func:`contextual_targets`); every other token goes to the target whose unit-normalised metric has the largest
    dot product with its own (first target on ties). Returns the (C,) target and (R - C,) merged indices into the
    remaining list, and the (B, R - C) target each merged token goes to.
    """
    target_index, merged_index = _target_split(metric.shape[1], contextual, metric.device)
    if contextual == 0:
        return target_index, merged_index, merged_index.new_zeros(metric.shape[0], 0)
    unit = F.normalize(metric, dim=-1)
    similarity = torch.bmm(unit.index_select(1, merged_index), unit.index_select(1, target_index).transpose(1, 2))
    return target_index, merged_index, similarity.argmax(dim=-1)  # argmax returns the first maximum


def combine_contextual(hidden: Tensor, target_index: Tensor, merged_index: Tensor, assignment: Tensor) -> Tensor:
    """The contextual tokens: each target's hidden state plus the mean of the hidden states assigned to it (the
    target itself is not in the mean, and a target nobody chose stays as it is — the reference behaviour).

    hidden: (B, R, D) of the remaining tokens; the indices and (B, R - C) assignment of :func:`assign_contextual`.
    Returns (B, C, D), differentiable in ``hidden``.
    """
    contextual = target_index.shape[0]
    if contextual == 0:
        return hidden[:, :0]
    # One-hot matmul in the hidden dtype, as the reference does: deterministic, unlike scatter_add on GPU.
    one_hot = torch.zeros(*assignment.shape, contextual, dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(2, assignment.unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (B, C, 1)
    mean_assigned = torch.bmm(one_hot.transpose(1, 2), hidden.index_select(1, merged_index)) / counts
    return hidden.index_select(1, target_index) + mean_assigned


def _contextual_groups(shape: torch.Size, target_index: Tensor, merged_index: Tensor, assignment: Tensor) -> Tensor:
    """(B, R) the contextual token each remaining position went into (a target is in its own group), or
    :data:`DROPPED` for every position without contextual tokens."""
    contextual = target_index.shape[0]
    if contextual == 0:
        return torch.full(shape, DROPPED, device=target_index.device)
    groups = torch.empty(shape, dtype=torch.long, device=target_index.device)
    groups[:, target_index] = torch.arange(contextual, device=target_index.device)
    groups[:, merged_index] = assignment
    return groups


def merge_contextual(hidden: Tensor, metric: Tensor, contextual: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the non-dominant tokens into ``contextual`` tokens (:func:`assign_contextual`, then
    :func:`combine_contextual`).

    hidden: (B, R, D) and metric: (B, R, d) of the R remaining tokens in positional order. Returns ((B, contextual,
    D), (contextual,) target positions within the remaining list, (B, R) the contextual token each remaining
    position went into: its group, :data:`DROPPED` for every position when ``contextual == 0``).
    """
    target_index, merged_index, assignment = assign_contextual(metric, contextual)
    tokens = combine_contextual(hidden, target_index, merged_index, assignment)
    return tokens, target_index, _contextual_groups(hidden.shape[:2], target_index, merged_index, assignment)


def select(metric: Tensor, scores: Tensor, *, dominant: int, contextual: int, has_cls: bool) -> ZipResult:
    """VisionZip's selection without its tokens: the dominant positions, the contextual targets and what became of
    every position (:class:`ZipResult` with ``tokens=None``; :func:`combine` makes the tokens of any hidden states
    of the same positions).

    metric: (B, N, d) head-mean keys; scores: (B, N - 1) patch scores with ``has_cls`` (CLS is then dominant token
    #0), else (B, N).
    """
    tokens = metric.shape[1]
    validate_budget(dominant, contextual, tokens)
    dominant_indices = select_dominant(scores, dominant, has_cls)
    rest = remaining_positions(dominant_indices, tokens)
    target_index, merged_index, assignment = assign_contextual(take_tokens(metric, rest), contextual)
    rest_groups = _contextual_groups(rest.shape, target_index, merged_index, assignment)
    groups = torch.full(metric.shape[:2], DOMINANT, device=metric.device).scatter_(1, rest, rest_groups)
    return ZipResult(None, dominant_indices, rest.index_select(1, target_index), groups, scores)


def combine(hidden: Tensor, selection: ZipResult) -> Tensor:
    """The tokens of a VisionZip :func:`select` ion for ``hidden`` (B, N, D), differentiable in it: the dominant
    tokens in positional order, then each contextual target plus the mean of the tokens assigned to it. Returns
    (B, dominant + contextual, D)."""
    rest = remaining_positions(selection.dominant_indices, hidden.shape[1])
    target_index, merged_index = _target_split(rest.shape[1], selection.contextual_indices.shape[1], hidden.device)
    assignment = selection.groups.gather(1, rest.index_select(1, merged_index))
    contextual = combine_contextual(take_tokens(hidden, rest), target_index, merged_index, assignment)
    return torch.cat([take_tokens(hidden, selection.dominant_indices), contextual], dim=1)


def select_and_merge(
    hidden: Tensor, metric: Tensor, scores: Tensor, *, dominant: int, contextual: int, has_cls: bool
) -> ZipResult:
    """Dominant selection and contextual merge from precomputed scores (any scoring rule): :func:`select`, then
    :func:`combine`.

    hidden: (B, N, D); metric: (B, N, d) head-mean keys; scores: (B, N - 1) patch scores with ``has_cls`` (CLS is
    then dominant token #0), else (B, N). Returns a :class:`ZipResult` with tokens (B, dominant + contextual, D).
    """
    selection = select(metric, scores, dominant=dominant, contextual=contextual, has_cls=has_cls)
    return selection._replace(tokens=combine(hidden, selection))


def in_position_order(result: ZipResult) -> tuple[Tensor, Tensor]:
    """The tokens of ``result`` in ascending position order, each contextual token in its target's slot (upstream
    VisionZip's Qwen layout, so that the kept tokens' positions stay monotone in the sequence).

    Returns tokens (B, K, D) and their positions (B, K) int64, ascending."""
    positions = torch.cat([result.dominant_indices, result.contextual_indices], dim=1)
    order = positions.argsort(dim=1)
    return take_tokens(result.tokens, order), positions.gather(1, order)


def visionzip(
    hidden: Tensor,
    queries: Tensor,
    keys: Tensor,
    *,
    num_heads: int,
    scale: float,
    dominant: int,
    contextual: int,
    has_cls: bool,
) -> ZipResult:
    """VisionZip on one layer: dominant + contextual tokens per image.

    hidden: (B, N, D) output of layer L; queries, keys: (B, N, D) that layer's ``q_proj`` / ``k_proj`` outputs
    (``scale`` is the attention's ``head_dim ** -0.5``). With ``has_cls`` the scores are the CLS row summed over
    heads and CLS is dominant token #0; without, the attention each token receives. Returns a :class:`ZipResult`
    whose tokens are (B, dominant + contextual, D) in ``hidden``'s dtype.
    """
    validate_budget(dominant, contextual, hidden.shape[1])  # before any attention is computed
    if has_cls:
        scores = cls_attention_scores(queries[:, 0], keys, num_heads, scale)
    else:
        scores = received_attention_scores(queries, keys, num_heads, scale)
    return select_and_merge(
        hidden, key_metric(keys, num_heads), scores, dominant=dominant, contextual=contextual, has_cls=has_cls
    )
