"""What every compressor shares: the tower signals it reads (:class:`Signals`) and the interface it implements
(:class:`Compressor`).

A compressor is a pure function from one batch of units' tower signals (an image, an anyres crop, a video frame, a
Qwen image or temporal slice, a Mini-Gemini view) to K rows per unit and a record of what became of every input
position (:class:`~visionzip_tune.algorithm.compress.ZipResult`). It works in two steps: :meth:`Compressor.select`
reads the frozen signals only (no autograd), and :meth:`Compressor.combine` makes the rows from any hidden states of
the same positions (differentiable), so the rows can be made again from other hidden states (Qwen's merger
outputs as the merger trains, Mini-Gemini's mined tokens) with the same selection.

Shape letters: B units, N sequence positions (CLS first when the tower has one), P = N - 1 patches with CLS
(else N), D hidden size, K rows kept per unit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from visionzip_tune.algorithm.compress import DOMINANT, DROPPED, ZipResult, take_tokens

# The signals a tower can give (Signals' attributes besides hidden and features), by name.
CLS_ATTENTION = "cls_attention"  # (B, P) attention the CLS token pays each patch, summed over heads
RECEIVED_ATTENTION = "received_attention"  # (B, N) attention each token receives, averaged over heads and queries
KEYS = "keys"  # (B, N, d) the feature layer's keys averaged over heads
GRID = "grid"  # (rows, columns) of the patches
SEEDS = "seeds"  # (B,) int64 a hash of each unit's pixels: the same image gives the same seed anywhere
# The signals in words, for messages.
SIGNAL_NAMES = {
    CLS_ATTENTION: "CLS attention row",
    RECEIVED_ATTENTION: "attention each token receives",
    KEYS: "keys",
    GRID: "patch grid",
    SEEDS: "pixel seeds",
}


class Signals:
    """The tower signals of a batch of units at the feature layer; each is a tensor, a zero-argument function
    computing it on first use (once), or None where the tower has no such signal.

    hidden: (B, N, D) what the rows are made of (:meth:`Compressor.combine`); features: (B, N, D') the frozen
    pre-projector features similarity-based selections compare (default ``hidden``); has_cls: whether position 0 is
    a CLS token (compressors other than VisionZip drop it and work on the P patches); grid: (rows, columns) of the
    patches; heads: how many attention heads the CLS attention is summed over."""

    def __init__(
        self,
        hidden: Tensor,
        *,
        has_cls: bool,
        features: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        heads: int = 1,
        **signals: Tensor | Callable[[], Tensor] | None,
    ):
        unknown = set(signals) - {CLS_ATTENTION, RECEIVED_ATTENTION, KEYS, SEEDS}
        if unknown:
            raise TypeError(f"unknown signals {sorted(unknown)}")
        self.hidden = hidden
        self.features = hidden if features is None else features
        self.has_cls = has_cls
        self.grid = grid
        self.heads = heads  # the attention heads the CLS attention is summed over
        self._given = signals
        self._computed: dict[str, Tensor] = {}

    def available(self) -> set[str]:
        """The names of the signals given (GRID when the patch grid is known)."""
        return {name for name, value in self._given.items() if value is not None} | ({GRID} if self.grid else set())

    def _get(self, name: str) -> Tensor:
        if name not in self._computed:
            value = self._given.get(name)
            if value is None:
                raise ValueError(f"this tower gives no {SIGNAL_NAMES[name]}")
            self._computed[name] = value() if callable(value) else value
        return self._computed[name]

    cls_attention = property(functools.partial(_get, name=CLS_ATTENTION))
    received_attention = property(functools.partial(_get, name=RECEIVED_ATTENTION))
    keys = property(functools.partial(_get, name=KEYS))
    seeds = property(functools.partial(_get, name=SEEDS))

    @property
    def patch_features(self) -> Tensor:
        """(B, P, D') the features of the patches (CLS dropped)."""
        return self.features[:, int(self.has_cls) :]


class Compressor:
    """One compression rule. Subclasses set :attr:`name`, :attr:`reads`, :attr:`parameters` and :attr:`source` and
    implement :meth:`select` and :meth:`combine`; the registry (``compressors.COMPRESSORS``) holds one instance of
    each."""

    name: ClassVar[str]
    reads: ClassVar[frozenset[str]] = frozenset()  # the signals select reads (besides the features)
    # Its parameters and their defaults; "tokens" (K per unit) is every compressor's but VisionZip's.
    parameters: ClassVar[dict[str, object]] = {"tokens": None}
    source: ClassVar[str]  # the paper (and official code) the rule is read from, for docs and errors

    def needs(self, has_cls: bool) -> frozenset[str]:
        """The signals :meth:`select` reads from a tower with (or without) a CLS token."""
        return self.reads

    def resolve(self, given: dict, recorded: dict | None = None) -> dict:
        """The parameters from those ``given`` (unset ones as ``recorded``, else the defaults); ``ValueError``
        naming an unknown or missing parameter or a bad value."""
        unknown = sorted(set(given) - set(self.parameters))
        if unknown:
            raise ValueError(f"the {self.name} compressor takes {', '.join(self.parameters)}, not {', '.join(unknown)}")
        recorded = recorded or {}
        params = {key: given.get(key, recorded.get(key, default)) for key, default in self.parameters.items()}
        missing = [key for key, value in params.items() if value is None]
        if missing:
            raise ValueError(f"the {self.name} compressor needs {', '.join(missing)} (e.g. tokens=64 per unit)")
        self.check(params)
        return params

    def check(self, params: dict) -> None:
        """``ValueError`` for parameter values the rule cannot take (whatever the unit)."""
        tokens = params["tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"{self.name}: tokens must be an int >= 1 (rows per unit), got {tokens!r}")

    def rows(self, params: dict) -> int:
        """K: the rows every unit becomes."""
        return params["tokens"]

    def fits(self, params: dict, positions: int, has_cls: bool) -> None:
        """``ValueError`` naming the numbers when a unit of ``positions`` sequence positions cannot give the
        rows the parameters ask for."""
        patches = positions - int(has_cls)
        if self.rows(params) > patches:
            raise ValueError(
                f"{self.name}: tokens={self.rows(params)} rows per unit, but a unit has only {patches} patches"
            )

    def select(self, signals: Signals, params: dict) -> ZipResult:
        """The selection (a :class:`ZipResult` with ``tokens=None``), from the frozen signals."""
        raise NotImplementedError

    def combine(self, hidden: Tensor, selection: ZipResult) -> Tensor:
        """(B, K, D) the rows of ``selection`` made from ``hidden`` (B, N, D), differentiable in it."""
        raise NotImplementedError

    def compress(self, signals: Signals, params: dict) -> ZipResult:
        """:meth:`select` without autograd, then :meth:`combine` of the signals' hidden states."""
        self.fits(params, signals.hidden.shape[1], signals.has_cls)
        with torch.no_grad():
            selection = self.select(signals, params)
        return selection._replace(tokens=self.combine(signals.hidden, selection))


def patch_selection(
    kept: Tensor, has_cls: bool, positions: int, *, scores: Tensor | None = None, groups: Tensor | None = None
) -> ZipResult:
    """The :class:`ZipResult` of a selection made among the patches: ``kept`` (B, k) patch indices (0..P-1),
    ascending; ``groups`` (B, P) the merged row of each patch (None: every patch not kept is dropped). Positions
    count CLS as 0 when the tower has one (it is dropped: patch selections never keep it)."""
    offset = int(has_cls)
    batch = kept.shape[0]
    if groups is None:
        groups = torch.full((batch, positions - offset), DROPPED, dtype=torch.long, device=kept.device)
        groups.scatter_(1, kept, DOMINANT)
    if offset:
        groups = torch.cat([groups.new_full((batch, 1), DROPPED), groups], dim=1)
    return ZipResult(None, kept + offset, kept.new_zeros(batch, 0), groups, scores)


def kept_rows(hidden: Tensor, selection: ZipResult) -> Tensor:
    """The hidden states of the kept positions, in their order: (B, kept, D)."""
    return take_tokens(hidden, selection.dominant_indices)
