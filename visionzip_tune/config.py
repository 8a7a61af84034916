"""Typed run configuration: dataclass defaults <- recipe YAML <- ``key.sub=value`` overrides.

Every field carries a one-line ``doc`` (shown by ``python -m visionzip_tune train --help-config``). Loading is
strict: an unknown key or a value of the wrong type is a :class:`UserError` naming the key, where it came from,
the valid keys of that section and the closest match.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from visionzip_tune.errors import UserError
from visionzip_tune.tiny import TinySpec


def _doc(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line description (the source of the help table)."""
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    name_or_path: str = _doc("llava-hf/llava-1.5-7b-hf", "base VLM: a local save_pretrained directory or a hub id")
    attn_implementation: str | None = _doc(
        None, "LLM attention kernel for from_pretrained ('sdpa', 'flash_attention_2', 'eager'); null = default"
    )
    build_tiny_if_missing: bool = _doc(
        False, "demo/tests only: build a random tiny model (model.tiny) at name_or_path when it does not exist"
    )
    tiny: TinySpec = _doc(TinySpec(), "family and geometry of that tiny model (fields of visionzip_tune.tiny.TinySpec)")


@dataclass
class VisionZipConfig:
    enabled: bool = _doc(True, "feed the LLM only VisionZip's dominant + contextual tokens per image")
    dominant: int = _doc(54, "dominant tokens per image, CLS included (paper: 54 / 108 / 162 for 64 / 128 / 192)")
    contextual: int = _doc(10, "contextual (merged) tokens per image (paper: 10 / 20 / 30)")
    eager: bool = _doc(False, "run the vision tower with eager attention (bit-exact reproduction; slower)")
    token_order: Literal["flat", "grid"] | None = _doc(
        None, "LLaVA-NeXT crop token layout: 'flat' (crop after crop) or 'grid' (official VisionZip); null = flat"
    )


@dataclass
class DataConfig:
    path: str = _doc("data/llava_v1_5_mix665k_10pct.json", "training data: LLaVA JSON array or JSONL")
    image_folder: str = _doc("data/images", "folder the samples' 'image' paths are relative to")
    eval_path: str | None = _doc(
        None, "held-out LLaVA JSON whose samples carry 'choices'; accuracy before, during and after training"
    )
    eval_image_folder: str | None = _doc(None, "image folder for eval_path; null = image_folder")
    video_folder: str | None = _doc(None, "folder the samples' 'video' paths are relative to; null = image_folder")
    video_frames: int = _doc(8, "frames sampled uniformly from each video (Video-LLaVA: 8)")
    template: Literal["vicuna_v1", "chat_template"] = _doc(
        "vicuna_v1", "conversation template: LLaVA-1.5's v1 prompt, or the tokenizer's chat template"
    )
    image_aspect: Literal["pad", "processor"] = _doc(
        "pad", "'pad': LLaVA's expand-to-square with the mean colour; 'processor': the image processor alone"
    )
    max_length: int = _doc(2048, "token limit per sample, image tokens included (longer text is cut)")
    on_bad_sample: Literal["error", "skip"] = _doc(
        "error", "a sample that cannot be used stops the run ('error') or is logged to skipped.jsonl ('skip')"
    )
    num_workers: int = _doc(4, "DataLoader worker processes per rank")
    group_by_modality: bool = _doc(True, "LLaVA's group_by_modality_length batching (image / text-only)")
    build_demo_if_missing: bool = _doc(
        False, "demo only: write the synthetic demo dataset into path's folder when path does not exist"
    )
    demo_samples: int = _doc(400, "number of samples the demo builder writes")
    demo_seed: int = _doc(0, "seed of the demo builder")
    demo_videos: int = _doc(0, "of demo_samples, how many are video samples (families with a video input)")


