"""The training run, read top to bottom: :func:`train` is the run (setup -> loop of optimizer steps with logging,
checkpoints and held-out evaluation -> final evaluation -> export); :func:`setup` builds what it needs from the
recipe in named phases (through ``build``), :func:`train_step` is one optimizer step. :func:`run_worker` is one
process of a run, under ``torchrun`` (``bash train.sh``) for any number of processes, or plainly for one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from visionzip_tune import families, watchdog
from visionzip_tune.data import Collator, LengthGroupedSampler, MediaSource, Processing, SupervisedDataset
from visionzip_tune.distributed import (
    Dist,
    all_reduce_sum_,
    barrier,
    cleanup_distributed,
    exit_worker,
    init_distributed,
    is_main,
    print0,
    together,
)
from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.heldout import ChoiceSample, choice_accuracy, read_choices
from visionzip_tune.export import export_projector, weights_fingerprint
from visionzip_tune.families.forward import FrozenBlank, forward_with_vision, frozen_blanks, to_model_inputs
from visionzip_tune.files import atomic_write, file_sha256, remove_stale_temps
from visionzip_tune.loading import base_model_id, load_model_processing, load_vlm
from visionzip_tune.training import build, cache, checkpoint, metrics, ops, plots, preemption, preflight
from visionzip_tune.training.config import Config, to_dict, to_yaml
from visionzip_tune.training.lock import RunLock


def run_worker(cfg: Config, recipe: str | None) -> int:
    """One process of the run ``cfg`` describes, from signals to the process group's end; returns its exit status:
    0 done, :data:`preemption.EXIT_INTERRUPTED` stopped by a signal after a checkpoint. A torchrun worker leaves
    the process through :func:`exit_worker` (see there)."""
    stop = preemption.install(cfg.train.save_on_signal)
    under_torchrun = "LOCAL_RANK" in os.environ  # (a world of one sets it too: ask before init_distributed)
    if under_torchrun:  # stop (with a checkpoint) when the launcher dies
        preemption.die_with_parent()
    dist = init_distributed()
    try:
        status = _train_until_done_or_stopped(cfg, dist, recipe, stop)
        # Leave together, before the group goes: a rank that tears gloo down while a peer still works (rank 0 plots
        # and prints the summary alone) can abort in the teardown. Not after an error: the other ranks may be inside
        # another collective, where a barrier would hang them.
        barrier()
    finally:
        cleanup_distributed()
    if under_torchrun:
        exit_worker(status)
    return status


def _train_until_done_or_stopped(cfg: Config, dist: Dist, recipe: str | None, stop: preemption.StopRequest) -> int:
    """:func:`train`, and its exit status: 0 done, :data:`preemption.EXIT_INTERRUPTED` stopped by a signal."""
    try:
        train(cfg, dist, recipe=recipe, stop=stop)
    except preemption.Interrupted as interrupted:
        print0(
            f"[train] stopped by {interrupted.signal_name} after step {interrupted.step}; checkpoint "
            f"{interrupted.checkpoint}. Run the same command again to resume."
        )
        return preemption.EXIT_INTERRUPTED
    return 0


def train(cfg: Config, dist: Dist, recipe: str | None = None, stop: preemption.StopRequest | None = None) -> nn.Module:
    """Run the whole recipe into ``cfg.output.dir``; returns the trained model (peft-wrapped in lora mode).

    Holds the run directory's lock throughout. With ``stop`` (the signals of ``train.save_on_signal``), a signal
    makes every rank finish the step, checkpoint and raise :class:`preemption.Interrupted`.
    """
    lock = RunLock(cfg.output.dir)
    everyone = f"all {dist.world_size} ranks"
    with watchdog.phase("the first collective (rank 0 takes the run directory's lock)", f"{everyone} (an all-reduce)"):
        together(lambda: lock.acquire() if is_main() else None)
    try:
        run = setup(cfg, dist, stop)
        state = run.state
        with metrics.open_logger(run.dir, cfg, run.total_steps, state.step, resumed=state.resumed) as log:
            if run.eval_due(state.step):  # before training; or, resumed, the evaluation due at the checkpoint
                with watchdog.phase("the held-out evaluation before training", f"{everyone}, each scoring its share"):
                    log.eval(run.evaluate())
            first_step = state.step + 1
            while state.step < run.total_steps:
                state.step += 1
                first = state.step == first_step  # the last phase of the start: later steps say so in their line
                step_phase = "the first optimizer step", f"forward, backward and the step's all-reduce of {everyone}"
                with watchdog.phase(*step_phase) if first else contextlib.nullcontext():
                    log.step(train_step(run))
                lock.heartbeat()
                saved = run.save() if run.save_due() or state.stop_signal else None
                if saved is not None:
                    log.print(f"[train] checkpoint {saved}")
                if state.stop_signal:
                    raise run.interrupted(saved)
                if run.eval_due(state.step):
                    log.eval(run.evaluate())
            if run.eval_set is not None:
                log.eval(run.evaluate())
            if cfg.output.export:
                out = export_projector(
                    run.engine, run.dir / "export", metadata=run.export_metadata(recipe), processing=run.processing
                )
                log.print(f"[train] exported the {'model' if cfg.train.mode == 'full' else 'projector'} to {out}")
            if run.train_set.read_skipped():
                log.print(f"[train] {run.train_set.skip_summary()}")
            if is_main():
                log.print(f"[train] curves: {plots.plot_metrics(run.dir)}")
                for line in summary(run, run.dir / "export" if cfg.output.export else None):
                    log.print(line)
    finally:
        lock.release()
    print0(f"[train] done: {run.dir}")
    return run.engine.module


def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step over ``train.grad_accum`` micro-batches; returns its metrics record.

    Counters stay on the device and are reduced once per step; the only host sync per micro-batch is the NaN check,
    which must stop every rank before its backward.
    """
    started = time.perf_counter()
    engine, grad_accum = run.engine, run.cfg.train.grad_accum
    lrs = engine.get_lr()  # the rates this step uses (the scheduler advances inside engine.step())
    loss_sum = 0.0
    on_device = torch.zeros(2, dtype=torch.float64, device=engine.device)  # text + vision tokens, vision tokens
    samples = images = videos = 0
    for _ in range(grad_accum):
        batch, run.state.data_state = next(run.batches)
        inputs = to_model_inputs(batch, engine.device, run.dtype)
        loss = forward_with_vision(engine, inputs, run.blanks).loss  # text-only batches too: see there
        loss_sum += _finite_mean_loss(loss, run)
        engine.backward(loss)
        # DeepSpeed applies the optimizer (and advances the scheduler) only at the grad_accum boundary: for the
        # other micro-batches this call only accumulates.
        engine.step()
        on_device[0] += inputs["attention_mask"].sum()
        on_device[1] += torch.isin(inputs["input_ids"], run.vision_token_ids).sum()
        samples += inputs["input_ids"].shape[0]
        batch_images, batch_videos = families.media_count(run.model.config, batch)
        images, videos = images + batch_images, videos + batch_videos
    # The step's one reduce also tells every rank whether any rank got a stop signal, so all stop after this step.
    stop = float(run.stop is not None and run.stop.requested)
    counts = torch.tensor([samples, images, videos, stop], dtype=torch.float64, device=engine.device)
    tokens, vision, samples, images, videos, stops = all_reduce_sum_(torch.cat([on_device, counts])).tolist()
    if stops:
        run.state.stop_signal = (run.stop.signal_name if run.stop is not None else None) or "a signal on another rank"
    elapsed = time.perf_counter() - started
    grad_norm = engine.get_global_grad_norm()
    record = {
        "kind": "train",
        "step": run.state.step,
        "epoch": run.state.data_state["epoch"],
        "loss": loss_sum / grad_accum,
        "lr": lrs[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "vision_tokens": int(vision),
        "vision_tokens_per_unit": families.tokens_per_unit(run.model.config),  # K per image, crop or frame
        # What the LLM saw, measured: the mean per image or video (the Qwen families' K follows each image's size)
        "vision_tokens_per_image": vision / (images + videos) if images + videos else None,
        "images": int(images),
        "videos": int(videos),
    }
    if len(set(lrs)) > 1:
        record["lr_groups"] = lrs
    return record


def _finite_mean_loss(loss: torch.Tensor, run: Run) -> float:
    """The micro-batch loss averaged over ranks; every rank stops together, before backward, if any rank's loss is
    not finite (one all-reduce and one host sync)."""
    world_size = run.dist.world_size
    total, bad = all_reduce_sum_(torch.stack([loss.detach(), ~torch.isfinite(loss.detach())]).double()).tolist()
    if bad:
        raise UserError(
            f"the loss is {total / world_size} (not finite) at step {run.state.step} of {run.total_steps}; stopped "
            "before "
            f"updating the weights. The last good checkpoint ({checkpoint.latest_checkpoint(run.dir) or 'none yet'}) "
            "is intact; lower train.lr or check the data, then run the same command again to resume."
        )
    return total / world_size


# ---------------------------------------------------------------------------------------------------------------
# setup


@dataclass
class RunState:
    """Where a run stands (what a checkpoint records besides the trainable weights and the optimizer, and what a
    resume restores): the optimizer steps taken, the sampler's position after them, whether this process resumed,
    and the signal that stops it after the current step (on any rank)."""

    step: int = 0
    data_state: dict | None = None
    resumed: bool = False
    stop_signal: str | None = None


@dataclass
class Run:
    """What the loop works with, as :func:`setup` builds it, and where it stands (:attr:`state`)."""

    cfg: Config
    dist: Dist
    dir: Path
    engine: Any  # the DeepSpeed engine; engine.module is the model (peft-wrapped in lora mode)
    model: nn.Module
    trainable: list[tuple[str, nn.Parameter]]
    processing: Processing
    train_set: SupervisedDataset
    batches: Iterator[tuple[dict, dict]]  # (micro-batch, sampler state after it), endless
    collator: Collator
    eval_set: SupervisedDataset | None
    eval_samples: list[ChoiceSample] | None
    total_steps: int
    dtype: torch.dtype
    vision_token_ids: torch.Tensor  # placeholder ids of every kind of vision input, on the device
    base_fingerprint: str
    data_fingerprint: str
    stop: preemption.StopRequest | None = None
    state: RunState = field(default_factory=RunState)
    # With train.feature_cache: the frozen part of a blank image (video), which a batch without one feeds the
    # trainable modules (the training set's rows come from the cache, so no rank runs the tower).
    blanks: dict[str, FrozenBlank] | None = None

    def eval_due(self, step: int) -> bool:
        """Evaluate before training and every ``train.eval_every`` steps; the final evaluation runs after the loop."""
        every = self.cfg.train.eval_every
        periodic = every > 0 and step % every == 0
        return self.eval_set is not None and step != self.total_steps and (step == 0 or periodic)

    def evaluate(self) -> dict[str, Any]:
        result = choice_accuracy(
            self.engine.module,
            self.eval_set,
            self.eval_samples,
            self.collator,
            batch_size=self.cfg.train.eval_batch_size,
            eos_token_id=self.processing.tokenizer.eos_token_id,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        return {"kind": "eval", "step": self.state.step, **result}

    def save_due(self) -> bool:
        every, step = self.cfg.train.save_every, self.state.step
        return (every > 0 and step % every == 0) or step == self.total_steps

    def save(self) -> Path:
        state = {
            "sampler": self.state.data_state,
            "world_size": self.dist.world_size,
            "total_steps": self.total_steps,
            "data_fingerprint": self.data_fingerprint,
            "base_fingerprint": self.base_fingerprint,
            "config": to_dict(self.cfg),
        }
        return checkpoint.save_checkpoint(
            self.engine, self.dir, self.state.step, self.trainable, state, keep=self.cfg.train.keep_checkpoints
        )

    def interrupted(self, saved: Path) -> preemption.Interrupted:
        """Record (rank 0) that the run stopped on a signal with checkpoint ``saved``; the exception to raise."""
        signal_name, step = self.state.stop_signal, self.state.step
        if is_main():
            marker = {"signal": signal_name, "step": step, "checkpoint": str(saved)}
            atomic_write(self.dir / preemption.INTERRUPTED_FILE, json.dumps(marker).encode())
        return preemption.Interrupted(signal_name, step, str(saved))

    def export_metadata(self, recipe: str | None) -> dict[str, Any]:
        return {
            "base_model": base_model_id(self.cfg.model.name_or_path),
            "base_fingerprint": self.base_fingerprint,
            "recipe": {"path": str(Path(recipe).resolve()) if recipe else None, "config": to_dict(self.cfg)},
            "step": self.total_steps,
            "data_fingerprint": self.data_fingerprint,
            "mode": self.cfg.train.mode,
        }


def setup(cfg: Config, dist: Dist, stop: preemption.StopRequest | None = None) -> Run:
    """Build the run ``cfg`` describes (the run directory's lock held), phase by phase. Inputs, and a resumed
    checkpoint's compatibility, are checked before anything is written into the run directory."""
    _seed_everything(cfg.train.seed)
    resume, data_fingerprint = _inputs(cfg, dist)
    ops.prepare_ops(cfg)  # before anything initialises DeepSpeed (ZeRO-3 does so as the weights load)
    built = _model(cfg, dist, resume)
    model = built.model
    options = cache.build_options(cfg)
    run_cache = (
        cache.open_cache(cfg, dist, model, built.processing, built.dtype, options) if cfg.train.feature_cache else None
    )
    data = _data(cfg, dist, model, built.processing, run_cache.media if run_cache is not None else None)
    engine = _engine(cfg, dist, model, built.trainable, data.total_steps)
    blanks = None
    if run_cache is not None:  # on the engine's device (and, under ZeRO-3, through its parameter gathers)
        run_cache.build_missing(engine.module, dist, engine.device, built.dtype, options)
        blanks = frozen_blanks(engine.module, engine.device, built.dtype)
    _prepare_run_dir(cfg)
    run = Run(
        cfg=cfg,
        dist=dist,
        dir=Path(cfg.output.dir),
        engine=engine,
        model=model,
        trainable=built.trainable,
        processing=built.processing,
        train_set=data.train_set,
        batches=watchdog.first_of(
            _micro_batches(data.loader, data.sampler),
            "the first batch from the data loader",
            f"{_loader_workers(cfg)}, reading the samples of {cfg.data.path} and their images and videos",
        ),
        collator=data.collator,
        eval_set=data.eval_set,
        eval_samples=data.eval_samples,
        total_steps=data.total_steps,
        dtype=built.dtype,
        vision_token_ids=torch.tensor(
            [model.config.image_token_id, getattr(model.config, "video_token_id", -1)], device=engine.device
        ),
        base_fingerprint=built.base_fingerprint,
        data_fingerprint=data_fingerprint,
        stop=stop,
        state=RunState(data_state=data.sampler.state_dict(0)),
        blanks=blanks,
    )
    if resume is not None:
        with watchdog.phase("loading the checkpoint to resume from", f"the files of {resume.path}"):
            restored = checkpoint.load_checkpoint(engine, resume.path, dist.world_size)
        run.state = RunState(step=restored["step"], data_state=restored["sampler"], resumed=True)
        data.sampler.load_state_dict(run.state.data_state)
        print0(
            f"[train] resumed from {resume.path} at step {run.state.step} (epoch {data.sampler.epoch}, sample "
            f"{data.sampler.start})"
        )
    return run


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from and its ``state.json``."""

    path: Path
    state: dict


def _inputs(cfg: Config, dist: Dist) -> tuple[Resume | None, str]:
    """The demo's assets built if asked for, every input present, and the checkpoint to resume (refused when it
    would not continue this run); returns it and the training data's fingerprint."""
    with watchdog.phase("building the demo's assets", "rank 0, which builds the tiny model and the demo data"):
        together(lambda: preflight.build_demo_assets(cfg) if is_main() else None)
    problems = preflight.missing_inputs(cfg)
    if problems:
        raise UserError(next(iter(problems.values())))
    preflight.check_keys(cfg)  # every key set takes effect with this model, or the run stops here
    run_dir = Path(cfg.output.dir)
    resume_from = checkpoint.resolve_resume(cfg.train.resume, run_dir)
    if cfg.train.resume == "never" and checkpoint.latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"output.dir {run_dir} already holds checkpoints and train.resume=never: choose another output.dir, "
            "delete that directory, or resume it (train.resume=auto)"
        )
    with watchdog.phase("fingerprinting the training data", f"reading {cfg.data.path}"):
        data_fingerprint = "sha256:" + file_sha256(cfg.data.path)[:32]
    if resume_from is None:
        return None, data_fingerprint
    resume = Resume(resume_from, checkpoint.read_state(resume_from))
    now = {"config": to_dict(cfg), "world_size": dist.world_size, "data_fingerprint": data_fingerprint}
    checkpoint.refuse_incompatible_resume(resume.path, resume.state, now)
    return resume, data_fingerprint


