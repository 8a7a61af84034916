"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): VisionZip per image and per temporal slice of a video, in
merged tokens, scored at the tower's last block (one of its full-attention blocks); the projector is the merger.

The tower runs most blocks on windows of merge groups, in window order; the zipped units are taken back to raster
order (the permutation the tower itself undoes after its merger) so that the kept tokens keep their positions.
A video is one placeholder run: its slices' tokens one after the other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

from visionzip_tune.families import qwen_positions, qwen_vl
from visionzip_tune.families.base import Family


def window_to_raster(visual: nn.Module, grid_thw: Tensor) -> Tensor:
    """Indices that put the tower's merged tokens, in its window order, back in raster order: (G,) int64."""
    window_index, _ = get_vision_window_index(
        grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    return window_index.argsort()


def seconds_per_patch(config, grid, times: list[float]) -> dict[str, Tensor]:
    """``second_per_grid_ts`` (1,): the seconds one temporal patch of the sampled frames spans, which spaces the
    video's temporal positions (the processor's ``temporal_patch_size / sampled fps``)."""
    gap = (
        (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 1.0 / config.vision_config.temporal_patch_size
    )
    return {"second_per_grid_ts": torch.tensor([config.vision_config.temporal_patch_size * gap])}


VARIANT = qwen_vl.Variant(raster_order=window_to_raster, frame_runs=False, output=BaseModelOutputWithPooling)

FAMILY = Family(
    name="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    model_type="qwen2_5_vl",
    overrides={**qwen_vl.features_methods(VARIANT), "get_rope_index": qwen_positions.rope_index_method(VARIANT)},
    stock_tokens=qwen_vl.stock_tokens,
    zipped_tokens=qwen_vl.zipped_tokens,
    budget=qwen_vl.RATIO_BUDGET,
    towers=("visual",),
    projector=("visual.merger",),
    original_projector_names=None,
    stock_video_tokens=qwen_vl.stock_tokens,
    zipped_video_tokens=qwen_vl.zipped_tokens,
    image_inputs=("pixel_values", "image_grid_thw"),
    video_inputs=("pixel_values_videos", "video_grid_thw"),
    position_inputs=("image_grid_thw", "video_grid_thw", "second_per_grid_ts"),
    media_rows=("image_grid_thw", "video_grid_thw"),
    image_size=qwen_vl.image_grid,
    video_size=qwen_vl.video_grid,
    video_timing=seconds_per_patch,
    blank_image=qwen_vl.blank_image,
    blank_video=qwen_vl.blank_video,
    id_inputs=qwen_positions.id_inputs,
)
