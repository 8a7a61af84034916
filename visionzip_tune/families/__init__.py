"""Per-family knowledge of VLMs, behind one registry: where the tower, projector and LLM live, how many ``<image>``
/ ``<video>`` tokens an image or video becomes, and VisionZip's instance-level overrides of the inner model's
feature methods.

One module per family (``llava``, ``llava_next``, ``video_llava``, ``llava_onevision``, ``qwen/qwen2_5_vl``,
``qwen/qwen3_vl``, ``mini_gemini``), each defining a subclass of :class:`~visionzip_tune.families.base.Family` and its
instance ``FAMILY``; adding a family means one new module and one line in :data:`FAMILIES`. VisionZip runs on every unit
the tower sees independently: an image, an anyres crop, a video frame (Qwen: a temporal slice, in merged tokens). The
overrides are bound with ``types.MethodType`` to the *inner* model instance (``model.model``): both ``forward()`` and
``generate()`` call them there, and the class and every other instance stay stock. The budget lives in
``model.config.visionzip`` (serialised with ``save_pretrained``), which is the single source the overrides, the
token-count functions and the processor read from.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.families import llava, llava_next, llava_onevision, mini_gemini, video_llava
from visionzip_tune.families.base import (
    COMPRESSED,
    IMAGE,
    RECORDER,
    SIZES,
    VIDEO,
    Budget,
    Family,
    MediaSize,
    VideoLayout,
    ZippedUnits,
    cached_key,
)
from visionzip_tune.families.processor import patch_processor, unpatch_processor
from visionzip_tune.families.qwen import qwen2_5_vl, qwen3_vl

# mini_gemini's import registers its native model with transformers' Auto classes (on import of visionzip_tune).
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        llava.FAMILY,
        llava_next.FAMILY,
        video_llava.FAMILY,
        llava_onevision.FAMILY,
        qwen2_5_vl.FAMILY,
        qwen3_vl.FAMILY,
        mini_gemini.FAMILY,
    )
}


# Every kind of budget a family takes (VisionZip in tokens per unit or in ratios of each unit's tokens; another
# compressor), in registry order.
BUDGETS: tuple[Budget, ...] = (*dict.fromkeys(family.budget for family in FAMILIES.values()), COMPRESSED)


def budget_kind(budget: dict) -> Budget:
    """The kind of a budget given as apply_visionzip keywords (``{"dominant": 54, "contextual": 10}``: VisionZip in
    tokens per unit; ``{"method": "divprune", "tokens": 64}``: another compressor); ``ValueError`` for none."""
    for kind in (COMPRESSED, *BUDGETS):
        if kind.owns(budget):
            return kind
    raise ValueError(f"{budget} is not a budget: give {' or '.join(', '.join(k.keys) for k in BUDGETS)}")


def budget_label(budget: dict) -> str:
    """``54+10`` for a budget in tokens, ``0.45+0.05`` for one in ratios of each image's tokens."""
    return budget_kind(budget).label(budget)


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


def tokens_per_image(config, image_size: MediaSize = None) -> int:
    """Number of image placeholder tokens the LLM receives for one image under ``config``.

    The VisionZip budget when ``config.visionzip`` is set, else the stock count. ``image_size`` is what the family's
    count depends on: the original (height, width) for anyres families (LLaVA-NeXT, OneVision; ``None`` means one
    untiled crop, which is also the per-crop budget when zipped), the processor's patch grid (t, h, w) for Qwen;
    LLaVA-1.5 ignores it. The processor, the data path and the model all use this one function, so their counts
    cannot drift apart.
    """
    return family_of(config).image_tokens(config, image_size)


def tokens_per_unit(config) -> int | None:
    """K, the tokens each zipped unit (an image, an anyres crop, a video frame) becomes; None without VisionZip or
    with a budget in ratios (Qwen: K follows each unit's size)."""
    budget = getattr(config, "visionzip", None)
    return family_of(config).budget_of(budget).unit_tokens(budget) if budget else None


def sample_image_tokens(config, image_sizes: list[MediaSize]) -> list[int]:
    """Placeholder tokens of each image of one sample, from the sizes its image processor reported (see
    ``MediaTransform.images``; a family that feeds the images of a multi-image sample untiled counts each of them
    as one crop)."""
    tiled = family_of(config).tiled_flags([len(image_sizes)], len(image_sizes))
    return [tokens_per_image(config, size if tile else None) for size, tile in zip(image_sizes, tiled)]


def video_family(config) -> Family:
    """The family of ``config``; ``ValueError`` naming the families with a video input if it has none."""
    family = family_of(config)
    if not family.has_video:
        raise ValueError(
            f"{family.model_class} has no video input; families with one: "
            f"{', '.join(f.name for f in FAMILIES.values() if f.has_video)}"
        )
    return family


