"""The family class both Qwen generations derive from: the merger is the projector, the budget is in ratios of each
image's (temporal slice's) merged tokens, token counts follow the processor's patch grid, and VisionZip replaces the
features methods and ``get_rope_index`` (exact positions of the kept tokens)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzip_tune.families.base import Family
from visionzip_tune.families.qwen import positions
from visionzip_tune.families.qwen.common import ENCODED, RATIOS, features_methods, merged_per_slice, unit_tokens


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

    def __init__(self):
        # Bound to this generation: the features methods and the positions read its token order and layout.
        self.overrides = {**features_methods(self), "get_rope_index": positions.rope_index_method(self)}

    def raster_order(self, visual: nn.Module, grid_thw: Tensor) -> Tensor | None:
        return None

    def stock_tokens(self, config, grid=None) -> int:
        """Stock placeholders of an image or video of (t, h, w) patches: every merged token of every slice."""
        return int(grid[0]) * merged_per_slice(config, grid)

    def zipped_tokens(self, config, budget: dict, grid=None) -> int:
        """Placeholders of an image or video of (t, h, w) patches under ``budget``: K per temporal slice."""
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
