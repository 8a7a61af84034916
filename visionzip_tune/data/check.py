"""Preflight: every sample validated and every image and video decoded, in a process pool, before any GPU is spent."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionzip_tune.data.config import DEFAULT_VIDEO_FRAMES
from visionzip_tune.data.images import open_image
from visionzip_tune.data.source import column, load_samples
from visionzip_tune.data.validate import BadSample, row_video
from visionzip_tune.data.video import check_video
from visionzip_tune.errors import UserError


@dataclass
class CheckReport:
    total: int
    with_images: int
    with_videos: int
    text_only: int
    bad: list[tuple[str, str]]  # (sample id, reason), in file order

    def summary(self, path: str | Path) -> str:
        head = (
            f"{path}: checked {self.total} samples ({self.with_images} with images, {self.with_videos} with a video, "
            f"{self.text_only} text-only): "
        )
        if not self.bad:
            return head + "all usable"
        lines = [head + f"{len(self.bad)} unusable"]
        lines += [f"  id {sample_id}: {reason}" for sample_id, reason in self.bad]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    image_folder: str | None
    images: list[str]
    video_folder: str | None
    video: str | list[str] | None
    video_frames: int


def _media_problem(job: _Job) -> str | None:
    """Why the sample's images or video cannot be used, or None."""
    try:
        for rel in job.images:
            open_image(Path(job.image_folder) / rel, draft=True)
        if job.video is not None:
            check_video(job.video, Path(job.video_folder), job.video_frames)
    except BadSample as bad:
        return bad.reason
    return None


def _require_folder(data, folder: str | Path | None, kind: str, option: str, samples: int) -> None:
    if samples and (folder is None or not Path(folder).is_dir()):
        given = f"no {option} was given" if folder is None else f"{folder} is not a directory"
        raise UserError(f"{data}: {samples} samples have {kind} but {given}")


def check_data(
    data: str | Path,
    image_folder: str | Path | None,
    *,
    video_folder: str | Path | None = None,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
    workers: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Validate every sample of ``data`` and open every image under ``image_folder`` and every video under
    ``video_folder`` (default: ``image_folder``; video files sampled to ``video_frames``) with ``workers``
    processes."""
    video_folder = image_folder if video_folder is None else video_folder
    samples = load_samples(data).select_columns(["id", "images", "video_file", "frame_files", "problem"])
    all_images = column(samples, "images")
    problems = column(samples, "problem")
    videos = [
        row_video({"video_file": file, "frame_files": frames})
        for file, frames in zip(column(samples, "video_file"), column(samples, "frame_files"))
    ]
    jobs = [r for r, images in enumerate(all_images) if (images or videos[r]) and problems[r] is None]
    _require_folder(data, image_folder, "images", "--image-folder", sum(1 for r in jobs if all_images[r]))
    _require_folder(data, video_folder, "videos", "--video-folder", sum(1 for r in jobs if videos[r]))
    bar = tqdm(total=len(jobs), desc="checking images and videos", unit="sample", disable=not progress)
    work = [_Job(_str(image_folder), all_images[r], _str(video_folder), videos[r], video_frames) for r in jobs]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for r, problem in zip(jobs, pool.map(_media_problem, work, chunksize=64)):
            problems[r] = problem
            bar.update()
    bar.close()
    ids = column(samples, "id")
    return CheckReport(
        total=len(ids),
        with_images=sum(1 for images in all_images if images),
        with_videos=sum(1 for video in videos if video is not None),
        text_only=sum(1 for images, video in zip(all_images, videos) if not images and video is None),
        bad=[(ids[r], p) for r, p in enumerate(problems) if p is not None],
    )


def _str(folder: str | Path | None) -> str | None:
    return None if folder is None else str(folder)
