"""What every family module builds on: the :class:`Family` base class, the budget kinds (:class:`Budget`), and
the zipping steps families share.

A family module (``llava.py``, ``llava_next.py``, ...) defines one subclass of :class:`Family` for one transformers
VLM class: where its tower, projector and LLM live on the inner model (``model.model``), how many placeholder
tokens an image or video becomes with and without VisionZip, and the instance-level replacements of the inner
model's feature methods that feed the LLM the zipped tokens. The class attributes say where things are; the methods
say how a family differs (every default below is LLaVA-1.5's). ``families/__init__.py`` keeps the registry and the
functions the rest of the package calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.algorithm import capture, compress

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


# ----------------------------------------------------------------------------------------------------------------
# Budget kinds


class Budget:
    """A kind of VisionZip budget: how it is given to ``apply_visionzip``, kept in ``config.visionzip``, recorded in
    an export's ``visionzip.json``, parsed from a command line and shown. Two kinds exist: tokens per unit
    (:class:`CountBudget`, the LLaVA families) and ratios of each unit's tokens (Qwen's, in ``families/qwen``)."""

    # The keyword arguments of apply_visionzip (re-applied from an export's record; the first is None there for an
    # export without VisionZip), and those an export may lack (apply_visionzip then keeps its default).
    keys: ClassVar[tuple[str, ...]]
    optional: ClassVar[tuple[str, ...]] = ()
    # Whether the token counts depend on the image processor's settings, which the record then holds (Qwen).
    uses_image_processor: ClassVar[bool] = False
    syntax: ClassVar[str]  # how a command line writes a budget of this kind, for error messages
    example: ClassVar[str]  # ... and an example

    def owns(self, budget: dict) -> bool:
        """Whether ``budget`` (apply_visionzip keywords) is of this kind."""
        return bool(budget) and set(budget) <= set(self.keys)

    def resolve(self, family: Family, config, recorded: dict, given: dict) -> dict:
        """The new ``config.visionzip`` from the recorded one and the keywords given (None left out); ``ValueError``
        naming what is wrong, from the model's config alone."""
        raise NotImplementedError

    def record(self, family: Family, config, image_processor=None) -> dict:
        """The export's entries on the budget and on what the token counts depend on (None values without one)."""
        raise NotImplementedError

    def check(self, record: dict, image_processor) -> list[str]:
        """Problems loading an export's ``record`` for inputs made by ``image_processor`` (None: not known)."""
        return []

    def label(self, budget: dict) -> str:
        """The budget as written on a command line: ``54+10``; ``0.45+0.05``."""
        raise NotImplementedError

    def parse(self, text: str) -> dict | None:
        """A command-line budget of this kind (``--budgets`` entries) as apply_visionzip keywords; None if ``text``
        is not one."""
        raise NotImplementedError

    def unit_tokens(self, budget: dict) -> int | None:
        """K, the tokens every zipped unit becomes; None when K follows each unit's size."""
        return None

    def share(self, family: Family, config) -> int | str:
        """What the LLM gets of an (untiled) image, for tables: a token count, or a percentage of its tokens."""
        raise NotImplementedError

    def describe(self, budget: dict) -> str:
        """One phrase for a person: ``VisionZip 54 + 10``."""
        raise NotImplementedError


# The paper's LLaVA-1.5 budgets keep dominant : contextual at 54 : 10 (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30).
PAPER_CONTEXTUAL_SHARE = 10 / 64


