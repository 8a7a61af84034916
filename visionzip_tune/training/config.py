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
from typing import Any, ClassVar, Literal, Sequence

import yaml

from visionzip_tune.algorithm.compressors import COMPRESSORS
from visionzip_tune.data.config import DataConfig
from visionzip_tune.demo.tiny import TinySpec
from visionzip_tune.docfields import bound_problems, documented
from visionzip_tune.errors import UserError
from visionzip_tune.training.preemption import parse_signals


@dataclass
class ModelConfig:
    name_or_path: str = documented(
        "llava-hf/llava-1.5-7b-hf", "base VLM: a local save_pretrained directory or a hub id", resume_safe=True
    )
    attn_implementation: str | None = documented(
        None,
        "LLM attention kernel for from_pretrained ('sdpa', 'flash_attention_2', 'eager'); null = default",
        resume_safe=True,
    )
    build_tiny_if_missing: bool = documented(
        False,
        "demo/tests only: build a random tiny model (model.tiny) at name_or_path when it does not exist",
        resume_safe=True,
    )
    tiny: TinySpec = documented(
        TinySpec(),
        "family and geometry of that tiny model (fields of visionzip_tune.demo.tiny.TinySpec)",
        resume_safe=True,
    )


@dataclass
class VisionZipConfig:
    """The compression in the data path: ``method`` picks the compressor (VisionZip unless set), the other keys its
    budget. VisionZip's: tokens per image for the LLaVA families (dominant, contextual, ...), ratios of each image's
    merged tokens for the Qwen families (dominant_ratio, contextual_ratio, merge_space); every other compressor's:
    ``tokens`` per unit and its own parameters. Each family reads its own keys, so one recipe may carry both (the
    tiny demo); a Qwen model refuses a VisionZip recipe without its ratios."""

    enabled: bool = documented(True, "feed the LLM only VisionZip's dominant + contextual tokens per image")
    dominant: int = documented(
        54, "dominant tokens per image, CLS included (paper: 54 / 108 / 162 for 64 / 128 / 192)", ge=1
    )
    contextual: int = documented(10, "contextual (merged) tokens per image (paper: 10 / 20 / 30)", ge=0)
    eager: bool = documented(False, "run the vision tower with eager attention (bit-exact reproduction; slower)")
    token_order: Literal["flat", "grid"] | None = documented(
        None, "LLaVA-NeXT crop token layout: 'flat' (crop after crop) or 'grid' (official VisionZip); null = flat"
    )
    dominant_ratio: float | None = documented(
        None,
        "Qwen: dominant tokens per image / frame as a fraction of its N merged tokens, max(1, floor(ratio x N)) "
        "(upstream: 0.45 with contextual_ratio 0.05 = 50%)",
        gt=0,
    )
    contextual_ratio: float | None = documented(
        None, "Qwen: contextual (merged) tokens as a fraction of N, max(1, floor(ratio x N))", ge=0
    )
    merge_space: Literal["post", "pre"] | None = documented(
        None, "Qwen: merge contextual tokens after the merger ('post', upstream) or on its inputs ('pre'); null = post"
    )
    method: Literal[tuple(COMPRESSORS)] = documented(
        "visionzip",
        f"the compressor: {', '.join(COMPRESSORS)} (README: choosing a compressor); every one but visionzip takes "
        "visionzip.tokens",
    )
    tokens: int | None = documented(None, "rows per image, crop, frame or view for a method other than visionzip", ge=1)
    seed: int | None = documented(None, "method random: the seed mixed into each image's pixel hash; null = 0")
    resample: bool | None = documented(
        None, "method random: draw new positions at every call (each epoch) instead of per image; null = false"
    )
    important_ratio: float | None = documented(
        None, "method vispruner: the share of tokens kept for CLS attention, the rest for diversity; null = 0.5", ge=0
    )
    neighbours: int | None = documented(
        None, "method prumerge_plus: the most key-similar patches each kept patch absorbs; null = 32", ge=1
    )


