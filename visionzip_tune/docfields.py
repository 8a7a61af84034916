"""Dataclass fields that carry a one-line doc, their bounds and whether a resumed run may change them: how every
config section declares its keys.

The docs are the source of ``train --help-config`` and the README's key table; the bounds are checked by
:func:`bound_problems` for every section at once, and the resume-safe keys are listed by :func:`resume_safe_keys`,
so a constraint sits next to the key it guards.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def documented(
    default: Any,
    doc: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    resume_safe: bool = False,
) -> Any:
    """A dataclass field with a one-line description and optional bounds (``gt`` / ``ge`` / ``lt``; a null value
    is never out of bounds). ``resume_safe``: a run resumed from a checkpoint may change it, because it does not
    change what the run computes (logging, cadences, paths of inputs compared by content)."""
    metadata = {
        "doc": doc,
        "bounds": {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt)) if v is not None},
        "resume_safe": resume_safe,
    }
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_HOLDS = {"gt": float.__gt__, "ge": float.__ge__, "lt": float.__lt__}


def _wanted(bounds: dict[str, float]) -> str:
    """``positive``, ``in [0, 1)``, ``>= 1``: the declared bounds in words."""
    if bounds == {"gt": 0}:
        return "positive"
    if bounds.keys() == {"ge", "lt"}:
        return f"in [{bounds['ge']}, {bounds['lt']})"
    symbols = {"gt": ">", "ge": ">=", "lt": "<"}
    return " and ".join(f"{symbols[relation]} {limit}" for relation, limit in bounds.items())


def bound_problems(section: Any, prefix: str) -> list[str]:
    """``"key must be > 0, got -1"`` for every field of the dataclass ``section`` (and its sub-sections) whose
    value breaks its declared bounds; keys are named ``prefix + field``."""
    problems = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            problems += bound_problems(value, f"{prefix}{f.name}.")
            continue
        bounds = f.metadata.get("bounds", {})
        if value is None or not bounds:
            continue
        if not all(_HOLDS[relation](float(value), float(limit)) for relation, limit in bounds.items()):
            problems.append(f"config key '{prefix}{f.name}' must be {_wanted(bounds)}, got {value}")
    return problems


def resume_safe_keys(section: type, prefix: str = "") -> set[str]:
    """The dotted keys of the dataclass ``section`` (and its sub-sections) declared ``resume_safe``; a resume-safe
    field whose value is itself a dataclass covers all of its keys."""
    keys = set()
    hints = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        name = f"{prefix}{f.name}"
        if f.metadata.get("resume_safe"):
            keys.add(name)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys |= resume_safe_keys(hints[f.name], f"{name}.")
    return keys
