"""What every family module builds on: the :class:`Family` base class, the budget kinds (:class:`Budget`), and
the zipping steps families share.

A family module (``llava.py``, ``llava_next.py``, ...) defines one subclass of :class:`Family` for one transformers
VLM class: where its tower, projector and LLM live on the inner model (``model.model``), how many placeholder
tokens an image or video becomes with and without VisionZip, and the instance-level replacements of the inner
model's feature methods that feed the LLM the zipped tokens. The class attributes say where things are; the methods
say how a family differs (every default below is LLaVA-1.5's). ``families/__init__.py`` keeps the registry and the
functions the rest of the package calls.

Every features method runs in two parts (:meth:`Family.frozen_features`, :meth:`Family.features_from_frozen`): the
frozen part -- the tower and the compression, everything before the first module projector mode trains -- and the
rest. The overrides are their composition, so rows a feature cache stored (``visionzip_tune.feature_cache``) take
exactly the code path computed ones take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.algorithm import capture, compress
from visionzip_tune.algorithm.compressors import (
    CLS_ATTENTION,
    COMPRESSORS,
    GRID,
    KEYS,
    RECEIVED_ATTENTION,
    SEEDS,
    SIGNAL_NAMES,
    Compressor,
    Signals,
    compressor_named,
    pixel_seeds,
)

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
    """A kind of budget: how it is given to ``apply_visionzip``, kept in ``config.visionzip``, recorded in an export's
    ``visionzip.json``, parsed from a command line and shown. Three kinds exist: VisionZip in tokens per unit
    (:class:`CountBudget`, the LLaVA families), VisionZip in ratios of each unit's tokens (Qwen's, in
    ``families/qwen``), and any other compressor with its K tokens per unit (:class:`CompressorBudget`). A family's
    own knobs (``Family.knob_keys``: eager attention and token order, or Qwen's merge space) sit beside the kind's
    keys."""

    # The kind's keyword arguments of apply_visionzip (an export records them; the first is None there for an export
    # without a budget), and those an export may lack (apply_visionzip then keeps its default).
    keys: ClassVar[tuple[str, ...]]
    optional: ClassVar[tuple[str, ...]] = ()
    syntax: ClassVar[str]  # how a command line writes a budget of this kind, for error messages
    example: ClassVar[str]  # ... and an example

    def owns(self, budget: dict) -> bool:
        """Whether ``budget`` (apply_visionzip keywords) is of this kind."""
        return bool(budget) and set(budget) <= set(self.keys) | KNOB_KEYS

    def resolve(self, family: Family, config, recorded: dict, given: dict) -> dict:
        """The new ``config.visionzip`` from the recorded one and the keywords given (None left out); ``ValueError``
        naming what is wrong, from the model's config alone."""
        raise NotImplementedError

    def record(self, family: Family, config, image_processor=None) -> dict:
        """The export's entries on the budget and on what the token counts depend on (None values without one)."""
        raise NotImplementedError

    def recorded(self, record: dict) -> dict | None:
        """The apply_visionzip keywords of the budget an export ``record`` holds; None for an export without one."""
        if record.get(self.keys[0]) is None:
            return None
        return {key: record[key] for key in self.keys if key in record}

    def label(self, budget: dict) -> str:
        """The budget as written on a command line: ``54+10``; ``0.45+0.05``; ``divprune:64``."""
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
        return family.image_tokens(config)

    def describe(self, budget: dict) -> str:
        """One phrase for a person: ``VisionZip 54 + 10``."""
        raise NotImplementedError

    def compressor(self, budget: dict) -> tuple[Compressor, dict]:
        """The compressor a resolved budget runs and its parameters, for a unit whose size does not change them."""
        raise NotImplementedError


# The paper's LLaVA-1.5 budgets keep dominant : contextual at 54 : 10 (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30).
PAPER_CONTEXTUAL_SHARE = 10 / 64
# Every family's knobs (Family.knob_keys): the LLaVA-style families' and Qwen's.
KNOB_KEYS = frozenset({"eager", "token_order", "merge_space", "score_layer"})


class CountBudget(Budget):
    """VisionZip at ``dominant + contextual`` tokens per unit (an image, crop, frame or view)."""

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
        knobs = family.resolve_knobs(config, recorded, given, VISIONZIP.name)
        if dominant is None or contextual is None:
            raise ValueError(
                "apply_visionzip needs a budget: pass dominant and contextual (e.g. 54 and 10 for 64 tokens), or use "
                "a model whose config records one (config.visionzip)"
            )
        capture.resolve_layer(config.vision_config.num_hidden_layers, config.vision_feature_layer)
        compress.validate_budget(dominant, contextual, capture.tokens_per_tower_output(config.vision_config))
        return {"dominant": dominant, "contextual": contextual, **knobs}

    def record(self, family: Family, config, image_processor=None) -> dict:
        budget = getattr(config, "visionzip", None) or {}
        return {
            "method": VISIONZIP.name,
            "dominant": budget.get("dominant"),
            "contextual": budget.get("contextual"),
            "eager": bool(budget.get("eager", False)),
            "token_order": budget.get("token_order", "flat"),
            **family.record_inputs(config, image_processor),
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

    def describe(self, budget: dict) -> str:
        return f"VisionZip {budget['dominant']} + {budget['contextual']}"

    def compressor(self, budget: dict) -> tuple[Compressor, dict]:
        return VISIONZIP, {"dominant": budget["dominant"], "contextual": budget["contextual"]}


COUNTS = CountBudget()
VISIONZIP = COMPRESSORS["visionzip"]


class CompressorBudget(Budget):
    """Any compressor but VisionZip (``method``) with its parameters: ``tokens``, K rows per unit, and the
    compressor's own (``random``: seed, resample; ``vispruner``: important_ratio; ``prumerge_plus``: neighbours)."""

    keys = ("method",)
    syntax = f"METHOD:TOKENS with METHOD one of {', '.join(name for name in COMPRESSORS if name != 'visionzip')}"
    example = "divprune:64,pool:64"

    def owns(self, budget: dict) -> bool:
        return budget.get("method", VISIONZIP.name) != VISIONZIP.name

    def resolve(self, family: Family, config, recorded: dict, given: dict) -> dict:
        compressor = compressor_named(given["method"])
        family.check_signals(compressor, config)
        params = compressor.resolve(
            {key: value for key, value in given.items() if key not in KNOB_KEYS | {"method"}},
            {key: recorded[key] for key in compressor.parameters if key in recorded},
        )
        knobs = family.resolve_knobs(config, recorded, given, compressor.name)
        positions = family.unit_positions(config)
        if positions is not None:
            compressor.fits(params, positions, family.tower_has_cls(config))
        return {"method": compressor.name, **params, **knobs}

    def record(self, family: Family, config, image_processor=None) -> dict:
        return {**config.visionzip, **family.record_inputs(config, image_processor)}

    def recorded(self, record: dict) -> dict:
        compressor = compressor_named(record["method"])
        return {key: record[key] for key in ("method", *compressor.parameters, *KNOB_KEYS) if key in record}

    def label(self, budget: dict) -> str:
        compressor = compressor_named(budget["method"])
        changed = [
            f"{key}={budget[key]}"
            for key, default in compressor.parameters.items()
            if budget.get(key, default) != default and key != "tokens"
        ]
        return f"{compressor.name}:{budget['tokens']}" + (f"({','.join(changed)})" if changed else "")

    def parse(self, text: str) -> dict | None:
        """``divprune:64``: a compressor other than VisionZip and its tokens per unit."""
        method, colon, tokens = (part.strip() for part in text.partition(":"))
        if colon and method in COMPRESSORS and method != VISIONZIP.name and tokens.isdigit():
            return {"method": method, "tokens": int(tokens)}
        return None

    def unit_tokens(self, budget: dict) -> int:
        return compressor_named(budget["method"]).rows(budget)

    def describe(self, budget: dict) -> str:
        return f"{self.label(budget)} ({self.unit_tokens(budget)} tokens per unit)"

    def compressor(self, budget: dict) -> tuple[Compressor, dict]:
        compressor = compressor_named(budget["method"])
        return compressor, {key: budget[key] for key in compressor.parameters}


COMPRESSED = CompressorBudget()


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
    # The tower that encodes video frames one by one, each an image (LLaVA-style families with a video path).
    frame_tower: ClassVar[str | None] = None
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
    # The family's knobs beside the budget (config.visionzip): eager attention, and the token order where it has a
    # choice (Qwen: the merge space).
    knob_keys: ClassVar[tuple[str, ...]] = ("eager", "token_order")
    # Whether the token counts depend on the image processor's settings, which an export then records (Qwen).
    uses_image_processor: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.model_class}>"

    # -- budgets ----------------------------------------------------------------------------------------------
    def budget_of(self, budget: dict) -> Budget:
        """The kind of a budget (``config.visionzip``, an export's record, apply_visionzip keywords): the family's
        VisionZip kind, or :data:`COMPRESSED` for any other compressor (``method``)."""
        return COMPRESSED if COMPRESSED.owns(budget) else self.budget

    def resolve_knobs(self, config, recorded: dict, given: dict, method: str) -> dict:
        """``eager`` (an eager-attention tower) and, where the family has a choice, ``token_order``; unset ones as
        recorded, else the defaults. ``grid`` is VisionZip's order only."""
        eager = bool(given.get("eager", recorded.get("eager", False)))
        token_order = given.get("token_order", recorded.get("token_order", self.token_orders[0]))
        if token_order not in self.token_orders:
            raise ValueError(
                f"token_order={token_order!r} is not available for {self.model_class}; choose one of "
                f"{', '.join(self.token_orders)}"
            )
        if token_order != self.token_orders[0] and method != VISIONZIP.name:
            raise ValueError(
                f"token_order={token_order!r} is VisionZip's official LLaVA-NeXT layout (every crop's dominant tokens "
                f"in raster order, then their CLS tokens, then their contextual tokens); the {method} compressor has "
                "no such split: use token_order=flat"
            )
        knobs = {"eager": eager}
        if len(self.token_orders) > 1:
            knobs["token_order"] = token_order
        return knobs

    def tower_has_cls(self, config) -> bool:
        """Whether the image tower's token 0 is a CLS token."""
        return capture.config_has_cls(config.vision_config)

    def unit_positions(self, config) -> int | None:
        """N, the sequence positions of every unit the image tower zips (patches and CLS); None when it varies."""
        return capture.tokens_per_tower_output(config.vision_config)

    def signals(self, config) -> frozenset[str]:
        """The signals the image tower gives a compressor (the CLS attention row only with CLS)."""
        cls = {CLS_ATTENTION} if self.tower_has_cls(config) else set()
        return frozenset({*cls, RECEIVED_ATTENTION, KEYS, GRID, SEEDS})

    def check_signals(self, compressor: Compressor, config) -> None:
        """``ValueError`` naming what is missing when the tower cannot give ``compressor`` a signal it reads, and
        the compressors that run on it."""
        provided = self.signals(config)
        missing = compressor.needs(self.tower_has_cls(config)) - provided
        if missing:
            usable = [c.name for c in COMPRESSORS.values() if c.needs(self.tower_has_cls(config)) <= provided]
            raise ValueError(
                f"the {compressor.name} compressor reads the {' and '.join(SIGNAL_NAMES[m] for m in sorted(missing))} of "
                "the vision tower, "
                f"which {self.model_class}'s {config.vision_config.model_type} tower does not give (no CLS token); "
                f"compressors that run on it: {', '.join(usable)}"
            )

    def record_inputs(self, config, image_processor=None) -> dict:
        """What an export records of what the token counts depend on: the feature layer and one untiled image's
        tokens."""
        return {"layer": config.vision_feature_layer, "tokens_per_image": self.image_tokens(config)}

    def check_inputs(self, record: dict, image_processor) -> list[str]:
        """Problems loading an export ``record`` for inputs made by ``image_processor`` (None: not known)."""
        return []

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
        return self.budget_of(budget).unit_tokens(budget)

    def stock_video_tokens(self, config, video: MediaSize) -> int:
        """Placeholder tokens of a video (of its MediaSize) without VisionZip, for families with a video path."""
        raise NotImplementedError(f"{self.model_class} has no video input")

    def zipped_video_tokens(self, config, budget: dict, frames: MediaSize) -> int:
        """Placeholder tokens of a video under ``budget``: K per frame."""
        return frames * self.budget_of(budget).unit_tokens(budget)

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

    # -- the frozen part of the features path (what a feature cache holds) --------------------------------------
    def frozen_features(self, inner: nn.Module, modality: str, inputs: dict[str, Tensor], layer: int | None = None):
        """The frozen part of ``get_{modality}_features`` on a batch's ``inputs`` (the keys of ``image_inputs`` /
        ``video_inputs``): the tower and the compression, without autograd. A dict of tensors whose concatenation
        over batches (dim 0) is the frozen part of the joined batch (:meth:`split_frozen` cuts it per image or
        video). LLaVA-1.5: each image's compressed tower rows, the projector's input, ``rows`` (images, K, D);
        a video family's frames: ``rows`` (videos, frames, K, D)."""
        if modality == VIDEO:
            return frozen_frames(inner, getattr(inner, self.frame_tower), inputs["pixel_values_videos"], layer)
        return {"rows": zip_units(inner, getattr(inner, self.towers[0]), inputs["pixel_values"], layer).tokens}

    def features_from_frozen(
        self, inner: nn.Module, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> BaseModelOutputWithPooling:
        """What ``get_{modality}_features`` returns, from the frozen part of its batch (computed, or read from a
        cache) and the batch's inputs besides pixels (``image_sizes``, grids): the trainable rest. LLaVA-1.5:
        ``pooler_output`` = list of B tensors (K, text hidden), projected with autograd on."""
        rows = frozen["rows"]
        if modality == VIDEO:
            return features_from_frames(inner, rows)
        return BaseModelOutputWithPooling(last_hidden_state=rows, pooler_output=list(inner.multi_modal_projector(rows)))

    def features(self, inner: nn.Module, modality: str, inputs: dict[str, Tensor], layer: int | None = None):
        """``get_{modality}_features`` of a batch: :meth:`features_from_frozen` of :meth:`frozen_features`."""
        return self.features_from_frozen(inner, modality, self.frozen_features(inner, modality, inputs, layer), inputs)

    def split_frozen(
        self, config, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> list[dict[str, Tensor]]:
        """The frozen part of a batch cut per image (video), in batch order: the inverse of concatenating theirs.
        Default: row i of every field is item i's."""
        items = len(next(iter(frozen.values())))
        return split_fields(frozen, {field: [1] * items for field in frozen})

    def cache_refusal(self, trained: tuple[str, ...]) -> str | None:
        """Why rows cached from this family's frozen part cannot stand in for computed ones while the projector
        modules ``trained`` train (None: they can, as for every family whose frozen part holds nothing that
        trains)."""
        return None

    def cache_modules(self, inner: nn.Module) -> dict[str, nn.Module]:
        """The modules the frozen part is a function of (a feature cache's key fingerprints their weights): the
        towers."""
        return {name: getattr(inner, name) for name in self.towers}

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
    """VisionZip on a captured tower layer, as the families run it: scores (CLS row or attention received),
    selection and merge."""
    return VISIONZIP.compress(layer_signals(captured, None, None), {"dominant": dominant, "contextual": contextual})


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
IMAGE, VIDEO = "image", "video"  # the modalities of a features method (get_image_features, get_video_features)
# The field of a cached batch (``cached_key``) holding one row per image (video): the sizes its placeholders were
# counted from; the rest are the frozen fields.
SIZES = "sizes"


def cached_key(modality: str, field: str) -> str:
    """The batch key of a field read from a feature cache: ``cached_image.rows``, ``cached_video.sizes``."""
    return f"cached_{modality}.{field}"


def layer_signals(
    captured: capture.LayerCapture,
    grid: tuple[int, int] | None,
    pixels: Tensor | None,
    hidden: Tensor | None = None,
) -> Signals:
    """A captured tower layer's signals for a compressor: the CLS row of its attention (with CLS) or the attention each
    token receives (bounded-memory chunks), its head-mean keys, the patch grid and the units' pixel seeds, each
    computed only if the compressor reads it. The rows are made of ``hidden`` (default: the layer's output, which
    stays the features similarity-based selections compare)."""
    heads, scale = captured.num_heads, captured.scale
    queries, keys = captured.queries, captured.keys
    return Signals(
        captured.hidden if hidden is None else hidden,
        features=captured.hidden,
        has_cls=captured.has_cls,
        grid=grid,
        heads=heads,
        cls_attention=(lambda: compress.cls_attention_scores(queries[:, 0], keys, heads, scale))
        if captured.has_cls
        else None,
        received_attention=lambda: compress.received_attention_scores(queries, keys, heads, scale),
        keys=lambda: compress.key_metric(keys, heads),
        seeds=(lambda: pixel_seeds(pixels)) if pixels is not None else None,
    )


def patch_grid(config) -> tuple[int, int]:
    """(rows, columns) of a unit's patches: the tower's input side over its patch size, square."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side, side


def zip_units(inner: nn.Module, tower: nn.Module, pixel_values: Tensor, vision_feature_layer: int | None):
    """The configured compressor (VisionZip unless ``config.visionzip`` names another) on encoder layer L of
    ``tower`` for a batch of (B, 3, S, S) units, at the inner model's feature layer and budget, read from its config
    at every call, without autograd (frozen tower). B counts whatever the family zips independently (images, crops,
    frames). The call is recorded while ``families.recorded_zips`` is active (:func:`record_zip`)."""
    budget = inner.config.visionzip
    layer = inner.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    layer_index = capture.resolve_layer(len(tower.encoder.layers), layer)
    compressor, params = (COMPRESSED if COMPRESSED.owns(budget) else COUNTS).compressor(budget)
    # no_grad also stops enable_input_require_grads() (activation checkpointing) from building a tower graph.
    with torch.no_grad():
        captured = capture.run_until(tower, pixel_values, layer_index, eager=budget["eager"])
        result = compressor.compress(layer_signals(captured, patch_grid(inner.config), pixel_values), params)
    record_zip(inner, result, lambda: pixel_values)
    return result


def record_zip(inner: nn.Module, result: compress.ZipResult, pixel_values: Callable[[], Tensor]) -> None:
    """Append a zip to the inner model's recording while ``families.recorded_zips`` is active; ``pixel_values``
    gives the units the tower saw, (B, 3, S, S), and is only called then."""
    recorded = inner.__dict__.get(RECORDER)
    if recorded is not None:
        recorded.append(ZippedUnits(pixel_values(), result))


def frozen_frames(inner: nn.Module, tower: nn.Module, pixel_values_videos: Tensor, layer: int | None) -> dict:
    """Every frame of (B, T, 3, H, W) videos zipped as an image (frames are independent images, as the paper does
    for Video-LLaVA): ``rows`` (B, T, K, D_vision)."""
    videos, frames = pixel_values_videos.shape[:2]
    tokens = zip_units(inner, tower, pixel_values_videos.flatten(0, 1), layer).tokens
    return {"rows": tokens.unflatten(0, (videos, frames))}


def features_from_frames(inner: nn.Module, rows: Tensor) -> BaseModelOutputWithPooling:
    """``last_hidden_state`` = (B * T, K, D_vision) and ``pooler_output`` = (B, T * K, text hidden) of the zipped
    frames ``rows`` (B, T, K, D_vision), frames in time order (no pooling, no newline)."""
    tokens = rows.flatten(0, 1)
    projected = inner.multi_modal_projector(tokens)
    return BaseModelOutputWithPooling(
        last_hidden_state=tokens, pooler_output=projected.reshape(len(rows), -1, projected.shape[-1])
    )


def per_frame_video_features(tower: str) -> Callable[..., BaseModelOutputWithPooling]:
    """A ``get_video_features`` replacement that zips every frame of ``pixel_values_videos`` through the inner
    model's ``tower`` to K tokens (:func:`frozen_frames`, :func:`features_from_frames`)."""

    def get_video_features(
        self, pixel_values_videos: Tensor, vision_feature_layer: int | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """pixel_values_videos: (B, T, 3, H, W). Returns ``last_hidden_state`` = (B * T, K, D_vision) and
        ``pooler_output`` = (B, T * K, text hidden)."""
        frozen = frozen_frames(self, getattr(self, tower), pixel_values_videos, vision_feature_layer)
        return features_from_frames(self, frozen["rows"])

    return get_video_features


def split_fields(frozen: dict[str, Tensor], rows: dict[str, list[int]]) -> list[dict[str, Tensor]]:
    """Cut every field of a frozen part into consecutive blocks, ``rows[field][i]`` rows for item i: the items'
    frozen parts."""
    blocks = {field: torch.split(value, rows[field]) for field, value in frozen.items()}
    return [dict(zip(blocks, item)) for item in zip(*blocks.values())]
