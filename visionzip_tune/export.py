"""Export a tuned projector, and load it back onto a fresh base model with its VisionZip budget.

An export directory holds three files (DESIGN §7):

* ``projector.safetensors`` -- the projector in HF checkpoint names (``multi_modal_projector.linear_1.weight``, ...),
  float32;
* ``mm_projector.bin`` -- the same tensors in the original LLaVA names (``model.mm_projector.0.weight``, ...), a
  plain ``torch.save`` dict that LLaVA's ``--pretrain_mm_mlp_adapter`` / ``load_state_dict(strict=False)`` reads;
* ``visionzip.json`` -- what the projector was tuned for: base model and a fingerprint of its weights, family,
  budget (dominant, contextual, eager), vision layer, token order, tensor shapes, recipe, step, data fingerprint.

LoRA runs add ``adapter/`` (peft format), which ``load_projector`` merges into the language model. ``full`` runs
(language model trained too) add ``model/``: the whole trained model in HF ``save_pretrained`` format, its
``config.json`` keeping the ``visionzip`` budget, with the run's tokenizer (and chat template) and image processor
when given (``processing=``) -- load it with ``from_pretrained`` and call ``vzt.apply_visionzip(model)`` (``python -m
visionzip_tune generate --projector EXPORT`` does); ``load_projector`` refuses such an export, as the projector
alone would not reproduce the run.

``load_projector`` refuses an export made on other base weights (fingerprint) or another geometry (shapes), so a
projector is never silently paired with a model it was not trained for.

Original LLaVA code: its loader (``--model-path EXPORT --model-base liuhaotian/llava-v1.5-7b``, a path containing
"llava") reads ``mm_projector.bin`` and the ``config.json`` next to it; copy the base LLaVA's ``config.json`` there
(the projector geometry is the base model's -- it is not written here because the HF config does not name the
original vision tower). Run it under the official VisionZip with the budget of ``visionzip.json``.

Under DeepSpeed ZeRO-3 every parameter read here goes through ``deepspeed.zero.GatheredParameters``, a collective:
call ``export_projector``, ``weights_fingerprint`` and ``load_projector`` on all ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from visionzip_tune.errors import UserError
from visionzip_tune.files import atomic_dir

FORMAT_VERSION = 1
PROJECTOR_FILE = "projector.safetensors"
LLAVA_FILE = "mm_projector.bin"
METADATA_FILE = "visionzip.json"
ADAPTER_DIR = "adapter"  # LoRA runs: the language model's adapter, in peft's save_pretrained format
MODEL_DIR = "model"  # full runs: the whole trained model, in HF's save_pretrained format

# Per family: the projector's prefix in HF checkpoints, and its in-projector names -> original LLaVA names.
_FAMILY_NAMES: dict[str, tuple[str, dict[str, str]]] = {
    "llava": ("multi_modal_projector.", {"linear_1.": "model.mm_projector.0.", "linear_2.": "model.mm_projector.2."}),
    "llava_next": (
        "multi_modal_projector.", {"linear_1.": "model.mm_projector.0.", "linear_2.": "model.mm_projector.2."}
    ),
    "video_llava": (
        "multi_modal_projector.", {"linear_1.": "model.mm_projector.0.", "linear_2.": "model.mm_projector.2."}
    ),
    "llava_onevision": (
        "multi_modal_projector.", {"linear_1.": "model.mm_projector.0.", "linear_2.": "model.mm_projector.2."}
    ),
}

# Elements sampled per fingerprinted tensor; enough to catch any re-initialisation or fine-tune of that tensor.
_SAMPLES_PER_TENSOR = 1024
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------
# Model plumbing shared by the three entry points


def _without_engine(model: nn.Module) -> nn.Module:
    """The module inside a DeepSpeed engine / DDP wrapper (``.module``); others pass through."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DeepSpeed engine / DDP wrapper (``.module``) and a peft wrapper."""
    from visionzip_tune.models import unwrap

    return unwrap(_without_engine(model))