class Model(NamedTuple):
    """The model as the run trains it and what comes with it."""

    model: nn.Module  # peft-wrapped in lora mode
    trainable: list[tuple[str, nn.Parameter]]  # exactly the recipe's, in named_parameters order
    processing: Processing
    dtype: torch.dtype
    base_fingerprint: str  # of the base weights, before LoRA or DeepSpeed touch them


def _model(cfg: Config, dist: Dist, resume: Resume | None) -> Model:
    """The base model with the recipe's VisionZip in its data path and exactly the recipe's parameters trainable."""
    dtype = torch.bfloat16 if build.use_bf16(cfg) else torch.float32
    zero3 = cfg.deepspeed.zero_stage == 3
    model = load_vlm(
        cfg.model.name_or_path,
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        zero3_config=build.deepspeed_config(cfg, dist.world_size) if zero3 else None,
    )
    if zero3:
        sharded = all(hasattr(p, "ds_id") for p in model.parameters())
        print0(f"[train] ZeRO-3: {'weights sharded across ranks at load' if sharded else 'weights NOT sharded'}")
    processing = load_model_processing(cfg.model.name_or_path)
    build.apply_recipe_visionzip(model, cfg.visionzip)
    print0(f"[train] {build.describe_compression(model)}")
    with watchdog.phase("fingerprinting the base weights", "hashing every weight tensor in memory"):
        base_fingerprint = weights_fingerprint(model)  # before LoRA/DeepSpeed touch the model
    if resume is not None:
        checkpoint.refuse_incompatible_resume(resume.path, resume.state, {"base_fingerprint": base_fingerprint})
    if cfg.train.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.config.use_cache = False
    model, trainable = build.prepare_trainable(model, cfg.train)
    print0(f"[train] {build.describe_trainable(model, cfg.train)}")
    return Model(model, trainable, processing, dtype, base_fingerprint)


