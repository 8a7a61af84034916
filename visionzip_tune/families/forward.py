"""The forward pass training and held-out evaluation share: a batch's vision inputs are encoded first, with the
family's (zipped) feature methods, and handed to the model as ``mm_encoder_outputs``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from visionzip_tune.distributed import unwrap_engine
from visionzip_tune.families import (
    blank_image_inputs,
    blank_video_inputs,
    has_video_input,
    id_inputs,
    media_inputs,
    unwrap_peft,
)


def to_model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The collated batch's tensors on ``device``; pixel values (images, crops, frames) in the model's dtype (bf16
    under mixed precision), sizes, counts and timings (Qwen2.5-VL's seconds per temporal patch) as they are."""
    return {
        k: v.to(device, dtype) if k.startswith("pixel_values") else v.to(device)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }


def forward_with_vision(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Run a VLM on a batch with its vision path computed first, passed in as ``mm_encoder_outputs``.

    ``model`` is what runs the batch: the DeepSpeed engine in training (its backward and gradient reduction hook on
    its own forward), the model itself in evaluation; plain or peft-wrapped inside. The family names which batch
    keys each features method takes and which the forward needs besides (Qwen: the grids for positions, and the
    ``mm_token_type_ids`` derived from the ids). Every batch runs the image path,
    and the video path for families with one. A batch without images (or videos) runs it on one blank image (one
    blank frame) and passes a zero-length slice of its features (LLaVA's ``image_features[0:0]``): nothing is
    inserted, but the LLM's inputs depend on the projector. So whatever a rank's batch holds, every rank runs the
    same modules in the same order, forward and backward -- under ZeRO-3 each is a collective parameter gather --
    and every rank reduces the projector's gradients (zero for that batch) instead of waiting or asserting.
    """
    base = unwrap_peft(unwrap_engine(model))
    inputs = dict(inputs)
    on = (inputs["input_ids"].device, base.dtype)
    image_keys, video_keys, position_keys = media_inputs(base.config)
    positions = {k: inputs[k] for k in position_keys if k in inputs}  # the same tensors the features see
    images = {k: inputs.pop(k) for k in image_keys if k in inputs}
    encoded = {"image": _features(base.model.get_image_features, images, lambda: blank_image_inputs(base.config), *on)}
    if has_video_input(base.config):
        videos = {k: inputs.pop(k) for k in video_keys if k in inputs}
        encoded["video"] = _features(
            base.model.get_video_features, videos, lambda: blank_video_inputs(base.config), *on
        )
    inputs.update(positions)
    inputs.update(id_inputs(base.config, inputs["input_ids"]))
    return model(**inputs, mm_encoder_outputs=encoded)


def _features(encode: Callable[..., Any], given: dict, blank: Callable[[], dict], device, dtype):
    """``encode(**given)``; without inputs, the features of ``blank()`` sliced to zero tokens (same graph, nothing
    inserted). Pooled features (and Qwen3-VL's DeepStack features, per layer) are a list of per-image tensors or
    one (units, tokens, hidden) tensor by family."""
    if given:
        return encode(**given)
    output = encode(**to_model_inputs(blank(), device, dtype))
    output.pooler_output = _empty(output.pooler_output)
    if getattr(output, "deepstack_features", None) is not None:
        output.deepstack_features = [_empty(layer) for layer in output.deepstack_features]
    return output


def _empty(features):
    return [f[:0] for f in features] if isinstance(features, (list, tuple)) else features[:, :0]
