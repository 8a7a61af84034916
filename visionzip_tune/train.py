"""``python -m visionzip_tune train [RECIPE] [key=value ...]``: fine-tune a VLM with VisionZip in the data path.

One file, read top to bottom: setup (config, ranks, model + VisionZip + what trains, data, DeepSpeed, resume) ->
loop (micro-batches -> optimizer step -> one log line, metrics.jsonl, wandb -> checkpoint / evaluation) ->
final evaluation -> export of the projector -> cleanup. Launch it with ``torchrun`` (``bash train.sh``) for any
number of processes, or plainly for one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from visionzip_tune import checkpoint
from visionzip_tune.config import Config, TrainConfig, help_table, load_config, to_dict, to_yaml
from visionzip_tune.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    deepspeed_config,
    init_distributed,
    print0,
    use_bf16,
)
from visionzip_tune.errors import UserError
from visionzip_tune.files import atomic_write, file_sha256

DESCRIPTION = __doc__.split("\n\n")[0].replace("``", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune train",
        description=DESCRIPTION,
        epilog="example: bash train.sh recipes/llava-1.5-7b/projector.yaml visionzip.dominant=108 "
        "visionzip.contextual=20   (--help-config lists every key)",
    )
    parser.add_argument("recipe", nargs="?", help="recipe YAML (recipes/<model>/<mode>.yaml); omit for defaults")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its doc and exit")
    parser.add_argument(
        "--check", action="store_true", help="check the config and input paths, print output.dir and exit"
    )
    args = parser.parse_args(argv)
    if args.help_config:
        print(help_table())
        return 0
    if args.recipe is not None and "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.recipe)  # `train key=value` without a recipe
        args.recipe = None
    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.check:  # train.sh runs this before torchrun, so bad input never reaches the launcher's tracebacks
        _check_inputs(cfg, buildable_ok=True)
        print(cfg.output.dir)
        return 0
    dist = init_distributed()
    try:
        train(cfg, dist, recipe=args.recipe)
        barrier()  # leave together: a rank exiting while a peer still talks to it can abort in gloo's teardown
    finally:
        cleanup_distributed()  # after an error no barrier: the other ranks may be inside another collective
    return 0


def train(cfg: Config, dist: Dist, recipe: str | None = None) -> nn.Module:
    """Run the whole recipe into ``cfg.output.dir``; returns the trained model (peft-wrapped in lora mode)."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    from visionzip_tune.data import Collator, LengthGroupedSampler
    from visionzip_tune.evaluate import choice_accuracy, forward_vision_first, model_inputs, read_choices
    from visionzip_tune.export import export_projector, weights_fingerprint
    from visionzip_tune.models import family_name, projector, remove_visionzip, tokens_per_image

    t = cfg.train
    run_dir = Path(cfg.output.dir)
    _seed_everything(t.seed)

    # -- inputs: build the demo assets if asked, then check everything before writing anything ------------------
    _build_demo_assets(cfg, dist)
    _check_inputs(cfg)
    resume_from = checkpoint.resolve_resume(t.resume, run_dir)
    if t.resume == "never" and checkpoint.latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"output.dir {run_dir} already holds checkpoints and train.resume=never: choose another output.dir, "
            "delete that directory, or resume it (train.resume=auto)"
        )

    data_fingerprint = _file_fingerprint(cfg.data.path)

    # -- model: VisionZip in the data path, then what trains ------------------------------------------------------
    bf16 = use_bf16(cfg)
    ds_config = deepspeed_config(cfg, dist.world_size)
    model, processing = _load_model(cfg, bf16, ds_config)
    tokenizer = processing[0]
    if cfg.visionzip.enabled:
        _apply_visionzip(model, cfg)
    else:
        remove_visionzip(model)  # a base saved zipped (a full-mode export) records a budget: stock means stock
    base_fingerprint = weights_fingerprint(model)  # before LoRA/DeepSpeed touch the model
    if t.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.config.use_cache = False
    model = set_trainable(model, t)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(_numel(p) for _, p in trainable)
    n_projector = sum(_numel(p) for p in projector(model).parameters())
    if t.mode == "projector" and n_trainable != n_projector:
        raise AssertionError(f"projector mode trains {n_trainable} parameters, the projector has {n_projector}")
    n_total = sum(_numel(p) for p in model.parameters())
    print0(
        f"[train] mode={t.mode}: {n_trainable:,} trainable parameters of {n_total:,} "
        f"({100 * n_trainable / n_total:.2f}%; projector {n_projector:,}) in {len(trainable)} tensors"
    )

    # -- data ------------------------------------------------------------------------------------------------------
    skip_log = run_dir / "skipped.jsonl" if dist.is_main else None  # one writer: every rank skips the same ids
    train_set = _dataset(cfg, cfg.data.path, cfg.data.image_folder, model.config, processing, skip_log)
    collator = Collator(tokenizer.pad_token_id)
    sampler = LengthGroupedSampler(
        train_set.lengths,
        t.micro_batch_size,
        num_replicas=dist.world_size,
        rank=dist.rank,
        seed=t.seed,
        group_by_modality=cfg.data.group_by_modality,
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=t.micro_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=cfg.data.num_workers,
        drop_last=True,  # full micro-batches only: equal work on every rank
        persistent_workers=False,
    )
    steps_per_epoch = sampler.num_batches // t.grad_accum
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    if total_steps < 1:
        raise UserError(
            f"{cfg.data.path}: {len(train_set)} usable samples do not fill one optimizer step of "
            f"{t.micro_batch_size * t.grad_accum * dist.world_size} samples (micro_batch_size x grad_accum x "
            f"{dist.world_size} processes); lower train.micro_batch_size or train.grad_accum"
        )
    eval_set = eval_samples = None
    if cfg.data.eval_path:
        eval_folder = cfg.data.eval_image_folder or cfg.data.image_folder
        eval_set = _dataset(cfg, cfg.data.eval_path, eval_folder, model.config, processing, None)
        eval_samples = read_choices(eval_set)

    # -- DeepSpeed: AdamW over the trainable parameters only, cosine schedule with warmup -------------------------
    optimizer = _adamw(_param_groups(model, trainable, t), t.lr, offload=cfg.deepspeed.offload_optimizer)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total_steps),
        config=ds_config,
    )
    dtype = torch.bfloat16 if bf16 else torch.float32
    # Placeholder ids of every kind of vision input (images; videos for families with a video input), on the device
    # once rather than every micro-batch.
    vision_token_ids = torch.tensor(
        [model.config.image_token_id, getattr(model.config, "video_token_id", -1)], device=engine.device
    )

    # -- run directory: the resolved config first; then resume --------------------------------------------------
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(run_dir / "config.yaml", to_yaml(cfg))
    barrier()
    step, data_state = 0, sampler.state_dict(0)
    if resume_from is not None:
        state = checkpoint.load_checkpoint(engine, resume_from, dist.world_size)
        step, data_state = state["step"], state["sampler"]
        sampler.load_state_dict(data_state)
        print0(f"[train] resumed from {resume_from} at step {step} (epoch {sampler.epoch}, sample {sampler.start})")
    logger = RunLogger(run_dir, cfg, dist, resume_step=step if resume_from is not None else None)

    def evaluate(at_step: int) -> None:
        result = choice_accuracy(
            engine.module, eval_set, eval_samples, collator,
            batch_size=t.eval_batch_size, eos_token_id=tokenizer.eos_token_id,
            rank=dist.rank, world_size=dist.world_size,
        )  # fmt: skip
        logger.log({"kind": "eval", "step": at_step, **result})

    def save(at_step: int) -> None:
        state = {
            "sampler": data_state,
            "world_size": dist.world_size,
            "total_steps": total_steps,
            "data_fingerprint": data_fingerprint,
        }
        path = checkpoint.save_checkpoint(engine, run_dir, at_step, trainable, state, keep=t.keep_checkpoints)
        print0(f"[train] checkpoint {path}")

    def eval_due(at_step: int) -> bool:  # the final evaluation runs after the loop
        periodic = t.eval_every > 0 and at_step % t.eval_every == 0
        return eval_set is not None and at_step != total_steps and (at_step == 0 or periodic)

    # -- loop -----------------------------------------------------------------------------------------------------
    if eval_due(step):  # before training; or, resumed, the evaluation due at the checkpoint (its record was dropped)
        evaluate(step)
    batches = _micro_batches(loader, sampler)
    progress = _progress_bar(cfg, dist, step, total_steps)
    while step < total_steps:
        step += 1
        started = time.perf_counter()
        lrs = engine.get_lr()  # the rates this step uses (the scheduler advances inside engine.step())
        loss_sum = samples = tokens = vision = images = videos = 0.0
        for _ in range(t.grad_accum):
            batch, data_state = next(batches)
            inputs = model_inputs(batch, engine.device, dtype)
            loss = forward_vision_first(engine, model, inputs).loss  # text-only batches too: see there
            # One all-reduce tells every rank about a NaN on any rank, so all stop together before backward.
            micro_loss, bad = all_reduce_sum([loss.item(), float(not math.isfinite(loss.item()))])
            if bad:
                raise UserError(
                    f"the loss is {micro_loss / dist.world_size} (not finite) at step {step} of {total_steps}; "
                    f"stopped before updating the weights. The last good checkpoint "
                    f"({checkpoint.latest_checkpoint(run_dir) or 'none yet'}) is intact; lower train.lr or check "
                    "the data, then run the same command again to resume."
                )
            engine.backward(loss)
            engine.step()
            loss_sum += micro_loss / dist.world_size
            samples += inputs["input_ids"].shape[0]
            tokens += float(inputs["attention_mask"].sum())
            vision += float(torch.isin(inputs["input_ids"], vision_token_ids).sum())
            images += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
            videos += batch["pixel_values_videos"].shape[0] if "pixel_values_videos" in batch else 0
        samples, tokens, vision, images, videos = all_reduce_sum([samples, tokens, vision, images, videos])
        elapsed = time.perf_counter() - started
        record = {
            "kind": "train",
            "step": step,
            "epoch": data_state["epoch"],
            "loss": loss_sum / t.grad_accum,
            "lr": lrs[0],
            "grad_norm": _grad_norm(engine),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "vision_tokens": int(vision),
            "vision_tokens_per_image": tokens_per_image(model.config),  # per crop (anyres); per frame: the same K
            "images": int(images),
            "videos": int(videos),
        }
        if len(set(lrs)) > 1:
            record["lr_groups"] = lrs
        logger.log(record)
        logger.console(record, total_steps, progress)
        if (t.save_every and step % t.save_every == 0) or step == total_steps:
            save(step)
        if eval_due(step):
            evaluate(step)
    if progress is not None:
        progress.close()

    # -- end: evaluation, export, cleanup ---------------------------------------------------------------------------
    if eval_set is not None:
        evaluate(total_steps)
    if cfg.output.export:
        metadata = {
            "base_model": base_model_id(cfg.model.name_or_path),
            "base_fingerprint": base_fingerprint,
            "family": family_name(model),
            "recipe": {"path": str(Path(recipe).resolve()) if recipe else None, "config": to_dict(cfg)},
            "step": total_steps,
            "data_fingerprint": data_fingerprint,
            "mode": t.mode,
        }
        out = export_projector(engine, run_dir / "export", metadata=metadata, processing=processing[:2])
        print0(f"[train] exported the {'model' if t.mode == 'full' else 'projector'} to {out}")
    if train_set.skipped:
        print0(f"[train] {train_set.skip_summary()}")
    logger.close()
    print0(f"[train] done: {run_dir}")
    return engine.module


