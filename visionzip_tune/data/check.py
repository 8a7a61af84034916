"""Preflight: every sample validated and every image decoded, in a process pool, before any GPU is spent."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionzip_tune.data.images import open_image
from visionzip_tune.data.source import column, load_samples
from visionzip_tune.data.validate import BadSample
from visionzip_tune.errors import UserError


@dataclass
class CheckReport:
    total: int
    with_images: int
    bad: list[tuple[str, str]]  # (sample id, reason), in file order

    def summary(self, path: str | Path) -> str:
        head = (
            f"{path}: checked {self.total} samples ({self.with_images} with images, "
            f"{self.total - self.with_images} text-only): "
        )
        if not self.bad:
            return head + "all usable"
        lines = [head + f"{len(self.bad)} unusable"]
        lines += [f"  id {sample_id}: {reason}" for sample_id, reason in self.bad]
        return "\n".join(lines)


def _image_problem(job: tuple[str, list[str]]) -> str | None:
    folder, images = job
    try:
        for rel in images:
            open_image(Path(folder) / rel, draft=True)
    except BadSample as bad:
        return bad.reason
    return None


def check_data(
    data: str | Path, image_folder: str | Path | None, *, workers: int | None = None, progress: bool = True
) -> CheckReport:
    """Validate every sample of ``data`` and open every image under ``image_folder`` with ``workers`` processes."""
    samples = load_samples(data).select_columns(["id", "images", "problem"])
    all_images = column(samples, "images")
    problems = column(samples, "problem")
    jobs = [r for r, images in enumerate(all_images) if images and problems[r] is None]
    if jobs and (image_folder is None or not Path(image_folder).is_dir()):
        given = "no --image-folder was given" if image_folder is None else f"{image_folder} is not a directory"
        raise UserError(f"{data}: {len(jobs)} samples have images but {given}")
    bar = tqdm(total=len(jobs), desc="checking images", unit="sample", disable=not progress)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        found = pool.map(_image_problem, [(str(image_folder), all_images[r]) for r in jobs], chunksize=64)
        for r, problem in zip(jobs, found):
            problems[r] = problem
            bar.update()
    bar.close()
    ids = column(samples, "id")
    bad = [(ids[r], p) for r, p in enumerate(problems) if p is not None]
    return CheckReport(total=len(samples), with_images=sum(1 for images in all_images if images), bad=bad)
