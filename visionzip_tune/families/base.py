"""What every family module builds on: the :class:`Family` record and the zipping steps families share.

A family module (``llava.py``, ``llava_next.py``, ...) describes one transformers VLM class: where its tower,
projector and LLM live on the inner model (``model.model``), how many placeholder tokens an image or video becomes
with and without VisionZip, and the instance-level replacements of the inner model's feature methods that feed the
LLM the zipped tokens. ``families/__init__.py`` keeps the registry and the functions the rest of the package calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune import compress, encoders

ImageSize = tuple[int, int]  # (height, width) of an image as its image processor saw it
# What a family's token count of one image (video) is a function of: LLaVA families an image's (height, width) (or
# None for one untiled crop) and a video's frame count; Qwen families the processor's patch grid (t, h, w).
MediaSize = tuple[int, ...] | int | None
# A video's placeholder text in a prompt: runs of placeholder tokens (ints, their counts) between texts (str).
VideoLayout = list[str | int]

# The LLaVA projector's parameter names in the original LLaVA code (``mm_projector.bin``), by their HF name prefix
# (relative to the inner model): linear_1 and linear_2 are entries 0 and 2 of LLaVA's Sequential(Linear, GELU, Linear).
LLAVA_PROJECTOR_NAMES = {
    "multi_modal_projector.linear_1.": "model.mm_projector.0.",
    "multi_modal_projector.linear_2.": "model.mm_projector.2.",
}


def tower_image_side(config) -> int:
    """The side of the square images (or crops, or frames) in ``pixel_values``: the tower's input size."""
    return config.vision_config.image_size


@dataclass(frozen=True)
class Budget:
    """How a family's VisionZip budget is given to ``apply_visionzip``, kept in ``config.visionzip`` and recorded in
    an export's ``visionzip.json``.

    ``keys``: the keyword arguments of ``apply_visionzip`` (re-applied from an export's record; the first is None
    there for an export without VisionZip). ``resolve(family, config, recorded, given)``: the new
    ``config.visionzip`` from the recorded one and the keywords given (None left out), ``ValueError`` naming what
    is wrong. ``record(family, config, image_processor)``: the export's entries on the budget and on what the token
    counts depend on (None values without a budget). ``check(record, image_processor)``: problems loading that
    record for inputs made by ``image_processor`` (None: not known)."""

    keys: tuple[str, ...]
    resolve: Callable[[Family, object, dict, dict], dict]
    record: Callable[[Family, object, object], dict]
    check: Callable[[dict, object], list[str]] = lambda record, image_processor: []
    optional: tuple[str, ...] = ()  # keys an export may lack: apply_visionzip then keeps its default
    # Whether the token counts depend on the image processor's settings, which the record then holds (Qwen).
    uses_image_processor: bool = False