@dataclass
class TrainConfig:
    mode: Literal["projector", "full", "lora"] = documented(
        "projector", "projector: projector only; full: LLM + projector; lora: LoRA on the LLM + projector"
    )
    epochs: int = documented(1, "passes over the data when max_steps is null", gt=0)
    max_steps: int | None = documented(None, "optimizer steps; null = epochs x steps per epoch", gt=0)
    micro_batch_size: int = documented(16, "samples per forward pass per rank", gt=0)
    grad_accum: int = documented(1, "micro-batches per optimizer step (global batch = micro x accum x ranks)", gt=0)
    projector_modules: str = documented(
        "all",
        "which of the family's projector modules train: 'all', or a subset the family names (Qwen3-VL 'merger': the "
        "main merger without the DeepStack mergers; Mini-Gemini 'mlp_only': the MLP without the mining projections)",
    )
    lr: float = documented(2e-5, "peak learning rate (LoRA parameters in lora mode)", gt=0)
    projector_lr: float | None = documented(None, "peak learning rate of the projector; null = lr", gt=0)
    weight_decay: float = documented(0.0, "AdamW weight decay (matrices only; biases and norms never decay)", ge=0)
    warmup_ratio: float = documented(
        0.03, "fraction of the steps with linear warmup before the cosine decay", ge=0, lt=1
    )
    max_grad_norm: float = documented(1.0, "gradient clipping norm (0 = no clipping)", ge=0)
    activation_checkpointing: bool = documented(
        True, "recompute LLM activations in backward (less memory)", resume_safe=True
    )
    lora_r: int = documented(128, "LoRA rank (lora mode)", gt=0)
    lora_alpha: int = documented(256, "LoRA alpha (lora mode)", gt=0)
    lora_dropout: float = documented(0.05, "LoRA dropout (lora mode)", ge=0, lt=1)
    save_every: int = documented(
        100, "checkpoint every N optimizer steps (0 = only at the end)", ge=0, resume_safe=True
    )
    keep_checkpoints: int = documented(2, "newest checkpoints kept on disk (0 = keep all)", ge=0, resume_safe=True)
    eval_every: int = documented(
        0, "held-out evaluation every N steps (0 = only before and after training)", ge=0, resume_safe=True
    )
    eval_batch_size: int = documented(
        8, "held-out samples per forward pass (all their choices together)", gt=0, resume_safe=True
    )
    resume: str = documented(
        "auto", "'auto': continue the newest checkpoint in output.dir; 'never'; or a checkpoint path", resume_safe=True
    )
    feature_cache: str | None = documented(
        None,
        "directory of a compressed-feature cache (README: Feature cache): the tower and compression run once per "
        "image, then every epoch, rerun and sweep reads their rows from disk; null = compute them every step",
        resume_safe=True,
    )
    feature_cache_build: bool = documented(
        True,
        "with train.feature_cache: build the entries it lacks before training (false: refuse, naming what changed)",
        resume_safe=True,
    )
    seed: int = documented(42, "seed of parameter init (LoRA), data order and dropout")
    save_on_signal: str = documented(
        "SIGTERM SIGINT SIGUSR1",
        "signals that make every rank finish the step, checkpoint and exit with status 75 (resume: run again); "
        "empty = die on them",
        resume_safe=True,
    )


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = documented(2, "ZeRO stage (2: shard optimizer + grads; 3: also parameters)")
    bf16: bool | Literal["auto"] = documented("auto", "bf16 mixed precision; auto = on where the GPU supports it")
    offload_optimizer: bool = documented(False, "ZeRO-Offload: keep optimizer states in CPU memory")


@dataclass
class LoggingConfig:
    wandb: bool = documented(
        False, "log to Weights & Biases (offline mode when no WANDB_API_KEY is set)", resume_safe=True
    )
    wandb_project: str = documented("visionzip_tune", "W&B project", resume_safe=True)
    wandb_run_name: str | None = documented(None, "W&B run name; null = the output directory's name", resume_safe=True)
    progress_bar: bool = documented(True, "tqdm progress bar with ETA on rank 0", resume_safe=True)


@dataclass
class OutputConfig:
    dir: str = documented(
        "runs/visionzip", "run directory: config.yaml, metrics.jsonl, checkpoints/, export/", resume_safe=True
    )
    export: bool = documented(True, "export the projector into dir/export at the end of training", resume_safe=True)


