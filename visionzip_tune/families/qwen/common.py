"""What Qwen2.5-VL and Qwen3-VL share: VisionZip in the merged-token units of their own vision towers, their
budget in ratios, and the memory of each modality's latest encoding that their positions read. ``base.py`` is the
family class both generations derive from (``qwen2_5_vl.py``, ``qwen3_vl.py``); ``positions.py`` the exact MRoPE
positions of the kept tokens.

The tower's merger fuses every 2 x 2 group of patches into one LLM token, so VisionZip selects among merged tokens.
The unit is what the last vision block attends over as one segment: an image, or one temporal slice of a video.
The scores come from that block (full attention in both models): the attention each patch receives, from the
block's q/k after its own rotary embedding, captured by hooks for one call (SDPA stays on; the towers return no
attention maps). Scores and keys are averaged over the 4 patches of each merge group. The budget is a pair of ratios
of each unit's N merged tokens (``compress.ratio_budget``), so the count is a function of the processor's grid.

Kept tokens keep their stock positions (``positions.py``), which depend on the image: each modality's latest
encoding is remembered on the inner model (:class:`Encoded`), so positions are computed from the encoding of the
very grid tensor given, and ``generate()``, which computes positions before features, encodes its pixels once.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.algorithm import capture, compress
from visionzip_tune.algorithm.compressors import Compressor, Signals, pixel_seeds
from visionzip_tune.families.base import COMPRESSED, VISIONZIP, Budget, Family, split_fields

MERGE_SPACES = ("post", "pre")  # contextual merge after the merger (upstream) or on its inputs
ENCODED = "_visionzip_encoded"  # attribute of the inner model: {"image" | "video": Encoded}


class Generation(Protocol):
    """How one Qwen generation differs (the family class of each, ``base.QwenFamily``, provides it): its tower's
    token order, its video placeholder runs, its output type (the DeepStack mergers, where a tower has them, are
    found on the tower)."""

    # Qwen3-VL: every video frame (temporal patch) is a placeholder run of its own, between timestamp texts.
    frame_runs: bool
    output: type[BaseModelOutputWithPooling]  # what get_image_features returns

    def raster_order(self, visual: nn.Module, grid_thw: Tensor) -> Tensor | None:
        """Permutation from the tower's merge-group order to raster order for a grid_thw, or None when already
        raster (Qwen2.5-VL runs its blocks in window order)."""


# ----------------------------------------------------------------------------------------------------------------
# Budget and token counts


def merged_per_slice(config, grid) -> int:
    """N: merged tokens of one temporal slice of a (t, h, w) patch grid."""
    merge = config.vision_config.spatial_merge_size
    return int(grid[1]) * int(grid[2]) // merge**2


def unit_tokens(budget: dict, merged: int) -> int:
    """K: the tokens a unit of ``merged`` tokens is zipped to (VisionZip's ratios, or another compressor's fixed K,
    checked to fit the unit)."""
    if COMPRESSED.owns(budget):
        compressor, params = COMPRESSED.compressor(budget)
        compressor.fits(params, merged, has_cls=False)
        return compressor.rows(params)
    return sum(compress.ratio_budget(merged, budget["dominant_ratio"], budget["contextual_ratio"]))


def unit_compressor(budget: dict, merged: int) -> tuple[Compressor, dict]:
    """The compressor and parameters of a unit of ``merged`` tokens: VisionZip's dominant and contextual counts from
    the ratios (``compress.ratio_budget``), or another compressor's as resolved."""
    if COMPRESSED.owns(budget):
        return COMPRESSED.compressor(budget)
    dominant, contextual = compress.ratio_budget(merged, budget["dominant_ratio"], budget["contextual_ratio"])
    return VISIONZIP, {"dominant": dominant, "contextual": contextual}


def _is_ratio(text: str) -> bool:
    try:
        return "." in text and 0 <= float(text) <= 1
    except ValueError:
        return False