@dataclass(frozen=True)
class Family:
    """How VisionZip plugs into one VLM family. Module paths are attributes of the inner model (``model.model``)."""

    name: str
    model_class: str  # outer class, e.g. LlavaForConditionalGeneration
    model_type: str  # config.model_type
    # Method name on the inner model -> its VisionZip replacement, bound to the instance by apply_visionzip
    # (get_image_features; get_video_features for families with a video path; get_rope_index for Qwen positions).
    overrides: dict[str, Callable[..., object]]
    stock_tokens: Callable[[object, MediaSize], int]  # placeholder tokens per image without VisionZip
    zipped_tokens: Callable[[object, dict, MediaSize], int]  # ... with the budget dict of config.visionzip
    budget: Budget = field(default_factory=lambda: COUNT_BUDGET)
    towers: tuple[str, ...] = ("vision_tower",)  # every vision tower; the first one encodes images
    projector: tuple[str, ...] = ("multi_modal_projector",)  # the modules projector mode trains
    # Named subsets of the projector that projector mode may train instead (config key train.projector_modules);
    # "all" always means every module of ``projector``.
    projector_subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    language_model: str = "language_model"
    # Projector parameter names in the family's original (non-HF) code, by HF name prefix relative to the inner
    # model (``multi_modal_projector.linear_1.``): what ``mm_projector.bin`` is written with. None: the export has no
    # such file for this family.
    original_projector_names: dict[str, str] | None = field(default_factory=lambda: dict(LLAVA_PROJECTOR_NAMES))
    # Whether the export also writes those names as a safetensors checkpoint with its index: the original loader
    # of Mini-Gemini reads its mining modules through ``model.safetensors.index.json``, not ``mm_projector.bin``.
    original_projector_index: bool = False
    # Orders the zipped tokens of one image can be fed in; the first is the default. Only a family with a choice
    # records "token_order" in config.visionzip.
    token_orders: tuple[str, ...] = ("flat",)
    # Families with a video path: the stock placeholder tokens of a video (of its MediaSize), and zipped.
    stock_video_tokens: Callable[[object, MediaSize], int] | None = None
    zipped_video_tokens: Callable[[object, dict, MediaSize], int] = lambda config, budget, frames: (
        frames * (budget["dominant"] + budget["contextual"])
    )
    # A video's placeholder text from its size and frame times (seconds); None: one run of all its tokens.
    video_layout: Callable[[object, MediaSize, list[float]], VideoLayout] | None = None
    # Inputs the model takes about a video besides its pixels, from its size and frame times (Qwen2.5-VL: seconds
    # per temporal patch, for positions); None: none.
    video_timing: Callable[[object, MediaSize, list[float]], dict[str, Tensor]] | None = None
    # Anyres families take (images, crops, 3, S, S) pixel values with each image's (height, width) in image_sizes.
    anyres: bool = False
    # Whether the images of a sample holding several are tiled like a lone image (OneVision feeds them untiled).
    tiles_every_image: bool = True
    # The side of the square images in ``pixel_values`` (blank inputs for text-only batches are that size): the
    # tower's input size, or Mini-Gemini's high-resolution image, from which its model derives the tower's input.
    image_side: Callable[[object], int] = tower_image_side
    # Batch keys the image (video) features method takes, and the vision keys the model's forward needs next to
    # the features it is given (Qwen: the grids and video timing, for positions).
    image_inputs: tuple[str, ...] = ("pixel_values", "image_sizes", "batch_num_images")
    video_inputs: tuple[str, ...] = ("pixel_values_videos",)
    position_inputs: tuple[str, ...] = ()
    # The batch keys with one row per image and per video (Qwen packs patches: its grids have one).
    media_rows: tuple[str, str] = ("pixel_values", "pixel_values_videos")
    # The MediaSize of image (video) ``index`` of an image (video) processor's output for a whole call: the keys
    # the count functions take.
    image_size: Callable[[Family, dict, int], MediaSize] = field(default_factory=lambda: processor_image_size)
    video_size: Callable[[dict, int], MediaSize] = lambda video_inputs, index: len(
        video_inputs["pixel_values_videos"][index]
    )
    # Inputs of one all-zero image (video) laid out as the processor lays out a real one (fp32, CPU), which a batch
    # without images (videos) encodes so every rank runs the same modules.
    blank_image: Callable[[object], dict[str, Tensor]] = field(default_factory=lambda: blank_square_image)
    blank_video: Callable[[object], dict[str, Tensor]] = field(default_factory=lambda: blank_square_video)
    # Inputs the model needs that follow from the token ids alone (Qwen: mm_token_type_ids), or None.
    id_inputs: Callable[[object, Tensor], dict[str, Tensor]] | None = None

    @property
    def has_video(self) -> bool:
        return self.stock_video_tokens is not None

    def projector_paths(self, subset: str = "all") -> tuple[str, ...]:
        """The projector modules of ``subset`` ("all": every one); ``ValueError`` listing the family's choices."""
        if subset == "all":
            return self.projector
        if subset not in self.projector_subsets:
            choices = ", ".join(["all", *self.projector_subsets])
            raise ValueError(f"{self.model_class} has no projector subset {subset!r}; choose one of {choices}")
        return self.projector_subsets[subset]