@dataclass(frozen=True)
class Data:
    """The training set and how it is batched, the number of optimizer steps it makes, and the held-out set."""

    train_set: SupervisedDataset
    collator: Collator
    sampler: LengthGroupedSampler
    loader: torch.utils.data.DataLoader
    total_steps: int
    eval_set: SupervisedDataset | None
    eval_samples: list[ChoiceSample] | None


def _data(cfg: Config, dist: Dist, model: nn.Module, processing: Processing, media: MediaSource | None) -> Data:
    """The training set (its media from ``media``: a feature cache's, or the files), its batches and held-out set."""
    train_cfg = cfg.train
    skip_log = Path(cfg.output.dir) / "skipped.jsonl" if is_main() else None  # one writer: every rank skips alike
    train_set = build.dataset(cfg, model.config, processing, skip_log=skip_log, media=media)
    collator = Collator(processing.tokenizer.pad_token_id)
    sampler = LengthGroupedSampler(
        train_set.lengths,
        train_cfg.micro_batch_size,
        num_replicas=dist.world_size,
        rank=dist.rank,
        seed=train_cfg.seed,
        group_by_modality=cfg.data.group_by_modality,
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=train_cfg.micro_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=cfg.data.num_workers,
        drop_last=True,  # full micro-batches only: equal work on every rank
        persistent_workers=False,
    )
    total_steps = train_cfg.max_steps or train_cfg.epochs * (sampler.num_batches // train_cfg.grad_accum)
    if total_steps < 1:
        raise UserError(
            f"{cfg.data.path}: {len(train_set)} usable samples do not fill one optimizer step of "
            f"{train_cfg.micro_batch_size * train_cfg.grad_accum * dist.world_size} samples (micro_batch_size x "
            f"grad_accum x {dist.world_size} processes); lower train.micro_batch_size or train.grad_accum"
        )
    eval_set = build.dataset(cfg, model.config, processing, held_out=True) if cfg.data.eval_path else None
    eval_samples = read_choices(eval_set) if eval_set is not None else None
    return Data(train_set, collator, sampler, loader, total_steps, eval_set, eval_samples)


def _engine(cfg: Config, dist: Dist, model: nn.Module, trainable: list[tuple[str, nn.Parameter]], total_steps: int):
    """The DeepSpeed engine: AdamW over the trainable parameters only, cosine schedule with warmup."""
    import deepspeed  # lazy: slow to import, and `train --check` / `--help` (run before torchrun) do not need it

    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    everyone = f"all {dist.world_size} ranks (it broadcasts the weights of rank 0 and builds its groups)"
    with watchdog.phase("initialising DeepSpeed", everyone):
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=build.optimizer(model, trainable, cfg),
            lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total_steps),
            config=build.deepspeed_config(cfg, dist.world_size),
        )
    return engine


