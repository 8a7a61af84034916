"""Load LLaVA-format samples (a JSON array or JSON lines) into a memory-mapped ``datasets.Dataset``.

Columns: ``id`` (str), ``images`` (list of paths relative to the image folder; empty for text-only),
``video_file`` (a video file's path relative to the video folder, or None), ``frame_files`` (a video given as frame
files, in time order; empty otherwise), ``source`` (first folder of the first image, else of the video, ``text-only``
without either), ``conversations`` (``[{"from", "value"}]``),
``problem`` (why the sample is structurally unusable, or None), ``offset``/``nbytes`` (the record's exact bytes in
the file). The file is streamed record by record into Arrow, so 665k samples never exist as Python objects at once;
the Arrow cache is keyed by the file's path, size and mtime and reused on the next load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets import Features, List, Value

from visionzip_tune import watchdog
from visionzip_tune.data.jsonstream import iter_records
from visionzip_tune.data.validate import normalize_record, row_video
from visionzip_tune.errors import UserError

TEXT_ONLY = "text-only"
# Bump when the row layout or the validation rules change, so cached Arrow files are rebuilt.
_ROW_VERSION = 2


def _features():
    return Features(
        {
            "id": Value("string"),
            "images": List(Value("string")),
            "video_file": Value("string"),
            "frame_files": List(Value("string")),
            "source": Value("string"),
            "conversations": List({"from": Value("string"), "value": Value("string")}),
            "problem": Value("string"),
            "offset": Value("int64"),
            "nbytes": Value("int64"),
        }
    )


def source_of(images: list[str], video: str | list[str] | None = None) -> str:
    """The stratum of a sample: ``coco`` for ``coco/train2017/x.jpg``; for a sample without images, the first
    folder of its video file (or first frame); ``text-only`` without either."""
    if images:
        first = images[0]
    elif video:
        first = video if isinstance(video, str) else video[0]
    else:
        return TEXT_ONLY
    head, sep, _ = first.replace("\\", "/").lstrip("./").partition("/")
    return head if sep else "."


def _rows(path: str, size: int, mtime_ns: int, version: int) -> Iterator[dict]:
    # size/mtime_ns/version only feed the cache fingerprint that datasets derives from these arguments.
    for record in iter_records(path):
        row = normalize_record(record.value, record.index)
        row["source"] = source_of(row["images"], row_video(row))
        yield {**row, "offset": record.offset, "nbytes": record.nbytes}


def load_samples(path: str | Path, *, cache_dir: str | Path | None = None):
    """Load ``path`` (LLaVA JSON array or JSONL) as a ``datasets.Dataset``; ids are strings.

    Malformed JSON raises ``UserError`` naming the line and column; a well-formed record that is not a usable
    sample is kept with its reason in ``problem`` (``data check`` lists them, training errors or skips them).
    The dataset's ``info.description`` holds the resolved path, for error messages downstream.
    """
    path = Path(path).resolve()
    stat = path.stat() if path.is_file() else None
    gen_kwargs = {
        "path": str(path),
        "size": stat.st_size if stat else -1,
        "mtime_ns": stat.st_mtime_ns if stat else -1,
        "version": _ROW_VERSION,
    }
    if stat is None:
        next(iter_records(path))  # raises the UserError for a missing file
    cache = datasets.config.HF_DATASETS_CACHE if cache_dir is None else cache_dir
    # A process building the same Arrow cache holds its lock (a flock, which the kernel drops if that process dies).
    waits_on = f"{path}, read into the datasets cache {cache} (and its lock, while another process builds the same)"
    try:
        with watchdog.phase("reading the samples", waits_on):
            samples = datasets.Dataset.from_generator(
                _rows,
                features=_features(),
                gen_kwargs=gen_kwargs,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, UserError):  # datasets wraps whatever the generator raised
            raise err.__cause__ from None
        raise
    samples.info.description = str(path)
    return samples


def column(samples, name: str) -> list:
    """One column as a Python list (one Arrow conversion, not a per-row lookup)."""
    return samples.with_format("arrow")[name].to_pylist()


def data_path(samples) -> str:
    """The file a dataset from ``load_samples`` was read from ("the data" if unknown)."""
    return getattr(samples.info, "description", "") or "the data"
