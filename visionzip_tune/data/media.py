"""Where a sample's vision inputs come from: :class:`FileMedia` reads its image and video files and turns them into
model inputs (:class:`~visionzip_tune.data.images.MediaTransform`); a feature cache gives another
:class:`MediaSource` that reads the sample's frozen features instead (``visionzip_tune.feature_cache``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from visionzip_tune.data.config import DataConfig
from visionzip_tune.data.images import MediaTransform, open_image
from visionzip_tune.data.validate import row_video
from visionzip_tune.data.video import read_video_clip
from visionzip_tune.errors import UserError

# What a sample's images (its video) become: the vision inputs of the example (``SupervisedDataset``'s ``vision``)
# and what the placeholder counts are a function of (each image's size; the video's size and its frames' times).
ImageInputs = tuple[dict[str, torch.Tensor], list[tuple[int, ...]]]
VideoInputs = tuple[dict[str, torch.Tensor], int | tuple[int, ...], list[float]]


class MediaSource(Protocol):
    """A sample's vision inputs; ``BadSample`` for media that cannot be used."""

    def images(self, sample: dict) -> ImageInputs:
        """The inputs of the sample's n >= 1 images (:meth:`MediaTransform.images`) and each image's size."""

    def video(self, sample: dict) -> VideoInputs:
        """The inputs of the sample's video (:meth:`MediaTransform.video_inputs`), its size and its frames' times
        (seconds)."""


class FileMedia:
    """A sample's media read from files: images relative to ``image_folder``, videos to ``video_folder`` (default the
    image folder), through ``transform``. ``data_path`` names the data in error messages."""

    def __init__(
        self,
        transform: MediaTransform,
        image_folder: str | Path | None,
        video_folder: str | Path | None,
        data_path: str = "the data",
    ):
        self.transform = transform
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.video_folder = Path(video_folder) if video_folder is not None else self.image_folder
        self.data_path = data_path

    @classmethod
    def for_data(
        cls, data: DataConfig, image_processor, *, image_folder: str | Path | None = None, data_path: str = "the data"
    ) -> FileMedia:
        """The media of a recipe's ``data`` section (``image_folder`` overrides ``data.image_folder``)."""
        folder = data.image_folder if image_folder is None else image_folder
        transform = MediaTransform(image_processor, data.image_aspect, data.video_frames)
        return cls(transform, folder, data.video_folder, data_path)

    def image_paths(self, sample: dict) -> list[Path]:
        """The files of the sample's images."""
        folder = self._folder(self.image_folder, "images")
        return [folder / rel for rel in sample["images"]]

    def video_paths(self, sample: dict) -> list[Path]:
        """The files of the sample's video: one video file, or its frame files."""
        video, folder = row_video(sample), self._folder(self.video_folder, "videos")
        return [folder / video] if isinstance(video, str) else [folder / rel for rel in video]

    def images(self, sample: dict) -> ImageInputs:
        return self.transform.images([open_image(path) for path in self.image_paths(sample)])

    def video(self, sample: dict) -> VideoInputs:
        clip = read_video_clip(
            row_video(sample), self._folder(self.video_folder, "videos"), self.transform.video_frames
        )
        inputs, size = self.transform.video_inputs(clip.frames)
        return inputs, size, clip.times

    def _folder(self, folder: Path | None, kind: str) -> Path:
        if folder is None:
            raise UserError(f"{self.data_path}: samples have {kind} but no {kind[:-1]} folder was given")
        return folder
