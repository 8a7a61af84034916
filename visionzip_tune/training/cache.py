"""What ``train.feature_cache`` means for a recipe: whether its family and mode can read a compressed-feature cache
(:func:`refuse_uncacheable`), the run's cache opened -- its key, its entries' keys, what is missing and why
(:func:`open_cache`) -- and built where entries are missing, before training (:meth:`RunCache.build_missing`) or by
``python -m visionzip_tune cache`` (:mod:`visionzip_tune.training.cache_command`). The cache itself is
:mod:`visionzip_tune.feature_cache`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visionzip_tune import families
from visionzip_tune.data import FileMedia, load_samples
from visionzip_tune.data.processing import Processing
from visionzip_tune.data.source import column, data_path
from visionzip_tune.distributed import (
    Dist,
    broadcast_object,
    is_main,
    print0,
    together,
)
from visionzip_tune.errors import UserError
from visionzip_tune.feature_cache import (
    BuildOptions,
    CachedMedia,
    FeatureCache,
    Job,
    build,
    cache_key,
    chunks_to_build,
    media_paths,
    plan_jobs,
)
from visionzip_tune.training.config import Config


def refusal(cfg: Config, family: families.Family | None = None) -> str | None:
    """The paragraph refusing ``train.feature_cache`` for this recipe (``family``: its model's, when known), or
    None: a cache holds compressed rows, which a frozen compression of a frozen tower makes."""
    given = f"train.feature_cache={cfg.train.feature_cache}"
    if not cfg.visionzip.enabled:
        return (
            f"{given} holds compressed tower rows, but visionzip.enabled=false feeds the LLM every tower token: set "
            "visionzip.enabled=true, or leave train.feature_cache unset"
        )
    if cfg.visionzip.method == "random" and cfg.visionzip.resample:
        return (
            f"{given} cannot hold visionzip.method=random with visionzip.resample=true: it draws new positions at "
            "every call, so no two epochs see the same rows. Set visionzip.resample=false (positions seeded by each "
            "image's pixels), or leave train.feature_cache unset"
        )
    if family is None:
        return None
    try:
        trained = family.projector_paths(cfg.train.projector_modules)
    except ValueError:
        return None  # an unknown subset: refused with its own message where the run picks its parameters
    reason = family.cache_refusal(trained)
    if reason is None:
        return None
    return (
        f"{given} (train.mode={cfg.train.mode}, train.projector_modules={cfg.train.projector_modules}): {reason}. Set "
        "train.projector_modules to that subset, or leave train.feature_cache unset"
    )


def refuse_uncacheable(cfg: Config, family: families.Family | None = None) -> None:
    """:class:`UserError` with :func:`refusal`'s paragraph, if any (``train.feature_cache`` set)."""
    problem = refusal(cfg, family) if cfg.train.feature_cache else None
    if problem is not None:
        raise UserError(problem)


@dataclass
class RunCache:
    """A recipe's cache as a run finds it: the media source its training set reads, and what is still to build."""

    cache: FeatureCache
    jobs: list[Job]  # every entry the training data needs
    chunks: list[list[Job]]  # the planned chunks with entries missing
    samples: object  # the loaded training samples (datasets.Dataset)
    files: FileMedia  # their media files
    media: CachedMedia

    @property
    def missing(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def build_missing(self, model: nn.Module, dist: Dist, device: torch.device, dtype: torch.dtype, options) -> None:
        """Build the missing entries with ``model`` (zipped, on ``device``) on every rank together, then check
        that every entry is there."""
        if self.chunks:
            started = time.monotonic()
            build(self.cache, model, self.chunks, self.samples, self.files, dist, options, device, dtype)
            print0(f"[cache] built {self.missing} entries in {time.monotonic() - started:.1f} s")
        shards = self.cache.shards()
        absent = [job for job in self.jobs if job.key not in shards]
        if absent:  # only if another process removed shards meanwhile
            raise UserError(
                f"the feature cache {self.cache.dir} lacks {len(absent)} entries after its build (shards removed "
                "while it ran?); run the same command again"
            )


def build_options(cfg: Config, batch_size: int | None = None, shard_entries: int | None = None) -> BuildOptions:
    """How a recipe's cache is built: its data's workers and bad-sample policy, and the sizes given (else the
    defaults)."""
    defaults = BuildOptions()
    return BuildOptions(
        batch_size=batch_size or defaults.batch_size,
        shard_entries=shard_entries or defaults.shard_entries,
        num_workers=cfg.data.num_workers,
        stop_on_bad_sample=cfg.data.on_bad_sample == "error",
        data_path=str(Path(cfg.data.path).resolve()),
    )


def open_cache(
    cfg: Config, dist: Dist, model: nn.Module, processing: Processing, dtype: torch.dtype, options: BuildOptions
) -> RunCache:
    """The recipe's cache for ``model`` (zipped, its trainable parameters chosen): its key, the hashes of the
    training data's media (hashed on rank 0, given to all), the entries the data needs and those missing, said in a
    line. :class:`UserError` for a recipe that cannot use a cache, and for missing entries with
    ``train.feature_cache_build=false``, naming what changed. Collective (every rank)."""
    refuse_uncacheable(cfg, families.family_of(model))
    trained = families.projector_parameters(model, cfg.train.projector_modules).values()
    key = cache_key(model, processing.image_processor, cfg.data.image_aspect, cfg.data.video_frames, dtype, trained)
    cache = FeatureCache(cfg.train.feature_cache, key)
    samples = load_samples(cfg.data.path)
    rows = [row for row, problem in enumerate(column(samples, "problem")) if problem is None]
    files = FileMedia.for_data(cfg.data, processing.image_processor, data_path=data_path(samples))
    hashes, changed = broadcast_object(together(lambda: _hash_media(cache, samples, rows, files)))
    jobs = plan_jobs(samples, rows, files, hashes, families.family_of(model).has_video)
    shards = cache.shards()
    chunks = chunks_to_build(jobs, shards, options.shard_entries)
    run_cache = RunCache(cache, jobs, chunks, samples, files, CachedMedia(cache.dir, hashes, files))
    missing = run_cache.missing
    if not missing:
        print0(f"[cache] reading {len(jobs)} entries from {cache.dir}")
        return run_cache
    why = cache.why_missing() if not len(shards) else _changed_media(changed, missing)
    if not cfg.train.feature_cache_build:
        raise UserError(
            f"train.feature_cache={cfg.train.feature_cache}: {missing} of the {len(jobs)} entries this data needs "
            f"are not in {cache.dir} ({why}), and train.feature_cache_build=false. Build them with `python -m "
            "visionzip_tune cache` and the same recipe and overrides, or set train.feature_cache_build=true"
        )
    print0(f"[cache] {cache.dir}: {len(jobs) - missing} of {len(jobs)} entries there, {missing} to build ({why})")
    return run_cache


def _hash_media(cache: FeatureCache, samples, rows: list[int], files: FileMedia):
    """Rank 0: the hashes of every media file of ``rows`` (the index remembers them), and those that changed."""
    if not is_main():
        return None
    paths = [path for row in rows for path in media_paths(samples[row], files)]
    index = cache.media_hashes()
    hashes = index.hash_files(paths)
    index.save()
    return hashes, index.changed


def _changed_media(changed: list[str], missing: int) -> str:
    if not changed:
        return f"{missing} samples with media new to this cache"
    listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"{len(changed)} media files changed since they were cached ({listed}); the rest are new"
