"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): images through ``image_tower`` as in LLaVA-1.5, videos
through ``video_tower`` frame by frame, one projector. VisionZip zips every image and every frame independently
with the same budget."""

from __future__ import annotations

from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_tune.algorithm import capture
from visionzip_tune.families.base import IMAGE, Family, per_frame_video_features


def get_image_features(
    self,
    pixel_values: Tensor | None = None,
    pixel_values_images: Tensor | None = None,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """VisionZip replacement for ``VideoLlavaModel.get_image_features`` (same parameter names).

    pixel_values (or the deprecated pixel_values_images): (B, 3, H, W). Returns ``last_hidden_state`` = (B, K,
    D_vision) and ``pooler_output`` = (B, K, text hidden), a tensor as the stock method returns.
    """
    pixels = pixel_values if pixel_values is not None else pixel_values_images
    return FAMILY.features(self, IMAGE, {"pixel_values": pixels}, vision_feature_layer)


class VideoLlava(Family):
    name = "video_llava"
    model_class = "VideoLlavaForConditionalGeneration"
    model_type = "video_llava"
    towers = ("image_tower", "video_tower")
    frame_tower = "video_tower"
    overrides = {"get_image_features": get_image_features, "get_video_features": per_frame_video_features(frame_tower)}
    has_video = True

    def features_from_frozen(
        self, inner: nn.Module, modality: str, frozen: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> BaseModelOutputWithPooling:
        """Images: ``pooler_output`` one (B, K, text hidden) tensor, as the stock method returns."""
        if modality != IMAGE:
            return super().features_from_frozen(inner, modality, frozen, inputs)
        rows = frozen["rows"]
        return BaseModelOutputWithPooling(last_hidden_state=rows, pooler_output=inner.multi_modal_projector(rows))

    def stock_video_tokens(self, config, frames: int) -> int:
        """Stock Video-LLaVA feeds every tower token of every frame, CLS included, whatever the select strategy."""
        return frames * capture.tokens_per_tower_output(config.vision_config)


FAMILY = VideoLlava()
