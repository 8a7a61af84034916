"""Export a tuned projector, and load it back onto a fresh base model with its VisionZip budget.

An export directory holds three files (two more for Mini-Gemini, below):

* ``projector.safetensors`` -- the projector in HF checkpoint names (``multi_modal_projector.linear_1.weight``, ...;
  Qwen: ``visual.merger.*`` and Qwen3-VL's ``visual.deepstack_merger_list.*``), float32;
* ``mm_projector.bin`` (LLaVA families) -- the same tensors in the original LLaVA names
  (``model.mm_projector.0.weight``, ...), a plain ``torch.save`` dict that LLaVA's ``--pretrain_mm_mlp_adapter`` /
  ``load_state_dict(strict=False)`` reads;
* ``visionzip.json`` -- what the projector was tuned for: base model and a fingerprint of its weights, family,
  budget (dominant, contextual, eager, vision layer, token order; Qwen: dominant_ratio, contextual_ratio,
  merge_space, score_layer and the image processor's min/max pixels), tensor shapes, recipe, step, data fingerprint.

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

Original Mini-Gemini code (read, not run here: mgm/model/builder.py, mgm_arch.py ``initialize_uni_modules``): its
projector set is the MLP plus the mining modules, so ``mm_projector.bin`` holds ``model.mm_projector.*`` and
``model.vlm_uni_*``. Its loader (``load_pretrained_model(EXPORT, model_base=<the MGM checkpoint>, model_name)`` with
"mgm" in the name) loads ``mm_projector.bin`` over the base with ``strict=False`` -- before the mining modules exist
-- and then re-creates them from the checkpoint index in EXPORT: so a Mini-Gemini export also holds
``model.safetensors.index.json`` pointing at ``mm_projector.safetensors`` (the same tensors, MGM names).

Under DeepSpeed ZeRO-3 every parameter read here goes through ``deepspeed.zero.GatheredParameters``, a collective:
call ``export_projector``, ``weights_fingerprint`` and ``load_projector`` on all ranks.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from visionzip_tune import families, watchdog
from visionzip_tune.data.processing import Processing
from visionzip_tune.distributed import full_shape, gathered, is_main, together, unwrap_engine
from visionzip_tune.errors import UserError
from visionzip_tune.files import atomic_dir, disk_errors, file_sha256, remove_stale_temps

FORMAT_VERSION = 2  # 2: visionzip.json seals its fields and the export's files (checksum, files)
PROJECTOR_FILE = "projector.safetensors"
LLAVA_FILE = "mm_projector.bin"
# Families whose original loader reads trained modules through a checkpoint index (Mini-Gemini's mining modules):
# the original names again, as a safetensors checkpoint of one shard and its index.
ORIGINAL_SAFETENSORS_FILE = "mm_projector.safetensors"
ORIGINAL_INDEX_FILE = "model.safetensors.index.json"
METADATA_FILE = "visionzip.json"
ADAPTER_DIR = "adapter"  # LoRA runs: the language model's adapter, in peft's save_pretrained format
MODEL_DIR = "model"  # full runs: the whole trained model, in HF's save_pretrained format

# Elements sampled per fingerprinted tensor; enough to catch any re-initialisation or fine-tune of that tensor.
_SAMPLES_PER_TENSOR = 1024
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")  # a stack of repeated blocks (Qwen towers: blocks)


def _base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a DeepSpeed engine / DDP wrapper and a peft wrapper."""
    return families.unwrap_peft(unwrap_engine(model))


def original_name(hf_name: str, family: families.Family) -> str:
    """A projector parameter's name in the family's original code (``multi_modal_projector.linear_1.weight`` ->
    ``model.mm_projector.0.weight``), the names ``mm_projector.bin`` holds."""
    for ours, theirs in family.original_projector_names.items():
        if hf_name.startswith(ours):
            return theirs + hf_name[len(ours) :]
    raise ValueError(f"projector parameter {hf_name!r} has no original name in the {family.name} family")


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
    projector = families.projector_parameters(_base_model(model)).values()  # in Qwen's tower
    return modules_fingerprint(families.frozen_parts(_base_model(model)), skip=projector)


