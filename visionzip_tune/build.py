"""What a recipe means: the model it names, its VisionZip budget, what trains, its data and its DeepSpeed config.

One place for every command that rebuilds a run's pieces: ``train``, ``export --run``, ``data preview`` and
``generate``. Functions here raise :class:`UserError` with the config key (or parameter) that is wrong.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from huggingface_hub import constants as hf_constants
from huggingface_hub import model_info, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from visionzip_tune import families
from visionzip_tune.config import Config, TrainConfig, VisionZipConfig
from visionzip_tune.data import Placeholders, SupervisedDataset, load_samples, make_demo_dataset
from visionzip_tune.data.dataset import refuse_unusable
from visionzip_tune.distributed import full_numel, print0
from visionzip_tune.errors import UserError
from visionzip_tune.processing import Processing, load_processing
from visionzip_tune.tiny import save_tiny

# ----------------------------------------------------------------------------------------------------------------
# Inputs


def missing_inputs(cfg: Config) -> dict[str, str]:
    """Config key -> what is wrong, for every input file or folder of the recipe that does not exist."""
    data = cfg.data
    problems = {}
    for key, path, what in [
        ("data.path", data.path, "data file"),
        ("data.image_folder", data.image_folder, "image folder"),
        ("data.eval_path", data.eval_path, "data file"),
        ("data.eval_image_folder", data.eval_image_folder, "image folder"),
        ("data.video_folder", data.video_folder, "video folder"),
    ]:
        if path is None or (Path(path).is_file() if what == "data file" else Path(path).is_dir()):
            continue
        problems[key] = f"{key}: the {what} {path} does not exist (relative paths start at {Path.cwd()})"
    return problems


def demo_outputs(cfg: Config) -> set[str]:
    """Config keys whose paths the demo data builder writes (``data.build_demo_if_missing``): they may be missing
    before a run starts."""
    return {"data.path", "data.image_folder", "data.eval_path"} if cfg.data.build_demo_if_missing else set()


def preflight(cfg: Config) -> None:
    """What can be checked in seconds before anything starts (``train --check`` and the launcher run it): input
    files, the model path, the budget against the model's tower, the data's structure. Raises :class:`UserError`."""
    ignore = demo_outputs(cfg)
    problems = [problem for key, problem in missing_inputs(cfg).items() if key not in ignore]
    if problems:
        raise UserError(problems[0])
    tiny_demo = cfg.model.build_tiny_if_missing and not Path(cfg.model.name_or_path).exists()
    if not tiny_demo:
        check_model_source(cfg.model.name_or_path)
        if cfg.visionzip.enabled:
            try:
                model_config = AutoConfig.from_pretrained(cfg.model.name_or_path)
            except (OSError, ValueError) as err:
                raise UserError(
                    f"model.name_or_path={cfg.model.name_or_path!r}: cannot read its config: {err}"
                ) from None
            try:
                family = families.family_of(model_config)
            except ValueError as err:
                raise UserError(f"model.name_or_path={cfg.model.name_or_path!r}: {err}") from None
            _checked_budget(cfg.visionzip, family, functools.partial(families.resolve_budget, model_config))
    if cfg.data.on_bad_sample == "error":
        for key, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
            if path is not None and key not in ignore:
                refuse_unusable(load_samples(path))


def check_model_source(name_or_path: str, key: str = "model.name_or_path") -> None:
    """:class:`UserError` at once when ``name_or_path`` cannot be loaded: a local path that does not exist, or a
    hub id that is neither in the local cache nor reachable (offline, a typo), instead of retrying for minutes."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}={name_or_path!r} is not a saved model: {path / 'config.json'} is missing")
        return
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"{key}={name_or_path!r}: no such directory (relative paths start at {Path.cwd()})")
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return  # cached: from_pretrained finds it offline too
    if hf_constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{key}={name_or_path!r} looks like a hub id, but it is not in the local cache and HF_HUB_OFFLINE is "
            "set: download it first (huggingface-cli download ...) or give a local directory"
        )
    try:
        model_info(name_or_path, timeout=10)
    except GatedRepoError:
        return  # it exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise UserError(f"{key}={name_or_path!r}: no such model on the hub (a typo?), and no such directory") from None
    except Exception as err:  # the HTTP client's connection errors: not cached and not downloadable either
        raise UserError(
            f"{key}={name_or_path!r} looks like a hub id, not in the local cache, and the hub cannot be reached "
            f"({type(err).__name__}): check the name, download it where there is a network, or give a local directory"
        ) from None