def tokens_per_video(config, num_frames: MediaSize) -> int:
    """Number of video placeholder tokens the LLM receives for a video under ``config``: per frame (Qwen: per
    temporal slice) the zipped unit's tokens when ``config.visionzip`` is set, else the stock count. The video's
    size is its frame count (Qwen: the processor's patch grid (t, h, w)). Families without a video path raise
    ``ValueError``.
    """
    return video_family(config).video_tokens(config, num_frames)


def video_layout(config, video: MediaSize, times: list[float]) -> VideoLayout:
    """What a video becomes in the text: runs of placeholders (ints) between texts (strs), from its size and its
    frames' times in seconds; one run of :func:`tokens_per_video` tokens except for Qwen3-VL (a run per frame,
    after its timestamp)."""
    return video_family(config).video_layout(config, video, times)


def video_timing(config, video: MediaSize, times: list[float]) -> dict[str, Tensor]:
    """Inputs the model takes about a video besides its pixels (Qwen2.5-VL: ``second_per_grid_ts``); {} if none."""
    return video_family(config).video_timing(config, video, times)


def has_video_input(config) -> bool:
    """Whether the family takes videos (``pixel_values_videos``)."""
    return family_of(config).has_video


def processor_counts(config) -> tuple[Callable[[dict, int], int], Callable[[dict, int], int] | None]:
    """``(image_count, video_count)`` for :func:`~visionzip_tune.families.processor.patch_processor`: the placeholder
    count of image ``i`` (or video ``i``) of a processor call, from what the image (video) processor returned for the
    whole call."""
    family = family_of(config)

    def image_count(image_inputs: dict, index: int) -> int:
        return tokens_per_image(config, family.image_size(image_inputs, index))

    def video_count(video_inputs: dict, index: int) -> int:
        return tokens_per_video(config, family.video_size(video_inputs, index))

    return image_count, (video_count if family.has_video else None)


def media_inputs(config) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Batch keys of ``(image features, video features, positions)``: what ``get_image_features`` and
    ``get_video_features`` take, and the vision inputs the model's forward needs next to the features."""
    family = family_of(config)
    return family.image_inputs, family.video_inputs, family.position_inputs


def media_count(config, batch: dict) -> tuple[int, int]:
    """``(images, videos)`` in a collated batch (of pixels, or of rows read from a feature cache)."""
    counts = []
    for modality, key in zip((IMAGE, VIDEO), family_of(config).media_rows):
        key = key if key in batch else cached_key(modality, SIZES)
        counts.append(len(batch[key]) if key in batch else 0)
    return tuple(counts)


def id_inputs(config, input_ids: Tensor) -> dict[str, Tensor]:
    """Inputs the model needs that follow from the token ids alone (Qwen: ``mm_token_type_ids``); {} if none."""
    return family_of(config).id_inputs(config, input_ids)


def blank_image_inputs(config) -> dict[str, Tensor]:
    """Image inputs of one all-zero image, laid out as the family's image processor lays out a real one (anyres:
    every crop of a tower-sized image, and its ``image_sizes``; Qwen: 2 x 2 merged tokens and their grid). fp32,
    on the CPU."""
    return family_of(config).blank_image(config)


def blank_video_inputs(config) -> dict[str, Tensor]:
    """Video inputs of one video of one all-zero frame (Qwen: one temporal patch). fp32, on the CPU."""
    return family_of(config).blank_video(config)


# ----------------------------------------------------------------------------------------------------------------
# The frozen part of the features path: what a feature cache holds (``visionzip_tune.feature_cache``)


