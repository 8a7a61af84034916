"""Mini-Gemini (``MiniGeminiForConditionalGeneration``, the native model of :mod:`visionzip_tune.models.mini_gemini`):
VisionZip as "mine, then zip".

MGM refines every CLIP patch token with its own high-resolution region before the projector (patch info mining).
VisionZip on MGM mines all patch tokens of a view first, then selects and merges ``[CLS, mined patches]`` with
VisionZip's own signals from CLIP layer L (the CLS row of its attention, the head-mean keys): CLS stays dominant token
#0, unmined, as for LLaVA-1.5. Mining is local per token, so the dominant tokens are exactly MGM's own tokens at those
positions; only the contextual tokens depend on the order (merged mined tokens rather than mined merged tokens).
HD zips each of its 5 views with the same budget, in MGM's ``[global, crops]`` order. Budgets are the paper's
Table 8 (54+10, 108+20, 162+30; per view for HD). The paper's own MGM integration is unpublished (the obvious
drop-in of the LLaVA patch crashes MGM's resampler at 128 and 192 tokens), so its Table 14 is a target, not
something this reproduces bit for bit.

Projector mode trains MGM's own stage-1 set: the MLP (``multi_modal_projector``, MGM's ``mm_projector``) and the
three mining projections; ``train.projector_modules=mlp_only`` trains the MLP alone. Both towers stay frozen, and
the ConvNeXt runs in full whatever the budget: the saving is in the LLM and CLIP's last layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.algorithm import compress
from visionzip_tune.families.base import IMAGE, Family, layer_signals, patch_grid, record_zip
from visionzip_tune.models.mini_gemini.configuration_mini_gemini import stock_tokens_per_image, views_per_image
from visionzip_tune.models.mini_gemini.modeling_mini_gemini import (
    MGM_PROJECTOR_NAMES,
    MINING_MODULES,
    MinedViews,
    low_resolution_views,
    mine_views,
    per_image,
)


def zip_mined_views(mined: MinedViews, budget: dict, views: Tensor, config) -> compress.ZipResult:
    """The budget's compressor on every view's ``[CLS, mined patches]``, selecting with the captured CLIP layer's own
    signals (its CLS attention row, head-mean keys and unmined features, so the selection does not drift while the
    mining trains) and making its rows from the mined tokens. ``views`` are the LR views CLIP saw (their pixels seed
    the random compressor). Returns tokens (B * V, K, D) with autograd through the mined tokens, and positions
    counting CLS as 0, patch j as j + 1."""
    hidden = torch.cat([mined.capture.hidden[:, :1], mined.tokens], dim=1)
    compressor, params = FAMILY.budget_of(budget).compressor(budget)
    return compressor.compress(layer_signals(mined.capture, patch_grid(config), views, hidden=hidden), params)


def get_image_features(
    self,
    pixel_values: Tensor,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """VisionZip replacement for ``MiniGeminiModel.get_image_features`` (same parameter names: ``generate()``
    filters the kwargs it passes by them): "mine, then zip" at the budget of ``self.config.visionzip``.

    pixel_values: (B, 3, S_aux, S_aux). Returns ``last_hidden_state`` = (B, V * K, D) zipped tokens and
    ``pooler_output`` = list of B tensors (V * K, text hidden), projected with autograd on.
    """
    return FAMILY.features(self, IMAGE, {"pixel_values": pixel_values}, vision_feature_layer)


class MiniGemini(Family):
    name = "mini_gemini"
    model_class = "MiniGeminiForConditionalGeneration"
    model_type = "mini_gemini"
    overrides = {"get_image_features": get_image_features}
    towers = ("vision_tower", "vision_tower_aux")
    projector = ("multi_modal_projector", *MINING_MODULES)
    projector_subsets = {"mlp_only": ("multi_modal_projector",)}
    original_projector_names = MGM_PROJECTOR_NAMES
    original_projector_index = True

    def stock_tokens(self, config, image_size=None) -> int:
        return stock_tokens_per_image(config)

    def frozen_features(self, inner: nn.Module, modality: str, inputs: dict[str, Tensor], layer: int | None = None):
        """Both towers, the mining and the compression: each image's zipped mined tokens, the MLP's input, ``rows``
        (B, V * K, D). Frozen -- and so cacheable -- only while the mining does not train
        (``train.projector_modules=mlp_only``); otherwise the rows carry the mining's autograd."""
        pixel_values = inputs["pixel_values"]
        budget = inner.config.visionzip
        mined = mine_views(inner, pixel_values, layer, eager=budget["eager"])
        views = low_resolution_views(pixel_values, inner.config)  # the views CLIP saw
        zipped = zip_mined_views(mined, budget, views, inner.config)
        record_zip(inner, zipped, lambda: views)
        return {"rows": per_image(zipped.tokens, pixel_values.shape[0])}

    def cache_refusal(self, trained: tuple[str, ...]) -> str | None:
        mining = [path for path in trained if path in MINING_MODULES]
        if not mining:
            return None
        return (
            f"{self.model_class} trains its patch-info-mining projections here ({', '.join(mining)}), which read the "
            "CLIP tokens and ConvNeXt vectors of every patch, not zipped rows: far too big to cache. Its projector "
            "subset mlp_only trains the MLP alone, with the mining frozen: then the zipped mined tokens are cached"
        )

    def cache_modules(self, inner: nn.Module) -> dict[str, nn.Module]:
        """Both towers and the (frozen) mining projections."""
        return {**super().cache_modules(inner), **{name: getattr(inner, name) for name in MINING_MODULES}}

    def zipped_tokens(self, config, budget: dict, image_size=None) -> int:
        """Every view keeps K tokens (VisionZip's dominant + contextual: 64 / 128 / 192; HD 320 / 640 / 960)."""
        return views_per_image(config) * self.budget_of(budget).unit_tokens(budget)

    def image_side(self, config) -> int:
        """MGM's ``pixel_values`` are the HR image, ``image_size_aux`` px square (a text-only batch encodes a blank
        one); the model derives the LR views from it."""
        return config.image_size_aux

    def tower_stages(self, name, tower):
        """CLIP as any LLaVA tower; the high-resolution ConvNeXt: its embeddings and stages."""
        if name == "vision_tower_aux":
            return tower.embeddings, list(tower.encoder.stages)
        return super().tower_stages(name, tower)


FAMILY = MiniGemini()
