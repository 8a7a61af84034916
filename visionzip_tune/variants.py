"""The configurations ``eval`` and ``bench-infer`` compare, each ready to run: the stock model, VisionZip at
training-free budgets, and a tuned projector at its export's budget.

``prepared`` (eval) loads the base model once for stock and the training-free budgets (the budget is switched in
place) and gives the tuned run a fresh base with the export's projector (or a ``full`` export's whole model);
:class:`Switcher` (bench-infer) moves one base model between all of them, back and forth. Every run of one command
builds its prompts with the same :class:`~visionzip_tune.prompts.Prompter` settings (the export's recipe, else the
model's chat template), so the runs differ only in budget and projector.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from visionzip_tune.data.config import IMAGE_ASPECTS, TEMPLATES
from visionzip_tune.errors import UserError
from visionzip_tune.export import load_projector, read_export, recorded_budget
from visionzip_tune.families import apply_visionzip, projector_parameters, remove_visionzip
from visionzip_tune.generate import DTYPES, load_model
from visionzip_tune.prompts import Prompter

# The paper's LLaVA-1.5 budgets keep dominant : contextual at 54 : 10 (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30).
PAPER_CONTEXTUAL_SHARE = 10 / 64


@dataclass(frozen=True)
class Variant:
    label: str
    budget: dict | None  # apply_visionzip's budget keywords, applied training-free; None: stock or tuned
    tuned: bool = False  # the export's projector and budget


def budget_label(budget: dict) -> str:
    """``54+10`` for a budget in tokens, ``0.45+0.05`` for a Qwen budget in ratios of each image's tokens."""
    if "dominant" in budget:
        return f"{budget['dominant']}+{budget['contextual']}"
    return f"{budget['dominant_ratio']}+{budget['contextual_ratio']}"


def parse_budgets(text: str | None, flag: str = "--budgets") -> list[dict]:
    """``"54+10,128"`` -> the budgets 54 + 10 and 108 + 20: ``DOMINANT+CONTEXTUAL``, or a total split as the paper
    splits its budgets (``contextual = round(total * 10 / 64)``); ``"0.45+0.05"``: ratios of each image's merged
    tokens (Qwen). :class:`UserError` naming a malformed entry."""
    budgets = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        dominant, plus, contextual = (part.strip() for part in item.partition("+"))
        if plus and dominant.isdigit() and contextual.isdigit():
            budgets.append({"dominant": int(dominant), "contextual": int(contextual)})
        elif plus and _is_ratio(dominant) and _is_ratio(contextual):
            budgets.append({"dominant_ratio": float(dominant), "contextual_ratio": float(contextual)})
        elif not plus and item.isdigit() and int(item) >= 2:
            share = round(int(item) * PAPER_CONTEXTUAL_SHARE)
            budgets.append({"dominant": int(item) - share, "contextual": share})
        else:
            raise UserError(
                f"{flag}: {item!r} is neither DOMINANT+CONTEXTUAL, a token total >= 2, nor two ratios (Qwen); give "
                f"e.g. {flag} 54+10,108+20 or 64,128 (split 54+10, 108+20 as in the paper), or 0.45+0.05"
            )
    return budgets


def _is_ratio(text: str) -> bool:
    try:
        return "." in text and 0 <= float(text) <= 1
    except ValueError:
        return False


def plan(budgets: list[dict] | None, record: dict | None) -> list[Variant]:
    """Stock, each training-free budget (``None``: the export's budget, or none without an export), then the tuned
    projector when there is an export (``record``: its visionzip.json)."""
    recorded = recorded_budget(record) if record is not None else None
    if budgets is None:
        budgets = [recorded] if recorded is not None else []
    variants = [Variant("stock", None)] + [Variant(f"VisionZip {budget_label(b)}", b) for b in budgets]
    if record is not None:
        tuned = f"VisionZip‡ {budget_label(recorded)}" if recorded is not None else "stock tokens"
        variants.append(Variant(f"{tuned} (tuned)", None, tuned=True))
    return variants


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, export and prompt flags ``eval``, ``bench-infer`` and ``show`` share."""
    parser.add_argument("--model", help="base model (save_pretrained directory or hub id); default: the export's")
    parser.add_argument("--projector", help="export directory of a tuned projector (adds the tuned run)")
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        help="prompt template (default: the export's recipe, else the model's chat template, else vicuna_v1)",
    )
    parser.add_argument(
        "--image-aspect", choices=IMAGE_ASPECTS, help="image transform (default: the export's recipe, else pad)"
    )
    parser.add_argument("--video-frames", type=int, help="frames per video (default: the export's recipe, else 8)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto (default): bfloat16 on a GPU that has it, else float32"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def check_model_arguments(args) -> dict | None:
    """The export's record (None without ``--projector``); :class:`UserError` for a missing or invalid choice."""
    if args.model is None and args.projector is None:
        raise UserError("give a model (--model) or a projector export (--projector), whose base model is used.")
    if args.video_frames is not None and args.video_frames < 1:
        raise UserError(f"--video-frames {args.video_frames}: give at least 1 frame per video.")
    return read_export(args.projector) if args.projector else None


def prompter_for(model, processing, record: dict | None, args) -> Prompter:
    """The prompter of ``args``' prompt flags, defaulting to the export's recipe (then the model's own template)."""
    return Prompter.for_recipe(
        model,
        processing,
        record,
        template=args.template,
        image_aspect=args.image_aspect,
        video_frames=args.video_frames,
    )


class Switcher:
    """Moves one loaded base model between variants in place, so runs can take turns (``bench-infer`` interleaves
    them, and load on the machine then hits every run alike): the budget is applied or removed, and the projector
    is the stock one or the export's (it is small: its two versions are swapped by copying weights). A ``full``
    export holds a whole trained model and cannot be switched to (:class:`UserError`). Without ``projector`` it
    switches between stock and training-free budgets only."""

    def __init__(self, model, projector: str | None, record: dict | None):
        if record is not None and record.get("mode") == "full":
            raise UserError(
                f"{projector} is a 'full' export (a whole trained model), which cannot share the base model with the "
                f"other runs; time it with --model {projector}/model instead."
            )
        self.model = model
        self.projector = projector
        self.stock = {name: p.detach().clone() for name, p in projector_parameters(model).items()}

    def to(self, variant: Variant) -> None:
        if variant.tuned:
            load_projector(self.model, self.projector)  # its weights and its budget
            return
        with torch.no_grad():
            for name, param in projector_parameters(self.model).items():
                param.copy_(self.stock[name])
        remove_visionzip(self.model)  # so the budget's left-out keys take their defaults, not the last run's
        if variant.budget is not None:
            try:
                apply_visionzip(self.model, **variant.budget)
            except ValueError as err:
                raise UserError(f"budget {budget_label(variant.budget)}: {err}") from None


def prepared(variants: list[Variant], args, record: dict | None) -> Iterator[tuple[Variant, object, Prompter]]:
    """Each variant's ``(variant, model, prompter)``, in order, the model set to the variant's budget and projector
    (the same model object from one variant to the next, until the tuned run loads its own)."""
    model, processing, _ = load_model(args.model or record["base_model"], None, dtype=args.dtype, device=args.device)
    prompter = prompter_for(model, processing, record, args)
    switch = Switcher(model, None, None)  # stock and the training-free budgets
    for variant in variants:
        if variant.tuned:
            del model, prompter, switch  # free the base before loading the tuned one
            model, processing, _ = load_model(args.model, args.projector, dtype=args.dtype, device=args.device)
            prompter = prompter_for(model, processing, record, args)
        else:
            switch.to(variant)
        yield variant, model, prompter
