"""Per-family knowledge of VLMs: where the tower, projector and LLM live, how many ``<image>`` / ``<video>`` tokens
an image or video becomes, and VisionZip's instance-level override of the inner model's ``get_image_features``
(and ``get_video_features``).

One :class:`Family` entry per VLM family (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA, LLaVA-OneVision); adding one means
adding an entry, not touching the others. VisionZip runs on every unit the tower sees independently: an image, an
anyres crop, a video frame. The override is bound with ``types.MethodType`` to the *inner* model instance
(``model.model``): both ``forward()`` and ``generate()`` call it there, and the class and every other instance stay
stock. The budget lives in ``model.config.visionzip`` (serialised with ``save_pretrained``), which is the single
source the override, :func:`tokens_per_image` and the processor read from.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

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
    # Orders the zipped tokens of one image can be fed in; the first is the default. Only a family with a choice
    # records "token_order" in config.visionzip.
    token_orders: tuple[str, ...] = ("flat",)
    # Families with a video path: replacement for the inner get_video_features, its tower (when not the image
    # tower), and the stock placeholder tokens of a video of T frames (per-frame VisionZip feeds T x K instead).
    video_features: Callable[..., BaseModelOutputWithPooling] | None = None
    video_tower: str | None = None
    stock_video_tokens: Callable[[object, int], int] | None = None
    # Anyres families take (images, crops, 3, S, S) pixel values with each image's (height, width) in image_sizes.
    anyres: bool = False
    # Whether the images of a sample holding several are tiled like a lone image (OneVision feeds them untiled).
    tiles_every_image: bool = True


def _zip_images(
    inner: nn.Module, tower: nn.Module, pixel_values: Tensor, vision_feature_layer: int | None
) -> compress.ZipResult:
    """(B, 3, H, W) -> tokens (B, dominant + contextual, D_vision) and the kept positions: tower + selection,
    without autograd (frozen tower). B counts whatever the family zips independently (images, crops, frames).

    The budget and default layer come from the inner model's config at every call.
    """
    budget = inner.config.visionzip
    layer = inner.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    layer_index = encoders.resolve_layer(len(tower.encoder.layers), layer)
    # no_grad also stops enable_input_require_grads() (activation checkpointing) from building a tower graph.
    with torch.no_grad():
        return encoders.visionzip_features(
            tower, pixel_values, layer_index, budget["dominant"], budget["contextual"], eager=budget["eager"]
        )


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
    tokens = _zip_images(self, self.vision_tower, pixel_values, vision_feature_layer).tokens
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


# ----------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT: one image becomes a base crop plus an anyres grid of crops; VisionZip zips every crop with the same
# budget (the paper's Table 9 budgets are per crop). The stock ``pack_image_features`` (unpad to the aspect ratio,
# a newline per row) needs the dense grid that selection removes, so it is bypassed and ``image_newline`` unused.


def _crop_count(config, image_size) -> int:
    """Crops of one image of original (height, width) ``image_size``: the base crop + the anyres grid's crops."""
    return image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)


def _grid_shape(config, image_size) -> tuple[int, int]:
    """(rows, columns) of the anyres crop grid for original (height, width) ``image_size`` (HF's (h, w) order)."""
    rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    return int(rows), int(cols)


def _zip_crops(
    inner: nn.Module, pixel_values: Tensor, crops: list[int], vision_feature_layer: int | None
) -> tuple[compress.ZipResult, list[Tensor]]:
    """Zip every real crop of a batch of anyres images; project; split per image (crop after crop).

    pixel_values: (B, max_crops, 3, S, S) padded, or the real crops concatenated (sum crops, 3, S, S); ``crops``:
    the real crop count of each image. Returns the :class:`compress.ZipResult` over all crops and B tensors
    (crops_i * K, text hidden).
    """
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, crops)])
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
    zipped = _zip_images(inner, inner.vision_tower, pixel_values, vision_feature_layer)
    projected = inner.multi_modal_projector(zipped.tokens)  # (sum crops, K, text hidden)
    return zipped, [image.flatten(0, 1) for image in torch.split(projected, crops)]