# ---------------------------------------------------------------------------------------------------------------
# setup helpers


def _numel(p: nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only this rank's shard of it."""
    return getattr(p, "ds_numel", p.numel())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_demo_assets(cfg: Config, dist: Dist) -> None:
    """Demo recipes: rank 0 builds the tiny model and the demo data when missing; the other ranks wait."""
    if dist.is_main:
        if cfg.model.build_tiny_if_missing and not Path(cfg.model.name_or_path).exists():
            from visionzip_tune.tiny import save_tiny

            print0(f"[train] building a random tiny {cfg.model.tiny.family} model in {cfg.model.name_or_path}")
            save_tiny(cfg.model.name_or_path, cfg.model.tiny)
        if cfg.data.build_demo_if_missing and not Path(cfg.data.path).exists():
            from visionzip_tune.data import make_demo_dataset

            out = Path(cfg.data.path).parent
            print0(f"[train] writing the demo dataset ({cfg.data.demo_samples} samples) into {out}")
            make_demo_dataset(out, n=cfg.data.demo_samples, seed=cfg.data.demo_seed, videos=cfg.data.demo_videos)
    barrier()


def _check_inputs(cfg: Config, buildable_ok: bool = False) -> None:
    """Missing files are reported before anything is loaded or written (``buildable_ok``: the demo builder's
    outputs may be missing yet)."""
    demo = buildable_ok and cfg.data.build_demo_if_missing
    for key, path, kind in [
        ("data.path", cfg.data.path, "file"),
        ("data.image_folder", cfg.data.image_folder, "dir"),
        ("data.eval_path", cfg.data.eval_path, "file"),
        ("data.eval_image_folder", cfg.data.eval_image_folder, "dir"),
    ]:
        if path is None or (demo and not Path(cfg.data.path).exists()):
            continue
        exists = Path(path).is_file() if kind == "file" else Path(path).is_dir()
        if not exists:
            what = "data file" if kind == "file" else "image folder"
            raise UserError(f"{key}: the {what} {path} does not exist (relative paths start at {Path.cwd()})")


def _load_model(cfg: Config, bf16: bool, ds_config: dict) -> tuple[nn.Module, tuple[Any, Any, str | None]]:
    """The VLM and its ``(tokenizer, image_processor, chat_template)`` (see ``processing.load_processing``).

    Under ZeRO-3 the model is built inside ``zero.Init`` (transformers does so while an ``HfDeepSpeedConfig`` is
    registered): every rank holds only its shard of the weights from the start, instead of a full copy per rank in
    host memory (about 14 GB per rank for a 7B model in bf16).
    """
    from transformers import AutoModelForImageTextToText
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from visionzip_tune.models import family_name
    from visionzip_tune.processing import load_processing

    name = cfg.model.name_or_path
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    # zero.Init parses the config before DeepSpeed knows the world size: leave out the global batch it would check.
    init_config = {k: v for k, v in ds_config.items() if k != "train_batch_size"}
    zero3 = HfDeepSpeedConfig(init_config) if cfg.deepspeed.zero_stage == 3 else None
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        processing = load_processing(name)
    except OSError as err:
        raise UserError(
            f"model.name_or_path={name!r} could not be loaded: {err} (a local save_pretrained directory or a hub "
            "id; for the tiny demo set model.build_tiny_if_missing=true)"
        ) from None
    finally:
        if zero3 is not None:
            unset_hf_deepspeed_config()  # only loading is built under zero.Init
    if zero3 is not None:
        sharded = all(hasattr(p, "ds_id") for p in model.parameters())
        print0(f"[train] ZeRO-3: {'weights sharded across ranks at load' if sharded else 'weights NOT sharded'}")
    try:
        family_name(model)
    except ValueError as err:
        raise UserError(f"model.name_or_path={name!r}: {err}") from None
    return model, processing


def _apply_visionzip(model: nn.Module, cfg: Config) -> None:
    from visionzip_tune.models import apply_visionzip

    v = cfg.visionzip
    try:
        apply_visionzip(model, v.dominant, v.contextual, eager=v.eager, token_order=v.token_order)
    except ValueError as err:
        raise UserError(
            f"visionzip.dominant={v.dominant}, visionzip.contextual={v.contextual}, "
            f"visionzip.token_order={v.token_order}: {err}"
        ) from None


def set_trainable(model: nn.Module, t: TrainConfig) -> nn.Module:
    """Freeze everything, then unfreeze by module: the projector always, plus the LLM (full) or LoRA (lora)."""
    from visionzip_tune.models import language_model, projector

    model.requires_grad_(False)
    if t.mode == "lora":
        model = _wrap_lora(model, t)
    elif t.mode == "full":
        language_model(model).requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    projector(model).requires_grad_(True)
    return model


def _wrap_lora(model: nn.Module, t: TrainConfig) -> nn.Module:
    """peft LoRA on the language model's linear layers only: the regex is rooted at the LLM's module path, so the
    vision tower's q/k/v projections (same leaf names) are never wrapped."""
    from peft import LoraConfig, get_peft_model

    from visionzip_tune.models import language_model

    llm = language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is llm)
    leaves = sorted({name.rpartition(".")[2] for name, m in llm.named_modules() if isinstance(m, nn.Linear)})
    target = rf"{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, leaves))})"
    lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=target)
    return get_peft_model(model, lora)


