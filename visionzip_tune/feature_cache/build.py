"""Building a feature cache: the frozen part of the model's features path (``families.frozen_features``) on every
sample's media, once, in large batches without autograd, on every rank, into shards written whole.

The entries are planned in data order, distinct keys only, and cut into fixed chunks of ``shard_entries``; a chunk
whose entries are all present is skipped, so a build that was killed resumes where its complete shards stop and
writes the same shards an uninterrupted one would. Chunk ``i`` goes to rank ``i % world``; every rank runs the same
number of tower calls per modality (a rank short of work runs blank inputs), since under ZeRO-3 each call gathers
the tower's parameters collectively.
"""

from __future__ import annotations

import fcntl
import itertools
import math
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from visionzip_tune import families
from visionzip_tune.data import FileMedia, collate_vision
from visionzip_tune.data.media import ImageInputs, VideoInputs
from visionzip_tune.data.validate import BadSample, row_video
from visionzip_tune.distributed import Dist, barrier, is_main, print0, together
from visionzip_tune.errors import UserError
from visionzip_tune.families.base import IMAGE, VIDEO
from visionzip_tune.families.forward import to_model_inputs
from visionzip_tune.feature_cache.cache import FeatureCache
from visionzip_tune.feature_cache.media import entry_fields, sample_key
from visionzip_tune.feature_cache.progress import Progress
from visionzip_tune.feature_cache.store import write_shard
from visionzip_tune.files import free_space, remove_stale_temps

BATCH_SIZE = 32  # samples per tower call
SHARD_ENTRIES = 256  # entries per shard: 32 MiB at LLaVA-1.5's 64 x 1024 rows in bf16
LOCK_FILE = ".build.lock"


@dataclass(frozen=True)
class Job:
    """One entry to have: its key, the row of the first sample with its media, and which media it has."""

    key: str
    row: int
    images: bool
    video: bool


def plan_jobs(samples, rows: Sequence[int], files: FileMedia, hashes: dict, has_video: bool) -> list[Job]:
    """The entries the samples at ``rows`` need, one per distinct key, in data order: every sample with images or (a
    video family) a video, whose media files all exist (a missing one makes a bad sample, which needs no entry)."""
    jobs: dict[str, Job] = {}
    for row in rows:
        sample = samples[row]
        video = row_video(sample) is not None
        if (video and not has_video) or not (sample["images"] or video):
            continue  # a video the model cannot take (a bad sample), or text only
        key = sample_key(sample, files, hashes)
        if key is not None and key not in jobs:
            jobs[key] = Job(key, row, bool(sample["images"]), video)
    return list(jobs.values())


def chunks_to_build(jobs: list[Job], present, shard_entries: int) -> list[list[Job]]:
    """The planned chunks of ``jobs`` with the entries not ``present`` yet, those that have any."""
    chunks = [jobs[start : start + shard_entries] for start in range(0, len(jobs), shard_entries)]
    todo = [[job for job in chunk if job.key not in present] for chunk in chunks]
    return [chunk for chunk in todo if chunk]


class Decoded(NamedTuple):
    """A job's media as model inputs, or why they cannot be used."""

    job: Job
    images: ImageInputs | None
    video: VideoInputs | None
    bad: str | None


class _Decode(torch.utils.data.Dataset):
    """The jobs' media decoded and processed (in DataLoader workers): the video first, then the images, as the
    training set reads them."""

    def __init__(self, jobs: list[Job], samples, files: FileMedia):
        self.jobs, self.samples, self.files = jobs, samples, files

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> Decoded:
        job = self.jobs[index]
        sample = self.samples[job.row]
        try:
            video = self.files.video(sample) if job.video else None
            images = self.files.images(sample) if job.images else None
        except BadSample as bad:
            return Decoded(job, None, None, bad.reason)
        return Decoded(job, images, video, None)


class BuildLock:
    """``DIR/.build.lock`` held with ``flock`` by the process that builds ``DIR``: the kernel releases it when that
    process ends, however it ends, so a killed build never blocks the next one."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"the feature cache {self.path.parent} is being built by {holder}: wait for it to finish and run "
                "again (what it built is then read, not built twice), or choose another cache directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@dataclass
class BuildOptions:
    """How a build runs: samples per tower call, entries per shard, DataLoader workers decoding the media, and
    whether a sample whose media cannot be used stops it (``data.on_bad_sample=error``) or is recorded as bad."""

    batch_size: int = BATCH_SIZE
    shard_entries: int = SHARD_ENTRIES
    num_workers: int = 0
    stop_on_bad_sample: bool = True
    data_path: str = "the data"


def build(
    cache: FeatureCache,
    model: nn.Module,
    chunks: list[list[Job]],
    samples,
    files: FileMedia,
    dist: Dist,
    options: BuildOptions,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Build ``chunks`` (``chunks_to_build``) into ``cache`` with ``model`` (zipped, on ``device``), on every rank of
    ``dist`` together; returns the entries this rank built. Rank 0 holds the build lock and clears what killed
    builds left; nothing is written before the disk space is known to suffice (checked after the first batch)."""
    lock = BuildLock(cache.dir)
    together(lambda: lock.acquire() if is_main() else None)
    try:
        if is_main():
            remove_stale_temps(cache.dir)
            cache.record_key()
        barrier()
        was_training = model.training
        model.eval()  # no dropout: the rows of a frozen tower (CLIP and SigLIP have none at training either)
        try:
            with torch.no_grad():
                built = _build_chunks(cache, model, chunks, samples, files, dist, options, device, dtype)
        finally:
            model.train(was_training)
        barrier()
    finally:
        lock.release()
    return built