class RatioBudget(Budget):
    """VisionZip at ratios of each unit's N merged tokens (``compress.ratio_budget``): ``dominant_ratio`` and
    ``contextual_ratio`` (default upstream's 0.45 + 0.05 = 50%), beside the family's ``merge_space``."""

    defaults = {"dominant_ratio": 0.45, "contextual_ratio": 0.05}  # upstream's 50%
    keys = (*defaults, "merge_space")
    syntax = "two ratios (Qwen)"
    example = "0.45+0.05"

    def resolve(self, family: Family, config, recorded: dict, given: dict) -> dict:
        """Unset keys as recorded, else the defaults; ``ValueError`` for counts or anything else a Qwen model cannot
        take."""
        wrong = sorted(set(given) - set(self.keys))
        if wrong:
            raise ValueError(
                f"{family.model_class} takes a VisionZip budget as ratios of each image's merged tokens "
                f"(dominant_ratio, contextual_ratio, merge_space; e.g. 0.45 and 0.05 for 50%), not {', '.join(wrong)}"
            )
        budget = {key: given.get(key, recorded.get(key, default)) for key, default in self.defaults.items()}
        compress.validate_ratios(budget["dominant_ratio"], budget["contextual_ratio"])
        knobs = family.resolve_knobs(config, recorded, given, VISIONZIP.name)
        return {**budget, "dominant_ratio": float(budget["dominant_ratio"]), **knobs}

    def record(self, family: Family, config, image_processor=None) -> dict:
        """The ratios (None where no budget is set) and the family's inputs record (the pixel bounds)."""
        budget = getattr(config, "visionzip", None) or {}
        return {
            "method": VISIONZIP.name,
            "dominant_ratio": budget.get("dominant_ratio"),
            "contextual_ratio": budget.get("contextual_ratio"),
            "merge_space": budget.get("merge_space"),
            "score_layer": budget.get("score_layer"),
            **family.record_inputs(config, image_processor),
        }

    def label(self, budget: dict) -> str:
        return f"{budget['dominant_ratio']}+{budget['contextual_ratio']}"

    def parse(self, text: str) -> dict | None:
        """``0.45+0.05``."""
        dominant, plus, contextual = (part.strip() for part in text.partition("+"))
        if plus and _is_ratio(dominant) and _is_ratio(contextual):
            return {"dominant_ratio": float(dominant), "contextual_ratio": float(contextual)}
        return None

    def share(self, family: Family, config) -> str:
        budget = getattr(config, "visionzip", None)
        return f"{budget['dominant_ratio'] + budget['contextual_ratio']:.0%}" if budget else "100%"

    def describe(self, budget: dict) -> str:
        return f"VisionZip {budget['dominant_ratio']} + {budget['contextual_ratio']} of each image's tokens"


RATIOS = RatioBudget()


# ----------------------------------------------------------------------------------------------------------------
# One tower run, captured


class BlockCapture(NamedTuple):
    """The scoring block and the mergers of one tower run over packed patches (S of them, tower order).

    queries, keys: (S, H, d) after the block's rotary embedding; segments: the block's attention segments as
    [start, end) patch ranges (one per image or temporal slice); scale: its softmax scale; merger_inputs /
    merger_outputs: (S, C) / (S / 4, out) per merger, the main one first, then the DeepStack ones (Qwen3-VL)."""

    queries: Tensor
    keys: Tensor
    segments: list[tuple[int, int]]
    scale: float
    merger_inputs: list[Tensor]
    merger_outputs: list[Tensor]


def mergers(visual: nn.Module) -> list[nn.Module]:
    """The tower's mergers: the main one, then the DeepStack ones (Qwen3-VL)."""
    return [visual.merger, *getattr(visual, "deepstack_merger_list", [])]