def _param_groups(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], t: TrainConfig) -> list[dict]:
    """AdamW groups: projector vs the rest (train.projector_lr), and decay (matrices) vs none (biases, norms)."""
    from visionzip_tune.models import projector

    in_projector = {id(p) for p in projector(model).parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, p in trainable:
        groups.setdefault((id(p) in in_projector, p.ndim >= 2), []).append(p)
    return [
        {
            "params": params,
            "lr": t.projector_lr if is_projector and t.projector_lr is not None else t.lr,
            "weight_decay": t.weight_decay if decays else 0.0,
        }
        for (is_projector, decays), params in sorted(groups.items())  # non-projector first: lr logs train.lr
    ]


def _adamw(groups: list[dict], lr: float, offload: bool) -> torch.optim.Optimizer:
    """torch's AdamW (HF Trainer's defaults, as LLaVA used); with ZeRO-Offload DeepSpeed's CPU AdamW, the only
    optimizer it steps efficiently in CPU memory (built on first use)."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _dataset(cfg: Config, path: str, image_folder: str, model_config, processing, skip_log: Path | None):
    from visionzip_tune.data import SupervisedDataset, load_samples, model_placeholders

    tokenizer, image_processor, chat_template = processing
    return SupervisedDataset(
        load_samples(path),
        image_folder=image_folder,
        tokenizer=tokenizer,
        image_processor=image_processor,
        template=cfg.data.template,
        **model_placeholders(model_config),
        video_folder=cfg.data.video_folder,
        video_frames=cfg.data.video_frames,
        max_length=cfg.data.max_length,
        image_aspect=cfg.data.image_aspect,
        on_bad_sample=cfg.data.on_bad_sample,
        skip_log=skip_log,
        chat_template=chat_template,
    )


def _micro_batches(loader, sampler) -> Iterator[tuple[dict, dict]]:
    """Endless ``(batch, sampler state after it)`` from where the sampler stands (its epoch and start, set on
    resume: the consumed samples are skipped by index, no image is loaded twice); each new epoch reshuffles."""
    while True:
        epoch, consumed = sampler.epoch, sampler.start
        for batch in loader:
            consumed += len(batch["ids"])
            yield batch, sampler.state_dict(consumed)
        sampler.set_epoch(epoch + 1)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def base_model_id(name: str) -> str:
    """A hub id as given, a local directory as an absolute path (from_pretrained must find it from anywhere)."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def _file_fingerprint(path: str | Path) -> str:
    return "sha256:" + file_sha256(path)[:32]


def _write_atomically(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def _progress_bar(cfg: Config, dist: Dist, step: int, total: int):
    if not (dist.is_main and cfg.logging.progress_bar):
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (log files keep one clean line per step)
    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=None)


# ---------------------------------------------------------------------------------------------------------------
# logging


class RunLogger:
    """metrics.jsonl (+ wandb when enabled) on rank 0; a no-op elsewhere.

    On resume the records after the resumed step (written before the process died) are dropped, and so is an
    evaluation at that step (it ran after the checkpoint was written, and runs again), so the file holds one
    continuous curve with one evaluation per evaluated step.
    """

    def __init__(self, run_dir: Path, cfg: Config, dist: Dist, resume_step: int | None):
        self.enabled = dist.is_main
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not self.enabled:
            return
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _kept_on_resume(line, resume_step)]
        _write_atomically(self.path, "".join(line + "\n" for line in kept))
        if cfg.logging.wandb:
            self.wandb = _init_wandb(cfg, run_dir)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            prefix = "eval/" if record["kind"] == "eval" else "train/"
            values = {prefix + k: v for k, v in record.items() if k not in ("kind", "step") and _is_number(v)}
            self.wandb.log(values, step=record["step"])
        if record["kind"] == "eval":
            kinds = [k.removeprefix("accuracy_") for k in record if k.startswith("accuracy_")]
            by_kind = ", ".join(f"{kind} {record['accuracy_' + kind]:.3f}" for kind in kinds) if len(kinds) > 1 else ""
            print0(f"[eval] step {record['step']}: accuracy {record['accuracy']:.3f} "
                   f"({record['correct']}/{record['total']}{'; ' + by_kind if by_kind else ''})")  # fmt: skip

    def console(self, record: dict[str, Any], total: int, progress) -> None:
        if not self.enabled:
            return
        grad = f" | grad {record['grad_norm']:.3f}" if record["grad_norm"] is not None else ""
        line = (
            f"step {record['step']:>{len(str(total))}}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e}"
            f"{grad} | {record['samples_per_s']:.1f} samples/s | {record['tokens_per_s']:.0f} tok/s"
            f" | {record['vision_tokens_per_image']} vision tok/img"
        )
        if progress is None:
            print(line, flush=True)
        else:
            progress.write(line)
            progress.update(1)

    def close(self) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # waits for the W&B service to flush the run files (finish alone may return first)


def _kept_on_resume(line: str, resume_step: int) -> bool:
    """Whether a metrics.jsonl line stays when resuming at ``resume_step``: training records up to it, evaluations
    before it; never a line cut short by a kill."""
    try:
        record = json.loads(line)
        step, kind = record["step"], record["kind"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return step < resume_step or (step == resume_step and kind != "eval")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _init_wandb(cfg: Config, run_dir: Path):
    """A W&B run that continues across resumes (id kept in the run dir); offline when no credentials exist."""
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    _write_atomically(id_file, run_id)
    mode = (
        None if os.environ.get("WANDB_MODE") else ("online" if wandb.login(prompt=False, verify=False) else "offline")
    )
    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.logging.wandb_run_name or run_dir.resolve().name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=to_dict(cfg),
        mode=mode,
    )
