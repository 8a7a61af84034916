"""The model an inference command runs: a base model with a tuned projector export and its budget, a full run's
whole trained model, or a stock model with an optional training-free budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visionzip_tune.data import Processing
from visionzip_tune.errors import UserError
from visionzip_tune.export import MODEL_DIR, load_projector, read_export, recorded_budget
from visionzip_tune.families import apply_visionzip
from visionzip_tune.loading import load_model_processing, load_vlm, resolve_dtype


def load_model(
    model_dir: str | None,
    projector: str | None,
    dominant: int | None = None,
    contextual: int | None = None,
    *,
    check_fingerprint: bool = True,
    dtype: str = "float32",
    device: str | None = None,
    other_compressor: bool = False,
    **budget,
) -> tuple[Any, Processing, dict | None]:
    """``(model, processing, record)``: the base model with the exported projector and budget (``record`` = its
    visionzip.json), or stock with an optional training-free budget (``dominant`` + ``contextual``; Qwen: the
    ``dominant_ratio`` / ``contextual_ratio`` keywords; another compressor: ``method`` and its parameters) when
    ``projector`` is None. With a projector, a budget is refused (the projector was tuned for its own), unless
    ``other_compressor``, which loads the projector under that budget to compare compressors. A ``full`` run's
    export holds the whole trained model with its tokenizer and image processor: it is loaded and re-zipped with its
    recorded budget. ``dtype`` is one of :data:`DTYPES` (``auto``: bfloat16 on a GPU that supports it, else
    float32); ``device`` defaults to cuda when available, else cpu."""
    free = {k: v for k, v in {"dominant": dominant, "contextual": contextual, **budget}.items() if v is not None}
    if projector is not None and free and not other_compressor:
        raise UserError(
            f"{', '.join(free)} set a training-free budget; with a projector export the export's budget is used "
            "(the projector was tuned for it). Give one or the other (or, to compare compressors under this "
            "projector, say so: other_compressor / --other-compressor)."
        )
    if (dominant is None) != (contextual is None):
        raise UserError("give both dominant and contextual (e.g. 54 and 10 for 64 tokens per image), or neither.")
    record = read_export(projector) if projector is not None else None
    whole = record is not None and record.get("mode") == "full"
    if whole and model_dir is not None:
        raise UserError(
            f"{projector} comes from a 'full' run: it holds the whole trained model ({MODEL_DIR}/), so no other "
            "model can replace it. Leave the model out."
        )
    if whole:
        source = str(Path(projector) / record.get("model", MODEL_DIR))
    else:
        source = model_dir or (record["base_model"] if record else None)
    if source is None:
        raise UserError("give a model (a save_pretrained directory or hub id) or a projector export.")
    model = load_vlm(source, key="--model / the export's base model", dtype=resolve_dtype(dtype))
    processing = load_model_processing(source, key="model")
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if whole:
        if recorded_budget(record) is not None:  # a run without VisionZip saved a stock model
            apply_visionzip(model)  # the budget recorded in its config.json
    elif projector is not None:
        load_projector(
            model,
            projector,
            check_fingerprint=check_fingerprint,
            image_processor=processing.image_processor,
            budget=free or None,
            other_compressor=other_compressor,
        )
    elif free:
        try:
            apply_visionzip(model, **free)
        except ValueError as err:
            raise UserError(f"{', '.join(f'{k}={v}' for k, v in free.items())}: {err}") from None
    return model, processing, record
