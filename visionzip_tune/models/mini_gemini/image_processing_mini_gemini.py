"""Mini-Gemini's image processor: OpenAI CLIP's normalisation at the high-resolution side."""

from __future__ import annotations

from transformers import CLIPImageProcessorPil

# OpenAI CLIP's normalisation; MGM asserts that its ConvNeXt uses the same (mgm/train/train.py:1296-1298).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_image_processor(image_size_aux: int) -> CLIPImageProcessorPil:
    """MGM's image processor: OpenAI CLIP's, resizing to ``image_size_aux`` (mgm/train/train.py:1305-1309). The
    caller pads the image to a square with the mean colour first (MGM's ``image_aspect_ratio=pad``), so the resize
    and centre crop together are a plain resize."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size_aux},
        crop_size={"height": image_size_aux, "width": image_size_aux},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