def tiled_flags(family: Family, batch_num_images: Sequence[int] | Tensor | None, count: int) -> list[bool]:
    """Whether each of ``count`` images (over a whole batch) is tiled into crops: always, unless the family feeds
    the images of a sample holding several untiled (OneVision), ``batch_num_images`` giving the images per sample.
    The one rule that the processor, the data path and the family's ``get_image_features`` all follow."""
    if family.tiles_every_image or batch_num_images is None:
        return [True] * count
    return [int(n) == 1 for n in batch_num_images for _ in range(int(n))]


def zip_layer(captured: encoders.LayerCapture, dominant: int, contextual: int) -> compress.ZipResult:
    """VisionZip on a captured tower layer: scores (CLS row or attention received), selection and merge."""
    return compress.visionzip(
        captured.hidden,
        captured.queries,
        captured.keys,
        num_heads=captured.num_heads,
        scale=captured.scale,
        dominant=dominant,
        contextual=contextual,
        has_cls=captured.has_cls,
    )


def zip_tower(
    tower: nn.Module, pixel_values: Tensor, layer: int, dominant: int, contextual: int, *, eager: bool = False
) -> compress.ZipResult:
    """VisionZip tokens of encoder layer ``layer`` (see ``encoders.resolve_layer``) for a batch of (B, 3, H, W)
    images: tokens (B, dominant + contextual, D_vision) and the kept positions."""
    return zip_layer(encoders.run_until(tower, pixel_values, layer, eager=eager), dominant, contextual)


class ZippedUnits(NamedTuple):
    """One call of :func:`zip_units`: the units the tower saw, (B, 3, S, S) as given, and what VisionZip made of
    them."""

    pixel_values: Tensor
    result: compress.ZipResult


# Attribute of the inner model holding a list while families.recorded_zips is active: zip_units appends to it.
RECORDER = "_visionzip_recorded"


def zip_units(inner: nn.Module, tower: nn.Module, pixel_values: Tensor, vision_feature_layer: int | None):
    """:func:`zip_tower` at the inner model's feature layer and budget, read from its config at every call, without
    autograd (frozen tower). B counts whatever the family zips independently (images, crops, frames). The call is
    recorded while ``families.recorded_zips`` is active (:func:`record_zip`)."""
    budget = inner.config.visionzip
    layer = inner.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    layer_index = encoders.resolve_layer(len(tower.encoder.layers), layer)
    # no_grad also stops enable_input_require_grads() (activation checkpointing) from building a tower graph.
    with torch.no_grad():
        result = zip_tower(
            tower, pixel_values, layer_index, budget["dominant"], budget["contextual"], eager=budget["eager"]
        )
    record_zip(inner, result, lambda: pixel_values)
    return result


def record_zip(inner: nn.Module, result: compress.ZipResult, pixel_values: Callable[[], Tensor]) -> None:
    """Append a zip to the inner model's recording while ``families.recorded_zips`` is active; ``pixel_values``
    gives the units the tower saw, (B, 3, S, S), and is only called then."""
    recorded = inner.__dict__.get(RECORDER)
    if recorded is not None:
        recorded.append(ZippedUnits(pixel_values(), result))


def per_frame_video_features(tower: str) -> Callable[..., BaseModelOutputWithPooling]:
    """A ``get_video_features`` replacement that zips every frame of ``pixel_values_videos`` through the inner
    model's ``tower`` to K tokens (frames are independent images, as the paper does for Video-LLaVA)."""

    def get_video_features(
        self, pixel_values_videos: Tensor, vision_feature_layer: int | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """pixel_values_videos: (B, T, 3, H, W). Returns ``last_hidden_state`` = (B * T, K, D_vision) and
        ``pooler_output`` = (B, T * K, text hidden), frames in time order (no pooling, no newline)."""
        videos = pixel_values_videos.shape[0]
        frames = pixel_values_videos.flatten(0, 1)
        tokens = zip_units(self, getattr(self, tower), frames, vision_feature_layer).tokens
        projected = self.multi_modal_projector(tokens)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=projected.reshape(videos, -1, projected.shape[-1])
        )

    return get_video_features


