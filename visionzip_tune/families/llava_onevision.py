"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower (no CLS: scores are the attention
each token receives, computed in bounded chunks), anyres crops for an image alone in its sample, one untiled crop
per image of a multi-image sample, frames for video.

VisionZip zips each crop / frame to K tokens, replacing the stock unpad + bilinear downscale + newlines of images
and the 2x2 pooling + trailing newline of videos (there is no official OneVision recipe: the per-crop / per-frame
mapping mirrors LLaVA-NeXT and Video-LLaVA).
"""

from __future__ import annotations

import math

from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.families.base import IMAGE, per_frame_video_features
from visionzip_tune.families.llava_next import AnyresFamily


def get_image_features(
    self,
    pixel_values: Tensor,
    image_sizes: Tensor,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    vision_aspect_ratio: str | None = None,
    batch_num_images: Tensor | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """VisionZip replacement for ``LlavaOnevisionModel.get_image_features``: every crop zipped to K tokens.

    As in the stock method, the images of a sample holding several (``batch_num_images``) keep only their base
    crop. Returns ``last_hidden_state`` = (sum crops, K, D_vision) and ``pooler_output`` = list of B tensors
    (crops_i * K, text hidden), crop after crop.
    """
    inputs = {"pixel_values": pixel_values, "image_sizes": image_sizes, "batch_num_images": batch_num_images}
    return FAMILY.features(self, IMAGE, inputs, vision_feature_layer)


class LlavaOnevision(AnyresFamily):
    name = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    model_type = "llava_onevision"
    frame_tower = "vision_tower"
    overrides = {"get_image_features": get_image_features, "get_video_features": per_frame_video_features(frame_tower)}
    has_video = True
    tiles_every_image = False

    def max_crops(self, config) -> int:
        return int(config.vision_aspect_ratio.removeprefix("anyres_max_"))

    def stock_video_tokens(self, config, frames: int) -> int:
        """Stock OneVision video: each frame's patch grid bilinearly pooled 2x2 (ceil), one newline after it."""
        pooled = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
        return frames * pooled * pooled + 1


FAMILY = LlavaOnevision()
