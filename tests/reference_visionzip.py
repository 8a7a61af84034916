"""A deliberately straightforward VisionZip, written from the paper's algorithm (section 3 and the official code's
selection rule), used only as a test oracle.

It takes the route the official code takes — an eager tower run with ``output_attentions=True`` and
``output_hidden_states=True``, keys recomputed as ``k_proj(layer_norm1(input of layer L))`` — and then selects and
merges image by image with plain Python loops and sorted lists. No hooks, no early stop, no batching tricks: if
this and ``visionzip_tune`` agree, the fast path is right.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Reference:
    """Per image: tokens (K, D); dominant / contextual sequence positions (sorted lists of ints)."""

    tokens: list[Tensor]
    dominant: list[list[int]]
    contextual: list[list[int]]


def zip_one(hidden: Tensor, attention: Tensor, metric: Tensor, dominant: int, contextual: int, has_cls: bool):
    """One image. hidden (N, D), attention (H, N, N) probabilities, metric (N, d) head-mean keys."""
    if has_cls:
        scores = attention[:, 0, :].sum(dim=0).tolist()  # CLS row, summed over heads
    else:
        scores = attention.mean(dim=0).mean(dim=0).tolist()  # attention received, mean over heads then queries
    return zip_scored(hidden, scores, metric, dominant, contextual, has_cls)


def zip_scored(hidden: Tensor, scores: list[float], metric: Tensor, dominant: int, contextual: int, has_cls: bool):
    """One image from its token scores (a list of N floats; with CLS, entry 0 is ignored): (tokens [dominant
    in positional order, then contextual], dominant positions, contextual target positions)."""
    n = hidden.shape[0]
    if has_cls:
        patches = sorted(range(1, n), key=lambda j: (-scores[j], j))  # best first, lower position on ties
        kept = sorted([0] + patches[: dominant - 1])
    else:
        kept = sorted(sorted(range(n), key=lambda j: (-scores[j], j))[:dominant])
    rest = [j for j in range(n) if j not in kept]
    parts = [hidden[j] for j in kept]
    targets: list[int] = []
    if contextual > 0:
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        others = [j for j in rest if j not in targets]
        unit = metric / metric.norm(dim=-1, keepdim=True)
        assigned: dict[int, list[int]] = {t: [] for t in targets}
        for j in others:
            similarity = [float(unit[j] @ unit[t]) for t in targets]
            assigned[targets[similarity.index(max(similarity))]].append(j)  # first target on ties
        for t in targets:
            members = assigned[t]
            extra = torch.stack([hidden[j] for j in members]).mean(dim=0) if members else torch.zeros_like(hidden[t])
            parts.append(hidden[t] + extra)
    return torch.stack(parts), kept, targets


def reference_visionzip(tower, pixel_values: Tensor, vision_feature_layer: int, dominant: int, contextual: int):
    """VisionZip of ``hidden_states[vision_feature_layer]`` computed on an eager copy of ``tower``."""
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(pixel_values, output_hidden_states=True, output_attentions=True)
        n_layers = len(eager.encoder.layers)
        hs_index = vision_feature_layer % (n_layers + 1)
        layer = eager.encoder.layers[hs_index - 1]
        hidden = out.hidden_states[hs_index]
        attention = out.attentions[hs_index - 1]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[hs_index - 1]))
        heads = layer.self_attn.num_heads
        metric = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)
    has_cls = hasattr(eager.embeddings, "class_embedding")
    result = Reference([], [], [])
    for b in range(pixel_values.shape[0]):
        tokens, kept, targets = zip_one(hidden[b], attention[b], metric[b], dominant, contextual, has_cls)
        result.tokens.append(tokens)
        result.dominant.append(kept)
        result.contextual.append(targets)
    return result
