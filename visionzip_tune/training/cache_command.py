"""``python -m visionzip_tune cache RECIPE``: this node's ranks started under torchrun (:mod:`visionzip_tune.launcher`;
one process on one node runs here), and on each the recipe's model loaded on its device (no DeepSpeed: inference
only), its cache of the training data opened and the missing entries built, every rank a share of them
(:mod:`visionzip_tune.training.cache`)."""

from __future__ import annotations

import os

import torch

from visionzip_tune.distributed import (
    Dist,
    barrier,
    cleanup_distributed,
    exit_worker,
    init_distributed,
    is_main,
    print0,
    together,
)
from visionzip_tune.errors import UserError
from visionzip_tune.feature_cache import BuildOptions
from visionzip_tune.launcher import RanksFailed, launch_ranks, nodes, processes_per_node
from visionzip_tune.loading import load_model_processing, load_vlm
from visionzip_tune.training import build as recipe
from visionzip_tune.training import preemption, preflight
from visionzip_tune.training.cache import open_cache
from visionzip_tune.training.config import Config


def under_torchrun() -> bool:
    """Whether this process is a torchrun worker (its elastic agent names the run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def run_cache_command(cfg: Config, options: BuildOptions, argv: list[str]) -> int:
    """The cache command with ``argv`` (its arguments, to start the ranks with): a rank under torchrun builds its
    share; one process on one node builds here; else this node's ranks are started. Returns the exit status."""
    if under_torchrun() or (processes_per_node() == 1 and nodes() == 1):
        return run_cache_worker(cfg, options)
    print(f"[cache] starting {processes_per_node()} processes on this node", flush=True)
    try:
        launch_ranks(["-m", "visionzip_tune", "cache", *argv])
    except RanksFailed as failed:
        if failed.message is not None:
            raise UserError(failed.message) from None
        rank, code = min(failed.codes.items())
        print(f"error: the cache build failed on rank {rank} (exit status {code}); see its output above", flush=True)
        return 1
    return 0


def run_cache_worker(cfg: Config, options: BuildOptions) -> int:
    """One process of ``python -m visionzip_tune cache``, under torchrun or plainly: build the recipe's cache of
    its training data on every rank, then say what it holds. Returns the exit status (0)."""
    worker = under_torchrun()
    if worker:  # a killed launcher takes its workers along (shards are written whole: nothing is torn)
        preemption.die_with_parent()
    dist = init_distributed()
    try:
        _build_for_recipe(cfg, dist, options)
        barrier()
    finally:
        cleanup_distributed()
    if worker:
        exit_worker(0)
    return 0


def _build_for_recipe(cfg: Config, dist: Dist, options: BuildOptions) -> None:
    if not cfg.train.feature_cache:
        raise UserError("the cache command builds train.feature_cache: set it to a directory (train.feature_cache=DIR)")
    together(lambda: preflight.build_demo_assets(cfg) if is_main() else None)
    problems = preflight.missing_inputs(cfg)
    if problems:
        raise UserError(next(iter(problems.values())))
    dtype = torch.bfloat16 if recipe.use_bf16(cfg) else torch.float32
    device = torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model = load_vlm(cfg.model.name_or_path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    recipe.apply_recipe_visionzip(model, cfg.visionzip)
    recipe.projector_subset(model, cfg.train)  # an unknown train.projector_modules is refused as training refuses it
    model.to(device)
    processing = load_model_processing(cfg.model.name_or_path)
    run_cache = open_cache(cfg, dist, model, processing, dtype, options)
    run_cache.build_missing(model, dist, device, dtype, options)
    shards = run_cache.cache.shards()
    if shards.fields:
        per_sample = shards.nbytes / len(shards.fields)
        print0(
            f"[cache] {run_cache.cache.dir}: {len(shards)} entries ({len(shards.bad)} of unusable media), "
            f"{shards.nbytes / 2**20:.1f} MiB, {per_sample / 1024:.1f} KiB per sample; train with "
            f"train.feature_cache={cfg.train.feature_cache}"
        )
