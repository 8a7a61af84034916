"""Mini-Gemini (MGM, dvlab-research/MGM) as a native transformers-5 model; transformers ships none.

MGM is LLaVA-1.5 plus a second, high-resolution (HR) vision tower whose features refine every low-resolution (LR)
CLIP token before the projector ("patch info mining"):

* ``pixel_values`` is the normalised HR image (``image_size_aux`` px, 768 for MGM-7B/13B). The LR CLIP input is
  derived from it inside the model by a bilinear downscale (align_corners=False), as MGM's data loader does.
* LR tower: ``CLIPVisionModel``, hidden states of ``vision_feature_layer`` (-2), patch tokens (CLS dropped):
  X (L, D), L = 576 at 336 px.
* HR tower: ``ConvNextModel`` (stem + 4 stages of LAION's ConvNeXt-L); the stage outputs are upsampled (bilinear,
  align_corners=False, fp32) to stage 0's size and concatenated: H (C, h, h), C = 2,880, h = 192 at 768 px.
* Mining: LR token t attends (one query, one head, scale 1/sqrt(D)) over the p x p HR vectors of its own image region
  (p = h / sqrt(L) = 8); query, key and value are ``Sequential(LayerNorm, Linear)`` modules
  (``vlm_uni_{query,aux,val}_projector``); the token fed on is ``X + mined``.
* Projector: ``mlp2x_gelu`` (``multi_modal_projector.linear_1/linear_2``, LLaVA's), then a LLaMA-family LLM.
* HD (``image_grid=2``, ``image_global=True``): the LR image is 672 px, cut into 2 x 2 crops of 336 plus a global
  view (the 672 image downscaled to 336); each view mines its own part of the HR map (1536 px -> 384 x 384): crop k
  its k-th quarter (row-major), the global view the whole map downscaled by 1/2. Tokens are fed in
  ``[global, crop 0..3]`` order: 5 x 576 = 2,880 per image.

Everything past the image features is stock LLaVA (``LlavaModel.forward``, ``generate``, the placeholder scatter):
the classes subclass LLaVA's and override only the constructor and ``get_image_features``. Subclassing rather
than composing because MGM *is* a LLaVA with a different feature extractor: the module names, forward, generation
and tied-weight rules are LLaVA's, so reusing them keeps every later transformers fix. The constructors do not call
LLaVA's own (that would build and randomly initialise the LLM a second time); they build the same LLaVA modules
plus the HR tower and the mining.

CLIP runs through :func:`visionzip_tune.encoders.run_until` (SDPA kept, stopped after the feature layer), so the
VisionZip family (``families/mini_gemini.py``) reads its queries and keys from the very run that feeds the mining.
Importing this module registers the classes with transformers' Auto classes (:func:`register`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from visionzip_tune.algorithm import capture
from visionzip_tune.models.mini_gemini.configuration_mini_gemini import MiniGeminiConfig

# The mining projections (query over LR tokens, key and value over HR vectors), by attribute name as in MGM.
MINING_MODULES = ("vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")
# The projector parameters' names in MGM's checkpoints and its stage-1 ``mm_projector.bin``, by HF name prefix
# (relative to the inner model): the MLP is LLaVA's Sequential(Linear, GELU, Linear); the mining modules keep MGM's
# names (mgm/model/mgm_arch.py:149-154).
MGM_PROJECTOR_NAMES = {
    "multi_modal_projector.linear_1.": "model.mm_projector.0.",
    "multi_modal_projector.linear_2.": "model.mm_projector.2.",
    **{f"{name}.": f"model.{name}." for name in MINING_MODULES},
}


# ----------------------------------------------------------------------------------------------------------------
# Image side: the LR views and the HR map MGM derives from the one HR image.


def split_grid(images: Tensor, grid: int) -> Tensor:
    """(B, C, grid*h, grid*w) -> (B, grid², C, h, w): the grid's tiles, row-major (MGM's crop order)."""
    batch, channels, height, width = images.shape
    tiles = images.reshape(batch, channels, grid, height // grid, grid, width // grid)
    return tiles.permute(0, 2, 4, 1, 3, 5).flatten(1, 2)


def _views(grid_tiles: Tensor, whole: Tensor | None) -> Tensor:
    """(B, G, ...) tiles and an optional (B, ...) global view -> (B * V, ...) in [global, tiles] order."""
    parts = [grid_tiles] if whole is None else [whole.unsqueeze(1), grid_tiles]
    return torch.cat(parts, dim=1).flatten(0, 1)


def low_resolution_views(pixel_values: Tensor, config) -> Tensor:
    """The LR CLIP inputs of a batch of HR images, as MGM's loader makes them (mgm/train/train.py:971-1025).

    pixel_values: (B, 3, S_aux, S_aux) normalised HR images. The image is downscaled (bilinear, align_corners=False,
    fp32) to image_grid x the CLIP input side; with a grid it is cut into crops, and the global view is that LR image
    downscaled once more. Returns (B * V, 3, s, s) fp32, each image's views in [global, crops row-major] order.
    """
    side = config.vision_config.image_size
    grid = config.image_grid
    image = F.interpolate(pixel_values.float(), size=(side * grid, side * grid), mode="bilinear", align_corners=False)
    if grid == 1:
        return image
    whole = None
    if config.image_global:
        whole = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)
    return _views(split_grid(image, grid), whole)


def aux_feature_map(aux_tower: nn.Module, pixel_values: Tensor) -> Tensor:
    """MGM's HR features (mgm/model/multimodal_encoder/openclip_encoder.py:66-93): ConvNeXt stem and stages, the
    later stages upsampled (bilinear, align_corners=False, in fp32) to stage 0's size, all concatenated on channels.

    pixel_values: (B, 3, S, S). Returns (B, C, S / stride, S / stride) in the tower's dtype, C = sum(hidden_sizes).
    """
    hidden = aux_tower.embeddings(pixel_values.to(aux_tower.embeddings.patch_embeddings.weight.dtype))
    stages = []
    for stage in aux_tower.encoder.stages:
        hidden = stage(hidden)
        stages.append(hidden)
    size = stages[0].shape[-2:]
    upsampled = [
        F.interpolate(stage.float(), size=size, mode="bilinear", align_corners=False).to(stage.dtype)
        for stage in stages[1:]
    ]
    return torch.cat([stages[0], *upsampled], dim=1)


def aux_view_maps(aux_map: Tensor, config) -> Tensor:
    """The part of the HR map each LR view mines (mgm/model/mgm_arch.py:239-283), in :func:`low_resolution_views`'
    order: crop k its k-th tile (row-major); the global view the whole map downscaled by 1/image_grid (bilinear,
    align_corners=False, fp32).

    aux_map: (B, C, h, h). Returns (B * V, C, h / grid, h / grid).
    """
    grid = config.image_grid
    if grid == 1:
        return aux_map
    whole = None
    if config.image_global:
        scaled = F.interpolate(aux_map.float(), scale_factor=1 / grid, mode="bilinear", align_corners=False)
        whole = scaled.to(aux_map.dtype)
    return _views(split_grid(aux_map, grid), whole)


# ----------------------------------------------------------------------------------------------------------------
# Patch info mining (mgm/model/mgm_arch.py:293-311).


def region_vectors(aux_maps: Tensor, side: int) -> Tensor:
    """The HR vectors of each LR token's image region.

    aux_maps: (N, C, h, h); ``side``: LR tokens per view side (h must be a multiple). Returns (N, side², p², C),
    p = h / side: token t = row * side + column gets its p x p region, raster order inside, as MGM orders them.
    """
    views, channels, height, _ = aux_maps.shape
    region = height // side
    tiles = aux_maps.permute(0, 2, 3, 1).reshape(views, side, region, side, region, channels)
    return tiles.permute(0, 1, 3, 2, 4, 5).reshape(views, side * side, region * region, channels)


def patch_info_mining(patches: Tensor, regions: Tensor, query: nn.Module, key: nn.Module, value: nn.Module) -> Tensor:
    """MGM's token: ``X + softmax(q kᵀ / sqrt(D)) v`` with one query per token over its own region.

    patches: (N, L, D) LR patch tokens X; regions: (N, L, P, C) from :func:`region_vectors`; query maps D -> D, key
    and value C -> D. Returns (N, L, D). The operations are MGM's, in its order and dtype, so low-precision results
    match it too.
    """
    q = query(patches)  # (N, L, D)
    k = key(regions)  # (N, L, P, D)
    v = value(regions)
    logits = q.unsqueeze(2) @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)  # (N, L, 1, P)
    # MGM's nan_to_num: half-precision logits of LayerNorm-ed vectors can overflow.
    mined = logits.nan_to_num().softmax(dim=-1) @ v  # (N, L, 1, D)
    return patches + mined.squeeze(2)


class MinedViews(NamedTuple):
    """The LR views of a batch after mining.

    capture: CLIP layer L over all views (hidden, queries, keys: (B * V, 1 + L, D), CLS first), without autograd.
    tokens: (B * V, L, D) mined patch tokens ``X + mined`` (autograd reaches the mining projections).
    """

    capture: capture.LayerCapture
    tokens: Tensor


def mine_views(
    inner: nn.Module, pixel_values: Tensor, vision_feature_layer: int | None = None, *, eager: bool = False
) -> MinedViews:
    """Run both towers on a batch and mine every LR patch token of every view.

    inner: a :class:`MiniGeminiModel`; pixel_values: (B, 3, S_aux, S_aux). The frozen towers run under no_grad, as in
    MGM (the mining projections keep autograd). CLIP runs with the project's per-call hooks (SDPA kept, early stop
    after layer L; ``eager=True`` for eager attention) so VisionZip reads its queries and keys from the same run.
    """
    config = inner.config
    layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    layer_index = capture.resolve_layer(len(inner.vision_tower.encoder.layers), layer)
    with torch.no_grad():
        captured = capture.run_until(
            inner.vision_tower, low_resolution_views(pixel_values, config), layer_index, eager=eager
        )
        aux_maps = aux_view_maps(aux_feature_map(inner.vision_tower_aux, pixel_values), config)
    side = config.vision_config.image_size // config.vision_config.patch_size
    regions = region_vectors(aux_maps.to(captured.hidden.dtype), side)
    tokens = patch_info_mining(captured.hidden[:, 1:], regions, *(getattr(inner, name) for name in MINING_MODULES))
    return MinedViews(captured, tokens)


def per_image(view_tokens: Tensor, images: int) -> Tensor:
    """(B * V, K, D) tokens of every view -> (B, V * K, D): each image's views in a row, [global, crops] order."""
    return view_tokens.reshape(images, -1, view_tokens.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# The model.


def _norm_linear(width_in: int, width_out: int) -> nn.Sequential:
    """MGM's mining projection: ``Sequential(LayerNorm, Linear)`` (keys ``.0.*`` and ``.1.*``)."""
    return nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, width_out))