def modules_fingerprint(parts: dict[str, nn.Module], skip=()) -> str:
    """:func:`weights_fingerprint`'s rule over the modules ``parts`` (by name), leaving out the parameters ``skip``
    (those that train); a feature cache fingerprints the modules its rows are a function of with it. Collective
    under ZeRO-3."""
    skipped = {id(param) for param in skip}
    named: list[tuple[str, nn.Parameter]] = []
    for part, module in parts.items():
        for name, param in module.named_parameters():
            if ".lora_" in name or id(param) in skipped:
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
        digest.update(f"{name}:{list(full_shape(param))};".encode())
    chosen = [(name, param) for name, param in named if sampled(name)]
    with gathered([param for _, param in chosen]):
        for name, param in chosen:
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
            values = sample.to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
            digest.update(name.encode())
            digest.update(values.numpy().tobytes())
    return "v1:" + digest.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------
# Export


def export_record(model: nn.Module, metadata: dict[str, Any], image_processor=None) -> dict[str, Any]:
    """The ``visionzip.json`` record of exporting ``model`` (any wrapper) with ``metadata``: family, budget, layer
    and projector shapes come from the model (and, for families whose token counts depend on it, from the
    ``image_processor`` the run used: Qwen's min/max pixels); ``metadata`` must hold ``base_model`` and may not
    contradict them.

    Usual metadata keys: ``base_fingerprint`` (computed from the model when absent -- pass the value computed before
    training when the base weights themselves are trained), ``recipe``, ``step``, ``data_fingerprint``, ``mode``;
    anything else is recorded as given. Collective under ZeRO-3 when the fingerprint is computed here.
    """
    if "base_model" not in metadata:
        raise ValueError("export_projector: metadata needs 'base_model' (hub id or absolute path of the base model)")
    base = _base_model(model)
    family = families.family_of(base)
    budget = getattr(base.config, "visionzip", None) or {}
    derived = {"family": family.name, **family.budget_of(budget).record(family, base.config, image_processor)}
    clashes = {key: value for key, value in metadata.items() if key in derived and value != derived[key]}
    if clashes:
        raise ValueError(f"export_projector: metadata {clashes} contradicts the model ({derived})")
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "base_model": metadata["base_model"],
        "base_fingerprint": metadata.get("base_fingerprint") or weights_fingerprint(base),
        **derived,
        "recipe": None,
        "step": None,
        "data_fingerprint": None,
        "mode": "projector",
    }
    fixed = {*derived, "format_version", "base_fingerprint"}
    record.update((key, value) for key, value in metadata.items() if key not in fixed)
    record["projector"] = {name: list(full_shape(p)) for name, p in families.projector_parameters(base).items()}
    if hasattr(unwrap_engine(model), "peft_config"):
        record["adapter"] = ADAPTER_DIR
    if record["mode"] == "full":
        record["model"] = MODEL_DIR
    return record


def export_projector(
    model: nn.Module,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any],
    processing: Processing | None = None,
) -> Path:
    """Write the projector of ``model`` and its VisionZip budget to ``out_dir`` (see :func:`export_record` for
    ``metadata``; ``processing`` is the run's, whose image processor the record describes where the token counts
    depend on it); returns ``out_dir``.

    ``model``: an HF model, a peft-wrapped one or a DeepSpeed engine (or its ``.module``). Call on ALL ranks: under
    ZeRO-3 the projector is gathered collectively; rank 0 writes into a temporary directory next to ``out_dir`` and
    renames it over any previous export, so readers never see a half-written export. Returns after the export is
    complete on every rank. A peft (LoRA) model's adapter is exported too, into ``out_dir/adapter`` (peft format);
    for ``metadata["mode"] == "full"`` the whole model is saved into ``out_dir/model`` (HF ``save_pretrained``; under
    ZeRO-3 every parameter is gathered collectively, so each rank briefly holds the full model), with the
    ``processing``'s tokenizer (carrying the chat template) and image processor next to it, so
    ``load_processing(out_dir / "model")`` gives what the run's data path used.
    """
    wrapped = unwrap_engine(model)
    base = _base_model(model)
    record = export_record(model, metadata, processing.image_processor if processing is not None else None)
    tensors = _gathered_copy(families.projector_parameters(base))
    adapter = (
        _gathered_copy({n: p for n, p in wrapped.named_parameters() if ".lora_" in n}) if "adapter" in record else None
    )
    full = record["mode"] == "full"
    out_dir = Path(out_dir)

    def write() -> None:
        if not is_main():
            return
        with disk_errors(out_dir, "the export"):
            remove_stale_temps(out_dir.parent, out_dir.name)  # what killed exports left here
            with atomic_dir(out_dir) as tmp:
                _write_projector(tmp, tensors, families.family_of(base))
                if adapter is not None:
                    wrapped.save_pretrained(tmp / ADAPTER_DIR, state_dict=adapter)
                if full:
                    base.save_pretrained(tmp / MODEL_DIR)  # config.json keeps config.visionzip: apply_visionzip re-zips
                    if processing is not None:  # the tokenizer carries the chat template
                        processing.tokenizer.save_pretrained(tmp / MODEL_DIR)
                        processing.image_processor.save_pretrained(tmp / MODEL_DIR)
                sealed = seal(record, tmp)
                (tmp / METADATA_FILE).write_text(json.dumps(sealed, indent=2, default=str) + "\n")

    # A full run's export needs every parameter: gather them all (collectively, on every rank) around rank 0's write.
    with gathered(list(base.parameters()) if full else []):
        together(write)
    return out_dir