class CountBudget(Budget):
    """``dominant + contextual`` tokens per unit (an image, crop, frame or view), ``eager`` for an eager-attention
    tower, and ``token_order`` where the family has a choice."""

    keys = ("dominant", "contextual", "eager", "token_order")
    optional = ("eager", "token_order")
    syntax = "DOMINANT+CONTEXTUAL, a token total >= 2"
    example = "54+10,108+20 or 64,128 (split 54+10, 108+20 as in the paper)"

    def resolve(self, family: Family, config, recorded: dict, given: dict) -> dict:
        wrong = sorted(set(given) - set(self.keys))
        if wrong:
            raise ValueError(
                f"{family.model_class} takes a VisionZip budget in tokens per image (dominant, contextual; e.g. 54 "
                f"and 10 for 64), not {', '.join(wrong)}"
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
                "apply_visionzip needs a budget: pass dominant and contextual (e.g. 54 and 10 for 64 tokens), or use "
                "a model whose config records one (config.visionzip)"
            )
        capture.resolve_layer(config.vision_config.num_hidden_layers, config.vision_feature_layer)
        compress.validate_budget(dominant, contextual, capture.tokens_per_tower_output(config.vision_config))
        budget = {"dominant": dominant, "contextual": contextual, "eager": eager}
        if len(family.token_orders) > 1:
            budget["token_order"] = token_order
        return budget

    def record(self, family: Family, config, image_processor=None) -> dict:
        budget = getattr(config, "visionzip", None) or {}
        return {
            "dominant": budget.get("dominant"),
            "contextual": budget.get("contextual"),
            "eager": bool(budget.get("eager", False)),
            "layer": config.vision_feature_layer,
            "tokens_per_image": family.image_tokens(config),
            "token_order": budget.get("token_order", "flat"),
        }

    def label(self, budget: dict) -> str:
        return f"{budget['dominant']}+{budget['contextual']}"

    def parse(self, text: str) -> dict | None:
        """``54+10``, or a total >= 2 split as the paper splits its budgets (``contextual = round(total * 10/64)``)."""
        dominant, plus, contextual = (part.strip() for part in text.partition("+"))
        if plus and dominant.isdigit() and contextual.isdigit():
            return {"dominant": int(dominant), "contextual": int(contextual)}
        if not plus and text.isdigit() and int(text) >= 2:
            share = round(int(text) * PAPER_CONTEXTUAL_SHARE)
            return {"dominant": int(text) - share, "contextual": share}
        return None

    def unit_tokens(self, budget: dict) -> int:
        return budget["dominant"] + budget["contextual"]

    def share(self, family: Family, config) -> int:
        return family.image_tokens(config)

    def describe(self, budget: dict) -> str:
        return f"VisionZip {budget['dominant']} + {budget['contextual']}"


COUNTS = CountBudget()


# ----------------------------------------------------------------------------------------------------------------
# Families


