"""LLaVA-1.5 (``LlavaForConditionalGeneration``), with a CLIP tower (CLS-row scoring) or a SigLIP one (attention
received): VisionZip zips each image to ``dominant + contextual`` tokens."""

from __future__ import annotations

from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.families.base import IMAGE, Family


def get_image_features(
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
    return FAMILY.features(self, IMAGE, {"pixel_values": pixel_values}, vision_feature_layer)


class Llava(Family):
    name = "llava"
    model_class = "LlavaForConditionalGeneration"
    model_type = "llava"
    overrides = {"get_image_features": get_image_features}


FAMILY = Llava()
