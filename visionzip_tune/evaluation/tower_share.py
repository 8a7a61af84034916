"""One tower pass per image for every evaluation setting that can share it.

The frozen part of a zipped model's features path -- the tower and the compression, everything before the first
module a projector export changes (``families.frozen_features``, what a feature cache stores) -- is the same for
the training-free and the tuned projector at one budget, and for every choice of a multiple-choice question. A
:class:`TowerShare` keeps each medium's frozen part (on the CPU, up to a size) under the model's *frozen identity*
(the compression and its budget, the weights those rows come from, the dtype) and the medium's inputs (pixel
bytes, sizes, grids): a request whose frozen part is known skips the tower, its batch carrying ``cached_image.*``
rows that ``families.forward.encode_vision`` hands to the family's trainable rest, as a cached training batch does.
A medium computed once in a batch is reused bit for bit, so an answer does not depend on which setting or request
computed it first (to float tolerance, as for batching).

A stock model (no compression) has no frozen part and shares nothing; nor does Mini-Gemini with a tuned mining
projection, whose weights are in its identity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from torch import Tensor, nn

from visionzip_tune import families
from visionzip_tune.evaluation.answers import tensor_digest
from visionzip_tune.export import modules_fingerprint
from visionzip_tune.families.base import IMAGE, VIDEO, cached_key
from visionzip_tune.feature_cache import frozen_parts
from visionzip_tune.inference.prompts import Media

DEFAULT_GIB = 4.0  # per process: GQA's 12.5k images at 64 LLaVA rows in bf16 take 1.6 GiB on one process


def frozen_identity(model: nn.Module) -> str | None:
    """What a medium's frozen part depends on besides the medium: the compression and its budget, the fingerprint
    of the weights it is computed with (the towers, and Mini-Gemini's mining, leaving out what only reads the rows:
    Qwen's merger) and the dtype; None for a model without compression (no frozen part)."""
    base = families.unwrap_peft(model)
    budget = getattr(base.config, "visionzip", None)
    if not budget:
        return None
    family = families.family_of(base)
    outside = [path for path in family.projector_paths() if family.cache_refusal((path,)) is None]
    skip = [p for path in outside for p in base.model.get_submodule(path).parameters()]
    parts = {
        "compression": dict(budget),
        "weights": modules_fingerprint(families.cache_modules(base), skip=skip),
        "dtype": str(base.dtype),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TowerShare:
    """The frozen parts an evaluation has computed, by frozen identity and medium, kept on the CPU until they take
    ``gib`` GiB (then later media are computed each time they are needed; 0: nothing is kept)."""

    def __init__(self, gib: float = DEFAULT_GIB):
        self.limit = int(gib * 2**30)
        self.bytes = 0
        self.full = False
        self._parts: dict[str, dict[str, Tensor]] = {}

    def view(self, model: nn.Module) -> SharedTower | None:
        """What one setting's batches use: ``model``'s side of the share (None: nothing to share)."""
        identity = frozen_identity(model)
        return None if identity is None or self.limit <= 0 else SharedTower(self, model, identity)

    def get(self, key: str) -> dict[str, Tensor] | None:
        return self._parts.get(key)

    def put(self, key: str, part: dict[str, Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in part.values())
        if self.bytes + size > self.limit:
            self.full = True
            return
        self._parts[key] = {name: t.cpu() for name, t in part.items()}
        self.bytes += size


class SharedTower:
    """One model's use of a :class:`TowerShare`; counts the media it computed and the ones it found."""

    def __init__(self, share: TowerShare, model: nn.Module, identity: str):
        self.share, self.model, self.identity = share, model, identity
        base = families.unwrap_peft(model)
        image_keys, video_keys, _ = families.media_inputs(base.config)
        self.paths = [(IMAGE, image_keys)] + ([(VIDEO, video_keys)] if families.has_video_input(base.config) else [])
        self._on = (base.device, base.dtype)
        self.computed = self.reused = 0

    def attach(self, media: Sequence[Media]) -> list[Media]:
        """``media`` with each modality's pixels replaced by its frozen part: found in the share, or computed in
        one tower call for all the media of the batch that lack it (and kept)."""
        inputs = [dict(m.inputs) for m in media]
        for modality, keys in self.paths:
            own = [_medium(i, keys) for i in inputs]
            keyed = [None if o is None else self._key(modality, o) for o in own]
            known = {k: self.share.get(k) for k in keyed if k is not None}
            missing = {k: keyed.index(k) for k, part in known.items() if part is None}  # each medium once
            if missing:
                counts = [len(media[n].image_tokens) if modality == IMAGE else 1 for n in missing.values()]
                entries = [(own[n], count) for n, count in zip(missing.values(), counts)]
                for key, part in zip(missing, frozen_parts(self.model, modality, entries, *self._on)):
                    known[key] = part
                    self.share.put(key, part)
            self.computed += len(missing)
            self.reused += sum(k is not None for k in keyed) - len(missing)
            for n, key in enumerate(keyed):
                if key is None:
                    continue
                for name in keys:
                    if name.startswith("pixel_values"):
                        del inputs[n][name]
                inputs[n].update((cached_key(modality, field), t.to(self._on[0])) for field, t in known[key].items())
        return [m._replace(inputs=i) for m, i in zip(media, inputs)]

    def report(self) -> str:
        """What the tower did for this model: ``tower passes: 120 media computed, 360 shared``."""
        full = (
            f"; the share is full ({self.share.bytes / 2**30:.1f} GiB): raise --tower-share-gib"
            if self.share.full
            else ""
        )
        return f"tower passes: {self.computed} media computed, {self.reused} shared{full}"

    def _key(self, modality: str, own: dict[str, Tensor]) -> str:
        digest = hashlib.sha256(f"{self.identity}:{modality}".encode())
        for name in sorted(own):
            tensor_digest(digest, name, own[name])
        return digest.hexdigest()


def _medium(inputs: dict[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor] | None:
    """The inputs of one modality a request's media hold (its features keys), None when it has no pixels of it."""
    own = {key: inputs[key] for key in keys if key in inputs}
    return own if any(key.startswith("pixel_values") for key in own) else None