def _build_chunks(cache, model, chunks, samples, files, dist, options, device, dtype) -> int:
    family = families.family_of(model)
    modalities = (IMAGE, VIDEO) if family.has_video else (IMAGE,)
    world, rank, size = dist.world_size, dist.rank, options.batch_size
    mine = chunks[rank::world]
    jobs = [job for chunk in mine for job in chunk]
    # One loader over this rank's chunks, its batches never crossing a chunk's end.
    starts = [0, *itertools.accumulate(len(chunk) for chunk in mine)]
    batches = [
        list(range(a + k, min(a + k + size, b))) for a, b in itertools.pairwise(starts) for k in range(0, b - a, size)
    ]
    loader = torch.utils.data.DataLoader(
        _Decode(jobs, samples, files), batch_sampler=batches, num_workers=options.num_workers, collate_fn=list
    )
    decoded_batches = iter(loader)
    total = sum(len(chunk) for chunk in chunks)
    progress = Progress("building the feature cache (this rank's share)", len(jobs), "entries")
    for round_start in range(0, len(chunks), world):
        in_round = chunks[round_start : round_start + world]
        calls = max(math.ceil(len(chunk) / size) for chunk in in_round)  # the same on every rank
        mine_now = rank < len(in_round)
        entries: dict[str, dict[str, Tensor]] = {}
        bad: dict[str, str] = {}
        for call in range(calls):
            own = mine_now and call < math.ceil(len(in_round[rank]) / size)
            decoded = next(decoded_batches) if own else []
            together(lambda: _refuse_bad(decoded, samples, options))
            good = [item for item in decoded if item.bad is None]
            bad.update((item.job.key, item.bad) for item in decoded if item.bad is not None)
            frozen = {modality: _frozen(model, modality, good, device, dtype) for modality in modalities}
            for index, item in enumerate(good):
                image, video = (frozen[m][index] if m in frozen else None for m in (IMAGE, VIDEO))
                entries[item.job.key] = entry_fields(item.images, image, item.video, video)
            if round_start == 0 and call == 0:
                together(lambda: _check_space(cache.dir, entries, total))
            progress.advance(len(decoded))
        if mine_now:
            write_shard(cache.dir, entries, bad)
    progress.finish()
    return len(jobs)


def _refuse_bad(decoded: list[Decoded], samples, options: BuildOptions) -> None:
    """``data.on_bad_sample=error``: a sample whose media cannot be used stops the build, as it would stop training."""
    for item in decoded:
        if item.bad is not None and options.stop_on_bad_sample:
            raise UserError(
                f"{options.data_path}: sample id {samples[item.job.row]['id']}: {item.bad}. Fix the data, or set "
                "data.on_bad_sample=skip to leave such samples out."
            )


def _frozen(model: nn.Module, modality: str, items: list[Decoded], device, dtype) -> list[dict[str, Tensor] | None]:
    """The frozen part of each item's ``modality`` (None for an item without it), from one tower call."""
    media = [item.images if modality == IMAGE else item.video for item in items]
    counted = [None if m is None else (m[0], len(m[1]) if modality == IMAGE else 1) for m in media]
    return frozen_parts(model, modality, counted, device, dtype)


def frozen_parts(
    model: nn.Module, modality: str, media: Sequence[tuple[dict[str, Tensor], int] | None], device, dtype
) -> list[dict[str, Tensor] | None]:
    """The frozen part of each entry of ``media`` -- ``(vision inputs, count)``: one sample's images (``count`` of
    them) or its video (1); None for an entry without ``modality`` -- from one tower call on all of them (on a
    blank input when none has any, so every rank makes the same calls), an entry's media joined again. What a
    feature cache stores per entry, and what evaluation shares between the settings at one budget."""
    config = families.unwrap_peft(model).config
    given = [m for m in media if m is not None]
    if given:
        inputs = collate_vision([m[0] for m in given])
    else:
        blank = families.blank_image_inputs if modality == IMAGE else families.blank_video_inputs
        inputs = blank(config)
    inputs = to_model_inputs(inputs, device, dtype)
    keys = families.media_inputs(config)[0 if modality == IMAGE else 1]
    frozen = families.frozen_features(model, modality, {key: inputs[key] for key in keys if key in inputs})
    if not given:
        return [None] * len(media)
    per_medium = iter(families.split_frozen(config, modality, frozen, inputs))
    joined = iter([_join([next(per_medium) for _ in range(count)]) for _, count in given])
    return [next(joined) if m is not None else None for m in media]


def _join(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {field: torch.cat([part[field] for part in parts]) for field in parts[0]}


def _check_space(folder: Path, entries: dict[str, dict[str, Tensor]], total: int) -> None:
    """Refuse a build the filesystem cannot hold, from the size of the first entries built; else say what it takes."""
    if not entries:
        return
    per_entry = sum(v.numel() * v.element_size() for fields in entries.values() for v in fields.values()) / len(entries)
    needed = per_entry * total * 1.02  # and the shards' headers
    if needed > shutil.disk_usage(folder).free:
        raise UserError(
            f"the feature cache needs about {_size(needed)} for {total} entries ({_size(per_entry)} each) in "
            f"{folder}, but there is not that much: {free_space(folder)}. Free some space, or put the cache on "
            "another filesystem"
        )
    print0(
        f"[cache] building {total} entries into {folder}: about {_size(needed)} ({_size(per_entry)} each); {free_space(folder)}"
    )


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
