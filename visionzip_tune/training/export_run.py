"""Export a checkpoint of a run directory (``python -m visionzip_tune export --run DIR``).

The model is rebuilt as the run trained it (``build``: its base model, VisionZip budget and trainable set, LoRA
wrapping included), the checkpoint's trainable tensors are loaded by name, and ``export.export_projector`` writes
the export. Single process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from visionzip_tune import families
from visionzip_tune.errors import UserError
from visionzip_tune.export import export_projector, shape_problems, weights_fingerprint
from visionzip_tune.loading import base_model_id, load_model_processing, load_vlm
from visionzip_tune.training import build, checkpoint
from visionzip_tune.training.config import load_config, to_dict


def run_checkpoint(run: Path, name: str | None) -> Path:
    """The checkpoint directory ``name`` (default: the latest) of run directory ``run``; :class:`UserError` naming
    the complete checkpoints otherwise."""
    root = checkpoint.checkpoints_root(run)
    available = sorted(p.name for p in root.glob("step-*") if (p / checkpoint.TRAINABLE_FILE).is_file())
    path = root / name if name is not None else checkpoint.latest_checkpoint(run)
    if path is None:
        raise UserError(
            f"run {run} has no checkpoint yet ({root / checkpoint.LATEST} is missing); train it first, or pick one "
            f"with --checkpoint (complete checkpoints: {available or 'none'})."
        )
    if not (path / checkpoint.TRAINABLE_FILE).is_file():
        raise UserError(
            f"checkpoint {path} has no {checkpoint.TRAINABLE_FILE}; complete checkpoints of {run}: "
            f"{available or 'none'}."
        )
    return path


def export_run(run: str | Path, checkpoint_name: str | None = None, output: str | Path | None = None) -> Path:
    """Export checkpoint ``checkpoint_name`` (default: the latest) of a run directory to ``output`` (default
    RUN/export). A ``full`` run's trainable set is the projector and the language model, so its export holds the
    whole model too, with the base model's tokenizer and image processor."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(
            f"{run} is not a run directory: {run / 'config.yaml'} is missing (a run directory is the output.dir "
            "of `bash train.sh` / `python -m visionzip_tune train`)."
        )
    cfg = load_config(run / "config.yaml")
    ckpt = run_checkpoint(run, checkpoint_name)
    base_model = base_model_id(cfg.model.name_or_path)
    key = f"model.name_or_path of run {run}"
    model = load_vlm(base_model, key=key, what="base model")
    family = families.family_of(model)
    full = cfg.train.mode == "full"
    processing = load_model_processing(base_model, key=key) if full or family.uses_image_processor else None
    fingerprint = weights_fingerprint(model)
    build.apply_recipe_visionzip(model, cfg.visionzip)
    model, trainable = build.prepare_trainable(model, cfg.train)

    path = ckpt / checkpoint.TRAINABLE_FILE
    trained = load_file(str(path))
    params = dict(trainable)
    problems = shape_problems(
        {name: tuple(p.shape) for name, p in params.items()},
        {name: tuple(t.shape) for name, t in trained.items()},
        "trainable parameter of this run's model",
    )
    if problems:
        raise UserError(f"{path} does not fit the {cfg.train.mode}-mode model of {base_model}: {'; '.join(problems)}.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trained[name])
    state = checkpoint.read_state(ckpt) if (ckpt / checkpoint.STATE_FILE).is_file() else {}
    metadata = {
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "recipe": {"path": str((run / "config.yaml").resolve()), "config": to_dict(cfg)},
        "step": state.get("step"),
        "data_fingerprint": state.get("data_fingerprint"),
        "mode": cfg.train.mode,
        "checkpoint": str(ckpt.resolve()),
    }
    return export_projector(
        model,
        Path(output) if output else run / "export",
        metadata=metadata,
        processing=processing,
    )