def _is_partitioned(param: torch.Tensor) -> bool:
    """ZeRO-3 partitions a parameter in place and tags it with ``ds_id``; its ``.data`` is empty outside a gather."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block; a collective when any is ZeRO-3 partitioned, a no-op otherwise."""
    if not any(_is_partitioned(p) for p in params):
        yield
        return
    import deepspeed  # only needed (and only importable cheaply enough) when DeepSpeed already partitioned the model

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _family_names(family: str) -> tuple[str, dict[str, str]]:
    if family not in _FAMILY_NAMES:
        raise ValueError(f"no export names for family {family!r}; known: {sorted(_FAMILY_NAMES)}")
    return _FAMILY_NAMES[family]


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap, deterministic fingerprint of the frozen base weights: ``"v1:" + 32 hex digits``.

    Covered: the names and shapes of every parameter of the vision tower (and of the video tower of a family that
    has a separate one, Video-LLaVA), the language model and the output embeddings (``lm_head``), plus a fixed
    strided sample of 1024 values of each of these tensors outside the repeated blocks -- embeddings, final norms,
    ``lm_head`` -- and of every tensor of the FIRST and LAST block of each ``layers`` stack (encoder and decoder).
    The projector is excluded: it is what gets trained.

    Values are rounded to bfloat16 before hashing, so one checkpoint loaded in float32 or bfloat16 (or, for a
    float16 checkpoint, also in float16) fingerprints identically; dtypes are deliberately not hashed. Names are
    relative to each component, and peft's ``.base_layer`` / ``lora_*`` entries are normalised away, so wrapping
    the model (peft, DeepSpeed) does not change the fingerprint.

    Cost: one pass over parameter metadata plus about 1024 elements per sampled tensor (milliseconds, also for a 7B
    model). Under ZeRO-3 only the sampled tensors are gathered (collectively: call it on all ranks).
    """
    from visionzip_tune.models import FAMILIES, family_name, language_model, vision_tower

    model = _unwrap(model)
    parts = {"vision_tower": vision_tower(model), "language_model": language_model(model)}
    video_tower = FAMILIES[family_name(model)].video_tower
    if video_tower is not None:  # a family without one hashes exactly what it always did
        parts["video_tower"] = getattr(model.model, video_tower)
    if model.get_output_embeddings() is not None:
        parts["lm_head"] = model.get_output_embeddings()

    named: list[tuple[str, nn.Parameter]] = []
    for part, module in parts.items():
        for name, param in module.named_parameters():
            if ".lora_" in name:
                continue
            named.append((f"{part}.{name.replace('.base_layer.', '.')}", param))

    last_layer: dict[str, int] = {}
    for name, _ in named:
        match = _LAYER_INDEX.search(name)
        if match:
            stack = name[: match.start(1)]
            last_layer[stack] = max(last_layer.get(stack, 0), int(match.group(1)))

    def sampled(name: str) -> bool:
        match = _LAYER_INDEX.search(name)
        return match is None or int(match.group(1)) in (0, last_layer[name[: match.start(1)]])

    digest = hashlib.sha256()
    for name, param in named:
        shape = tuple(getattr(param, "ds_shape", param.shape))
        digest.update(f"{name}:{list(shape)};".encode())
    chosen = [(name, param) for name, param in named if sampled(name)]
    with _gathered([param for _, param in chosen]):
        for name, param in chosen:
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
            values = sample.to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
            digest.update(name.encode())
            digest.update(values.numpy().tobytes())
    return "v1:" + digest.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------
# Export


def export_projector(
    model: nn.Module, out_dir: str | Path, *, metadata: dict[str, Any], processing: tuple[Any, Any] | None = None
) -> Path:
    """Write the projector of ``model`` and its VisionZip budget to ``out_dir``; returns ``out_dir``.

    ``model``: an HF model, a peft-wrapped one or a DeepSpeed engine (or its ``.module``). Call on ALL ranks: under
    ZeRO-3 the projector is gathered collectively; rank 0 writes into a temporary directory next to ``out_dir`` and
    renames it over any previous export, so readers never see a half-written export. Returns after the export is
    complete on every rank. A peft (LoRA) model's adapter is exported too, into ``out_dir/adapter`` (peft format);
    for ``metadata["mode"] == "full"`` the whole model is saved into ``out_dir/model`` (HF ``save_pretrained``; under
    ZeRO-3 every parameter is gathered collectively, so each rank briefly holds the full model). ``processing`` =
    ``(tokenizer, image_processor)`` is saved next to that model (the tokenizer carries the chat template), so
    ``processing.load_processing(out_dir / "model")`` gives what the run's data path used; other modes ignore it.

    ``metadata`` must hold ``base_model`` (a hub id or an absolute path that ``from_pretrained`` loads); usual keys
    are ``base_fingerprint`` (computed here from the model when absent -- pass the value computed before training
    when the base weights themselves are trained), ``recipe``, ``step``, ``data_fingerprint``, ``mode``; anything
    else is recorded as given. Family, budget, vision layer and shapes come from the model itself.
    """
    from visionzip_tune.models import family_name, projector, tokens_per_image

    if "base_model" not in metadata:
        raise ValueError("export_projector: metadata needs 'base_model' (hub id or absolute path of the base model)")
    wrapped = _without_engine(model)
    model = _unwrap(model)
    family = family_name(model)
    hf_prefix, llava_names = _family_names(family)
    budget = getattr(model.config, "visionzip", None) or {}
    derived = {
        "family": family,
        "dominant": budget.get("dominant"),
        "contextual": budget.get("contextual"),
        "eager": bool(budget.get("eager", False)),
        "layer": model.config.vision_feature_layer,
        "tokens_per_image": tokens_per_image(model.config),
        "token_order": budget.get("token_order", "flat"),
    }
    clashes = {key: value for key, value in metadata.items() if key in derived and value != derived[key]}
    if clashes:
        raise ValueError(f"export_projector: metadata {clashes} contradicts the model ({derived})")
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "base_model": metadata["base_model"],
        "base_fingerprint": metadata.get("base_fingerprint") or weights_fingerprint(model),
        **derived,
        "recipe": None,
        "step": None,
        "data_fingerprint": None,
        "mode": "projector",
    }
    fixed = {*derived, "format_version", "base_fingerprint"}
    record.update((key, value) for key, value in metadata.items() if key not in fixed)

    tensors = _gathered_copy(dict(projector(model).named_parameters()))
    record["projector"] = {hf_prefix + name: list(t.shape) for name, t in tensors.items()}
    is_peft = hasattr(wrapped, "peft_config")
    if is_peft:
        adapter = _gathered_copy({n: p for n, p in wrapped.named_parameters() if ".lora_" in n})
        record["adapter"] = ADAPTER_DIR
    full = record["mode"] == "full"
    if full:
        record["model"] = MODEL_DIR

    out_dir = Path(out_dir)
    # A full run's export needs every parameter: gather them all (collectively, on every rank) around rank 0's write.
    with _gathered(list(model.parameters()) if full else []):
        if _rank() == 0:
            _write_export(out_dir, record, tensors, hf_prefix, llava_names,
                          adapter=(wrapped, adapter) if is_peft else None, model=model if full else None,
                          processing=processing if full else None)
    _barrier()
    return out_dir


def _write_export(
    out_dir: Path,
    record: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    hf_prefix: str,
    llava_names: dict[str, str],
    *,
    adapter: tuple[nn.Module, dict[str, torch.Tensor]] | None,
    model: nn.Module | None,
    processing: tuple[Any, Any] | None,
) -> None:
    """Rank 0's half of :func:`export_projector`: every file of the export, in one atomic directory write."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file({hf_prefix + n: t for n, t in tensors.items()}, str(tmp / PROJECTOR_FILE), metadata={"format": "pt"})
        torch.save({_llava_name(n, llava_names): t for n, t in tensors.items()}, tmp / LLAVA_FILE)
        if adapter is not None:
            peft_model, state = adapter
            peft_model.save_pretrained(tmp / ADAPTER_DIR, state_dict=state)
        if model is not None:
            model.save_pretrained(tmp / MODEL_DIR)  # config.json keeps config.visionzip: apply_visionzip re-zips
        if processing is not None:
            for piece in processing:  # tokenizer (with its chat template), image processor
                piece.save_pretrained(tmp / MODEL_DIR)
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _gathered_copy(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full float32 CPU copies of ``params`` (gathered collectively under ZeRO-3)."""
    with _gathered(list(params.values())):
        return {name: p.detach().to("cpu", torch.float32).contiguous().clone() for name, p in params.items()}


def _llava_name(name: str, llava_names: dict[str, str]) -> str:
    for ours, theirs in llava_names.items():
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise ValueError(f"projector parameter {name!r} has no original-LLaVA name (known: {sorted(llava_names)})")


# ----------------------------------------------------------------------------------------------------------------
# Load


_REQUIRED_KEYS = ("base_model", "base_fingerprint", "family", "dominant", "contextual", "projector")


def read_export(export_dir: str | Path) -> dict[str, Any]:
    """The validated ``visionzip.json`` of an export directory; :class:`UserError` naming what is wrong otherwise."""
    export_dir = Path(export_dir)
    what = f"(an export is a directory holding {PROJECTOR_FILE}, {LLAVA_FILE} and {METADATA_FILE}, written by " \
        "`python -m visionzip_tune export --run RUN` or at the end of training)"
    if not export_dir.is_dir():
        raise UserError(f"export directory {export_dir} does not exist {what}.")
    path = export_dir / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{export_dir} is not a visionzip_tune export: {METADATA_FILE} is missing {what}.")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); the export is corrupt, export the run again.") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        found = record.get("format_version") if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"{path} has format_version {found!r}, this visionzip_tune reads format_version {FORMAT_VERSION}; "
            "export the run again with this version."
        )
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise UserError(f"{path} lacks the keys {missing}; the export is corrupt, export the run again.")
    return record


def _read_projector(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path} is missing: the export in {path.parent} is incomplete; export the run again.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); export the run again.") from None


def _shape_problems(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    what: str = "parameter of this model's projector",
) -> list[str]:
    """One line per tensor whose presence or shape differs between ``expected`` and ``found``."""
    problems = []
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            problems.append(f"{name} is missing (the model has {list(expected[name])})")
        elif name not in expected:
            problems.append(f"{name} {list(found[name])} is not a {what}")
        elif found[name] != expected[name]:
            problems.append(f"{name} is {list(found[name])} but the model has {list(expected[name])}")
    return problems


def load_projector(model: nn.Module, export_dir: str | Path, processor=None, *, check_fingerprint: bool = True):
    """Load an exported projector into ``model`` and apply the VisionZip budget it was tuned for. In place.

    Checks, before touching the model: the export is complete and readable, the family matches, the base weights'
    fingerprint matches the one recorded at export (``check_fingerprint=False`` skips this, e.g. for a base model
    re-saved in another dtype that changes the sampled values), and every tensor fits the model's projector.
    Then merges the LoRA adapter of a ``lora`` run into the language model, copies the projector weights (dtype
    and device of the model kept) and calls ``apply_visionzip(model, dominant, contextual, processor=processor)``
    -- or ``remove_visionzip`` for an export tuned without VisionZip. Returns ``model``. Under ZeRO-3, call on all
    ranks (LoRA exports: not under ZeRO-3).
    """
    from visionzip_tune.models import apply_visionzip, family_name, projector, remove_visionzip

    export_dir = Path(export_dir)
    record = read_export(export_dir)
    base = _unwrap(model)
    family = family_name(base)
    if family != record["family"]:
        raise UserError(
            f"the projector in {export_dir} belongs to a {record['family']!r} model ({record['base_model']}), "
            f"but the model given is a {family!r} model."
        )
    if check_fingerprint:
        fingerprint = weights_fingerprint(base)
        if fingerprint != record["base_fingerprint"]:
            raise UserError(
                f"the projector in {export_dir} was tuned on base model {record['base_model']} with weights "
                f"fingerprint {record['base_fingerprint']}, but the model given has fingerprint {fingerprint}: "
                "its weights differ. Load the base model the export names, or skip the check "
                "(check_fingerprint=False, --no-check-fingerprint) if you know the weights are the same."
            )
    if record.get("mode") == "full":
        raise UserError(
            f"{export_dir} comes from a 'full' run, which trained the language model together with the projector, "
            "so the projector alone does not reproduce that run. Load the whole trained model instead: "
            f"`model = AutoModelForImageTextToText.from_pretrained('{export_dir / record.get('model', MODEL_DIR)}')` "
            "then `vzt.apply_visionzip(model)` (the budget is in its config)."
        )
    adapter = export_dir / record["adapter"] if record.get("adapter") else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} (the LoRA adapter of this lora run) is missing; export the run again.")
    tensors = _read_projector(export_dir / PROJECTOR_FILE)
    hf_prefix, _ = _family_names(family)
    params = dict(projector(base).named_parameters())
    expected = {hf_prefix + name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in params.items()}
    problems = _shape_problems(expected, {name: tuple(t.shape) for name, t in tensors.items()})
    if problems:
        raise UserError(
            f"the projector in {export_dir / PROJECTOR_FILE} does not fit this model: {'; '.join(problems)}. "
            f"Was it exported from {record['base_model']}?"
        )
    if adapter is not None:
        from peft import PeftModel

        PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()  # in place: base keeps its identity
    # Every rank read the same file; under ZeRO-3 rank 0's copy is broadcast when the gather closes.
    with torch.no_grad(), _gathered(list(params.values()), modifier_rank=0):
        for name, param in params.items():
            param.copy_(tensors[hf_prefix + name])
    if record["dominant"] is None:
        remove_visionzip(base, processor)
    else:
        apply_visionzip(
            base,
            record["dominant"],
            record["contextual"],
            processor=processor,
            eager=bool(record.get("eager")),
            token_order=record.get("token_order"),
        )
    return model


# ----------------------------------------------------------------------------------------------------------------
# Command line: python -m visionzip_tune export --run DIR [--checkpoint NAME] [--output DIR]


def _run_checkpoint(run: Path, name: str | None) -> Path:
    """The checkpoint directory ``name`` (default: the one ``checkpoints/latest`` names) of run directory ``run``."""
    root = run / "checkpoints"
    available = sorted(p.name for p in root.glob("step-*") if (p / "trainable.safetensors").is_file())
    if name is None:
        pointer = root / "latest"
        if not pointer.is_file():
            raise UserError(
                f"run {run} has no checkpoint yet ({pointer} is missing); train it first, or pick one with "
                f"--checkpoint (complete checkpoints: {available or 'none'})."
            )
        name = pointer.read_text().strip()
    path = root / name
    if not (path / "trainable.safetensors").is_file():
        raise UserError(
            f"checkpoint {path} has no trainable.safetensors; complete checkpoints of {run}: {available or 'none'}."
        )
    return path


def export_run(run: str | Path, checkpoint: str | None = None, output: str | Path | None = None) -> Path:
    """Export checkpoint ``checkpoint`` (default: the latest) of a run directory to ``output`` (default RUN/export).

    Rebuilds the model as the run trained it -- the base model from ``model.name_or_path``, the run's VisionZip
    budget, its trainable set (LoRA wrapping included) -- loads the checkpoint's trainable tensors by name and
    writes the export (a ``full`` run's trainable set is the projector and the language model, so its export holds
    the whole model too, with the base model's tokenizer and image processor). Single process.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from visionzip_tune.config import load_config, to_dict
    from visionzip_tune.models import apply_visionzip, remove_visionzip
    from visionzip_tune.processing import load_processing
    from visionzip_tune.train import base_model_id, set_trainable

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(
            f"{run} is not a run directory: {run / 'config.yaml'} is missing (a run directory is the output.dir "
            "of `bash train.sh` / `python -m visionzip_tune train`)."
        )
    cfg = load_config(run / "config.yaml")
    ckpt = _run_checkpoint(run, checkpoint)
    base_model = base_model_id(cfg.model.name_or_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(base_model)
        # A full run's export holds the whole model: the base model's tokenizer and image processor go next to it.
        processing = load_processing(base_model)[:2] if cfg.train.mode == "full" else None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the base model {base_model} of run {run} (model.name_or_path): {err}") from None
    fingerprint = weights_fingerprint(model)
    if cfg.visionzip.enabled:
        v = cfg.visionzip
        apply_visionzip(model, v.dominant, v.contextual, eager=v.eager, token_order=v.token_order)
    else:
        remove_visionzip(model)  # as training does: a base saved zipped records a budget the run did not use
    model = set_trainable(model, cfg.train)

    path = ckpt / "trainable.safetensors"
    trained = load_file(str(path))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    problems = _shape_problems(
        {name: tuple(p.shape) for name, p in params.items()},
        {name: tuple(t.shape) for name, t in trained.items()},
        "trainable parameter of this run's model",
    )
    if problems:
        raise UserError(f"{path} does not fit the {cfg.train.mode}-mode model of {base_model}: {'; '.join(problems)}.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trained[name])
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    metadata = {
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "recipe": {"path": str((run / "config.yaml").resolve()), "config": to_dict(cfg)},
        "step": state.get("step"),
        "data_fingerprint": state.get("data_fingerprint"),
        "mode": cfg.train.mode,
        "checkpoint": str(ckpt.resolve()),
    }
    return export_projector(model, Path(output) if output else run / "export", metadata=metadata, processing=processing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune export",
        description="Export the trained projector of a run directory: projector.safetensors (HF names), "
        "mm_projector.bin (original LLaVA names) and visionzip.json (budget, base model fingerprint, recipe).",
    )
    parser.add_argument("--run", required=True, help="run directory (the output.dir of a training run)")
    parser.add_argument("--checkpoint", help="checkpoint name under RUN/checkpoints (default: the latest)")
    parser.add_argument("--output", help="export directory (default: RUN/export; replaced atomically)")
    args = parser.parse_args(argv)
    out = export_run(args.run, args.checkpoint, args.output)
    print(out)
    return 0