class Family:
    """How VisionZip plugs into one VLM family. Module paths are attributes of the inner model (``model.model``).

    Subclasses set the class attributes that differ and override the methods that differ; the registry holds one
    instance of each."""

    name: ClassVar[str]
    model_class: ClassVar[str]  # outer class, e.g. LlavaForConditionalGeneration
    model_type: ClassVar[str]  # config.model_type
    # Method name on the inner model -> its VisionZip replacement, bound to the instance by apply_visionzip
    # (get_image_features; get_video_features for families with a video path; get_rope_index for Qwen positions).
    overrides: ClassVar[dict[str, Callable[..., object]]]
    budget: ClassVar[Budget] = COUNTS
    towers: ClassVar[tuple[str, ...]] = ("vision_tower",)  # every vision tower; the first one encodes images
    projector: ClassVar[tuple[str, ...]] = ("multi_modal_projector",)  # the modules projector mode trains
    # Named subsets of the projector that projector mode may train instead (config key train.projector_modules);
    # "all" always means every module of ``projector``.
    projector_subsets: ClassVar[dict[str, tuple[str, ...]]] = {}
    language_model: ClassVar[str] = "language_model"
    # Projector parameter names in the family's original (non-HF) code, by HF name prefix relative to the inner
    # model (``multi_modal_projector.linear_1.``): what ``mm_projector.bin`` is written with. None: the export has no
    # such file for this family.
    original_projector_names: ClassVar[dict[str, str] | None] = LLAVA_PROJECTOR_NAMES
    # Whether the export also writes those names as a safetensors checkpoint with its index: the original loader
    # of Mini-Gemini reads its mining modules through ``model.safetensors.index.json``, not ``mm_projector.bin``.
    original_projector_index: ClassVar[bool] = False
    # Orders the zipped tokens of one image can be fed in; the first is the default. Only a family with a choice
    # records "token_order" in config.visionzip.
    token_orders: ClassVar[tuple[str, ...]] = ("flat",)
    has_video: ClassVar[bool] = False  # whether the family takes videos (pixel_values_videos)
    # Anyres families take (images, crops, 3, S, S) pixel values with each image's (height, width) in image_sizes.
    anyres: ClassVar[bool] = False
    # Whether the images of a sample holding several are tiled like a lone image (OneVision feeds them untiled).
    tiles_every_image: ClassVar[bool] = True
    # Batch keys the image (video) features method takes, and the vision keys the model's forward needs next to
    # the features it is given (Qwen: the grids and video timing, for positions).
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes", "batch_num_images")
    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)
    position_inputs: ClassVar[tuple[str, ...]] = ()
    # The batch keys with one row per image and per video (Qwen packs patches: its grids have one).
    media_rows: ClassVar[tuple[str, str]] = ("pixel_values", "pixel_values_videos")
    # Attributes the overrides keep on the inner model instance between calls: remove_visionzip drops them.
    instance_state: ClassVar[tuple[str, ...]] = ()
    # Overridden methods besides the features methods that encode the media (Qwen's get_rope_index, which
    # generate() calls first): their time is the vision stage's.
    encoding_methods: ClassVar[tuple[str, ...]] = ()
    # Whether each zipped unit is a square patch grid that ``show`` can draw (Qwen zips merged groups of its own
    # per-image grids).
    drawable: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.model_class}>"

    # -- token counts -----------------------------------------------------------------------------------------
    def image_tokens(self, config, image_size: MediaSize = None) -> int:
        """Placeholder tokens the LLM receives for one image: under ``config.visionzip`` when set, else stock."""
        budget = getattr(config, "visionzip", None)
        return self.zipped_tokens(config, budget, image_size) if budget else self.stock_tokens(config, image_size)

    def video_tokens(self, config, video: MediaSize) -> int:
        """Placeholder tokens the LLM receives for one video: under ``config.visionzip`` when set, else stock."""
        budget = getattr(config, "visionzip", None)
        return self.zipped_video_tokens(config, budget, video) if budget else self.stock_video_tokens(config, video)

    def stock_tokens(self, config, image_size: MediaSize = None) -> int:
        """Placeholder tokens per image without VisionZip. Stock LLaVA: every tower token, minus CLS (token 0) under
        the 'default' select strategy."""
        tokens = capture.tokens_per_tower_output(config.vision_config)
        return tokens - 1 if config.vision_feature_select_strategy == "default" else tokens

    def zipped_tokens(self, config, budget: dict, image_size: MediaSize = None) -> int:
        """Placeholder tokens per image under ``budget`` (``config.visionzip``): K per unit."""
        return self.budget.unit_tokens(budget)

    def stock_video_tokens(self, config, video: MediaSize) -> int:
        """Placeholder tokens of a video (of its MediaSize) without VisionZip, for families with a video path."""
        raise NotImplementedError(f"{self.model_class} has no video input")

    def zipped_video_tokens(self, config, budget: dict, frames: MediaSize) -> int:
        """Placeholder tokens of a video under ``budget``: K per frame."""
        return frames * self.budget.unit_tokens(budget)

    def video_layout(self, config, video: MediaSize, times: list[float]) -> VideoLayout:
        """A video's placeholder text from its size and its frames' times (seconds): one run of all its tokens."""
        return [self.video_tokens(config, video)]

    def video_timing(self, config, video: MediaSize, times: list[float]) -> dict[str, Tensor]:
        """Inputs the model takes about a video besides its pixels (Qwen2.5-VL: seconds per temporal patch)."""
        return {}

    # -- what the processor reports, and blank inputs ---------------------------------------------------------
    def image_side(self, config) -> int:
        """The side of the square images (or crops, or frames) in ``pixel_values``: the tower's input size (blank
        inputs for text-only batches are that size)."""
        return config.vision_config.image_size

    def image_size(self, image_inputs: dict, index: int) -> MediaSize:
        """Image ``index``'s MediaSize from an image processor's output for a whole call: its ``image_sizes`` entry
        (anyres), None for an untiled crop (OneVision's multi-image samples) or a processor that reports none."""
        sizes = image_inputs.get("image_sizes")
        if sizes is None:
            return None
        tiled = self.tiled_flags(image_inputs.get("batch_num_images"), len(sizes))[index]
        return tuple(int(v) for v in sizes[index]) if tiled else None

    def video_size(self, video_inputs: dict, index: int) -> MediaSize:
        """Video ``index``'s MediaSize from a processor's output: its frame count."""
        return len(video_inputs["pixel_values_videos"][index])

    def tiled_flags(self, batch_num_images: Sequence[int] | Tensor | None, count: int) -> list[bool]:
        """Whether each of ``count`` images (over a whole batch) is tiled into crops: always, unless the family
        feeds the images of a sample holding several untiled (OneVision), ``batch_num_images`` giving the images
        per sample. The one rule that the processor, the data path and ``get_image_features`` all follow."""
        if self.tiles_every_image or batch_num_images is None:
            return [True] * count
        return [int(n) == 1 for n in batch_num_images for _ in range(int(n))]

    def blank_image(self, config) -> dict[str, Tensor]:
        """Inputs of one all-zero image laid out as the processor lays out a real one (fp32, CPU), which a batch
        without images encodes so every rank runs the same modules: one image of the tower's input size."""
        size = self.image_side(config)
        return {"pixel_values": torch.zeros(1, 3, size, size)}

    def blank_video(self, config) -> dict[str, Tensor]:
        """One video of one all-zero frame of the tower's input size."""
        size = config.vision_config.image_size
        return {"pixel_values_videos": torch.zeros(1, 1, 3, size, size)}

    def id_inputs(self, config, input_ids: Tensor) -> dict[str, Tensor]:
        """Inputs the model needs that follow from the token ids alone (Qwen: ``mm_token_type_ids``)."""
        return {}

    # -- parts ------------------------------------------------------------------------------------------------
    def projector_paths(self, subset: str = "all") -> tuple[str, ...]:
        """The projector modules of ``subset`` ("all": every one); ``ValueError`` listing the family's choices."""
        if subset == "all":
            return self.projector
        if subset not in self.projector_subsets:
            choices = ", ".join(["all", *self.projector_subsets])
            raise ValueError(f"{self.model_class} has no projector subset {subset!r}; choose one of {choices}")
        return self.projector_subsets[subset]

    def tower_stages(self, name: str, tower: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """The module the tower ``name`` starts a pass with and the layers it runs (for timing): CLIP / SigLIP's
        embeddings and encoder layers."""
        return tower.embeddings, list(tower.encoder.layers)


# ----------------------------------------------------------------------------------------------------------------
# Zipping steps the LLaVA-style families share


def zip_layer(captured: capture.LayerCapture, dominant: int, contextual: int) -> compress.ZipResult:
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
    """VisionZip tokens of encoder layer ``layer`` (see ``capture.resolve_layer``) for a batch of (B, 3, H, W)
    images: tokens (B, dominant + contextual, D_vision) and the kept positions."""
    return zip_layer(capture.run_until(tower, pixel_values, layer, eager=eager), dominant, contextual)


class ZippedUnits(NamedTuple):
    """One zipping call on a batch of units: the units the tower saw, (B, 3, S, S) as given, and what VisionZip made
    of them."""

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
    layer_index = capture.resolve_layer(len(tower.encoder.layers), layer)
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