def grid_order(dominant_indices: Tensor, contextual: int, grid: tuple[int, int], side: int, has_cls: bool) -> Tensor:
    """Permutation of one image's zipped crop tokens into the official VisionZip LLaVA-NeXT order.

    The zipped tokens of an image, flattened crop after crop (crop 0 = base, then the grid crops row-major), are
    ``crops * K`` rows, ``K = dominant + contextual``, each crop ``[dominant (positional order), contextual]``. The
    official order is: the base crop's K tokens; the dominant *patch* tokens of all grid crops in raster order of
    the stitched (rows * side) x (columns * side) patch grid; each grid crop's CLS token; all grid crops'
    contextual tokens, crop by crop.
    dominant_indices: (crops, dominant) ascending tower positions (CLS = 0 when ``has_cls``); ``side`` patches per
    crop edge. Returns (crops * K,) int64 indices into the flattened rows.
    """
    crops, dominant = dominant_indices.shape
    rows, cols = grid
    if crops - 1 != rows * cols:
        raise ValueError(f"{crops} crops do not fit a base crop plus a {rows}x{cols} grid")
    kept = dominant + contextual
    first_patch = int(has_cls)  # with CLS, dominant slot 0 of every crop is the CLS token
    device = dominant_indices.device
    crop = torch.arange(1, crops, device=device).unsqueeze(1)  # (G, 1) grid crops, row-major
    patch = dominant_indices[1:, first_patch:] - first_patch  # (G, P) patch index within its crop
    row = ((crop - 1) // cols) * side + patch // side
    col = ((crop - 1) % cols) * side + patch % side
    slots = crop * kept + torch.arange(first_patch, dominant, device=device)  # where those tokens sit now
    dominant_slots = slots.flatten()[(row * (cols * side) + col).flatten().argsort()]
    cls_slots = crop.flatten() * kept if has_cls else crop.new_zeros(0)
    contextual_slots = (crop * kept + torch.arange(dominant, kept, device=device)).flatten()
    base = torch.arange(kept, device=device)
    return torch.cat([base, dominant_slots, cls_slots, contextual_slots])


def _next_image_features(
    self,
    pixel_values: Tensor,
    image_sizes: Tensor,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """VisionZip replacement for ``LlavaNextModel.get_image_features``: every crop zipped to K tokens.

    pixel_values: (B, max_crops, 3, S, S) padded, or the real crops already concatenated (sum crops, 3, S, S);
    image_sizes: (B, 2) original (height, width). Returns ``last_hidden_state`` = (sum crops, K, D_vision) zipped
    crop tokens and ``pooler_output`` = list of B tensors (crops_i * K, text hidden), projected with autograd on, in
    ``config.visionzip["token_order"]`` order ("flat": crop after crop; "grid": see :func:`grid_order`).
    """
    crops = [_crop_count(self.config, size) for size in image_sizes]
    zipped, per_image = _zip_crops(self, pixel_values, crops, vision_feature_layer)
    if self.config.visionzip.get("token_order", "flat") == "grid":
        config, contextual = self.config, self.config.visionzip["contextual"]
        side = config.vision_config.image_size // config.vision_config.patch_size
        has_cls = encoders.tower_has_cls(self.vision_tower)
        positions = torch.split(zipped.dominant_indices, crops)
        per_image = [
            tokens.index_select(0, grid_order(kept, contextual, _grid_shape(config, size), side, has_cls))
            for tokens, kept, size in zip(per_image, positions, image_sizes)
        ]
    return BaseModelOutputWithPooling(last_hidden_state=zipped.tokens, pooler_output=per_image)


def _anyres_stock_tokens(config, image_size: ImageSize | None = None, max_crops: int | None = None) -> int:
    """Stock anyres layout (``pack_image_features``): the base crop, plus the stitched grid unpadded to the image's
    aspect ratio, downscaled to about ``max_crops`` crops' worth when given (OneVision), one newline per row.

    ``image_size=None`` is an untiled image (one crop; OneVision's multi-image samples): base crop + one newline.
    """
    if image_size is None:
        return _llava_stock_tokens(config) + 1
    height, width = image_size
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = _grid_shape(config, (height, width))
    grid_h, grid_w = rows * side, cols * side
    # Unpadding, as in transformers' unpad_image: the padded axis keeps the image's share, rounded the same way.
    if width / height > grid_w / grid_h:
        grid_h -= 2 * ((grid_h - int(round(height * (grid_w / width), 7))) // 2)
    else:
        grid_w -= 2 * ((grid_w - int(round(width * (grid_h / height), 7))) // 2)
    if max_crops is not None:
        ratio = math.sqrt(grid_h * grid_w / (max_crops * side**2))
        if ratio > 1.1:
            grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
    return _llava_stock_tokens(config) + grid_h * grid_w + grid_h


def _anyres_zipped_tokens(config, budget: dict, image_size: ImageSize | None = None) -> int:
    """Every crop zipped to K tokens; ``image_size=None`` is an untiled image (one crop)."""
    crops = 1 if image_size is None else _crop_count(config, image_size)
    return crops * (budget["dominant"] + budget["contextual"])


LLAVA_NEXT = Family(
    name="llava_next",
    model_class="LlavaNextForConditionalGeneration",
    model_type="llava_next",
    image_features=_next_image_features,
    stock_tokens=_anyres_stock_tokens,
    zipped_tokens=_anyres_zipped_tokens,
    token_orders=("flat", "grid"),
    anyres=True,
)


# ----------------------------------------------------------------------------------------------------------------
# Video-LLaVA: images through ``image_tower`` as in LLaVA-1.5, videos through ``video_tower`` frame by frame; one
# projector. VisionZip zips every frame independently with the image budget.


def _video_llava_image_features(
    self,
    pixel_values: Tensor | None = None,
    pixel_values_images: Tensor | None = None,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """VisionZip replacement for ``VideoLlavaModel.get_image_features`` (same parameter names).

    pixel_values (or the deprecated pixel_values_images): (B, 3, H, W). Returns ``last_hidden_state`` = (B, K,
    D_vision) and ``pooler_output`` = (B, K, text hidden), a tensor as the stock method returns.
    """
    pixels = pixel_values if pixel_values is not None else pixel_values_images
    tokens = _zip_images(self, self.image_tower, pixels, vision_feature_layer).tokens
    return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=self.multi_modal_projector(tokens))


def _per_frame_video_features(tower: str) -> Callable[..., BaseModelOutputWithPooling]:
    """A ``get_video_features`` replacement that zips every frame of ``pixel_values_videos`` through the inner
    model's ``tower`` to K tokens (frames are independent images, as the paper does for Video-LLaVA)."""

    def get_video_features(
        self, pixel_values_videos: Tensor, vision_feature_layer: int | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """pixel_values_videos: (B, T, 3, H, W). Returns ``last_hidden_state`` = (B * T, K, D_vision) and
        ``pooler_output`` = (B, T * K, text hidden), frames in time order (no pooling, no newline)."""
        videos = pixel_values_videos.shape[0]
        frames = pixel_values_videos.flatten(0, 1)
        tokens = _zip_images(self, getattr(self, tower), frames, vision_feature_layer).tokens
        projected = self.multi_modal_projector(tokens)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=projected.reshape(videos, -1, projected.shape[-1])
        )

    return get_video_features


def _video_llava_stock_video_tokens(config, frames: int) -> int:
    """Stock Video-LLaVA feeds every tower token of every frame, CLS included, whatever the select strategy."""
    return frames * encoders.tokens_per_tower_output(config.vision_config)


VIDEO_LLAVA = Family(
    name="video_llava",
    model_class="VideoLlavaForConditionalGeneration",
    model_type="video_llava",
    image_features=_video_llava_image_features,
    stock_tokens=_llava_stock_tokens,
    zipped_tokens=_llava_zipped_tokens,
    tower="image_tower",
    video_features=_per_frame_video_features("video_tower"),
    video_tower="video_tower",
    stock_video_tokens=_video_llava_stock_video_tokens,
)


# ----------------------------------------------------------------------------------------------------------------
# LLaVA-OneVision: a SigLIP tower (no CLS: scores are the attention each token receives, computed in bounded
# chunks), anyres crops for an image alone in its sample, one untiled crop per image of a multi-image sample,
# frames for video. VisionZip zips each crop / frame to K tokens, replacing the stock unpad + bilinear downscale +
# newlines of images and the 2x2 pooling + trailing newline of videos (there is no official OneVision recipe: the
# per-crop / per-frame mapping mirrors LLaVA-NeXT and Video-LLaVA).


def _onevision_image_features(
    self,
    pixel_values: Tensor,
    image_sizes: Tensor,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    vision_aspect_ratio: str | None = None,
    batch_num_images: Tensor | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """VisionZip replacement for ``LlavaOnevisionModel.get_image_features``: every crop zipped to K tokens.

    As in the stock method, the images of a sample holding several (``batch_num_images``) keep only their base
    crop. Returns ``last_hidden_state`` = (sum crops, K, D_vision) and ``pooler_output`` = list of B tensors
    (crops_i * K, text hidden), crop after crop.
    """
    if batch_num_images is None:
        tiled = [True] * len(image_sizes)
    else:
        tiled = [n == 1 for n in batch_num_images for _ in range(n)]
    crops = [_crop_count(self.config, size) if tile else 1 for size, tile in zip(image_sizes, tiled)]
    zipped, per_image = _zip_crops(self, pixel_values, crops, vision_feature_layer)
    return BaseModelOutputWithPooling(last_hidden_state=zipped.tokens, pooler_output=per_image)


def _onevision_stock_tokens(config, image_size: ImageSize | None = None) -> int:
    return _anyres_stock_tokens(config, image_size, int(config.vision_aspect_ratio.removeprefix("anyres_max_")))


def _onevision_stock_video_tokens(config, frames: int) -> int:
    """Stock OneVision video: each frame's patch grid bilinearly pooled 2x2 (ceil), one newline after the video."""
    pooled = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
    return frames * pooled * pooled + 1


LLAVA_ONEVISION = Family(
    name="llava_onevision",
    model_class="LlavaOnevisionForConditionalGeneration",
    model_type="llava_onevision",
    image_features=_onevision_image_features,
    stock_tokens=_onevision_stock_tokens,
    zipped_tokens=_anyres_zipped_tokens,
    video_features=_per_frame_video_features("vision_tower"),
    stock_video_tokens=_onevision_stock_video_tokens,
    anyres=True,
    tiles_every_image=False,
)

FAMILIES: dict[str, Family] = {
    family.name: family for family in (LLAVA, LLAVA_NEXT, VIDEO_LLAVA, LLAVA_ONEVISION)
}


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
    (height, width), for families whose count depends on it; LLaVA-1.5 ignores it. For anyres families
    (LLaVA-NeXT, OneVision) ``None`` means one untiled crop, which is also the per-crop budget when zipped. The
    processor, the data path and the model all use this one function, so their counts cannot drift apart.
    """
    family = _family_of_config(config)
    budget = getattr(config, "visionzip", None)
    if budget:
        return family.zipped_tokens(config, budget, image_size)
    return family.stock_tokens(config, image_size)


def sample_image_tokens(config, image_sizes: list[ImageSize]) -> list[int]:
    """Placeholder tokens of each image of one sample, from the (height, width) its image processor saw.

    :func:`tokens_per_image` per image, except that a family which feeds the images of a multi-image sample untiled
    (OneVision) counts each of them as one untiled crop, as its image processor and ``get_image_features`` do.
    """
    tiled = _family_of_config(config).tiles_every_image or len(image_sizes) == 1
    return [tokens_per_image(config, size if tiled else None) for size in image_sizes]


def has_video_input(config) -> bool:
    """Whether the family takes videos (``pixel_values_videos``)."""
    return _family_of_config(config).video_features is not None


def blank_image_inputs(config) -> dict[str, Tensor]:
    """Image inputs of one all-zero image of the tower's input size, laid out as the family's image processor lays
    out a real one (anyres: every crop of that image, and its ``image_sizes``). fp32, on the CPU."""
    size = config.vision_config.image_size
    if not _family_of_config(config).anyres:
        return {"pixel_values": torch.zeros(1, 3, size, size)}
    crops = _crop_count(config, (size, size))
    return {"pixel_values": torch.zeros(1, crops, 3, size, size), "image_sizes": torch.tensor([[size, size]])}


def tokens_per_video(config, num_frames: int) -> int:
    """Number of video placeholder tokens the LLM receives for a video of ``num_frames`` frames under ``config``:
    frames x (dominant + contextual) when ``config.visionzip`` is set, else the stock count. Families without a
    video path raise ``ValueError``.
    """
    family = _family_of_config(config)
    if family.stock_video_tokens is None:
        raise ValueError(
            f"{family.model_class} has no video input; families with one: "
            f"{', '.join(f.name for f in FAMILIES.values() if f.stock_video_tokens)}"
        )
    budget = getattr(config, "visionzip", None)
    if budget:
        return num_frames * (budget["dominant"] + budget["contextual"])
    return family.stock_video_tokens(config, num_frames)


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
    token_order: str | None = None,
) -> nn.Module:
    """Feed the LLM ``dominant + contextual`` VisionZip tokens per image instead of every patch. In place.

    Arguments left as ``None`` come from the budget recorded on ``model.config.visionzip`` (so a model saved after
    zipping is re-zipped by ``apply_visionzip(model)`` alone); applying again changes the budget. ``eager=True``
    runs the tower with eager attention for bit-exact reproduction (default: the configured SDPA). With
    ``processor``, its ``<image>`` expands to the same count. ``token_order`` picks how a family that zips several
    crops per image lays them out (LLaVA-NeXT: ``"flat"``, the default, or ``"grid"``, the official order); it is
    recorded as ``config.visionzip["token_order"]`` for such families only. Returns ``model``.
    """
    family, inner = _inner(model)
    recorded = getattr(inner.config, "visionzip", None) or {}
    dominant = recorded.get("dominant") if dominant is None else dominant
    contextual = recorded.get("contextual") if contextual is None else contextual
    eager = bool(recorded.get("eager", False)) if eager is None else eager
    token_order = recorded.get("token_order", family.token_orders[0]) if token_order is None else token_order
    if token_order not in family.token_orders:
        raise ValueError(
            f"token_order={token_order!r} is not available for {family.model_class}; choose one of "
            f"{', '.join(family.token_orders)}"
        )
    if dominant is None or contextual is None:
        raise ValueError(
            "apply_visionzip needs a budget: pass dominant and contextual (e.g. 54 and 10 for 64 tokens), or use a "
            "model whose config records one (config.visionzip)"
        )
    for name in (family.tower, family.video_tower):
        if name is not None:
            tower = getattr(inner, name)
            encoders.tower_has_cls(tower)
            encoders.resolve_layer(len(tower.encoder.layers), inner.config.vision_feature_layer)
    compress.validate_budget(dominant, contextual, encoders.tokens_per_tower_output(inner.config.vision_config))
    budget = {"dominant": dominant, "contextual": contextual, "eager": bool(eager)}
    if len(family.token_orders) > 1:
        budget["token_order"] = token_order
    inner.config.visionzip = budget
    inner.get_image_features = types.MethodType(family.image_features, inner)
    if family.video_features is not None:
        inner.get_video_features = types.MethodType(family.video_features, inner)
    if processor is not None:
        video_count = functools.partial(tokens_per_video, inner.config) if family.video_features else None
        processing.patch_processor(processor, functools.partial(tokens_per_image, inner.config), video_count)
    return model


def remove_visionzip(model: nn.Module, processor=None) -> nn.Module:
    """Undo :func:`apply_visionzip`: stock features, stock token counts, no budget on the config. In place."""
    _, inner = _inner(model)
    inner.__dict__.pop("get_image_features", None)
    inner.__dict__.pop("get_video_features", None)
    if hasattr(inner.config, "visionzip"):
        del inner.config.visionzip
    if processor is not None:
        processing.unpatch_processor(processor)
    return model
