"""Processor side of VisionZip: each ``<image>`` in the text expands to exactly the number of tokens the model's
image features have, or ``get_placeholder_mask`` refuses the batch.

The processor's ``replace_image_token`` (and ``replace_video_token``) is overridden on the instance with count
functions supplied by the families (``families.processor_counts(config)``), so processor and model share one
formula and one budget (the live ``config.visionzip``). Removing the override restores the processor's own stock
expansion.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable

# count(inputs the image (video) processor returned for the whole call, index of the image (video)) -> tokens
MediaCount = Callable[[dict, int], int]


def patch_processor(processor, image_count: MediaCount, video_count: MediaCount | None = None):
    """Make ``processor`` expand ``<image>`` number i to ``image_count(image_inputs, i)`` tokens and, with
    ``video_count``, ``<video>`` number i to ``video_count(video_inputs, i)`` tokens (in the processor's own video
    text, whose placeholder runs are resized: :func:`resize_runs`). In place; returns it.

    Calling it again replaces the previous count functions.
    """
    if not callable(getattr(processor, "replace_image_token", None)) or getattr(processor, "image_token", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no <image> token expansion (replace_image_token / image_token); "
            f"pass the model's multimodal processor (e.g. LlavaProcessor)"
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * image_count(image_inputs, image_idx)

    processor.replace_image_token = types.MethodType(replace_image_token, processor)
    if video_count is not None:

        def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
            stock = type(self).replace_video_token(self, video_inputs, video_idx, **kwargs)
            return resize_runs(stock, self.video_token, video_count(video_inputs, video_idx))

        processor.replace_video_token = types.MethodType(replace_video_token, processor)
    return processor


def resize_runs(text: str, token: str, total: int) -> str:
    """``text`` (a processor's own video placeholder text) with its runs of ``token`` resized to ``total`` tokens
    in all, shared equally: one run for most families, one run per frame between timestamps for Qwen3-VL."""
    runs = re.findall(f"(?:{re.escape(token)})+", text)
    if not runs or total % len(runs):
        raise ValueError(f"cannot share {total} video tokens over the {len(runs)} placeholder runs of {text[:80]!r}")
    return re.sub(f"(?:{re.escape(token)})+", lambda _: token * (total // len(runs)), text)


def unpatch_processor(processor):
    """Restore the processor's stock ``<image>`` (and ``<video>``) expansion. In place; returns it."""
    processor.__dict__.pop("replace_image_token", None)
    processor.__dict__.pop("replace_video_token", None)
    return processor
