"""Per-family knowledge of VLMs: where the tower, projector and LLM live, how many ``<image>`` tokens an image
becomes, and VisionZip's instance-level override of the inner model's ``get_image_features``.

One :class:`Family` entry per VLM family; adding one (LLaVA-NeXT, Video-LLaVA, OneVision) means adding an entry,
not touching the others. The override is bound with ``types.MethodType`` to the *inner* model instance
(``model.model``): both ``forward()`` and ``generate()`` call it there, and the class and every other instance stay
stock. The budget lives in ``model.config.visionzip`` (serialised with ``save_pretrained``), which is the single
source the override, :func:`tokens_per_image` and the processor read from.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import compress, encoders, processing

ImageSize = tuple[int, int]


@dataclass(frozen=True)
class Family:
    """How VisionZip plugs into one VLM family (module names are attributes of the inner model)."""

    name: str
    model_class: str  # outer class, e.g. LlavaForConditionalGeneration
    model_type: str  # config.model_type
    image_features: Callable[..., BaseModelOutputWithPooling]  # replacement for the inner get_image_features
    stock_tokens: Callable[[object, ImageSize | None], int]  # placeholder tokens per image without VisionZip
    zipped_tokens: Callable[[object, dict, ImageSize | None], int]  # ... with the budget dict of config.visionzip
    tower: str = "vision_tower"
    projector: str = "multi_modal_projector"
    language_model: str = "language_model"


def _zip_images(inner: nn.Module, tower: nn.Module, pixel_values: Tensor, vision_feature_layer: int | None) -> Tensor:
    """(B, 3, H, W) -> (B, dominant + contextual, D_vision): tower + selection, without autograd (frozen tower).

    The budget and default layer come from the inner model's config at every call.
    """
    budget = inner.config.visionzip
    layer = inner.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    layer_index = encoders.resolve_layer(len(tower.encoder.layers), layer)
    # no_grad also stops enable_input_require_grads() (activation checkpointing) from building a tower graph.
    with torch.no_grad():
        zipped = encoders.visionzip_features(
            tower, pixel_values, layer_index, budget["dominant"], budget["contextual"], eager=budget["eager"]
        )
    return zipped.tokens


def _llava_image_features(
    self,
    pixel_values: Tensor,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    image_sizes: Tensor | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """VisionZip replacement for ``LlavaModel.get_image_features`` (same parameter names: ``generate()`` filters
    the kwargs it passes by this signature).

    ``vision_feature_select_strategy`` is ignored: VisionZip keeps CLS as dominant token #0, as the reference does.
    Returns ``pooler_output`` = list of B tensors (dominant + contextual, text hidden), projected with autograd on.
    """
    tokens = _zip_images(self, self.vision_tower, pixel_values, vision_feature_layer)
    return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=list(self.multi_modal_projector(tokens)))


def _llava_stock_tokens(config, image_size: ImageSize | None = None) -> int:
    """Stock LLaVA: every tower token, minus CLS (token 0) under the 'default' select strategy."""
    tokens = encoders.tokens_per_tower_output(config.vision_config)
    return tokens - 1 if config.vision_feature_select_strategy == "default" else tokens


def _llava_zipped_tokens(config, budget: dict, image_size: ImageSize | None = None) -> int:
    return budget["dominant"] + budget["contextual"]


LLAVA = Family(
    name="llava",
    model_class="LlavaForConditionalGeneration",
    model_type="llava",
    image_features=_llava_image_features,
    stock_tokens=_llava_stock_tokens,
    zipped_tokens=_llava_zipped_tokens,
)

FAMILIES: dict[str, Family] = {family.name: family for family in (LLAVA,)}


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES.values())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF model inside a peft wrapper (any object with ``get_base_model``); others pass through."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _family_of_config(config) -> Family:
    for family in FAMILIES.values():
        if getattr(config, "model_type", None) == family.model_type:
            return family
    raise ValueError(
        f"unsupported model type {getattr(config, 'model_type', None)!r} ({type(config).__name__}); "
        f"supported families: {_supported()}"
    )


def _family_of_model(model: nn.Module) -> Family:
    for family in FAMILIES.values():
        if type(model).__name__ == family.model_class:
            return family
    raise ValueError(f"unsupported model class {type(model).__name__}; supported families: {_supported()}")


def family_name(model_or_config) -> str:
    """Family of a model (plain or peft-wrapped) or of its config, e.g. ``"llava"``; unsupported -> ValueError."""
    if isinstance(model_or_config, nn.Module):
        return _family_of_model(unwrap(model_or_config)).name
    return _family_of_config(model_or_config).name


def tokens_per_image(config, image_size: ImageSize | None = None) -> int:
    """Number of ``<image>`` placeholder tokens the LLM receives for one image under ``config``.

    The VisionZip budget when ``config.visionzip`` is set, else the stock count. ``image_size`` is the original
    (height, width), for families whose count depends on it; LLaVA-1.5 ignores it. The processor, the data path
    and the model all use this one function, so their counts cannot drift apart.
    """
    family = _family_of_config(config)
    budget = getattr(config, "visionzip", None)
    if budget:
        return family.zipped_tokens(config, budget, image_size)
    return family.stock_tokens(config, image_size)


def _inner(model: nn.Module) -> tuple[Family, nn.Module]:
    model = unwrap(model)
    return _family_of_model(model), model.model


def projector(model: nn.Module) -> nn.Module:
    """The multimodal projector (``model.model.multi_modal_projector`` for LLaVA)."""
    family, inner = _inner(model)
    return getattr(inner, family.projector)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder (``model.model.vision_tower`` for LLaVA)."""
    family, inner = _inner(model)
    return getattr(inner, family.tower)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model.language_model``); the LM head is ``model.lm_head``."""
    family, inner = _inner(model)
    return getattr(inner, family.language_model)


def apply_visionzip(
    model: nn.Module,
    dominant: int | None = None,
    contextual: int | None = None,
    processor=None,
    *,
    eager: bool | None = None,
) -> nn.Module:
    """Feed the LLM ``dominant + contextual`` VisionZip tokens per image instead of every patch. In place.

    Arguments left as ``None`` come from the budget recorded on ``model.config.visionzip`` (so a model saved after
    zipping is re-zipped by ``apply_visionzip(model)`` alone); applying again changes the budget. ``eager=True``
    runs the tower with eager attention for bit-exact reproduction (default: the configured SDPA). With
    ``processor``, its ``<image>`` expands to the same count. Returns ``model``.
    """
    family, inner = _inner(model)
    recorded = getattr(inner.config, "visionzip", None) or {}
    dominant = recorded.get("dominant") if dominant is None else dominant
    contextual = recorded.get("contextual") if contextual is None else contextual
    eager = bool(recorded.get("eager", False)) if eager is None else eager
    if dominant is None or contextual is None:
        raise ValueError(
            "apply_visionzip needs a budget: pass dominant and contextual (e.g. 54 and 10 for 64 tokens), or use a "
            "model whose config records one (config.visionzip)"
        )
    tower = getattr(inner, family.tower)
    encoders.tower_has_cls(tower)
    encoders.resolve_layer(len(tower.encoder.layers), inner.config.vision_feature_layer)
    compress.validate_budget(dominant, contextual, encoders.tokens_per_tower_output(inner.config.vision_config))
    inner.config.visionzip = {"dominant": dominant, "contextual": contextual, "eager": bool(eager)}
    inner.get_image_features = types.MethodType(family.image_features, inner)
    if processor is not None:
        processing.patch_processor(processor, functools.partial(tokens_per_image, inner.config))
    return model


def remove_visionzip(model: nn.Module, processor=None) -> nn.Module:
    """Undo :func:`apply_visionzip`: stock features, stock token counts, no budget on the config. In place."""
    _, inner = _inner(model)
    inner.__dict__.pop("get_image_features", None)
    if hasattr(inner.config, "visionzip"):
        del inner.config.visionzip
    if processor is not None:
        processing.unpatch_processor(processor)
    return model
