"""What a recipe means for a run, once its model is loaded: its VisionZip budget, what trains, its optimizer, its
data and its DeepSpeed config. Used by ``train``, ``export --run`` and ``data preview``; functions raise
:class:`UserError` with the config key (or parameter) that is wrong.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionzip_tune import families
from visionzip_tune.data import MediaSource, Placeholders, Processing, SupervisedDataset, load_samples
from visionzip_tune.distributed import full_numel
from visionzip_tune.errors import UserError
from visionzip_tune.loading import bf16_supported
from visionzip_tune.training.config import Config, TrainConfig, VisionZipConfig
from visionzip_tune.training.preflight import checked_budget


def apply_recipe_visionzip(model: nn.Module, visionzip: VisionZipConfig) -> None:
    """The recipe's VisionZip: the family's budget keys when enabled (``Family.budget``; unset ones take the family's
    defaults); otherwise stock, also for a base saved zipped (a full-mode export records a budget in its config)."""
    if not visionzip.enabled:
        families.remove_visionzip(model)
        return
    checked_budget(visionzip, families.family_of(model), functools.partial(families.apply_visionzip, model))


def describe_compression(model: nn.Module) -> str:
    """One line: the budget the run feeds its LLM, resolved (what the recipe's keys became), and its knobs."""
    config = families.unwrap_peft(model).config
    budget = getattr(config, "visionzip", None)
    if not budget:
        return "compression: none (visionzip.enabled=false): every stock vision token reaches the LLM"
    family = families.family_of(config)
    kind = family.budget_of(budget)
    described = kind.describe(budget)
    unit = families.tokens_per_unit(config)  # None for ratios: each image's own share
    if unit is not None and kind is not families.COMPRESSED:  # (a compressor's phrase states its tokens per unit)
        described += f" = {unit} tokens per image, crop, frame or view"
    knobs = ", ".join(f"{key}={budget[key]}" for key in family.knob_keys if key in budget)
    return f"compression: {described}" + (f" ({knobs})" if knobs else "")


# ----------------------------------------------------------------------------------------------------------------
# What trains


def projector_subset(model: nn.Module, train: TrainConfig) -> dict[str, nn.Parameter]:
    """The projector parameters ``train.projector_modules`` names (see :func:`families.projector_parameters`);
    :class:`UserError` listing the family's choices for one it does not have."""
    try:
        return families.projector_parameters(model, train.projector_modules)
    except ValueError as err:
        raise UserError(f"train.projector_modules={train.projector_modules!r}: {err}") from None


def trainable_parts(model: nn.Module, train: TrainConfig) -> dict[str, set[str]]:
    """The parameters that train, by part, named as ``model.named_parameters()`` names them: the projector (the
    modules ``train.projector_modules`` names) always; the language model and LM head in ``full`` mode; the LoRA
    adapters in ``lora`` mode (``model`` already wrapped by peft)."""
    mode = train.mode
    name_of = {id(p): name for name, p in model.named_parameters()}  # tied weights: their first name
    parts: dict[str, list[nn.Parameter]] = {"projector": list(projector_subset(model, train).values())}
    if mode == "full":
        parts["language model"] = list(families.language_model(model).parameters())
        parts["lm_head"] = list(families.unwrap_peft(model).get_output_embeddings().parameters())
    elif mode == "lora":
        parts["LoRA adapters"] = [p for name, p in model.named_parameters() if ".lora_" in name]
    return {part: {name_of[id(p)] for p in params} for part, params in parts.items()}


def prepare_trainable(model: nn.Module, train: TrainConfig) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """Wrap the LLM's linears with LoRA in ``lora`` mode, then train exactly the parameters of
    :func:`trainable_parts` and nothing else (asserted by name). Returns the (possibly peft-wrapped) model and its
    trainable ``(name, parameter)`` pairs in ``named_parameters`` order; :func:`describe_trainable` says what they
    are."""
    model.requires_grad_(False)
    if train.mode == "lora":
        model = _wrap_lora(model, train)
    parts = trainable_parts(model, train)
    wanted = set().union(*parts.values())
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if {name for name, _ in trainable} != wanted:
        raise AssertionError(
            f"{train.mode} mode should train {sorted(wanted)} but trains {sorted(n for n, _ in trainable)}"
        )
    return model, trainable


def describe_trainable(model: nn.Module, train: TrainConfig) -> str:
    """One line: how many parameters train in ``train.mode``, of how many, by part (also under ZeRO-3 sharding)."""
    mode = train.mode
    size = {name: full_numel(p) for name, p in model.named_parameters()}
    parts = trainable_parts(model, train)
    trained, total = sum(size[name] for names in parts.values() for name in names), sum(size.values())
    by_part = "; ".join(
        f"{part} {sum(size[n] for n in names):,} in {len(names)} tensors" for part, names in parts.items()
    )
    return f"mode={mode}: {trained:,} trainable parameters of {total:,} ({100 * trained / total:.2f}%): {by_part}"


def _wrap_lora(model: nn.Module, train: TrainConfig) -> nn.Module:
    """peft LoRA on the language model's linear layers only: the regex is rooted at the LLM's module path, so the
    vision tower's q/k/v projections (same leaf names) are never wrapped."""
    from peft import LoraConfig, get_peft_model  # lazy: heavy, and only lora mode needs it

    llm = families.language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is llm)
    leaves = sorted({name.rpartition(".")[2] for name, m in llm.named_modules() if isinstance(m, nn.Linear)})
    target = rf"{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, leaves))})"
    lora = LoraConfig(
        r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout, target_modules=target
    )
    return get_peft_model(model, lora)


