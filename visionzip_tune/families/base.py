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
class Family:
    """How VisionZip plugs into one VLM family. Module paths are attributes of the inner model (``model.model``)."""

    name: str
    model_class: str  # outer class, e.g. LlavaForConditionalGeneration
    model_type: str  # config.model_type
    # Method name on the inner model -> its VisionZip replacement, bound to the instance by apply_visionzip
    # (get_image_features; get_video_features for families with a video path).
    overrides: dict[str, Callable[..., BaseModelOutputWithPooling]]
    stock_tokens: Callable[[object, ImageSize | None], int]  # placeholder tokens per image without VisionZip
    zipped_tokens: Callable[[object, dict, ImageSize | None], int]  # ... with the budget dict of config.visionzip
    towers: tuple[str, ...] = ("vision_tower",)  # every vision tower; the first one encodes images
    projector: tuple[str, ...] = (
        "multi_modal_projector",
    )  # the modules projector mode trains (train.projector_modules=all)
    # Named parts of the projector that train.projector_modules may choose to train alone (e.g. a main merger
    # without its DeepStack mergers): subset name -> module paths. "all" (the whole projector) is always there.
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
    # Families with a video path: the stock placeholder tokens of a video of T frames.
    stock_video_tokens: Callable[[object, int], int] | None = None
    # Anyres families take (images, crops, 3, S, S) pixel values with each image's (height, width) in image_sizes.
    anyres: bool = False
    # Whether the images of a sample holding several are tiled like a lone image (OneVision feeds them untiled).
    tiles_every_image: bool = True
    # The side of the square images in ``pixel_values`` (blank inputs for text-only batches are that size): the
    # tower's input size, or Mini-Gemini's high-resolution image, from which its model derives the tower's input.
    image_side: Callable[[object], int] = tower_image_side

    @property
    def has_video(self) -> bool:
        return self.stock_video_tokens is not None

    def projector_paths(self, subset: str = "all") -> tuple[str, ...]:
        """The module paths of projector subset ``subset``; ``ValueError`` naming the family's choices."""
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
    recorded as :class:`ZippedUnits` while ``families.recorded_zips`` is active."""
    budget = inner.config.visionzip
    layer = inner.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    layer_index = encoders.resolve_layer(len(tower.encoder.layers), layer)
    # no_grad also stops enable_input_require_grads() (activation checkpointing) from building a tower graph.
    with torch.no_grad():
        result = zip_tower(
            tower, pixel_values, layer_index, budget["dominant"], budget["contextual"], eager=budget["eager"]
        )
    recorded = inner.__dict__.get(RECORDER)
    if recorded is not None:
        recorded.append(ZippedUnits(pixel_values, result))
    return result


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
