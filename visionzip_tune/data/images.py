"""Open images lazily and turn them into ``pixel_values``: LLaVA's ``pad`` or the image processor's own transform."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from visionzip_tune.data.validate import BadSample

IMAGE_ASPECTS = ("pad", "processor")


def open_image(path: str | Path, *, draft: bool = False) -> Image.Image:
    """Fully decode ``path`` as RGB; ``BadSample`` naming the file if it is missing or unreadable.

    ``draft=True`` lets JPEG decode at reduced scale: every byte is still read and a truncated or corrupt file
    still fails, about 3x faster; ``data check`` uses it, training does not.
    """
    try:
        with Image.open(path) as img:
            if draft:
                img.draft("RGB", (64, 64))
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise BadSample(f"missing image {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSample(f"unreadable image {path}: {err}") from None


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``img`` on a square canvas of colour ``fill`` (LLaVA's ``expand2square``): nothing is cropped."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class ImageTransform:
    """``pixel_values`` for a sample's images: ``(n_images, 3, H, W)`` float.

    ``aspect="pad"`` (LLaVA-1.5's ``image_aspect_ratio=pad``): pad to a square filled with the processor's mean
    colour, then the processor (whose resize + centre crop is then a plain resize). ``"processor"``: the image
    processor's own resize/crop, e.g. CLIP's shortest-edge resize and centre crop, which cuts the long side.
    """

    def __init__(self, image_processor, aspect: str = "pad"):
        if aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image aspect {aspect!r} is not one of {IMAGE_ASPECTS}")
        self.image_processor = image_processor
        self.aspect = aspect
        self.fill = tuple(int(m * 255) for m in image_processor.image_mean)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        if self.aspect == "pad":
            images = [expand_to_square(img, self.fill) for img in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]
