"""The forward pass training and held-out evaluation share: a batch's vision inputs are encoded first, with the
family's (zipped) feature methods, and handed to the model as ``mm_encoder_outputs``. A batch read from a feature
cache carries the frozen part of its features instead of pixels (``cached_image.*`` keys): it goes through the
family's ``features_from_frozen`` alone, the tower never runs."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from visionzip_tune.distributed import unwrap_engine
from visionzip_tune.families import (
    blank_image_inputs,
    blank_video_inputs,
    family_of,
    has_video_input,
    id_inputs,
    media_inputs,
    unwrap_peft,
)
from visionzip_tune.families.base import IMAGE, SIZES, VIDEO, cached_key


class FrozenBlank(NamedTuple):
    """The frozen part of one blank image (video) and its inputs besides pixels (``image_sizes``, grids)."""

    frozen: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]


def to_model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The collated batch's tensors on ``device``; pixel values (images, crops, frames) in the model's dtype (bf16
    under mixed precision), sizes, counts and timings (Qwen2.5-VL's seconds per temporal patch) as they are."""
    return {
        k: v.to(device, dtype) if k.startswith("pixel_values") else v.to(device)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }


def forward_with_vision(model: nn.Module, inputs: dict[str, torch.Tensor], blanks: dict | None = None) -> Any:
    """Run a VLM on a batch with its vision path computed first (:func:`encode_vision`), passed in as
    ``mm_encoder_outputs``.

    ``model`` is what runs the batch: the DeepSpeed engine in training (its backward and gradient reduction hook on
    its own forward), the model itself in evaluation; plain or peft-wrapped inside. Every batch runs the image path,
    and the video path for families with one. A batch without images (or videos) runs it on one blank image (one
    blank frame) and passes a zero-length slice of its features (LLaVA's ``image_features[0:0]``): nothing is
    inserted, but the LLM's inputs depend on the projector. So whatever a rank's batch holds, every rank runs the
    same modules in the same order, forward and backward -- under ZeRO-3 each is a collective parameter gather --
    and every rank reduces the projector's gradients (zero for that batch) instead of waiting or asserting. A run
    that reads its rows from a cache passes ``blanks`` (:func:`frozen_blanks`): the blank's frozen part then stands
    in, and no rank runs the tower.
    """
    inputs, encoded = encode_vision(model, inputs, blanks)
    return model(**inputs, mm_encoder_outputs=encoded)


def encode_vision(
    model: nn.Module, inputs: dict[str, torch.Tensor], blanks: dict | None = None, *, every_path: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(inputs, encoded)``: the batch without the inputs its features methods read, and those features by
    modality, what the model (and ``generate``) takes as ``mm_encoder_outputs``.

    The family names which batch keys each features method takes and which the forward needs besides (Qwen: the
    grids for positions, and the ``mm_token_type_ids`` derived from the ids). A batch's cached rows
    (``cached_image.*``: from a feature cache, or shared between evaluation settings) go through the family's
    ``features_from_frozen``, its pixels through the features methods. ``every_path``: a modality the batch lacks
    is encoded on a blank (see :func:`forward_with_vision`); else it is left out (evaluation: nothing to keep in
    step with).
    """
    base = unwrap_peft(unwrap_engine(model))
    family, inner = family_of(base), base.model
    inputs = dict(inputs)
    on = (inputs["input_ids"].device, base.dtype)
    image_keys, video_keys, position_keys = media_inputs(base.config)
    positions = {k: inputs[k] for k in position_keys if k in inputs}  # the same tensors the features see
    paths = [(IMAGE, image_keys, inner.get_image_features, blank_image_inputs)]
    if has_video_input(base.config):
        paths.append((VIDEO, video_keys, inner.get_video_features, blank_video_inputs))
    encoded = {}
    for modality, keys, method, blank in paths:
        given = {k: inputs.pop(k) for k in keys if k in inputs}
        frozen = _pop_cached(inputs, modality)
        if frozen:
            encoded[modality] = family.features_from_frozen(inner, modality, frozen, given)
        elif given:
            encoded[modality] = method(**given)
        elif not every_path:
            continue
        elif blanks is not None:
            empty = blanks[modality]
            encoded[modality] = _sliced(family.features_from_frozen(inner, modality, empty.frozen, empty.inputs))
        else:
            encoded[modality] = _sliced(method(**to_model_inputs(blank(base.config), *on)))
    inputs.update(positions)
    inputs.update(id_inputs(base.config, inputs["input_ids"]))
    return inputs, encoded


def frozen_blanks(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, FrozenBlank]:
    """The frozen part of one blank image (and video, for a video family) per modality, on ``device``: what a
    batch without one hands its trainable modules when the run reads its rows from a feature cache. A tower pass
    each: call on every rank at the same point (a collective under ZeRO-3)."""
    base = unwrap_peft(unwrap_engine(model))
    family = family_of(base)
    blanks = {IMAGE: blank_image_inputs(base.config)}
    if family.has_video:
        blanks[VIDEO] = blank_video_inputs(base.config)
    frozen = {}
    for modality, blank in blanks.items():
        given = to_model_inputs(blank, device, dtype)
        others = {k: v for k, v in given.items() if not k.startswith("pixel_values")}
        with torch.no_grad():
            frozen[modality] = FrozenBlank(family.frozen_features(base.model, modality, given), others)
    return frozen


def _pop_cached(inputs: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """The frozen fields of ``modality`` a cached batch holds (removed from ``inputs``), by field name."""
    prefix = cached_key(modality, "")
    fields = {key[len(prefix) :]: inputs.pop(key) for key in [k for k in inputs if k.startswith(prefix)]}
    fields.pop(SIZES, None)
    return fields


def _sliced(output):
    """A features output sliced to zero tokens (same graph, nothing inserted). Pooled features (and Qwen3-VL's
    DeepStack features, per layer) are a list of per-image tensors or one (units, tokens, hidden) tensor by
    family."""
    output.pooler_output = _empty(output.pooler_output)
    if getattr(output, "deepstack_features", None) is not None:
        output.deepstack_features = [_empty(layer) for layer in output.deepstack_features]
    return output


def _empty(features):
    return [f[:0] for f in features] if isinstance(features, (list, tuple)) else features[:, :0]
