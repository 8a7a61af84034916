"""Per-family knowledge of VLMs, behind one registry: where the tower, projector and LLM live, how many ``<image>``
/ ``<video>`` tokens an image or video becomes, and VisionZip's instance-level overrides of the inner model's
feature methods.

One module per family (``llava``, ``llava_next``, ``video_llava``, ``llava_onevision``, ``mini_gemini``), each defining a
:class:`~visionzip_tune.families.base.Family` named ``FAMILY``; adding a family means one new module and one line
in :data:`FAMILIES`. VisionZip runs on every unit the tower sees independently: an image, an anyres crop, a video
frame. The overrides are bound with ``types.MethodType`` to the *inner* model instance (``model.model``): both
``forward()`` and ``generate()`` call them there, and the class and every other instance stay stock. The budget
lives in ``model.config.visionzip`` (serialised with ``save_pretrained``), which is the single source the
overrides, the token-count functions and the processor read from.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from visionzip_tune import compress, encoders, processing
from visionzip_tune.families import llava, llava_next, llava_onevision, mini_gemini, video_llava
from visionzip_tune.families.base import RECORDER, Family, ImageSize, ZippedUnits, tiled_flags

# mini_gemini's import registers its native model with transformers' Auto classes (on import of visionzip_tune).
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (llava.FAMILY, llava_next.FAMILY, video_llava.FAMILY, llava_onevision.FAMILY, mini_gemini.FAMILY)
}

IMAGE_INPUTS = ("pixel_values", "image_sizes", "batch_num_images")  # what the image processors emit, by family
VIDEO_INPUT = "pixel_values_videos"


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES.values())


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The plain HF model inside a peft wrapper (any object with ``get_base_model``); others pass through."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model_or_config) -> Family:
    """The :class:`Family` of a model (plain or peft-wrapped) or of its config; unsupported -> ``ValueError``."""
    if isinstance(model_or_config, nn.Module):
        name = type(unwrap_peft(model_or_config)).__name__
        for family in FAMILIES.values():
            if name == family.model_class:
                return family
        raise ValueError(f"unsupported model class {name}; supported families: {_supported()}")
    model_type = getattr(model_or_config, "model_type", None)
    for family in FAMILIES.values():
        if model_type == family.model_type:
            return family
    raise ValueError(
        f"unsupported model type {model_type!r} ({type(model_or_config).__name__}); supported families: {_supported()}"
    )


def family_name(model_or_config) -> str:
    """Family of a model (plain or peft-wrapped) or of its config, e.g. ``"llava"``; unsupported -> ValueError."""
    return family_of(model_or_config).name


# ----------------------------------------------------------------------------------------------------------------
# Token counts: the one set of functions the processor, the data path and the model share


def tokens_per_image(config, image_size: ImageSize | None = None) -> int:
    """Number of ``<image>`` placeholder tokens the LLM receives for one image under ``config``.

    The VisionZip budget when ``config.visionzip`` is set, else the stock count. ``image_size`` is the original
    (height, width), for families whose count depends on it; LLaVA-1.5 ignores it. For anyres families
    (LLaVA-NeXT, OneVision) ``None`` means one untiled crop, which is also the per-crop budget when zipped. The
    processor, the data path and the model all use this one function, so their counts cannot drift apart.
    """
    family = family_of(config)
    budget = getattr(config, "visionzip", None)
    if budget:
        return family.zipped_tokens(config, budget, image_size)
    return family.stock_tokens(config, image_size)


def tokens_per_unit(config) -> int | None:
    """K, the tokens each zipped unit (an image, an anyres crop, a video frame) becomes; None without VisionZip."""
    budget = getattr(config, "visionzip", None)
    return budget["dominant"] + budget["contextual"] if budget else None


def sample_image_tokens(config, image_sizes: list[ImageSize]) -> list[int]:
    """Placeholder tokens of each image of one sample, from the (height, width) its image processor saw
    (a family that feeds the images of a multi-image sample untiled counts each of them as one crop)."""
    tiled = tiled_flags(family_of(config), [len(image_sizes)], len(image_sizes))
    return [tokens_per_image(config, size if tile else None) for size, tile in zip(image_sizes, tiled)]


def tokens_per_video(config, num_frames: int) -> int:
    """Number of video placeholder tokens the LLM receives for a video of ``num_frames`` frames under ``config``:
    frames x (dominant + contextual) when ``config.visionzip`` is set, else the stock count. Families without a
    video path raise ``ValueError``.
    """
    family = family_of(config)
    if not family.has_video:
        raise ValueError(
            f"{family.model_class} has no video input; families with one: "
            f"{', '.join(f.name for f in FAMILIES.values() if f.has_video)}"
        )
    budget = getattr(config, "visionzip", None)
    if budget:
        return num_frames * tokens_per_unit(config)
    return family.stock_video_tokens(config, num_frames)


def has_video_input(config) -> bool:
    """Whether the family takes videos (``pixel_values_videos``)."""
    return family_of(config).has_video


def processor_counts(config) -> tuple[Callable[[dict, int], int], Callable[[dict, int], int] | None]:
    """``(image_count, video_count)`` for :func:`processing.patch_processor`: the placeholder count of image
    ``i`` (or video ``i``) of a processor call, from what the image processor returned for the whole call."""
    family = family_of(config)

    def image_count(image_inputs: dict, index: int) -> int:
        sizes = image_inputs.get("image_sizes")
        if sizes is None:
            return tokens_per_image(config)
        tiled = tiled_flags(family, image_inputs.get("batch_num_images"), len(sizes))[index]
        return tokens_per_image(config, tuple(int(v) for v in sizes[index]) if tiled else None)

    def video_count(video_inputs: dict, index: int) -> int:
        return tokens_per_video(config, len(video_inputs[VIDEO_INPUT][index]))  # (T, 3, H, W) frames

    return image_count, (video_count if family.has_video else None)


def blank_image_inputs(config) -> dict[str, Tensor]:
    """Image inputs of one all-zero image of the family's input size (``Family.image_side``), laid out as the
    family's image processor lays out a real one (anyres: every crop of that image, and its ``image_sizes``). fp32,
    on the CPU."""
    family = family_of(config)
    size = family.image_side(config)
    if not family.anyres:
        return {"pixel_values": torch.zeros(1, 3, size, size)}
    crops = llava_next.crop_count(config, (size, size))
    return {"pixel_values": torch.zeros(1, crops, 3, size, size), "image_sizes": torch.tensor([[size, size]])}


def blank_video_inputs(config) -> dict[str, Tensor]:
    """Video inputs of one video of one all-zero frame of the tower's input size. fp32, on the CPU."""
    size = config.vision_config.image_size
    return {VIDEO_INPUT: torch.zeros(1, 1, 3, size, size)}


