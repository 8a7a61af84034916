"""Processor side of VisionZip: each ``<image>`` in the text expands to exactly the number of tokens the model's
image features have, or ``get_placeholder_mask`` refuses the batch.

The processor's ``replace_image_token`` is overridden on the instance with a count function supplied by
``models.py`` — ``functools.partial(tokens_per_image, model.config)`` — so processor and model share one formula and
one budget (the live ``config.visionzip``). Removing the override restores the processor's own stock expansion.
"""

from __future__ import annotations

import types
from collections.abc import Callable

ImageSize = tuple[int, int]
TokenCount = Callable[[ImageSize | None], int]


def _original_size(image_inputs: dict, image_idx: int) -> ImageSize | None:
    """(height, width) of image ``image_idx`` before resizing, when the image processor reports it and the model
    tiles the image (OneVision does not tile the images of a sample holding several, ``batch_num_images``)."""
    sizes = image_inputs.get("image_sizes")
    if sizes is None or not _tiled(image_inputs.get("batch_num_images"), image_idx):
        return None
    height, width = (int(v) for v in sizes[image_idx])
    return height, width


def _tiled(batch_num_images, image_idx: int) -> bool:
    """Whether image ``image_idx`` (counted over the whole batch) is alone in its sample, or no grouping is given."""
    if batch_num_images is None:
        return True
    seen = 0
    for count in batch_num_images:
        seen += int(count)
        if image_idx < seen:
            return int(count) == 1
    return True


def load_processing(name_or_path: str):
    """``(tokenizer, image_processor, chat_template)`` of a saved model: what training, evaluation and generation
    need, loaded without the multimodal processor class (Video-LLaVA's and OneVision's build a video processor that
    requires torchvision, which the data path never uses: frames go through the image processor).

    ``OSError`` as from ``from_pretrained`` when something is missing.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    return tokenizer, image_processor, tokenizer.chat_template


def patch_processor(processor, count: TokenCount, video_count: Callable[[int], int] | None = None):
    """Make ``processor`` expand each ``<image>`` to ``count(original_size)`` tokens and, with ``video_count``,
    each ``<video>`` to ``video_count(num_frames)`` tokens. In place; returns it.

    Calling it again replaces the previous count functions.
    """
    if not callable(getattr(processor, "replace_image_token", None)) or getattr(processor, "image_token", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no <image> token expansion (replace_image_token / image_token); "
            f"pass the model's multimodal processor (e.g. LlavaProcessor)"
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * count(_original_size(image_inputs, image_idx))

    processor.replace_image_token = types.MethodType(replace_image_token, processor)
    if video_count is not None:

        def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
            frames = len(video_inputs["pixel_values_videos"][video_idx])  # (T, 3, H, W) array, tensor or list
            return self.video_token * video_count(frames)

        processor.replace_video_token = types.MethodType(replace_video_token, processor)
    return processor


def unpatch_processor(processor):
    """Restore the processor's stock ``<image>`` (and ``<video>``) expansion. In place; returns it."""
    processor.__dict__.pop("replace_image_token", None)
    processor.__dict__.pop("replace_video_token", None)
    return processor
