"""The family class both Qwen generations derive from: the merger is the projector, the budget is in ratios of each
image's (temporal slice's) merged tokens, token counts follow the processor's patch grid, and VisionZip replaces the
features methods and ``get_rope_index`` (exact positions of the kept tokens)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzip_tune.algorithm.compressors import GRID, KEYS, RECEIVED_ATTENTION, SEEDS
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.families.base import COMPRESSED, IMAGE, Family
from visionzip_tune.families.qwen import positions
from visionzip_tune.families.qwen.common import (
    ENCODED,
    MERGE_SPACES,
    RATIOS,
    features_from_frozen_media,
    features_methods,
    frozen_media,
    merged_per_slice,
    split_frozen_media,
    unit_tokens,
)


def pixel_bounds(image_processor) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) of a Qwen image processor (kept as its size's shortest / longest edge)."""
    if image_processor is None:
        return None, None
    size = image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def grid_of(inputs: dict, key: str, index: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of media ``index`` of a processor output (``image_grid_thw`` / ``video_grid_thw``)."""
    return tuple(int(v) for v in inputs[key][index])


class QwenFamily(Family):
    """What Qwen2.5-VL and Qwen3-VL share; a generation sets :attr:`frame_runs`, :attr:`output` and
    :meth:`raster_order` (``common.Generation``), and the rest that differs."""

    budget = RATIOS
    towers = ("visual",)
    projector = ("visual.merger",)
    original_projector_names = None
    has_video = True
    image_inputs = ("pixel_values", "image_grid_thw")
    video_inputs = ("pixel_values_videos", "video_grid_thw")
    position_inputs = ("image_grid_thw", "video_grid_thw")
    media_rows = ("image_grid_thw", "video_grid_thw")
    instance_state = (ENCODED,)
    encoding_methods = ("get_rope_index",)
    drawable = False
    frame_runs = False
    knob_keys = ("merge_space",)
    uses_image_processor = True

    def __init__(self):
        # Bound to this generation: the features methods and the positions read its token order and layout.
        self.overrides = {**features_methods(self), "get_rope_index": positions.rope_index_method(self)}

    def raster_order(self, visual: nn.Module, grid_thw: Tensor) -> Tensor | None:
        return None

    def resolve_knobs(self, config, recorded: dict, given: dict, method: str) -> dict:
        """``merge_space`` ("post": merge after the merger, upstream's; "pre": on its inputs), and the scoring block,
        the tower's last, which must attend over whole images."""
        merge_space = given.get("merge_space", recorded.get("merge_space", MERGE_SPACES[0]))
        if merge_space not in MERGE_SPACES:
            raise ValueError(f"merge_space={merge_space!r} is not one of {', '.join(MERGE_SPACES)}")
        last = config.vision_config.depth - 1
        full = getattr(config.vision_config, "fullatt_block_indexes", None)
        if full is not None and last not in full:
            raise ValueError(
                f"VisionZip scores tokens at the vision tower's last block ({last}), which must attend over whole "
                f"images (fullatt_block_indexes={list(full)}); window attention cannot rank tokens across windows"
            )
        return {"merge_space": merge_space, "score_layer": last}

    def media_keys(self, modality: str) -> tuple[str, str]:
        """The (pixels, grid) batch keys of ``modality``."""
        return self.image_inputs if modality == IMAGE else self.video_inputs

    def frozen_features(self, inner: nn.Module, modality: str, inputs: dict[str, Tensor], layer: int | None = None):
        """One tower run, every unit's selection and the merger inputs its rows need (``common.frozen_media``)."""
        pixels, grid = self.media_keys(modality)
        return frozen_media(inner, inputs[pixels], inputs[grid], self)

    def features_from_frozen(
        self, inner: nn.Module, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> BaseModelOutputWithPooling:
        """The mergers and the merge, remembered as the modality's latest encoding for the positions."""
        return features_from_frozen_media(inner, modality, frozen, inputs[self.media_keys(modality)[1]], self)

    def split_frozen(
        self, config, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> list[dict[str, Tensor]]:
        """Each image's (video's) temporal slices."""
        return split_frozen_media(frozen, inputs[self.media_keys(modality)[1]][:, 0].tolist())

    def tower_has_cls(self, config) -> bool:
        return False

    def unit_positions(self, config) -> None:
        """Units are images and temporal slices of their own sizes: checked per unit as they are zipped."""
        return None

    def signals(self, config) -> frozenset[str]:
        """The last block's attention received and keys, averaged over each merged token's patches; the merged grid."""
        return frozenset({RECEIVED_ATTENTION, KEYS, GRID, SEEDS})

    def record_inputs(self, config, image_processor=None) -> dict:
        """The image processor's pixel bounds, which decide each image's N and therefore its token count."""
        min_pixels, max_pixels = pixel_bounds(image_processor)
        return {"min_pixels": min_pixels, "max_pixels": max_pixels}

    def check_inputs(self, record: dict, image_processor) -> list[str]:
        """An export tuned on images resized within other pixel bounds sees other token counts: refuse it."""
        found = dict(zip(("min_pixels", "max_pixels"), pixel_bounds(image_processor)))
        return [
            f"{key} is {found[key]} in the image processor given but {record.get(key)} in the export (images resize "
            "to other patch grids, so the projector would see other token counts; use the image processor the "
            "export was tuned with)"
            for key in found
            if found[key] is not None and record.get(key) is not None and found[key] != record[key]
        ]

    def stock_tokens(self, config, grid=None) -> int:
        """Stock placeholders of an image or video of (t, h, w) patches: every merged token of every slice."""
        return int(grid[0]) * merged_per_slice(config, grid)

    def zipped_tokens(self, config, budget: dict, grid=None) -> int:
        """Placeholders of an image or video of (t, h, w) patches under ``budget``: K per temporal slice (``grid``
        None: one slice, for a compressor whose K does not follow the slice's size)."""
        if grid is None and COMPRESSED.owns(budget):
            return COMPRESSED.unit_tokens(budget)
        return int(grid[0]) * unit_tokens(budget, merged_per_slice(config, grid))

    stock_video_tokens = stock_tokens
    zipped_video_tokens = zipped_tokens

    def image_size(self, image_inputs: dict, index: int) -> tuple[int, int, int]:
        """Image ``index``'s count key: its patch grid, as the image processor reports it."""
        return grid_of(image_inputs, "image_grid_thw", index)

    def video_size(self, video_inputs: dict, index: int) -> tuple[int, int, int]:
        return grid_of(video_inputs, "video_grid_thw", index)

    def _blank(self, config, pixels: str, grid: str) -> dict[str, Tensor]:
        """One all-zero image (video of one temporal patch) of 2 x 2 merged tokens, the least a ratio budget fits."""
        vision = config.vision_config
        side = 2 * vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {pixels: torch.zeros(side * side, width), grid: torch.tensor([[1, side, side]])}

    def blank_image(self, config) -> dict[str, Tensor]:
        return self._blank(config, "pixel_values", "image_grid_thw")

    def blank_video(self, config) -> dict[str, Tensor]:
        return self._blank(config, "pixel_values_videos", "video_grid_thw")

    def id_inputs(self, config, input_ids: Tensor) -> dict[str, Tensor]:
        """What a Qwen model needs from the ids besides them: their ``mm_token_type_ids``."""
        return {"mm_token_type_ids": positions.token_types(config, input_ids)}

    def tower_stages(self, name, tower):
        """Qwen's patch embedding and blocks (its merger, the projector, is timed as such)."""
        return tower.patch_embed, list(tower.blocks)
