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

from visionzip_tune.families.qwen.base import QwenFamily


class Qwen2_5VL(QwenFamily):
    name = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    model_type = "qwen2_5_vl"
    output = BaseModelOutputWithPooling
    position_inputs = (*QwenFamily.position_inputs, "second_per_grid_ts")

    def raster_order(self, visual: nn.Module, grid_thw: Tensor) -> Tensor:
        """Indices that put the tower's merged tokens, in its window order, back in raster order: (G,) int64."""
        window_index, _ = get_vision_window_index(
            grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        return window_index.argsort()

    def video_timing(self, config, grid, times: list[float]) -> dict[str, Tensor]:
        """``second_per_grid_ts`` (1,): the seconds one temporal patch of the sampled frames spans, which spaces the
        video's temporal positions (the processor's ``temporal_patch_size / sampled fps``)."""
        temporal = config.vision_config.temporal_patch_size
        gap = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 1.0 / temporal
        return {"second_per_grid_ts": torch.tensor([temporal * gap])}


FAMILY = Qwen2_5VL()
