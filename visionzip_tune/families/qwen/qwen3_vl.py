"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): VisionZip per image and per video frame (temporal patch) as the
model runs them, in merged tokens, scored at the tower's last block (every block attends over whole images).

The projector is the merger plus the DeepStack mergers, whose features the LLM adds to its first layers' hidden
states at the placeholders: they keep exactly the main features' rows, order and merge. A video is one placeholder
run per frame, each after its timestamp text, as the model's processor writes it.
"""

from __future__ import annotations

from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from visionzip_tune.families.base import VideoLayout
from visionzip_tune.families.qwen.base import QwenFamily
from visionzip_tune.families.qwen.common import merged_per_slice, unit_tokens


def frame_pair_times(times: list[float], temporal: int) -> list[float]:
    """The time (seconds) of each temporal patch of frames at ``times``: the midpoint of its first and last frame,
    the last frame repeated to fill the last patch (how the Qwen3-VL processor stamps frames)."""
    padded = times + times[-1:] * (-len(times) % temporal)
    return [(padded[i] + padded[i + temporal - 1]) / 2 for i in range(0, len(padded), temporal)]


class Qwen3VL(QwenFamily):
    name = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"
    model_type = "qwen3_vl"
    output = BaseModelOutputWithDeepstackFeatures
    frame_runs = True
    projector = ("visual.merger", "visual.deepstack_merger_list")
    projector_subsets = {"merger": ("visual.merger",)}

    def video_layout(self, config, grid, times: list[float]) -> VideoLayout:
        """``<T seconds><|vision_start|>``, the frame's placeholders, ``<|vision_end|>``, for each temporal patch."""
        budget = getattr(config, "visionzip", None)
        merged = merged_per_slice(config, grid)
        per_frame = unit_tokens(budget, merged) if budget else merged
        stamps = frame_pair_times(times, config.vision_config.temporal_patch_size)
        if len(stamps) != grid[0]:
            raise ValueError(f"{len(times)} frame times for a video of {grid[0]} temporal patches")
        layout: VideoLayout = []
        for stamp in stamps:
            layout += [f"<{stamp:.1f} seconds><|vision_start|>", per_frame, "<|vision_end|>"]
        return layout


FAMILY = Qwen3VL()