def _digest(record: dict[str, Any]) -> str:
    """sha256 of a record's fields (its ``checksum`` left out), canonically serialised."""
    fields = {key: value for key, value in record.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def seal(record: dict[str, Any], export_dir: Path) -> dict[str, Any]:
    """``record`` with the sha256 of every file in ``export_dir`` (``files``) and a ``checksum`` over all its
    fields, so a file or a field changed after the export is noticed when it is read (:func:`read_export`)."""
    files = sorted(p for p in export_dir.rglob("*") if p.is_file() and p.name != METADATA_FILE)
    sealed = {**record, "files": {p.relative_to(export_dir).as_posix(): file_sha256(p) for p in files}}
    return {**sealed, "checksum": _digest(sealed)}


def _write_projector(out_dir: Path, tensors: dict[str, torch.Tensor], family: families.Family) -> None:
    """``projector.safetensors`` (HF names) and, for families with an original naming, ``mm_projector.bin`` (and,
    for a family whose loader wants an index, ``mm_projector.safetensors`` with ``model.safetensors.index.json``)."""
    save_file(tensors, str(out_dir / PROJECTOR_FILE), metadata={"format": "pt"})
    if family.original_projector_names is None:
        return
    original = {original_name(name, family): t for name, t in tensors.items()}
    torch.save(original, out_dir / LLAVA_FILE)
    if family.original_projector_index:
        save_file(original, str(out_dir / ORIGINAL_SAFETENSORS_FILE), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(original), ORIGINAL_SAFETENSORS_FILE)}
        (out_dir / ORIGINAL_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _gathered_copy(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full float32 CPU copies of ``params`` (gathered collectively under ZeRO-3)."""
    with gathered(list(params.values())):
        return {name: p.detach().to("cpu", torch.float32).contiguous().clone() for name, p in params.items()}


# ----------------------------------------------------------------------------------------------------------------
# Load


_REQUIRED_KEYS = ("base_model", "base_fingerprint", "family", "projector", "files", "checksum")  # + the budget keys


def read_export(export_dir: str | Path) -> dict[str, Any]:
    """The validated ``visionzip.json`` of an export directory; :class:`UserError` naming what is wrong otherwise."""
    export_dir = Path(export_dir)
    what = (
        f"(an export is a directory holding {PROJECTOR_FILE}, {LLAVA_FILE} and {METADATA_FILE}, written by "
        "`python -m visionzip_tune export --run RUN` or at the end of training)"
    )
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
    family = families.FAMILIES.get(record.get("family"))
    if family is None and "family" in record:
        raise UserError(
            f"{path} names the family {record['family']!r}, which this visionzip_tune does not know (families: "
            f"{', '.join(families.FAMILIES)}); the export is corrupt or from another version."
        )
    kind = family.budget_of(record) if family else None
    budget_keys = [key for key in kind.keys if key not in kind.optional] if kind else []
    missing = [key for key in (*_REQUIRED_KEYS, *budget_keys) if key not in record]
    if missing:
        raise UserError(f"{path} lacks the keys {missing}; the export is corrupt, export the run again.")
    if record["checksum"] != _digest(record):
        raise UserError(
            f"{path} was edited after the export (its fields no longer match their checksum): the projector was tuned "
            "for the recorded budget and base model, not for edited ones. Export the run again (or, for another "
            "budget, tune for it: visionzip.dominant / visionzip.contextual)."
        )
    with watchdog.phase("checking the export's files", f"reading every file of {export_dir} (their sha256)"):
        changed = [
            name
            for name, digest in record["files"].items()
            if not (export_dir / name).is_file() or file_sha256(export_dir / name) != digest
        ]
    if changed:
        raise UserError(
            f"the export {export_dir} is damaged: {', '.join(changed)} missing or changed since it was written "
            "(its sha256 no longer matches visionzip.json). Export the run again."
        )
    return record


def shape_problems(
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


def recorded_budget(record: dict[str, Any]) -> dict[str, Any] | None:
    """The ``apply_visionzip`` keywords of the budget an export records (its compressor and parameters, the
    family's knobs), None for an export tuned without compression."""
    return families.FAMILIES[record["family"]].budget_of(record).recorded(record)


def compressor_label(budget: dict[str, Any] | None) -> str:
    """The compressor of a budget (apply_visionzip keywords) and its parameters, for messages: ``VisionZip 54 +
    10``, ``divprune:64 (64 tokens per unit)``, or ``no compression``."""
    return families.budget_kind(budget).describe(budget) if budget else "no compression"


def load_projector(
    model: nn.Module,
    export_dir: str | Path,
    processor=None,
    *,
    check_fingerprint: bool = True,
    image_processor=None,
    budget: dict[str, Any] | None = None,
    other_compressor: bool = False,
):
    """Load an exported projector into ``model`` and apply the VisionZip budget it was tuned for. In place.

    Checks, before touching the model: the export is complete and readable, the family matches, the base weights'
    fingerprint matches the one recorded at export (``check_fingerprint=False`` skips this, e.g. for a base model
    re-saved in another dtype that changes the sampled values), and every tensor fits the model's projector.
    For families whose token counts depend on the image processor (Qwen: its min/max pixels decide each image's
    patch grid), an image processor that differs from the export's is refused: ``image_processor``, or the one of
    ``processor``. Then merges the LoRA adapter of a ``lora`` run into the language model, copies the projector
    weights (dtype and device of the model kept) and calls ``apply_visionzip`` with the recorded budget (and
    ``processor``) -- or ``remove_visionzip`` for an export tuned without VisionZip. ``budget`` (apply_visionzip
    keywords) applies another budget instead: one of another compressor is refused (the projector was tuned on
    that compressor's rows) unless ``other_compressor=True``. Returns ``model``. Under ZeRO-3, call on all ranks
    (LoRA exports: not under ZeRO-3).
    """
    export_dir = Path(export_dir)
    record = read_export(export_dir)
    base = _base_model(model)
    family = families.family_name(base)
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
    image_processor = image_processor or getattr(processor, "image_processor", None)
    mismatched = families.FAMILIES[record["family"]].check_inputs(record, image_processor)
    if mismatched:
        raise UserError(f"the projector in {export_dir} does not fit these inputs: {'; '.join(mismatched)}.")
    adapter = export_dir / record["adapter"] if record.get("adapter") else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} (the LoRA adapter of this lora run) is missing; export the run again.")
    tensors = load_file(str(export_dir / PROJECTOR_FILE))  # read_export checked it is the file that was written
    params = families.projector_parameters(base)
    expected = {name: full_shape(p) for name, p in params.items()}
    problems = shape_problems(expected, {name: tuple(t.shape) for name, t in tensors.items()})
    if problems:
        raise UserError(
            f"the projector in {export_dir / PROJECTOR_FILE} does not fit this model: {'; '.join(problems)}. "
            f"Was it exported from {record['base_model']}?"
        )
    tuned = recorded_budget(record)
    if budget is not None and not other_compressor:
        method, tuned_method = budget.get("method", "visionzip"), (tuned or {}).get("method", "visionzip")
        if tuned is None or method != tuned_method:
            raise UserError(
                f"the projector in {export_dir} was tuned with {compressor_label(tuned)}, but the budget asked for is "
                f"{compressor_label(budget)}: that compressor's rows are not what the projector was tuned on. Load it "
                "with its own compressor, or say so explicitly (other_compressor=True, --other-compressor) to compare "
                "compressors under one projector."
            )
    budget = tuned if budget is None else budget
    if budget is not None:
        try:
            families.resolve_budget(base.config, **budget)
        except ValueError as err:
            raise UserError(f"{export_dir / METADATA_FILE} records a budget this model cannot take: {err}") from None
    if adapter is not None:
        from peft import PeftModel  # lazy: heavy, and only LoRA exports need it

        PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()  # in place: base keeps its identity
    # Every rank read the same file; under ZeRO-3 rank 0's copy is broadcast when the gather closes.
    with torch.no_grad(), gathered(list(params.values()), modifier_rank=0):
        for name, param in params.items():
            param.copy_(tensors[name])
    if budget is None:
        families.remove_visionzip(base, processor)
    else:
        families.apply_visionzip(base, processor=processor, **budget)
    return model
