"""Deliberately straightforward versions of the compressors, written from the rules their docstrings state, used only
as test oracles: one unit at a time, Python lists and loops, no batching or index tricks."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

PRIME = 2**31 - 1


@dataclass
class UnitSignals:
    """One unit's signals from an eager tower run: hidden (N, D), attention (H, N, N), keys (N, d) averaged over
    heads, the patch grid side and the unit's pixels."""

    hidden: Tensor
    attention: Tensor
    keys: Tensor
    has_cls: bool
    side: int
    pixels: Tensor

    @property
    def patches(self) -> Tensor:
        return self.hidden[int(self.has_cls) :]

    @property
    def cls_attention_mean(self) -> list[float]:
        """The CLS row over the patches, per head, averaged over heads."""
        return self.attention[:, 0, 1:].mean(dim=0).tolist()


def tower_signals(tower, pixel_values: Tensor, vision_feature_layer: int) -> list[UnitSignals]:
    """Every unit's signals at ``hidden_states[vision_feature_layer]`` of an eager copy of ``tower``."""
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(pixel_values, output_hidden_states=True, output_attentions=True)
        index = vision_feature_layer % (len(eager.encoder.layers) + 1)
        layer = eager.encoder.layers[index - 1]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index - 1]))
        metric = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(dim=2)
    has_cls = hasattr(eager.embeddings, "class_embedding")
    side = tower.config.image_size // tower.config.patch_size
    return [
        UnitSignals(
            out.hidden_states[index][b], out.attentions[index - 1][b], metric[b], has_cls, side, pixel_values[b]
        )
        for b in range(pixel_values.shape[0])
    ]


def mix(x: int) -> int:
    for multiplier in (48271, 69621, 40692):
        x = (x * multiplier + 11) % PRIME
    return x


def pixel_seed(pixels: Tensor) -> int:
    values = pixels.flatten()
    stride = -(-values.numel() // 65536)
    bits = values[::stride].to(torch.bfloat16).contiguous().view(torch.int16).tolist()
    total = sum((bit + 32768) * ((e * 2654435761 + 12345) % PRIME) % PRIME for e, bit in enumerate(bits))
    return mix(total % PRIME)


def random_kept(pixels: Tensor, patches: int, tokens: int, seed: int = 0) -> list[int]:
    unit = mix((pixel_seed(pixels) + seed % PRIME) % PRIME)
    scores = [mix((unit * 1_000_003 + j) % PRIME) for j in range(patches)]
    return sorted(sorted(range(patches), key=lambda j: scores[j])[:tokens])


def pool_rows(patches: Tensor, rows: int, columns: int, side: int) -> tuple[Tensor, list[int]]:
    """(side * side, D) bin means and each patch's bin, bins by floor(r side / R), floor(c side / C)."""
    members: dict[int, list[Tensor]] = {b: [] for b in range(side * side)}
    bins = []
    for r in range(rows):
        for c in range(columns):
            b = (r * side // rows) * side + c * side // columns
            members[b].append(patches[r * columns + c])
            bins.append(b)
    return torch.stack([torch.stack(members[b]).mean(dim=0) for b in range(side * side)]), bins


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def divprune_kept(features: Tensor, tokens: int) -> list[int]:
    n = features.shape[0]
    f = features.double()
    distance = [[1.0 - cosine(f[i], f[j]) for j in range(n)] for i in range(n)]
    nearest = [sorted(distance[i][j] for i in range(n))[1] for j in range(n)]
    kept = [max(range(n), key=lambda j: (nearest[j], -j))]
    while len(kept) < tokens:
        closest = [min(distance[s][j] for s in kept) if j not in kept else -1.0 for j in range(n)]
        kept.append(max(range(n), key=lambda j: (closest[j], -j)))
    return sorted(kept)


def vispruner_kept(features: Tensor, attention: list[float], tokens: int, important_ratio: float = 0.5) -> list[int]:
    n = features.shape[0]
    important = int(tokens * important_ratio)
    ranked = sorted(range(n), key=lambda j: (-attention[j], j))
    candidates, keep = ranked[important:], tokens - important
    while keep and (drop := min(8, len(candidates) - keep)) > 0:
        even, odd = candidates[::2], candidates[1::2]
        score = [max(cosine(features[e], features[o]) for o in odd) for e in even]
        order = sorted(range(len(even)), key=lambda i: -score[i])[drop:]
        candidates = [even[i] for i in order] + odd
    return sorted(ranked[:important] + candidates[:keep] if keep else ranked[:important])


def prumerge_rows(
    patches: Tensor, attention: list[float], keys: Tensor, tokens: int, neighbours: int = 32
) -> tuple[Tensor, list[int]]:
    """(tokens, D) rows and the kept patches of PruMerge+ at a fixed K."""
    n = patches.shape[0]
    important_count = max(1, round((tokens - 1) / 4))
    uniform_count = tokens - 1 - important_count
    important = sorted(range(n), key=lambda j: (-attention[j], j))[:important_count]
    others = [j for j in range(n) if j not in important]
    uniform = [others[i * len(others) // uniform_count] for i in range(uniform_count)] if uniform_count else []
    kept = sorted(important + uniform)
    rows = []
    for i in kept:
        similar = sorted((j for j in range(n) if j != i), key=lambda j: -cosine(keys[i], keys[j]))[:neighbours]
        rows.append(patches[i] + sum(attention[j] * patches[j] for j in similar))
    pruned = [j for j in range(n) if j not in kept]
    rows.append(sum(attention[j] * patches[j] for j in pruned))
    return torch.stack(rows), kept
