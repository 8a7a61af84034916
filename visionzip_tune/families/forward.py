"""The forward pass training and held-out evaluation share: a batch's vision inputs are encoded first, with the
family's (zipped) feature methods, and handed to the model as ``mm_encoder_outputs``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.distributed import unwrap_engine
from visionzip_tune.families import (
    IMAGE_INPUTS,
    VIDEO_INPUT,
    blank_image_inputs,
    blank_video_inputs,
    has_video_input,
    unwrap_peft,
)


def to_model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The collated batch's tensors on ``device``; pixel values (images, crops, frames) in the model's dtype (bf16
    under mixed precision), sizes and counts as they are."""
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }


def forward_with_vision(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Run a VLM on a batch with its vision path computed first, passed in as ``mm_encoder_outputs``.

    ``model`` is what runs the batch: the DeepSpeed engine in training (its backward and gradient reduction hook on
    its own forward), the model itself in evaluation; plain or peft-wrapped inside. Every batch runs the image path,
    and the video path for families with one. A batch without images (or videos) runs it on one blank image (one
    blank frame) and passes a zero-length slice of its features (LLaVA's ``image_features[0:0]``): nothing is
    inserted, but the LLM's inputs depend on the projector. So whatever a rank's batch holds, every rank runs the
    same modules in the same order, forward and backward -- under ZeRO-3 each is a collective parameter gather --
    and every rank reduces the projector's gradients (zero for that batch) instead of waiting or asserting.
    """
    base = unwrap_peft(unwrap_engine(model))
    inputs = dict(inputs)
    on = (inputs["input_ids"].device, base.dtype)
    images = {k: inputs.pop(k) for k in IMAGE_INPUTS if k in inputs}
    encoded = {"image": _features(base.model.get_image_features, images, lambda: blank_image_inputs(base.config), *on)}
    if has_video_input(base.config):
        videos = {VIDEO_INPUT: inputs.pop(VIDEO_INPUT)} if VIDEO_INPUT in inputs else {}
        encoded["video"] = _features(
            base.model.get_video_features, videos, lambda: blank_video_inputs(base.config), *on
        )
    return model(**inputs, mm_encoder_outputs=encoded)


def _features(encode: Callable[..., Any], given: dict, blank: Callable[[], dict], device, dtype):
    """``encode(**given)``; without inputs, the features of ``blank()`` sliced to zero tokens (same graph, nothing
    inserted). Pooled features are a list of per-image tensors or one (units, tokens, hidden) tensor by family."""
    if given:
        return encode(**given)
    pooled = encode(**to_model_inputs(blank(), device, dtype)).pooler_output
    empty = [f[:0] for f in pooled] if isinstance(pooled, (list, tuple)) else pooled[:, :0]
    return BaseModelOutputWithPooling(pooler_output=empty)