def frozen_features(model: nn.Module, modality: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The frozen part of the zipped model's ``get_{modality}_features`` ("image" or "video") on a batch's
    ``inputs`` (its features keys: ``media_inputs``): the tower and the compression, everything before the first
    module projector mode trains, without autograd (:meth:`Family.frozen_features`). Feed it to
    :func:`features_from_frozen` of any model with the same tower and budget -- a training-free and a tuned
    projector share one tower pass so. Collective under ZeRO-3."""
    family, inner = _inner(model)
    with torch.no_grad():
        return family.frozen_features(inner, modality, inputs)


def features_from_frozen(
    model: nn.Module, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
) -> BaseModelOutputWithPooling:
    """What ``get_{modality}_features`` returns, from the frozen part of its batch (:func:`frozen_features`, or a
    feature cache's rows) and the batch's inputs besides pixels (``image_sizes``, grids)."""
    family, inner = _inner(model)
    return family.features_from_frozen(inner, modality, frozen, inputs)


def split_frozen(config, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]) -> list[dict]:
    """The frozen part of a batch cut per image (video), in batch order: what a feature cache stores per item."""
    return family_of(config).split_frozen(config, modality, frozen, inputs)


def cache_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules the frozen part is a function of: the towers (Mini-Gemini: and its mining projections)."""
    family, inner = _inner(model)
    return family.cache_modules(inner)


# ----------------------------------------------------------------------------------------------------------------
# Parts of a model


def _inner(model: nn.Module) -> tuple[Family, nn.Module]:
    model = unwrap_peft(model)
    return family_of(model), model.model


def projector_modules(model: nn.Module, subset: str = "all") -> dict[str, nn.Module]:
    """The modules projector mode trains, by attribute path on the inner model (``multi_modal_projector``; Qwen:
    ``visual.merger`` and, Qwen3-VL, ``visual.deepstack_merger_list``). ``subset`` names a part of the family's
    projector (``train.projector_modules``); ``ValueError`` listing the family's choices for an unknown one."""
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


def vision_towers(model: nn.Module) -> dict[str, nn.Module]:
    """Every vision tower by its attribute name, the image tower first (Video-LLaVA: ``image_tower``, then
    ``video_tower``)."""
    family, inner = _inner(model)
    return {name: getattr(inner, name) for name in family.towers}


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
    model: nn.Module, dominant: int | None = None, contextual: int | None = None, processor=None, **budget
):
    """Feed the LLM VisionZip's tokens per image instead of every patch (or another compressor's, ``method=``: see
    :func:`apply_compression`). In place; returns ``model``.

    The budget is the family's (``Family.budget``). LLaVA families: ``dominant + contextual`` tokens per image,
    crop or frame, ``eager=True`` for a bit-exact eager-attention tower, and ``token_order`` where the family has a
    choice (LLaVA-NeXT: ``"flat"``, the default, or ``"grid"``, the official order). Qwen families: ratios of each
    image's (temporal slice's) merged tokens, ``dominant_ratio`` and ``contextual_ratio`` (default 0.45 + 0.05 =
    50%), and ``merge_space`` ("post": merge after the merger, the default; "pre": on its inputs).

    Arguments left out come from the budget recorded on ``model.config.visionzip`` (so a model saved after zipping
    is re-zipped by ``apply_visionzip(model)`` alone); applying again changes the budget. With ``processor``, its
    placeholders expand to the same counts. ``ValueError`` for a budget the family cannot take.
    """
    family, inner = _inner(model)
    inner.config.visionzip = resolve_budget(inner.config, dominant, contextual, **budget)
    for method, override in family.overrides.items():
        setattr(inner, method, types.MethodType(override, inner))
    if processor is not None:
        patch_processor(processor, *processor_counts(inner.config))
    return model


def apply_compression(model: nn.Module, method: str, processor=None, **params):
    """Feed the LLM the rows of the compressor ``method`` (``visionzip``, ``random``, ``pool``, ``divprune``,
    ``vispruner``, ``prumerge_plus``: ``visionzip_tune.algorithm.compressors``) instead of every patch, per image,
    crop, frame or view: ``tokens=K`` rows per unit and the compressor's own parameters (VisionZip: ``dominant`` and
    ``contextual``, or Qwen's ratios), plus the family's knobs (``eager``, ``token_order``; Qwen: ``merge_space``).
    In place; returns ``model``. ``ValueError`` for a compressor the family's tower cannot feed (the CLS-attention
    ones on towers without CLS) or a budget it cannot take."""
    return apply_visionzip(model, processor=processor, method=method, **params)


def resolve_budget(config, dominant: int | None = None, contextual: int | None = None, **budget) -> dict:
    """The budget ``config.visionzip`` holds under :func:`apply_visionzip` with these arguments (``None``: as
    recorded on ``config``, for the same compressor), checked from the model's config alone (``ValueError`` naming
    what is wrong), so a recipe's or an export's budget can be checked before any weight is loaded.

    The compressor is ``method`` when given; else VisionZip when VisionZip's own keys are given; else the one
    recorded."""
    family = family_of(config)
    recorded = getattr(config, "visionzip", None) or {}
    given = {k: v for k, v in {"dominant": dominant, "contextual": contextual, **budget}.items() if v is not None}
    recorded_method = recorded.get("method", "visionzip")
    visionzip_keys = set(family.budget.keys) - set(family.knob_keys)
    method = given.pop("method", "visionzip" if set(given) & visionzip_keys else recorded_method)
    base = recorded if method == recorded_method else {}
    if method == "visionzip":
        return family.budget.resolve(family, config, base, given)
    return COMPRESSED.resolve(family, config, base, {"method": method, **given})


def remove_visionzip(model: nn.Module, processor=None) -> nn.Module:
    """Undo :func:`apply_visionzip`: stock features, stock token counts, no budget on the config. In place."""
    family, inner = _inner(model)
    for attribute in (*family.overrides, *family.instance_state):
        inner.__dict__.pop(attribute, None)
    if hasattr(inner.config, "visionzip"):
        del inner.config.visionzip
    if processor is not None:
        unpatch_processor(processor)
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
