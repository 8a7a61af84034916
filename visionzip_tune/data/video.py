"""Read a sample's video as ``frames`` PIL images sampled uniformly in time: a video file (PyAV) or frame files.

A video file is demuxed once to count its frames when the container does not record the count, then decoded up to
the last sampled frame, keeping only the sampled ones; frame files are opened only when sampled. PyAV (``av``) is
optional: only samples with a video file need it. :func:`read_video_clip` also gives each sampled frame's time, for
models that are told when their frames were taken (Qwen).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from visionzip_tune.data.config import DEFAULT_VIDEO_FPS
from visionzip_tune.data.images import open_image
from visionzip_tune.data.validate import BadSample
from visionzip_tune.errors import UserError


def sample_indices(total: int, frames: int) -> list[int]:
    """``frames`` indices spread uniformly over ``total`` frames, first and last included (repeats when
    ``total < frames``): ``round(linspace(0, total - 1, frames))``."""
    return np.round(np.linspace(0, total - 1, frames)).astype(int).tolist()


class VideoClip(NamedTuple):
    """Sampled frames of a video and the time of each in seconds (frame index / frame rate)."""

    frames: list[Image.Image]
    times: list[float]


def read_video(video: str | list[str], folder: Path, frames: int) -> list[Image.Image]:
    """``frames`` RGB frames of ``video`` in time order, sampled by :func:`sample_indices`.

    ``video``: a video file's path, or the paths of its frame files in time order, relative to ``folder``.
    ``BadSample`` ("missing video ...", "unreadable video ...") names the file; ``UserError`` if a video file needs
    PyAV and it is not installed.
    """
    return read_video_clip(video, folder, frames).frames


def read_video_clip(video: str | list[str], folder: Path, frames: int) -> VideoClip:
    """:func:`read_video` with the sampled frames' times: from the file's frame rate, or for frame files (which
    carry none) at ``DEFAULT_VIDEO_FPS``."""
    if isinstance(video, str):
        return _decode_file(Path(folder) / video, frames)
    indices = sample_indices(len(video), frames)
    return VideoClip([_open_frame(Path(folder) / video[i]) for i in indices], _times(indices, None))


def _times(indices: list[int], fps: float | None) -> list[float]:
    return [i / (fps or DEFAULT_VIDEO_FPS) for i in indices]


def check_video(video: str | list[str], folder: Path, frames: int) -> None:
    """``BadSample`` if ``video`` cannot be read (``data check``): every frame file of a frame list is decoded (JPEG
    at reduced scale), a video file is decoded as :func:`read_video` reads it."""
    if isinstance(video, str):
        _decode_file(Path(folder) / video, frames)
    else:
        for rel in video:
            _open_frame(Path(folder) / rel, draft=True)


def _open_frame(path: Path, *, draft: bool = False) -> Image.Image:
    try:
        return open_image(path, draft=draft)
    except BadSample as bad:  # "missing image x" -> "missing video frame x": the sample's video is what is broken
        raise BadSample(bad.reason.replace("image", "video frame", 1)) from None


def _import_av():
    try:
        import av  # lazy: optional (the video extra); only video files need it
    except ImportError:
        raise UserError(
            "a sample's video is a video file, which needs PyAV: pip install av (or pip install "
            "'visionzip_tune[video]'); videos given as lists of frame files need nothing extra"
        ) from None
    return av


def _decode_file(path: Path, frames: int) -> VideoClip:
    av = _import_av()
    if not path.is_file():
        raise BadSample(f"missing video {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSample(f"unreadable video {path}: no video stream")
            stream = container.streams.video[0]
            total = stream.frames or _count_frames(container, stream)
            fps = float(stream.average_rate) if stream.average_rate else None
        if total == 0:
            raise BadSample(f"unreadable video {path}: no frames")
        wanted = sample_indices(total, frames)
        with av.open(str(path)) as container:
            decoded = _decode_indices(container, container.streams.video[0], set(wanted))
    except av.error.FFmpegError as err:
        raise BadSample(f"unreadable video {path}: {err}") from None
    missing = [i for i in wanted if i not in decoded]
    if missing:  # the recorded frame count promised frames the stream does not hold: a truncated file
        raise BadSample(f"unreadable video {path}: frame {missing[0]} of {total} could not be decoded")
    return VideoClip([decoded[i] for i in wanted], _times(wanted, fps))


def _count_frames(container, stream) -> int:
    """Frames of ``stream`` from its packets (no decoding), for containers that do not record the count."""
    return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_indices(container, stream, wanted: set[int]) -> dict[int, Image.Image]:
    """Decode ``stream`` from its start until the last wanted frame; keep the wanted ones as RGB images."""
    out: dict[int, Image.Image] = {}
    last = max(wanted)
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            out[index] = frame.to_image().convert("RGB")
        if index >= last:
            break
    return out