@dataclass
class Config:
    """A run's whole configuration. :func:`load_config` also records, outside the fields, where each key was set
    (``sources``: key -> "recipe PATH" or "override 'key=value'"), the notices of recipe keys it dropped for a
    command-line key of another kind (``notices``) and the configuration of the recipe alone (``from_recipe``,
    unvalidated: what the recipe meant before the command line changed it)."""

    sources: ClassVar[dict[str, str]] = {}
    notices: ClassVar[tuple[str, ...]] = ()
    from_recipe: ClassVar[Config | None] = None

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
    """Defaults <- the recipe YAML (if any) <- ``key.sub=value`` overrides (values parsed as YAML scalars).

    One rule for keys of different kinds (the budget's: VisionZip's counts, its ratios, another compressor's; the
    run's length: max_steps or epochs): a command-line key wins over the recipe's keys of another kind, which are
    dropped, each with a notice (``Config.notices``). Whether every key left applies to the model's family and the
    mode is checked later, against the model (``training.keys``)."""
    from_recipe: dict[str, Any] = {}
    if recipe is not None:
        _merge(from_recipe, _read_recipe(Path(recipe)), Config, source=f"recipe {recipe}")
    from_overrides: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not of the form key.sub=value (e.g. train.lr=1e-4)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _merge(from_overrides, nested, Config, source=f"override {item!r}")
    recipe_keys, override_keys = _flatten_tree(from_recipe), _flatten_tree(from_overrides)
    notices = []
    for key, reason in _dropped_by_overrides(recipe_keys, override_keys).items():
        value, source = recipe_keys.pop(key)
        notices.append(f"notice: {key}={value!r} ({source}) dropped, the command line wins: {reason}")
    cfg = _build(Config, _unflatten({**recipe_keys, **override_keys}), prefix="")
    validate(cfg)
    cfg.sources = {key: source for key, (_, source) in {**recipe_keys, **override_keys}.items()}
    cfg.notices = tuple(notices)
    cfg.from_recipe = _build(Config, _unflatten(recipe_keys), prefix="")
    return cfg


def overridden(source: str) -> bool:
    """Whether a key's source (``Config.sources``) is the command line."""
    return source.startswith("override ")


def _unflatten(flat: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """The nested tree :func:`_build` takes, from dotted keys."""
    tree: dict[str, Any] = {}
    for key, leaf in flat.items():
        *sections, name = key.split(".")
        branch = tree
        for section in sections:
            branch = branch.setdefault(section, {})
        branch[name] = leaf
    return tree


def _flatten_tree(tree: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Dotted key -> (value, source) of a merged tree's leaves."""
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_tree(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# The budget keys of each kind: a run takes one budget kind. ``visionzip.method`` is of the compressor kind, unless
# it names VisionZip, whose keys are either kind of its own (counts or ratios, by family).
_BUDGET_KINDS = {
    "counts": ("visionzip.dominant", "visionzip.contextual"),
    "ratios": ("visionzip.dominant_ratio", "visionzip.contextual_ratio"),
    "compressor": tuple(f"visionzip.{key}" for key in ("tokens", "seed", "resample", "important_ratio", "neighbours")),
}
_VISIONZIP_KINDS = frozenset({"counts", "ratios"})
# The run's length: max_steps, or epochs.
_LENGTH = {"train.max_steps": "train.epochs", "train.epochs": "train.max_steps"}


def _kinds_of(key: str, value: Any) -> frozenset[str]:
    """The budget kinds a key belongs to (empty for a key of no budget kind)."""
    if key == "visionzip.method":
        return _VISIONZIP_KINDS if value == "visionzip" else frozenset({"compressor"})
    return frozenset(kind for kind, keys in _BUDGET_KINDS.items() if key in keys)


def _dropped_by_overrides(recipe: dict[str, tuple[Any, str]], overrides: dict[str, tuple[Any, str]]) -> dict[str, str]:
    """The recipe keys that command-line keys of another kind drop, and why."""
    given: set[str] = set()
    for key, (value, _) in overrides.items():
        given |= _kinds_of(key, value)
    setting = ", ".join(sorted(key for key, (value, _) in overrides.items() if _kinds_of(key, value)))
    dropped = {
        key: f"it sets a budget of another kind ({setting})"
        for key, (value, _) in recipe.items()
        if key not in overrides and _kinds_of(key, value) and given and not _kinds_of(key, value) & given
    }
    for key, other in _LENGTH.items():
        if key in overrides and other in recipe and other not in overrides:
            dropped[other] = f"it sets {key}"
    return dropped


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
    """Bounds declared on the fields, then checks that span several keys; per-key types were checked while loading."""
    problems = bound_problems(cfg, prefix="")
    if cfg.data.demo_videos > cfg.data.demo_samples:
        problems.append(
            f"config key 'data.demo_videos' ({cfg.data.demo_videos}) must not exceed data.demo_samples "
            f"({cfg.data.demo_samples}): the videos are part of the demo samples"
        )
    if not cfg.output.dir.strip():
        problems.append("config key 'output.dir' must name a directory")
    try:
        parse_signals(cfg.train.save_on_signal)
    except ValueError as err:
        problems.append(f"config key 'train.save_on_signal': {err}")
    if problems:
        raise UserError("; ".join(problems))


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
