"""Mini-Gemini's configuration: :class:`MiniGeminiConfig` (LLaVA's plus MGM's high-resolution tower and view layout)
and the token counts that follow from the config alone (what the processor expands each ``<image>`` to)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlavaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# LAION ConvNeXt-L (open_clip convnext_large_d_320 = timm convnext_large) as MGM-7B/13B use it.
_CONVNEXT_LARGE = {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]}


@strict
class MiniGeminiConfig(LlavaConfig):
    r"""LLaVA's config plus MGM's HR tower and layout.

    aux_vision_config: the HR tower (a ``ConvNextConfig``; default ConvNeXt-L). image_size_aux: side of the HR image
    in ``pixel_values`` (768; HD 1536). image_grid: LR crops per side (1; HD 2). image_global: add a global view to
    the crops (HD). ``vision_feature_select_strategy`` must stay "default" (MGM's "patch": CLS dropped) and
    ``vision_feature_layer`` an int. ``image_seq_length`` is derived: the stock tokens per image. Images are padded
    to a square with the mean colour before the image processor, as MGM does (the data path's ``image_aspect: pad``).
    """

    model_type = "mini_gemini"
    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        "aux_vision_config": SubConfigSpec(config_class=AutoConfig, model_type="convnext", init_kwargs=_CONVNEXT_LARGE),
    }

    aux_vision_config: dict | PreTrainedConfig | None = None
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _validate(self)
        self.image_seq_length = stock_tokens_per_image(self)


def _validate(config: MiniGeminiConfig) -> None:
    """ValueError naming the values unless the geometry is one MGM's computation is defined for."""
    vision, aux = config.vision_config, config.aux_vision_config
    problems = []
    if vision.model_type != "clip_vision_model" or aux.model_type != "convnext":
        problems.append(f"towers must be CLIP (LR) and ConvNeXt (HR), got {vision.model_type} and {aux.model_type}")
    if config.vision_feature_select_strategy != "default":
        problems.append(
            f"vision_feature_select_strategy must be 'default' (CLS dropped), got "
            f"{config.vision_feature_select_strategy!r}"
        )
    if isinstance(config.vision_feature_layer, bool) or not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer must be one int, got {config.vision_feature_layer!r}")
    if config.image_grid < 1 or (config.image_global and config.image_grid < 2):
        problems.append(
            f"image_grid={config.image_grid}, image_global={config.image_global}: need image_grid >= 1, "
            "and image_grid >= 2 for a global view"
        )
    side = vision.image_size // vision.patch_size
    stride = aux.patch_size  # stage 0 of ConvNeXt has the stem's stride
    if config.image_size_aux % stride or (config.image_size_aux // stride) % (max(config.image_grid, 1) * side):
        problems.append(
            f"image_size_aux={config.image_size_aux}: its HR map (stride {stride}) must split into image_grid="
            f"{config.image_grid} x {side} equal regions per side (one per LR token of each view)"
        )
    if problems:
        raise ValueError("invalid MiniGeminiConfig: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Token counts (config only): what the processor must expand each <image> to.


def views_per_image(config) -> int:
    """LR views per image: 1, or image_grid² crops (+ 1 global view)."""
    return 1 if config.image_grid == 1 else config.image_grid**2 + int(config.image_global)


def patches_per_view(config) -> int:
    """LR patch tokens per view, L (576 for CLIP ViT-L/14 at 336 px)."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def stock_tokens_per_image(config, image_size: tuple[int, int] | None = None) -> int:
    """Placeholder tokens of one image in stock MGM: views x L (576; HD 2,880). ``image_size`` is ignored (every
    image is padded to a square first)."""
    return views_per_image(config) * patches_per_view(config)