def optimizer(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (HF Trainer's defaults, as LLaVA used), in groups: projector vs the rest
    (``train.projector_lr``), decay (matrices) vs none (biases, norms). With ZeRO-Offload DeepSpeed's CPU AdamW,
    the only optimizer it steps efficiently in CPU memory."""
    train = cfg.train
    in_projector = {id(p) for p in families.projector_parameters(model).values()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, p in trainable:
        groups.setdefault((id(p) in in_projector, p.ndim >= 2), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": train.projector_lr if is_projector and train.projector_lr is not None else train.lr,
            "weight_decay": train.weight_decay if decays else 0.0,
        }
        for (is_projector, decays), params in sorted(groups.items())  # non-projector first: lr logs train.lr
    ]
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: builds a CPU op on first import

        return DeepSpeedCPUAdam(param_groups, lr=train.lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(param_groups, lr=train.lr, betas=(0.9, 0.999), eps=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# Data


def placeholders(model_config) -> Placeholders:
    """The model's placeholder ids and token-count functions, for :class:`SupervisedDataset`."""
    video = families.has_video_input(model_config)
    return Placeholders(
        image_tokens=functools.partial(families.sample_image_tokens, model_config),
        image_token_id=model_config.image_token_id,
        video_tokens=functools.partial(families.video_layout, model_config) if video else None,
        video_token_id=model_config.video_token_id if video else None,
        video_timing=functools.partial(families.video_timing, model_config) if video else None,
    )


def dataset(
    cfg: Config,
    model_config,
    processing: Processing,
    *,
    held_out: bool = False,
    skip_log: Path | None = None,
    media: MediaSource | None = None,
) -> SupervisedDataset:
    """The recipe's training set (``data.path``; its media from ``media``, default their files) or held-out set
    (``data.eval_path``, its own image folder)."""
    data = cfg.data
    if held_out:
        return SupervisedDataset(
            load_samples(data.eval_path),
            data,
            processing,
            placeholders(model_config),
            image_folder=data.eval_image_folder or data.image_folder,
        )
    return SupervisedDataset(
        load_samples(data.path), data, processing, placeholders(model_config), skip_log=skip_log, media=media
    )


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed


def use_bf16(cfg: Config) -> bool:
    """bf16 where the hardware supports it ('auto'), fp32 on CPU."""
    return bf16_supported() if cfg.deepspeed.bf16 == "auto" else bool(cfg.deepspeed.bf16)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this recipe (LLaVA's scripts/zero2.json / zero3.json with the numbers filled)."""
    train = cfg.train
    zero: dict[str, Any] = {
        "stage": cfg.deepspeed.zero_stage,
        "overlap_comm": torch.cuda.is_available(),  # overlap needs CUDA streams; on CPU it only adds copies
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if cfg.deepspeed.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e8,
            stage3_param_persistence_threshold=1e6,
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
        )
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": use_bf16(cfg)},
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW over the trainable parameters only (param groups for projector_lr).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we print our own one line per step
        "wall_clock_breakdown": False,
    }