class MiniGeminiModel(LlavaModel):
    """LLaVA's inner model (``vision_tower``, ``multi_modal_projector``, ``language_model``) plus MGM's HR tower
    ``vision_tower_aux`` (``ConvNextModel``) and mining projections ``vlm_uni_{query,aux,val}_projector``."""

    config_class = MiniGeminiConfig  # an attribute: with postponed annotations transformers would read a string

    def __init__(self, config: MiniGeminiConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower_aux = AutoModel.from_config(config.aux_vision_config)
        # MGM keeps ConvNeXt's stem and stages only: the pooled head's LayerNorm has no weights in its checkpoints.
        self.vision_tower_aux.layernorm = nn.Identity()
        width, aux_width = config.vision_config.hidden_size, sum(config.aux_vision_config.hidden_sizes)
        self.vlm_uni_query_projector = _norm_linear(width, width)
        self.vlm_uni_aux_projector = _norm_linear(aux_width, width)
        self.vlm_uni_val_projector = _norm_linear(aux_width, width)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """MGM's image features. pixel_values: (B, 3, S_aux, S_aux) normalised HR images. Returns
        ``last_hidden_state`` = (B, V * L, D) mined tokens and ``pooler_output`` = list of B tensors (V * L, text
        hidden), projected. Other LLaVA arguments (``image_sizes``) are accepted and ignored."""
        if vision_feature_select_strategy not in (None, "default"):
            raise ValueError(
                f"Mini-Gemini feeds patch tokens only (strategy 'default'), got {vision_feature_select_strategy!r}"
            )
        tokens = per_image(mine_views(self, pixel_values, vision_feature_layer).tokens, pixel_values.shape[0])
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=list(self.multi_modal_projector(tokens))
        )


class MiniGeminiForConditionalGeneration(LlavaForConditionalGeneration):
    """:class:`MiniGeminiModel` + LLaVA's LM head; ``forward`` and ``generate`` are LLaVA's."""

    config_class = MiniGeminiConfig

    def __init__(self, config: MiniGeminiConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = MiniGeminiModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