def llava_stock_tokens(config, image_size: ImageSize | None = None) -> int:
    """Stock LLaVA: every tower token, minus CLS (token 0) under the 'default' select strategy."""
    tokens = encoders.tokens_per_tower_output(config.vision_config)
    return tokens - 1 if config.vision_feature_select_strategy == "default" else tokens


def zipped_per_unit(config, budget: dict, image_size: ImageSize | None = None) -> int:
    """K: the tokens every zipped unit (an image, crop or frame) becomes."""
    return budget["dominant"] + budget["contextual"]


def processor_image_size(family: Family, image_inputs: dict, index: int) -> MediaSize:
    """Image ``index``'s MediaSize from an image processor's output: its ``image_sizes`` entry (anyres), None for
    an untiled crop (OneVision's multi-image samples, ``batch_num_images``) or for a processor that reports none."""
    sizes = image_inputs.get("image_sizes")
    if sizes is None:
        return None
    tiled = tiled_flags(family, image_inputs.get("batch_num_images"), len(sizes))[index]
    return tuple(int(v) for v in sizes[index]) if tiled else None


def blank_square_image(config) -> dict[str, Tensor]:
    """One all-zero image of the tower's input size."""
    size = config.vision_config.image_size
    return {"pixel_values": torch.zeros(1, 3, size, size)}


def blank_square_video(config) -> dict[str, Tensor]:
    """One video of one all-zero frame of the tower's input size."""
    size = config.vision_config.image_size
    return {"pixel_values_videos": torch.zeros(1, 1, 3, size, size)}


def resolve_count_budget(family: Family, config, recorded: dict, given: dict) -> dict:
    """``config.visionzip`` of a budget in tokens per unit (LLaVA families): ``dominant`` + ``contextual`` (checked
    against the tower's N, from the model's config alone), ``eager`` and, for families with a choice,
    ``token_order``; unset ones as recorded."""
    wrong = sorted(set(given) - set(COUNT_BUDGET.keys))
    if wrong:
        raise ValueError(
            f"{family.model_class} takes a VisionZip budget in tokens per image (dominant, contextual; e.g. 54 and "
            f"10 for 64), not {', '.join(wrong)}"
        )
    dominant = given.get("dominant", recorded.get("dominant"))
    contextual = given.get("contextual", recorded.get("contextual"))
    eager = bool(given.get("eager", recorded.get("eager", False)))
    token_order = given.get("token_order", recorded.get("token_order", family.token_orders[0]))
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
    budget = {"dominant": dominant, "contextual": contextual, "eager": eager}
    if len(family.token_orders) > 1:
        budget["token_order"] = token_order
    return budget


def count_budget_record(family: Family, config, image_processor=None) -> dict:
    """``visionzip.json`` entries of a budget in tokens per unit (None where no budget is set) and the tokens one
    untiled image becomes."""
    budget = getattr(config, "visionzip", None) or {}
    return {
        "dominant": budget.get("dominant"),
        "contextual": budget.get("contextual"),
        "eager": bool(budget.get("eager", False)),
        "layer": config.vision_feature_layer,
        "tokens_per_image": family.zipped_tokens(config, budget, None) if budget else family.stock_tokens(config, None),
        "token_order": budget.get("token_order", "flat"),
    }


COUNT_BUDGET = Budget(
    ("dominant", "contextual", "eager", "token_order"),
    resolve_count_budget,
    count_budget_record,
    optional=("eager", "token_order"),
)