def _prepare_run_dir(cfg: Config) -> None:
    """Leftovers of killed writes go, an earlier interruption's marker too; the resolved config is written first."""
    run_dir = Path(cfg.output.dir)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, checkpoint.checkpoints_root(run_dir)):
            remove_stale_temps(folder)
        (run_dir / preemption.INTERRUPTED_FILE).unlink(missing_ok=True)
        atomic_write(run_dir / "config.yaml", to_yaml(cfg).encode())
    barrier()


def summary(run: Run, export: Path | None) -> list[str]:
    """What a newcomer wants at the end of a run: what it achieved, where it is, and what to try next with it."""
    lines = []
    # From the file, not this process: a resumed run reports from the evaluation before its first step.
    evaluations = [record for record in metrics.read_metrics(run.dir) if record["kind"] == "eval"]
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        before = f"{first['accuracy']:.3f} (step {first['step']}) -> " if first is not last else ""
        lines.append(
            f"[train] held-out accuracy {before}{last['accuracy']:.3f} (step {last['step']}) on {last['total']} samples"
        )
    if export is None:
        return lines
    lines.append(f"[train] try the export {export}:")
    example = _example_image(run)
    if example is not None:
        image, question = example
        lines += [
            f'  python -m visionzip_tune generate --projector {export} --image {image} --prompt "{question}"',
            f"  python -m visionzip_tune show --projector {export} --image {image} --output kept.png",
        ]
    held_out = run.cfg.data.eval_path
    if held_out is not None:
        folder = run.cfg.data.eval_image_folder or run.cfg.data.image_folder
        lines.append(
            f"  python -m visionzip_tune eval --projector {export} --held-out {held_out} --image-folder {folder}"
        )
    lines.append(
        f"  python -m visionzip_tune eval --projector {export} --tasks gqa,pope,mme   (lmms-eval benchmarks; README)"
    )
    return lines


def _example_image(run: Run) -> tuple[Path, str] | None:
    """An image of the held-out (else training) data and its first question, for the commands to try next."""
    dataset = run.eval_set if run.eval_set is not None else run.train_set
    for row in dataset.rows[:50]:
        sample = dataset.samples[row]
        if sample["images"] and dataset.image_folder is not None:
            question = sample["conversations"][0]["value"].replace("<image>", "").strip().replace('"', "'")
            return dataset.image_folder / sample["images"][0], question
    return None


def _loader_workers(cfg: Config) -> str:
    workers = cfg.data.num_workers
    return f"{workers} data loader worker process(es)" if workers else "the data loader (in this process)"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _micro_batches(loader, sampler: LengthGroupedSampler) -> Iterator[tuple[dict, dict]]:
    """Endless ``(batch, sampler state after it)`` from where the sampler stands (its epoch and start, set on
    resume: the consumed samples are skipped by index, no image is loaded twice); each new epoch reshuffles."""
    while True:
        epoch, consumed = sampler.epoch, sampler.start
        for batch in loader:
            consumed += len(batch["ids"])
            yield batch, sampler.state_dict(consumed)
        sampler.set_epoch(epoch + 1)
