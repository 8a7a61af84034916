"""The settings ``eval`` and ``bench-infer`` compare, each ready to run: the stock model, VisionZip at training-free
budgets, and a tuned projector at its export's budget.

:func:`prepared` (eval) loads the base model once for all of them (the budget is switched in place, and the tuned
run, last, loads the export's projector into it; a ``full`` export's whole model is loaded on its own);
:class:`Switcher` (bench-infer) moves one base model between all of them, back and forth. Every run of one command
builds its prompts with the same :class:`~visionzip_tune.inference.prompts.Prompter` settings (the export's recipe,
else the model's chat template), so the runs differ only in budget and projector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from visionzip_tune.errors import UserError
from visionzip_tune.export import load_projector, recorded_budget
from visionzip_tune.families import (
    BUDGETS,
    COMPRESSED,
    apply_visionzip,
    budget_kind,
    budget_label,
    projector_parameters,
    remove_visionzip,
)
from visionzip_tune.inference.load import load_model
from visionzip_tune.inference.prompts import Prompter


@dataclass(frozen=True)
class Setting:
    """One configuration to compare: its label, and either a training-free budget or the export's tuned projector."""

    label: str
    budget: dict | None  # apply_visionzip's budget keywords, applied training-free; None: stock or tuned
    tuned: bool = False  # the export's projector and budget


def parse_budgets(text: str | None, flag: str = "--budgets") -> list[dict]:
    """Comma-separated budgets, each of one of the kinds the families take (``families.BUDGETS``): ``"54+10,128"``
    -> VisionZip at 54 + 10 and 108 + 20 (a total is split as the paper splits its budgets); ``"0.45+0.05"``:
    VisionZip at ratios of each image's merged tokens (Qwen); ``"divprune:64"``: another compressor at 64 tokens
    per unit; ``"visionzip:54+10"`` names VisionZip explicitly. :class:`UserError` naming a malformed entry."""
    budgets = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        text_of_kind = item.removeprefix("visionzip:")
        parsed = next((budget for kind in BUDGETS if (budget := kind.parse(text_of_kind)) is not None), None)
        if parsed is None:
            raise UserError(
                f"{flag}: {item!r} is neither {', nor '.join(kind.syntax for kind in BUDGETS)}; give e.g. {flag} "
                f"{', or '.join(kind.example for kind in BUDGETS)}"
            )
        budgets.append(parsed)
    return budgets


def setting_label(budget: dict, tuned: bool = False) -> str:
    """``VisionZip 54+10``; ``divprune:64``; tuned (the paper's mark): ``VisionZip‡ 54+10``, ``divprune:64‡``."""
    kind, mark = budget_kind(budget), "‡" if tuned else ""
    return f"{kind.label(budget)}{mark}" if kind is COMPRESSED else f"VisionZip{mark} {kind.label(budget)}"


def plan(budgets: list[dict] | None, record: dict | None) -> list[Setting]:
    """Stock, each training-free budget (``None``: the export's budget, or none without an export), then the tuned
    projector when there is an export (``record``: its visionzip.json)."""
    recorded = recorded_budget(record) if record is not None else None
    if budgets is None:
        budgets = [recorded] if recorded is not None else []
    settings = [Setting("stock", None)] + [Setting(setting_label(b), b) for b in budgets]
    if record is not None:
        tuned = setting_label(recorded, tuned=True) if recorded is not None else "stock tokens"
        settings.append(Setting(f"{tuned} (tuned)", None, tuned=True))
    return settings


class Switcher:
    """Moves one loaded base model between settings in place, so runs can take turns (``bench-infer`` interleaves
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

    def to(self, setting: Setting) -> None:
        if setting.tuned:
            load_projector(self.model, self.projector)  # its weights and its budget
            return
        with torch.no_grad():
            for name, param in projector_parameters(self.model).items():
                param.copy_(self.stock[name])
        remove_visionzip(self.model)  # so the budget's left-out keys take their defaults, not the last run's
        if setting.budget is not None:
            try:
                apply_visionzip(self.model, **setting.budget)
            except ValueError as err:
                raise UserError(f"budget {budget_label(setting.budget)}: {err}") from None


def prepared(
    settings: list[Setting],
    model: str | None,
    projector: str | None,
    record: dict | None,
    prompter_of: Callable[[object, object], Prompter],
    *,
    dtype: str = "auto",
    device: str | None = None,
) -> Iterator[tuple[Setting, object, Prompter]]:
    """Each setting's ``(setting, model, prompter)``, in order, the model set to the setting's budget and projector:
    one base model for all of them, the tuned run (last, as :func:`plan` puts it) loading the export's projector
    into it in place -- only a ``full`` export, a whole trained model, is loaded on its own. ``model`` is the base
    model given (None: the export's, whose ``record`` is its visionzip.json), ``prompter_of(model, processing)``
    builds the prompter every run shares."""
    base, processing, _ = load_model(model or record["base_model"], None, dtype=dtype, device=device)
    prompter = prompter_of(base, processing)
    switch = Switcher(base, None, None)  # stock and the training-free budgets
    for k, setting in enumerate(settings):
        if setting.tuned and k != len(settings) - 1:
            raise ValueError("the tuned setting comes last: loading its projector changes the base model")
        if setting.tuned and record.get("mode") == "full":
            del base, prompter, switch  # free the base before loading the tuned one
            base, processing, _ = load_model(model, projector, dtype=dtype, device=device)
            prompter = prompter_of(base, processing)
        elif setting.tuned:  # a lora export merges its adapter into the LLM: nothing runs on this base after it
            load_projector(base, projector, image_processor=processing.image_processor)
        else:
            switch.to(setting)
        yield setting, base, prompter