def capture_tower(visual: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> BlockCapture:
    """Run the tower once without autograd and capture its last block's q/k and its mergers' inputs and outputs."""
    attention = visual.blocks[-1].attn
    watched = {"attention": attention, "qkv": attention.qkv}
    watched.update((f"merger{i}", merger) for i, merger in enumerate(mergers(visual)))
    with torch.no_grad(), capture.record_calls(watched) as calls:
        visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
    qkv = calls["qkv"].output
    queries, keys = qkv.reshape(qkv.shape[0], 3, attention.num_heads, -1).unbind(1)[:2]
    cos, sin = calls["attention"].kwargs["position_embeddings"]
    # The rotary embedding the layer itself applies (a function of its modeling module in both models).
    rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    queries, keys = rotary(queries, keys, cos, sin)
    bounds = calls["attention"].kwargs["cu_seqlens"].tolist()
    names = [name for name in watched if name.startswith("merger")]
    return BlockCapture(
        queries,
        keys,
        list(zip(bounds[:-1], bounds[1:])),
        attention.scaling,
        [calls[name].args[0] for name in names],
        [calls[name].output for name in names],
    )


def merged_scores(capture: BlockCapture, group: int) -> tuple[Tensor, Tensor]:
    """Per merged token, in tower order: the attention its patches receive in their segment, averaged over heads,
    queries and its ``group`` patches, (S / group,) fp32; and its keys averaged over heads and patches, the metric
    of the contextual merge, (S / group, d)."""
    heads = capture.queries.shape[1]
    flat_q, flat_k = capture.queries.flatten(1), capture.keys.flatten(1)  # (S, H*d)
    received = torch.cat(
        [
            compress.received_attention_scores(flat_q[None, a:b], flat_k[None, a:b], heads, capture.scale)[0]
            for a, b in capture.segments
        ]
    )
    metric = compress.key_metric(flat_k[None], heads)[0]
    return compress.group_mean(received[:, None], group)[:, 0], compress.group_mean(metric, group)


# ----------------------------------------------------------------------------------------------------------------
# Zipping


class ZippedMedia(NamedTuple):
    """The zipped features of one ``get_*_features`` call.

    per_unit: each unit's tokens (K_u, F), F = the main merger's width x (1 + DeepStack mergers), position order;
    kept: each unit's kept merged-token indices (K_u,) ascending (contextual tokens at their targets);
    sizes: each unit's N."""

    per_unit: list[Tensor]
    kept: list[Tensor]
    sizes: list[int]


class MergedUnits(NamedTuple):
    """The units of one tower run in raster merged-token order: each unit's [start, end) rows, its (rows, columns) of
    merged tokens, and its [start, end) rows of the packed pixel values."""

    bounds: list[tuple[int, int]]
    grids: list[tuple[int, int]]
    pixel_rows: list[tuple[int, int]]


def merged_units(capture: BlockCapture, grid_thw: Tensor, merge: int) -> MergedUnits:
    """Every unit (an image, a temporal slice of a video) of a tower run: its attention segment, in merged tokens."""
    group = merge * merge
    grids = [(int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist() for _ in range(int(t))]
    bounds = [(a // group, b // group) for a, b in capture.segments]  # the same ranges in raster order
    return MergedUnits(bounds, grids, list(capture.segments))


def select_units(
    features: Tensor, metric: Tensor, scores: Tensor, units: MergedUnits, budget: dict, pixel_values: Tensor
) -> list[compress.ZipResult]:
    """The budget's selection of every unit, in raster merged-token order, without autograd (a
    :class:`~compress.ZipResult` with ``tokens=None`` each; :func:`combine_units` makes the rows).

    features: (G, F') the frozen pre-projector features of all units' merged tokens (the merger inputs); metric:
    (G, d); scores: (G,) the attention each merged token receives. Per unit of N tokens: VisionZip's top-D by score
    and C contextual tokens (D and C from the ratios), or another compressor's K rows."""
    selections = []
    for (start, end), grid, (first, last) in zip(units.bounds, units.grids, units.pixel_rows):
        compressor, params = unit_compressor(budget, end - start)
        compressor.fits(params, end - start, has_cls=False)
        signals = Signals(
            features[None, start:end],
            has_cls=False,
            grid=grid,
            received_attention=scores[None, start:end],
            keys=metric[None, start:end],
            seeds=lambda first=first, last=last: pixel_seeds(pixel_values[None, first:last]),
        )
        with torch.no_grad():
            selection = compressor.select(signals, params)
        if selection.mixing is not None:  # Qwen towers have no CLS: the compressors that mix rows need one
            raise ValueError(f"the {compressor.name} compressor's row mixing has no Qwen layout")
        selections.append(selection)
    return selections


def combine_units(
    hidden: Tensor, selections: list[compress.ZipResult], bounds: list[tuple[int, int]], budget: dict
) -> ZippedMedia:
    """Every unit's rows from ``hidden`` (G, F), the merged tokens of all units in any space (merger outputs, or
    merger inputs as 4 C-vectors), with its selection; in ascending position order, each merged row at the position
    it stands for."""
    per_unit, kept, sizes = [], [], []
    for (start, end), selection in zip(bounds, selections):
        compressor, _ = unit_compressor(budget, end - start)
        rows = compressor.combine(hidden[None, start:end], selection)
        tokens, positions = compress.in_position_order(selection._replace(tokens=rows))
        per_unit.append(tokens[0])
        kept.append(positions[0])
        sizes.append(end - start)
    return ZippedMedia(per_unit, kept, sizes)


def merger_trains(visual: nn.Module) -> bool:
    """Whether a merger call now builds a graph (projector training): remembered features cannot serve."""
    return torch.is_grad_enabled() and any(p.requires_grad for m in mergers(visual) for p in m.parameters())


def frozen_media(
    inner: nn.Module, pixel_values: Tensor, grid_thw: Tensor, generation: Generation, *, outputs: bool = False
) -> dict:
    """The frozen part of a features call on packed images (or videos) under ``inner.config.visionzip``: one tower
    run without autograd, every unit's selection, and what the mergers must read. Each unit (an image or temporal
    slice) of N merged tokens gives rows of every field, concatenated over units:

    ``post`` (merge the mergers' outputs): ``inputs`` (used, 4 C x mergers) the merger inputs of the merged tokens
    its rows are made of (``groups`` not DROPPED: all of them for VisionZip, the kept ones for a pruning
    compressor), ``groups`` (N,), ``dominant`` (D,), ``contextual`` (C,) its selection, ``counts`` (1, 4) = N, D, C,
    used; with ``outputs`` (the mergers do not train: inference), ``outputs`` (used, out x mergers) the mergers'
    own outputs from the tower run in place of ``inputs``, so they do not run twice. ``pre`` (merge the mergers'
    inputs): ``rows`` (K, 4 C x mergers) the merged groups of merger inputs, ``kept`` (K,) their positions,
    ``counts`` (1, 2) = N, K."""
    budget, visual = inner.config.visionzip, inner.visual
    group = visual.spatial_merge_size**2
    capture = capture_tower(visual, pixel_values, grid_thw)
    with torch.no_grad():
        scores, metric = merged_scores(capture, group)
    order = generation.raster_order(visual, grid_thw)
    raster = (lambda x: x) if order is None else (lambda x: x.index_select(0, order.to(x.device)))
    units = merged_units(capture, grid_thw, visual.spatial_merge_size)
    scores, metric = raster(scores), raster(metric)
    width = capture.merger_inputs[0].shape[-1]
    groups = raster(torch.cat([x.reshape(-1, group * width) for x in capture.merger_inputs], dim=-1))
    features = groups[:, : group * width]  # the main merger's inputs: the last block's output, pre-projector
    selections = select_units(features, metric, scores, units, budget, pixel_values)
    if budget["merge_space"] == "pre":
        with torch.no_grad():  # the tower's outputs: nothing to differentiate before the mergers
            zipped = combine_units(groups, selections, units.bounds, budget)
        counts = [[size, len(positions)] for size, positions in zip(zipped.sizes, zipped.kept)]
        return {"rows": torch.cat(zipped.per_unit), "kept": torch.cat(zipped.kept), "counts": _counts(counts, groups)}
    assigned = torch.cat([selection.groups[0] for selection in selections])
    used = (assigned != compress.DROPPED).nonzero()[:, 0]
    counts = [
        [
            end - start,
            len(s.dominant_indices[0]),
            len(s.contextual_indices[0]),
            int((s.groups != compress.DROPPED).sum()),
        ]
        for (start, end), s in zip(units.bounds, selections)
    ]
    rows = {"outputs": raster(torch.cat(capture.merger_outputs, dim=-1))} if outputs else {"inputs": groups}
    return {
        **{name: value.index_select(0, used) for name, value in rows.items()},
        "groups": assigned,
        "dominant": torch.cat([s.dominant_indices[0] for s in selections]),
        "contextual": torch.cat([s.contextual_indices[0] for s in selections]),
        "counts": _counts(counts, groups),
    }


def _counts(counts: list[list[int]], like: Tensor) -> Tensor:
    return torch.tensor(counts, dtype=torch.long, device=like.device)


def zipped_from_frozen(inner: nn.Module, frozen: dict[str, Tensor]) -> ZippedMedia:
    """Every unit's rows from the frozen part of its call (:func:`frozen_media`, computed or read from a cache); only
    the mergers see autograd. ``post`` runs the mergers on the merger inputs the rows need and merges their outputs
    (main and DeepStack side by side, so every DeepStack layer keeps the same rows with the same merge); ``pre`` runs
    them on the K merged groups of each unit."""
    budget, visual = inner.config.visionzip, inner.visual
    width = inner.config.vision_config.hidden_size  # the merger input's width C
    group_width = visual.spatial_merge_size**2 * width
    counts = frozen["counts"].tolist()
    if budget["merge_space"] == "pre":
        merged = _run_mergers(visual, frozen["rows"], group_width, width)
        kept_counts = [k for _, k in counts]
        return ZippedMedia(
            list(merged.split(kept_counts)), list(frozen["kept"].split(kept_counts)), [n for n, _ in counts]
        )
    if "outputs" in frozen:
        outputs = frozen["outputs"]
    else:
        outputs = _run_mergers(visual, frozen["inputs"], group_width, width)
    assigned = frozen["groups"]
    used = (assigned != compress.DROPPED).nonzero()[:, 0]
    hidden = outputs.new_zeros(len(assigned), outputs.shape[-1]).index_copy(0, used, outputs)  # unused rows: unread
    sizes = [n for n, _, _, _ in counts]
    pieces = zip(
        assigned.split(sizes),
        frozen["dominant"].split([d for _, d, _, _ in counts]),
        frozen["contextual"].split([c for _, _, c, _ in counts]),
    )
    selections = [
        compress.ZipResult(None, dominant[None], contextual[None], groups[None], None)
        for groups, dominant, contextual in pieces
    ]
    bounds = list(itertools.pairwise([0, *itertools.accumulate(sizes)]))
    return combine_units(hidden, selections, bounds, budget)


def _run_mergers(visual: nn.Module, groups: Tensor, group_width: int, width: int) -> Tensor:
    """(G, out x mergers): every merger on its own columns of ``groups`` (G, 4 C x mergers), side by side."""
    per_merger = groups.split(group_width, dim=-1)
    return torch.cat([merger(x.reshape(-1, width)) for merger, x in zip(mergers(visual), per_merger)], dim=-1)


def split_frozen_media(frozen: dict[str, Tensor], slices: list[int]) -> list[dict[str, Tensor]]:
    """The frozen part of a call (:func:`frozen_media`) cut per image (video) of ``slices[i]`` temporal slices:
    each item's units' rows of every field."""
    listed = frozen["counts"].tolist()
    if "rows" in frozen:  # pre: N, K per unit
        rows = {"rows": [k for _, k in listed], "kept": [k for _, k in listed]}
    else:  # post: N, D, C, used per unit
        rows = {
            "groups": [n for n, _, _, _ in listed],
            "dominant": [d for _, d, _, _ in listed],
            "contextual": [c for _, _, c, _ in listed],
            **{name: [u for _, _, _, u in listed] for name in ("inputs", "outputs") if name in frozen},
        }
    rows["counts"] = [1] * len(listed)
    per_item = {field: [sum(unit) for unit in split_counts(lengths, slices)] for field, lengths in rows.items()}
    return split_fields(frozen, per_item)


def features_output(
    zipped: ZippedMedia, grid_thw: Tensor, generation: Generation, widths: int
) -> BaseModelOutputWithPooling:
    """The ``get_*_features`` output: ``pooler_output`` = per image (video) its units' tokens, (sum K_u, out);
    with DeepStack, ``deepstack_features`` = per layer the same per-image split of that layer's columns."""
    slices = [int(t) for t in grid_thw[:, 0].tolist()]
    items = [torch.cat(units) for units in split_counts(zipped.per_unit, slices)]
    columns = [item.chunk(widths, dim=-1) for item in items]
    output = generation.output(pooler_output=tuple(cols[0] for cols in columns))
    if widths > 1:
        output.deepstack_features = [tuple(cols[layer] for cols in columns) for layer in range(1, widths)]
    return output


def split_counts(values: list, counts: list[int]) -> list[list]:
    """``values`` cut into consecutive lists of ``counts[i]`` items."""
    it = iter(values)
    return [list(itertools.islice(it, n)) for n in counts]


# ----------------------------------------------------------------------------------------------------------------
# The latest encoding of each modality, for positions


class Encoded(NamedTuple):
    """One ``get_*_features`` encoding: the tensors it was given, each unit's kept indices and size, and -- when a
    positions call encoded them first (``generate()``) -- the features, handed to the next features call on the
    same pixels instead of running the tower twice."""

    pixels: Tensor | None  # None for features made from cached rows
    grid: Tensor
    kept: list[Tensor]
    sizes: list[int]
    output: BaseModelOutputWithPooling | None


def encode(inner: nn.Module, modality: str, pixels: Tensor, grid: Tensor, generation: Generation, *, keep: bool):
    """The zipped features of ``pixels`` (``keep``: remember them for the next features call), recorded as the
    modality's latest encoding; reuses the remembered features of exactly these tensors once."""
    memory = inner.__dict__.setdefault(ENCODED, {})
    last = memory.get(modality)
    if last is not None and last.output is not None and last.pixels is pixels and last.grid is grid:
        if not merger_trains(inner.visual):
            memory[modality] = last._replace(output=None)
            return last.output
    frozen = frozen_media(inner, pixels, grid, generation, outputs=not merger_trains(inner.visual))
    return features_from_frozen_media(inner, modality, frozen, grid, generation, pixels=pixels, keep=keep)


def features_from_frozen_media(
    inner: nn.Module,
    modality: str,
    frozen: dict[str, Tensor],
    grid: Tensor,
    generation: Generation,
    *,
    pixels: Tensor | None = None,
    keep: bool = False,
) -> BaseModelOutputWithPooling:
    """The features output of a call from its frozen part (:func:`frozen_media`, computed from ``pixels`` or read
    from a cache), recorded as the modality's latest encoding of ``grid`` for the positions."""
    zipped = zipped_from_frozen(inner, frozen)
    output = features_output(zipped, grid, generation, len(mergers(inner.visual)))
    memory = inner.__dict__.setdefault(ENCODED, {})
    memory[modality] = Encoded(pixels, grid, zipped.kept, zipped.sizes, output if keep else None)
    return output


def encoded_for(inner: nn.Module, modality: str, grid: Tensor) -> Encoded:
    """The latest encoding of ``grid``: the same tensor (or one sharing its storage and values) that the last
    features call of the modality was given; ``ValueError`` otherwise, as the kept tokens depend on the pixels."""
    last = inner.__dict__.get(ENCODED, {}).get(modality)
    if last is not None and (
        last.grid is grid
        or (
            last.grid.data_ptr() == grid.data_ptr()
            and last.grid.shape == grid.shape
            and torch.equal(last.grid.cpu(), grid.cpu())
        )
    ):
        return last
    raise ValueError(
        f"VisionZip positions: get_rope_index got a {modality}_grid_thw that the last get_{modality}_features call "
        f"did not encode, and which {modality} tokens are kept depends on the pixels. Call get_{modality}_features "
        f"first with the same {modality}_grid_thw tensor (the model's forward and generate do), pass the pixels to "
        "get_rope_index, or pass position_ids"
    )


def features_methods(generation: Generation) -> dict[str, Callable[..., BaseModelOutputWithPooling]]:
    """The ``get_image_features`` / ``get_video_features`` replacements (stock parameter names: ``generate()``
    filters its kwargs by them). Both zip; Qwen3-VL's stock video method would call the image one."""

    def get_image_features(
        self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """pixel_values: (patches, C * T * P * P) packed; image_grid_thw: (images, 3). Returns ``pooler_output`` =
        per image (K, text hidden) in position order (and ``deepstack_features`` for Qwen3-VL)."""
        return encode(self, "image", pixel_values, image_grid_thw, generation, keep=False)

    def get_video_features(
        self, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """As ``get_image_features``: per video its temporal slices' K tokens one after the other."""
        return encode(self, "video", pixel_values_videos, video_grid_thw, generation, keep=False)

    return {"get_image_features": get_image_features, "get_video_features": get_video_features}