# ----------------------------------------------------------------------------------------------------------------
# Parts of a model


def _inner(model: nn.Module) -> tuple[Family, nn.Module]:
    model = unwrap_peft(model)
    return family_of(model), model.model


def projector_modules(model: nn.Module, subset: str = "all") -> dict[str, nn.Module]:
    """The modules projector mode trains (all of them, or the family's named ``subset``), by attribute path on the
    inner model (``multi_modal_projector``)."""
    family, inner = _inner(model)
    return {path: inner.get_submodule(path) for path in family.projector_paths(subset)}


def projector_parameters(model: nn.Module, subset: str = "all") -> dict[str, nn.Parameter]:
    """Every projector parameter (of ``subset``) by its name relative to the inner model
    (``multi_modal_projector.linear_1.weight``: the name HF checkpoints and ``projector.safetensors`` use)."""
    return {
        f"{path}.{name}": param
        for path, module in projector_modules(model, subset).items()
        for name, param in module.named_parameters()
    }


def vision_tower(model: nn.Module) -> nn.Module:
    """The image encoder (``model.model.vision_tower`` for LLaVA, ``image_tower`` for Video-LLaVA)."""
    family, inner = _inner(model)
    return getattr(inner, family.towers[0])


def vision_towers(model: nn.Module) -> list[nn.Module]:
    """Every vision tower, the image tower first (Video-LLaVA: ``image_tower``, then ``video_tower``)."""
    family, inner = _inner(model)
    return [getattr(inner, name) for name in family.towers]


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model.language_model``); the LM head is ``model.lm_head``."""
    family, inner = _inner(model)
    return getattr(inner, family.language_model)


def frozen_parts(model: nn.Module) -> dict[str, nn.Module]:
    """What the base-weights fingerprint covers: the towers (the image tower as ``vision_tower``, any other under
    its own name), the language model and the LM head, in a fixed order (fingerprints must not change when a
    family gains parts it does not have)."""
    family, inner = _inner(model)
    parts = {"vision_tower": getattr(inner, family.towers[0]), "language_model": language_model(model)}
    parts.update((name, getattr(inner, name)) for name in family.towers[1:])
    head = unwrap_peft(model).get_output_embeddings()
    if head is not None:
        parts["lm_head"] = head
    return parts


# ----------------------------------------------------------------------------------------------------------------
# VisionZip on and off


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
    inner.config.visionzip = resolve_budget(inner.config, dominant, contextual, eager=eager, token_order=token_order)
    for method, override in family.overrides.items():
        setattr(inner, method, types.MethodType(override, inner))
    if processor is not None:
        processing.patch_processor(processor, *processor_counts(inner.config))
    return model


def resolve_budget(
    config,
    dominant: int | None = None,
    contextual: int | None = None,
    *,
    eager: bool | None = None,
    token_order: str | None = None,
) -> dict:
    """The budget ``config.visionzip`` holds under :func:`apply_visionzip` with these arguments (``None``: the
    recorded one), checked against the model's tower from its config alone (``ValueError`` naming the numbers), so a
    recipe's budget can be checked before any weight is loaded."""
    family = family_of(config)
    recorded = getattr(config, "visionzip", None) or {}
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
    encoders.resolve_layer(config.vision_config.num_hidden_layers, config.vision_feature_layer)
    compress.validate_budget(dominant, contextual, encoders.tokens_per_tower_output(config.vision_config))
    budget = {"dominant": dominant, "contextual": contextual, "eager": bool(eager)}
    if len(family.token_orders) > 1:
        budget["token_order"] = token_order
    return budget


def remove_visionzip(model: nn.Module, processor=None) -> nn.Module:
    """Undo :func:`apply_visionzip`: stock features, stock token counts, no budget on the config. In place."""
    family, inner = _inner(model)
    for method in family.overrides:
        inner.__dict__.pop(method, None)
    if hasattr(inner.config, "visionzip"):
        del inner.config.visionzip
    if processor is not None:
        processing.unpatch_processor(processor)
    return model


@contextlib.contextmanager
def recorded_zips(model: nn.Module) -> Iterator[list[ZippedUnits]]:
    """Within the block, every zip the model's VisionZip overrides compute (one per call on a batch of images,
    crops or frames) is appended to the yielded list, in call order, with the pixel units the tower saw: what
    ``show`` draws and ``bench-infer`` counts, read from the model's own code path."""
    _, inner = _inner(model)
    recorded: list[ZippedUnits] = []
    inner.__dict__[RECORDER] = recorded
    try:
        yield recorded
    finally:
        inner.__dict__.pop(RECORDER, None)
