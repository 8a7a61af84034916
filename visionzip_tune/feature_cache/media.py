"""What a feature-cache entry holds for its sample, and :class:`CachedMedia`: the data path's media source that
reads it instead of the sample's files.

An entry is keyed by its sample's media bytes (:func:`sample_key`) and holds, per kind of media, what the example
needs besides the text: ``image.sizes`` (what each image's placeholder count is a function of), the processor's
inputs besides pixels (``image.input.image_sizes``, ``...batch_num_images``, ``...image_grid_thw``) and the
frozen part of the features (``image.frozen.<field>``: ``families.frozen_features``); for the video
``video.size``, ``video.times`` (its frames' times, seconds), ``video.input.*`` and ``video.frozen.*``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from visionzip_tune.data.media import FileMedia, ImageInputs, VideoInputs
from visionzip_tune.data.validate import BadSample, row_video
from visionzip_tune.families.base import IMAGE, SIZES, VIDEO, cached_key
from visionzip_tune.feature_cache.key import entry_key
from visionzip_tune.feature_cache.store import Shards


def media_paths(sample: dict, files: FileMedia) -> list[Path]:
    """Every file of the sample's media: its images, then its video file or frame files."""
    images = files.image_paths(sample) if sample["images"] else []
    return images + (files.video_paths(sample) if row_video(sample) is not None else [])


def sample_key(sample: dict, files: FileMedia, hashes: dict[str, str | None]) -> str | None:
    """The key of the sample's entry, from the hashes of its media files (``MediaHashes.hash_files``); None when one
    of them is missing."""
    images = [hashes.get(os.path.abspath(p)) for p in files.image_paths(sample)] if sample["images"] else []
    video = row_video(sample)
    frames = [hashes.get(os.path.abspath(p)) for p in files.video_paths(sample)] if video is not None else []
    if None in images or None in frames:
        return None
    return entry_key(images, frames, isinstance(video, str))


def _inputs(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value for key, value in inputs.items() if not key.startswith("pixel_values")}


def entry_fields(
    images: ImageInputs | None,
    image_frozen: dict[str, Tensor] | None,
    video: VideoInputs | None,
    video_frozen: dict[str, Tensor] | None,
) -> dict[str, Tensor]:
    """The tensors of one entry, on the CPU: a sample's image inputs (``FileMedia.images``) and the frozen part of
    their features, and its video's likewise (either None when the sample has none)."""
    fields: dict[str, Tensor] = {}
    if images is not None:
        inputs, sizes = images
        fields["image.sizes"] = torch.tensor(sizes, dtype=torch.long)
        fields.update((f"image.input.{key}", value) for key, value in _inputs(inputs).items())
        fields.update((f"image.frozen.{key}", value.cpu()) for key, value in image_frozen.items())
    if video is not None:
        inputs, size, times = video
        fields["video.size"] = torch.tensor(size, dtype=torch.long)
        fields["video.times"] = torch.tensor(times, dtype=torch.float64)
        fields.update((f"video.input.{key}", value) for key, value in _inputs(inputs).items())
        fields.update((f"video.frozen.{key}", value.cpu()) for key, value in video_frozen.items())
    return fields


class CachedMedia:
    """A :class:`~visionzip_tune.data.MediaSource` reading each sample's entry from the complete shards of
    ``folder`` (opened on first use, so shards built after this is made are seen): the sample's inputs besides
    pixels, and the frozen part of its features under ``cached_image.*`` / ``cached_video.*``, which
    ``forward_with_vision`` hands to the family's trainable rest. An entry recorded as bad raises ``BadSample``
    with its reason, as reading the files would; a sample whose media file is missing goes to ``files``, which says
    so the same way."""

    def __init__(self, folder: str | Path, hashes: dict[str, str | None], files: FileMedia):
        self.folder = Path(folder)
        self.hashes = hashes
        self.files = files
        self._shards: Shards | None = None

    @property
    def shards(self) -> Shards:
        if self._shards is None:
            self._shards = Shards(self.folder)
        return self._shards

    def images(self, sample: dict) -> ImageInputs:
        fields = self._entry(sample, "image.")
        if fields is None:
            return self.files.images(sample)
        sizes = fields["sizes"]
        vision = self._vision(fields, IMAGE)
        vision[cached_key(IMAGE, SIZES)] = sizes
        return vision, [tuple(size) for size in sizes.tolist()]

    def video(self, sample: dict) -> VideoInputs:
        fields = self._entry(sample, "video.")
        if fields is None:
            return self.files.video(sample)
        size = fields["size"].tolist()
        vision = self._vision(fields, VIDEO)
        vision[cached_key(VIDEO, SIZES)] = fields["size"].reshape(1, -1)
        return vision, size if isinstance(size, int) else tuple(size), fields["times"].tolist()

    def _vision(self, fields: dict[str, Tensor], modality: str) -> dict[str, Tensor]:
        vision = {name.removeprefix("input."): value for name, value in fields.items() if name.startswith("input.")}
        vision.update(
            (cached_key(modality, name.removeprefix("frozen.")), value)
            for name, value in fields.items()
            if name.startswith("frozen.")
        )
        return vision

    def _entry(self, sample: dict, prefix: str) -> dict[str, Tensor] | None:
        key = sample_key(sample, self.files, self.hashes)
        if key is None:
            return None
        reason = self.shards.bad.get(key)
        if reason is not None:
            raise BadSample(reason)
        return self.shards.read(key, prefix)
