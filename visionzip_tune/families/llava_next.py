"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): one image becomes a base crop plus an anyres grid of crops,
and VisionZip zips every crop with the same budget (the paper's Table 9 budgets are per crop).

The stock ``pack_image_features`` (unpad to the aspect ratio, a newline per row) needs the dense grid that
selection removes, so it is bypassed and ``image_newline`` unused. LLaVA-OneVision tiles images the same way and
uses the anyres helpers of this module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from visionzip_tune.algorithm import capture
from visionzip_tune.families.base import IMAGE, Family, ImageSize, split_fields, zip_units


def crop_count(config, image_size) -> int:
    """Crops of one image of original (height, width) ``image_size``: the base crop + the anyres grid's crops."""
    return image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)


def grid_shape(config, image_size) -> tuple[int, int]:
    """(rows, columns) of the anyres crop grid for original (height, width) ``image_size`` (HF's (h, w) order)."""
    rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    return int(rows), int(cols)


def real_crops(pixel_values: Tensor, crops: list[int]) -> Tensor:
    """The real crops of a batch of anyres images, concatenated (sum crops, 3, S, S): from (B, max_crops, 3, S, S)
    padded pixel values (``crops``: each image's real crop count), or as given when already concatenated."""
    if pixel_values.dim() == 5:
        return torch.cat([pixels[:count] for pixels, count in zip(pixel_values, crops)])
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
    return pixel_values


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


def get_image_features(
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
    inputs = {"pixel_values": pixel_values, "image_sizes": image_sizes}
    return FAMILY.features(self, IMAGE, inputs, vision_feature_layer)


class AnyresFamily(Family):
    """A family that tiles an image into a base crop plus an anyres grid of crops (LLaVA-NeXT, OneVision): every crop
    is zipped to K tokens."""

    anyres = True

    def crops(self, config, inputs: dict[str, Tensor]) -> list[int]:
        """The real crops of each image of a batch: the base crop + its anyres grid's, or one for an image the
        family feeds untiled (OneVision's multi-image samples, ``batch_num_images``)."""
        sizes = inputs["image_sizes"]
        tiled = self.tiled_flags(inputs.get("batch_num_images"), len(sizes))
        return [crop_count(config, size) if tile else 1 for size, tile in zip(sizes, tiled)]

    def frozen_features(self, inner: nn.Module, modality: str, inputs: dict[str, Tensor], layer: int | None = None):
        """Images: every real crop's zipped rows, ``rows`` (sum crops, K, D_vision), and with the grid token order
        its kept positions, ``kept`` (sum crops, dominant)."""
        if modality != IMAGE:
            return super().frozen_features(inner, modality, inputs, layer)
        pixel_values = real_crops(inputs["pixel_values"], self.crops(inner.config, inputs))
        zipped = zip_units(inner, inner.vision_tower, pixel_values, layer)
        if inner.config.visionzip.get("token_order", "flat") == "grid":
            return {"rows": zipped.tokens, "kept": zipped.dominant_indices}
        return {"rows": zipped.tokens}

    def features_from_frozen(
        self, inner: nn.Module, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> BaseModelOutputWithPooling:
        """Images: the crops projected and split per image, crop after crop ("flat") or in the official layout
        ("grid": :func:`grid_order`)."""
        if modality != IMAGE:
            return super().features_from_frozen(inner, modality, frozen, inputs)
        config = inner.config
        crops = self.crops(config, inputs)
        projected = inner.multi_modal_projector(frozen["rows"])  # (sum crops, K, text hidden)
        per_image = [image.flatten(0, 1) for image in torch.split(projected, crops)]
        if "kept" in frozen:
            side = config.vision_config.image_size // config.vision_config.patch_size
            has_cls = capture.tower_has_cls(inner.vision_tower)
            contextual = config.visionzip["contextual"]
            positions = torch.split(frozen["kept"], crops)
            per_image = [
                tokens.index_select(0, grid_order(kept, contextual, grid_shape(config, size), side, has_cls))
                for tokens, kept, size in zip(per_image, positions, inputs["image_sizes"])
            ]
        return BaseModelOutputWithPooling(last_hidden_state=frozen["rows"], pooler_output=per_image)

    def split_frozen(
        self, config, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> list[dict[str, Tensor]]:
        """Images: each image's crops."""
        if modality != IMAGE:
            return super().split_frozen(config, modality, frozen, inputs)
        crops = self.crops(config, inputs)
        return split_fields(frozen, {field: crops for field in frozen})

    def max_crops(self, config) -> int | None:
        """About how many crops' worth the stock layout downscales a big grid to (OneVision); None: never."""
        return None

    def stock_tokens(self, config, image_size: ImageSize | None = None) -> int:
        """Stock anyres layout (``pack_image_features``): the base crop, plus the stitched grid unpadded to the
        image's aspect ratio, downscaled to about :meth:`max_crops` crops' worth when set, one newline per row.

        ``image_size=None`` is an untiled image (one crop; OneVision's multi-image samples): base crop + one newline.
        """
        crop = super().stock_tokens(config)
        if image_size is None:
            return crop + 1
        height, width = image_size
        side = config.vision_config.image_size // config.vision_config.patch_size
        rows, cols = grid_shape(config, (height, width))
        grid_h, grid_w = rows * side, cols * side
        # Unpadding, as in transformers' unpad_image: the padded axis keeps the image's share, rounded the same way.
        if width / height > grid_w / grid_h:
            grid_h -= 2 * ((grid_h - int(round(height * (grid_w / width), 7))) // 2)
        else:
            grid_w -= 2 * ((grid_w - int(round(width * (grid_h / height), 7))) // 2)
        max_crops = self.max_crops(config)
        if max_crops is not None:
            ratio = math.sqrt(grid_h * grid_w / (max_crops * side**2))
            if ratio > 1.1:
                grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
        return crop + grid_h * grid_w + grid_h

    def zipped_tokens(self, config, budget: dict, image_size: ImageSize | None = None) -> int:
        """Every crop zipped to K tokens; ``image_size=None`` is an untiled image (one crop)."""
        crops = 1 if image_size is None else crop_count(config, image_size)
        return crops * self.budget_of(budget).unit_tokens(budget)

    def blank_image(self, config) -> dict[str, Tensor]:
        """One all-zero image of one crop's size, as an anyres processor lays it out: every crop, and its size."""
        size = config.vision_config.image_size
        crops = crop_count(config, (size, size))
        return {"pixel_values": torch.zeros(1, crops, 3, size, size), "image_sizes": torch.tensor([[size, size]])}


class LlavaNext(AnyresFamily):
    name = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    model_type = "llava_next"
    overrides = {"get_image_features": get_image_features}
    token_orders = ("flat", "grid")


FAMILY = LlavaNext()
