"""Exact 3-D (MRoPE) positions for Qwen's zipped sequences: every kept token and every text token gets the
position the model gives it in the stock-length sequence (a contextual token its target's).

``get_rope_index`` is replaced by one that expands every zipped placeholder run back to its stock length (each
unit's N merged tokens), calls the model's own method on that, and gathers the kept tokens' positions back -- no
stock logic is copied, so the temporal spacing of videos, Qwen3-VL's per-frame runs and the text positions after an
image all come from the model. Which tokens are kept comes from the latest encoding of the same grid tensor
(``common.encoded_for``); given the pixels (``generate()`` computes positions first) it encodes them itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from visionzip_tune.families.qwen.common import Encoded, Generation, encode, encoded_for, split_counts

TOKEN_TYPES = {"image": 1, "video": 2}  # mm_token_type_ids values (0 = text)


def token_types(config, input_ids: Tensor) -> Tensor:
    """``mm_token_type_ids`` of ``input_ids`` (B, L): 1 at image placeholders, 2 at video ones, else 0 -- what the
    processors derive from the ids, which the model's positions need."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = TOKEN_TYPES["image"]
    types[input_ids == config.video_token_id] = TOKEN_TYPES["video"]
    return types


class Expansion(NamedTuple):
    """Zipped rows expanded back to their stock lengths (attended tokens only, right-padded).

    input_ids, mm_token_type_ids, attention_mask: (B, L_stock); index: (B, L) the expanded column of every token
    of the zipped rows, -1 for tokens outside the attention mask."""

    input_ids: Tensor
    mm_token_type_ids: Tensor
    attention_mask: Tensor
    index: Tensor


Run = list[tuple[Tensor, int]]  # the units of one placeholder run: (kept indices, N) each


def expand_runs(
    input_ids: Tensor, mm_token_type_ids: Tensor, attention_mask: Tensor | None, runs: dict[int, list[Run]]
) -> Expansion:
    """Expand every placeholder run of the zipped rows to the stock run of its units (sum N_u tokens, unit after
    unit) and record where each zipped token lands: kept index k of a unit at its own stock slot.

    input_ids, mm_token_type_ids: (B, L); attention_mask: (B, L) or None; runs: per token type (1 image, 2 video)
    the placeholder runs in the order the rows hold them, across the batch. ``ValueError`` when a run's length is
    not its units' zipped size (a text built with other counts) or the runs do not match the media."""
    batch, length = input_ids.shape
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pending = {kind: iter(kind_runs) for kind, kind_runs in runs.items()}
    rows, index = [], torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        columns = attended[b].nonzero()[:, 0].tolist()
        ids, types = input_ids[b, columns].tolist(), mm_token_type_ids[b, columns].tolist()
        out_ids, out_types, where, start = [], [], [], 0
        for kind, group in itertools.groupby(types):
            count = len(list(group))
            if kind == 0:
                where += range(len(out_ids), len(out_ids) + count)
                out_ids += ids[start : start + count]
                out_types += [0] * count
            else:
                units = next(pending[kind], None) if kind in pending else None
                if units is None or count != sum(len(kept) for kept, _ in units):
                    expected = "none" if units is None else sum(len(kept) for kept, _ in units)
                    raise ValueError(
                        f"a run of {count} placeholders of token type {kind} in row {b}, but the zipped media give "
                        f"{expected} tokens there: build the text with the model's own counts (apply_visionzip with "
                        "the processor, or the project's data path)"
                    )
                offset = len(out_ids)
                for kept, size in units:
                    where += (kept + offset).tolist()
                    offset += size
                out_ids += [ids[start]] * (offset - len(out_ids))
                out_types += [kind] * (offset - len(out_types))
            start += count
        index[b, columns] = torch.tensor(where, dtype=torch.long)
        rows.append((out_ids, out_types))
    for kind, rest in pending.items():
        if next(rest, None) is not None:
            raise ValueError(f"the rows hold fewer placeholder runs of token type {kind} than the media given")
    width = max(len(ids) for ids, _ in rows)
    expanded = torch.zeros(3, batch, width, dtype=torch.long)
    for b, (ids, types) in enumerate(rows):
        expanded[0, b, : len(ids)] = torch.tensor(ids)
        expanded[1, b, : len(ids)] = torch.tensor(types)
        expanded[2, b, : len(ids)] = 1
    device = input_ids.device
    return Expansion(
        expanded[0].to(device), expanded[1].to(device, mm_token_type_ids.dtype), expanded[2].to(device), index
    )


def gather_positions(positions: Tensor, expansion: Expansion) -> tuple[Tensor, Tensor]:
    """The zipped rows' positions from the expanded rows' (3, B, L_stock): (3, B, L), 0 outside the attention mask
    as in the stock method, and ``rope_deltas`` (B, 1) = max position + 1 - attended tokens, per row."""
    index = expansion.index.to(positions.device)
    attended = index >= 0
    gathered = positions.gather(2, index.clamp(min=0)[None].expand(3, -1, -1)) * attended
    deltas = (gathered.amax(dim=(0, 2)) + 1 - attended.sum(dim=1)).unsqueeze(1)
    return gathered, deltas


def placeholder_runs(encoded: Encoded, grid: Tensor, frame_runs: bool) -> list[Run]:
    """The placeholder runs of the encoded images (videos): one per image or video, its slices one after the
    other; one per temporal slice when ``frame_runs`` (Qwen3-VL videos)."""
    units = list(zip(encoded.kept, encoded.sizes))
    if frame_runs:
        return [[unit] for unit in units]
    return split_counts(units, [int(t) for t in grid[:, 0].tolist()])


def rope_index_method(generation: Generation) -> Callable:
    """The ``get_rope_index`` replacement: stock positions of the kept tokens (see the module docstring)."""

    def get_rope_index(
        self,
        input_ids: Tensor,
        mm_token_type_ids: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        """Stock parameter names (``generate()`` passes everything by name). With ``pixel_values`` /
        ``pixel_values_videos`` (``generate()`` computes positions first) the media are encoded here, once."""
        stock = type(self).get_rope_index
        pixels = {"image": kwargs.pop("pixel_values", None), "video": kwargs.pop("pixel_values_videos", None)}
        grids = {"image": image_grid_thw, "video": video_grid_thw}
        if all(grid is None for grid in grids.values()):
            return stock(self, input_ids, mm_token_type_ids, attention_mask=attention_mask, **kwargs)
        if mm_token_type_ids is None:
            raise ValueError("VisionZip positions need mm_token_type_ids (0 text, 1 image, 2 video) with the grids")
        runs = {}
        for modality, grid in grids.items():
            if grid is None:
                continue
            if pixels[modality] is not None:
                encode(self, modality, pixels[modality], grid, generation, keep=True)
            frame_runs = generation.frame_runs and modality == "video"
            runs[TOKEN_TYPES[modality]] = placeholder_runs(encoded_for(self, modality, grid), grid, frame_runs)
        expansion = expand_runs(input_ids, mm_token_type_ids, attention_mask, runs)
        positions, _ = stock(
            self,
            expansion.input_ids,
            expansion.mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=expansion.attention_mask,
            **kwargs,
        )
        return gather_positions(positions, expansion)

    return get_rope_index
