"""Open images and turn one sample's images and video frames into model inputs (LLaVA's ``pad`` or not)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from visionzip_tune.data.config import DEFAULT_IMAGE_ASPECT, DEFAULT_VIDEO_FRAMES, IMAGE_ASPECTS
from visionzip_tune.data.validate import BadSample


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


class MediaTransform:
    """One sample's images and video frames -> the model-input tensors its HF model's ``forward`` takes.

    ``image_aspect="pad"`` (LLaVA-1.5's ``image_aspect_ratio=pad``): each image is padded to a square filled with the
    processor's mean colour, then given to the processor (whose resize + centre crop is then a plain resize; an
    anyres processor then tiles a square). ``"processor"``: the image processor's own resize/crop/tiling.
    ``video_frames`` is the number of frames a video is sampled to (``video.read_video``), held here so training,
    evaluation and generation sample videos alike.
    """

    def __init__(
        self, image_processor, image_aspect: str = DEFAULT_IMAGE_ASPECT, video_frames: int = DEFAULT_VIDEO_FRAMES
    ):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image aspect {image_aspect!r} is not one of {IMAGE_ASPECTS}")
        if video_frames < 1:
            raise ValueError(f"video_frames must be at least 1, not {video_frames}")
        self.image_processor = image_processor
        self.image_aspect = image_aspect
        self.video_frames = video_frames
        self.fill = tuple(int(m * 255) for m in image_processor.image_mean)
        self.anyres_side = _anyres_crop_side(image_processor)  # None for a processor that does not tile
        # A processor that resizes images to a patch grid of its choosing and packs the patches (Qwen).
        self.patch_grid = "image_grid_thw" in getattr(image_processor, "model_input_names", ())

    def _process(self, images: list[Image.Image] | list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return {_RENAMED.get(key, key): value for key, value in out.items() if key in _MODEL_KEYS}

    def images(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[tuple[int, ...]]]:
        """``({"pixel_values", ["image_sizes", "batch_num_images" | "image_grid_thw"]}, sizes)`` for one sample's
        n >= 1 images.

        pixel_values: (n, 3, H, W), or (n, crops, 3, S, S) from an anyres processor (crops padded to the most of
        the sample's images), or (patches, C * T * P * P) packed from a processor that resizes to a patch grid
        (Qwen); image_sizes: (n, 2), batch_num_images: (1,) and image_grid_thw: (n, 3) when the processor returns
        them. ``sizes``: what each image's token count depends on (``families.sample_image_tokens``): its patch
        grid (t, h, w) from a grid processor, which chooses the size itself; else its (height, width) as the
        processor saw it (after padding).
        """
        if self.image_aspect == "pad":
            images = [expand_to_square(img, self.fill) for img in images]
        # Nested: the images are ONE sample (OneVision then feeds a multi-image sample untiled).
        inputs = self._process([images])
        if "image_grid_thw" in inputs:
            return inputs, [tuple(int(v) for v in grid) for grid in inputs["image_grid_thw"]]
        return inputs, [(img.height, img.width) for img in images]

    def video_inputs(self, frames: list[Image.Image]) -> tuple[dict[str, torch.Tensor], int | tuple[int, ...]]:
        """``(inputs, size)`` of one video of ``video_frames`` frames: ``{"pixel_values_videos"}`` (1, T, 3, S, S)
        and its frame count T (:meth:`video`); from a grid processor (Qwen) the frames as its video patches,
        ``{"pixel_values_videos", "video_grid_thw"}``, and that grid (t, h, w).

        Grid processors: each frame goes through the image processor (its resize bounds, not a video processor's),
        and every ``temporal_patch_size`` consecutive frames (the last repeated to fill the last) form one temporal
        patch, laid out as the model's video processor lays them out: per temporal slice, the frame's merge-group
        order, each row (C, T, P, P)."""
        if not self.patch_grid:
            return {"pixel_values_videos": self.video(frames)}, len(frames)
        temporal, patch = self.image_processor.temporal_patch_size, self.image_processor.patch_size
        frames = frames + frames[-1:] * (-len(frames) % temporal)
        processed = self._process(frames)
        grids = processed["image_grid_thw"]
        if not (grids == grids[0]).all():
            raise ValueError(f"the frames of a video resize to different patch grids: {grids.tolist()}")
        patches = int(grids[0].prod())
        channels = processed["pixel_values"].shape[1] // (temporal * patch * patch)
        rows = processed["pixel_values"].view(len(frames), patches, channels, temporal, -1)[:, :, :, 0]
        # (frames, patches, C, P*P) -> (slices, patches, C, T, P*P): each slice's frames side by side per row
        video = rows.view(len(frames) // temporal, temporal, patches, channels, -1).permute(0, 2, 3, 1, 4)
        grid = (len(frames) // temporal, int(grids[0, 1]), int(grids[0, 2]))
        return {
            "pixel_values_videos": video.reshape(grid[0] * patches, -1),
            "video_grid_thw": torch.tensor([grid]),
        }, grid

    def video(self, frames: list[Image.Image]) -> torch.Tensor:
        """``pixel_values_videos`` (1, T, 3, S, S) of one video's T = ``video_frames`` frames.

        Each frame goes through the image processor's own transform, unpadded (as the families' video processors
        do); an anyres processor's frames keep only crop 0, the whole frame resized.
        """
        if len(frames) != self.video_frames:
            raise ValueError(f"a video of {len(frames)} frames; this transform samples {self.video_frames}")
        side = self.anyres_side
        if side is None:
            return self._process(frames)["pixel_values"].unsqueeze(0)  # flat: every frame a sample of its own
        # An anyres processor would tile each frame into up to ~10 crops to keep only crop 0, the whole frame
        # resized to one crop. Resize here instead, and pass the frames as one multi-image sample, which OneVision's
        # processor does not tile (its square-padding is then a no-op): one crop of work per frame.
        resample = getattr(self.image_processor, "resample", Image.Resampling.BICUBIC)
        frames = [frame.resize((side, side), resample) for frame in frames]
        return self._process([frames])["pixel_values"][:, 0].unsqueeze(0)


def _anyres_crop_side(image_processor) -> int | None:
    """The crop side of an anyres image processor (one with ``image_grid_pinpoints``), else None."""
    if not getattr(image_processor, "image_grid_pinpoints", None):
        return None
    crop, size = getattr(image_processor, "crop_size", None) or {}, image_processor.size or {}
    return crop.get("height") or size.get("height") or size["shortest_edge"]


# What image processors return that the models' forward takes, and the legacy names of those keys.
_RENAMED = {"pixel_values_images": "pixel_values"}  # VideoLlavaImageProcessor
_MODEL_KEYS = ("pixel_values", "pixel_values_images", "image_sizes", "batch_num_images", "image_grid_thw")