def recipe_budget(visionzip: VisionZipConfig, family: families.Family) -> dict:
    """The recipe's budget as the family takes it (``Family.budget.keys``: counts for the LLaVA families, ratios for
    Qwen); :class:`UserError` when the family's first key is not set."""
    keys = family.budget.keys
    if getattr(visionzip, keys[0]) is None:
        raise UserError(
            f"visionzip.{keys[0]} is not set: {family.model_class} takes its VisionZip budget as "
            f"{', '.join('visionzip.' + key for key in keys)} (e.g. visionzip.dominant_ratio=0.45 "
            "visionzip.contextual_ratio=0.05 for 50% of each image's merged tokens); visionzip.dominant and "
            f"visionzip.contextual ({visionzip.dominant} and {visionzip.contextual} here) are the LLaVA families' "
            "tokens per image"
        )
    return {key: getattr(visionzip, key) for key in keys if getattr(visionzip, key) is not None}


def _checked_budget(visionzip: VisionZipConfig, family: families.Family, check) -> None:
    """``check(**budget)`` on the recipe's budget; its ``ValueError`` as a :class:`UserError` naming the keys."""
    budget = recipe_budget(visionzip, family)
    try:
        check(**budget)
    except ValueError as err:
        given = ", ".join(f"visionzip.{key}={value}" for key, value in budget.items())
        raise UserError(f"{given}: {err}") from None


def build_demo_assets(cfg: Config) -> None:
    """Build the tiny model and the demo data of a demo recipe when missing (call on one rank)."""
    if cfg.model.build_tiny_if_missing and not Path(cfg.model.name_or_path).exists():
        print0(f"[train] building a random tiny {cfg.model.tiny.family} model in {cfg.model.name_or_path}")
        save_tiny(cfg.model.name_or_path, cfg.model.tiny)
    if cfg.data.build_demo_if_missing and not Path(cfg.data.path).exists():
        out = Path(cfg.data.path).parent
        print0(f"[train] writing the demo dataset ({cfg.data.demo_samples} samples) into {out}")
        make_demo_dataset(out, n=cfg.data.demo_samples, seed=cfg.data.demo_seed, videos=cfg.data.demo_videos)


# ----------------------------------------------------------------------------------------------------------------
# Model


def base_model_id(name: str) -> str:
    """A hub id as given, a local directory as an absolute path (from_pretrained must find it from anywhere)."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def load_vlm(
    name_or_path: str,
    *,
    key: str = "model.name_or_path",
    what: str = "model",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    zero3_config: dict[str, Any] | None = None,
) -> nn.Module:
    """The VLM saved at ``name_or_path`` (a ``save_pretrained`` directory or a hub id) of a supported family.

    With ``zero3_config`` (a DeepSpeed config of ZeRO stage 3) the model is built inside ``zero.Init``
    (transformers does so while an ``HfDeepSpeedConfig`` is registered): every rank holds only its shard of the
    weights from the start, instead of a full copy per rank in host memory (about 14 GB per rank for a 7B model in
    bf16). Errors name the path as the ``what`` (model, base model) given as ``key`` (a config key, a flag).
    """
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # zero.Init parses the config before DeepSpeed knows the world size: leave out the global batch it would check.
    registered = (
        HfDeepSpeedConfig({k: v for k, v in zero3_config.items() if k != "train_batch_size"})
        if zero3_config is not None
        else None
    )
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the {what} {name_or_path!r} ({key}): {err}") from None
    finally:
        if registered is not None:
            unset_hf_deepspeed_config()  # only loading is built under zero.Init
    try:
        families.family_of(model)
    except ValueError as err:
        raise UserError(f"the {what} {name_or_path!r} ({key}): {err}") from None
    return model


def load_model_processing(name_or_path: str, key: str = "model.name_or_path") -> Processing:
    """The tokenizer, image processor and chat template saved with a model (``processing.load_processing``)."""
    try:
        return load_processing(name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"{key}={name_or_path!r}: cannot load its tokenizer and image processor: {err}") from None


def apply_recipe_visionzip(model: nn.Module, visionzip: VisionZipConfig) -> None:
    """The recipe's VisionZip: the family's budget keys when enabled (``Family.budget``; unset ones take the family's
    defaults); otherwise stock, also for a base saved zipped (a full-mode export records a budget in its config)."""
    if not visionzip.enabled:
        families.remove_visionzip(model)
        return
    _checked_budget(visionzip, families.family_of(model), functools.partial(families.apply_visionzip, model))


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
) -> SupervisedDataset:
    """The recipe's training set (``data.path``) or held-out set (``data.eval_path``, its own image folder)."""
    data = cfg.data
    if held_out:
        return SupervisedDataset(
            load_samples(data.eval_path),
            data,
            processing,
            placeholders(model_config),
            image_folder=data.eval_image_folder or data.image_folder,
        )
    return SupervisedDataset(load_samples(data.path), data, processing, placeholders(model_config), skip_log=skip_log)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed


def use_bf16(cfg: Config) -> bool:
    """bf16 where the hardware supports it ('auto'), fp32 on CPU."""
    if cfg.deepspeed.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(cfg.deepspeed.bf16)


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