@dataclass
class TrainConfig:
    mode: Literal["projector", "full", "lora"] = _doc(
        "projector", "projector: projector only; full: LLM + projector; lora: LoRA on the LLM + projector"
    )
    epochs: int = _doc(1, "passes over the data when max_steps is null")
    max_steps: int | None = _doc(None, "optimizer steps; null = epochs x steps per epoch")
    micro_batch_size: int = _doc(16, "samples per forward pass per rank")
    grad_accum: int = _doc(1, "micro-batches per optimizer step (global batch = micro x accum x ranks)")
    lr: float = _doc(2e-5, "peak learning rate (LoRA parameters in lora mode)")
    projector_lr: float | None = _doc(None, "peak learning rate of the projector; null = lr")
    weight_decay: float = _doc(0.0, "AdamW weight decay (matrices only; biases and norms never decay)")
    warmup_ratio: float = _doc(0.03, "fraction of the steps with linear warmup before the cosine decay")
    max_grad_norm: float = _doc(1.0, "gradient clipping norm (0 = no clipping)")
    activation_checkpointing: bool = _doc(True, "recompute LLM activations in backward (less memory)")
    lora_r: int = _doc(128, "LoRA rank (lora mode)")
    lora_alpha: int = _doc(256, "LoRA alpha (lora mode)")
    lora_dropout: float = _doc(0.05, "LoRA dropout (lora mode)")
    save_every: int = _doc(100, "checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = _doc(2, "newest checkpoints kept on disk (0 = keep all)")
    eval_every: int = _doc(0, "held-out evaluation every N steps (0 = only before and after training)")
    eval_batch_size: int = _doc(8, "held-out samples per forward pass (all their choices together)")
    resume: str = _doc("auto", "'auto': continue the newest checkpoint in output.dir; 'never'; or a checkpoint path")
    seed: int = _doc(42, "seed of parameter init (LoRA), data order and dropout")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = _doc(2, "ZeRO stage (2: shard optimizer + grads; 3: also parameters)")
    bf16: bool | Literal["auto"] = _doc("auto", "bf16 mixed precision; auto = on where the GPU supports it")
    offload_optimizer: bool = _doc(False, "ZeRO-Offload: keep optimizer states in CPU memory")


@dataclass
class LoggingConfig:
    wandb: bool = _doc(False, "log to Weights & Biases (offline mode when no WANDB_API_KEY is set)")
    wandb_project: str = _doc("visionzip_tune", "W&B project")
    wandb_run_name: str | None = _doc(None, "W&B run name; null = the output directory's name")
    progress_bar: bool = _doc(True, "tqdm progress bar with ETA on rank 0")


@dataclass
class OutputConfig:
    dir: str = _doc("runs/visionzip", "run directory: config.yaml, metrics.jsonl, checkpoints/, export/")
    export: bool = _doc(True, "export the projector into dir/export at the end of training")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    visionzip: VisionZipConfig = field(default_factory=VisionZipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- the recipe YAML (if any) <- ``key.sub=value`` overrides (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    if recipe is not None:
        _merge(tree, _read_recipe(Path(recipe)), Config, source=f"recipe {recipe}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not of the form key.sub=value (e.g. train.lr=1e-4)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _merge(tree, nested, Config, source=f"override {item!r}")
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist (recipes live under recipes/<model>/<mode>.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (model:, data:, train:, ...)")
    return data


def _merge(tree: dict[str, Any], update: dict[str, Any], cls: type, *, source: str, prefix: str = "") -> None:
    """Deep-merge ``update`` into ``tree``, checking every key against the dataclass ``cls`` as it goes."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise UserError(_unknown_key_message(str(key), name, list(fields), source))
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise UserError(f"config key '{name}' in {source} is a section: give a mapping of its keys")
            _merge(tree.setdefault(key, {}), value, sub, source=source, prefix=f"{name}.")
        else:
            tree[key] = (value, source)


def _unknown_key_message(key: str, full: str, valid: list[str], source: str) -> str:
    section = full.rpartition(".")[0]
    where = f"section '{section}'" if section else "the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{(section + '.') if section else ''}{close[0]}'?" if close else ""
    return f"unknown config key '{full}' in {source}.{hint} Valid keys in {where}: {', '.join(valid)}."


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    """Instantiate ``cls`` from defaults plus the merged ``tree`` of (value, source) leaves, coercing types."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], tree[f.name], prefix=f"{name}.")
        else:
            value, source = tree[f.name]
            kwargs[f.name] = _coerce(value, hints[f.name], name, source)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, name: str, source: str) -> Any:
    """``value`` as type ``kind`` (bool, int, float, str, Literal, unions of them) or a UserError naming the key."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(kind):
            try:
                return _coerce(value, member, name, source)
            except UserError:
                continue
        expected = " or ".join(_type_name(m) for m in typing.get_args(kind))
    elif origin is Literal:
        if value in typing.get_args(kind) and type(value) in {type(c) for c in typing.get_args(kind)}:
            return value
        expected = "one of " + ", ".join(repr(c) for c in typing.get_args(kind))
    elif kind is type(None):
        if value is None:
            return None
        expected = "null"
    elif kind is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif kind is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number everybody means.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        expected = "a number"
    elif kind is str:
        # Paths and names that happen to look numeric (output.dir=2024) are still strings.
        if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return str(value)
        expected = "a string"
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"config field {name} has unsupported type {kind!r}")
    raise UserError(f"config key '{name}' in {source} expects {expected}, got {value!r} ({type(value).__name__})")


def _type_name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    if typing.get_origin(kind) is Literal:
        return "/".join(repr(c) for c in typing.get_args(kind))
    return getattr(kind, "__name__", str(kind))


def validate(cfg: Config) -> None:
    """Checks that span values (ranges, combinations); per-key types were checked while loading."""
    t = cfg.train
    positive = {
        "train.epochs": t.epochs,
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum": t.grad_accum,
        "train.eval_batch_size": t.eval_batch_size,
        "train.lr": t.lr,
        "data.max_length": cfg.data.max_length,
    }
    if t.max_steps is not None:
        positive["train.max_steps"] = t.max_steps
    if t.projector_lr is not None:
        positive["train.projector_lr"] = t.projector_lr
    if t.mode == "lora":
        positive.update({"train.lora_r": t.lora_r, "train.lora_alpha": t.lora_alpha})
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"config key '{name}' must be positive, got {value}")
    non_negative = {
        "train.save_every": t.save_every,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.eval_every": t.eval_every,
        "train.weight_decay": t.weight_decay,
        "train.max_grad_norm": t.max_grad_norm,
        "data.num_workers": cfg.data.num_workers,
        "visionzip.contextual": cfg.visionzip.contextual,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise UserError(f"config key '{name}' must be >= 0, got {value}")
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"config key 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if not 0 <= t.lora_dropout < 1:
        raise UserError(f"config key 'train.lora_dropout' must be in [0, 1), got {t.lora_dropout}")
    if cfg.visionzip.enabled and cfg.visionzip.dominant < 1:
        raise UserError(f"config key 'visionzip.dominant' must be >= 1, got {cfg.visionzip.dominant}")
    if not cfg.output.dir.strip():
        raise UserError("config key 'output.dir' must name a directory")


# ---------------------------------------------------------------------------------------------------------------
# output


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(key, type, default, doc)`` for every leaf field: the help table of ``train --help-config`` and README."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        kind, name = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind) and "doc" not in f.metadata:
            rows += describe(kind, prefix=f"{name}.")
        else:
            default = getattr(defaults, f.name)
            shown = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
            rows.append((name, _describe_type(kind), shown, f.metadata.get("doc", "")))
    return rows


def _describe_type(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(m) for m in typing.get_args(kind))
    if dataclasses.is_dataclass(kind):
        return "mapping"
    return _type_name(kind)


def help_table() -> str:
    rows = describe()
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {key:<{width}}  {doc} [{kind}; default {default!r}]" for key, kind, default, doc in rows)
