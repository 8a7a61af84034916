"""Tiny random models of the multi-crop / multi-frame families at one small geometry, shared by the tests of the
families, the data path and the export."""

from __future__ import annotations

from visionzip_tune.demo.tiny import IMAGE_TOKEN, VIDEO_TOKEN, TinySpec, build_tiny, build_tiny_with_processor

# 56 px crops (frames, images) of 14 px patches: a 4 x 4 patch grid (17 tokens with CLS).
CROP, PATCH, SIDE = 56, 14, 4
PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # LLaVA-NeXT: grids 1x2, 2x1 and 2x2
FRAMES = 3  # frames per Video-LLaVA video
OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [112, 168], [168, 112], [168, 168]]  # OneVision


def tiny_spec(family: str, seed: int, crop_grids: str = "1x2 2x1 2x2") -> TinySpec:
    """CROP px crops / frames of PATCH px patches, a 3-layer tower and a 2-layer Llama, 32 wide, for every family."""
    return TinySpec(
        family=family,
        image_size=CROP,
        patch_size=PATCH,
        vision_hidden=32,
        vision_layers=3,
        vision_heads=4,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        seed=seed,
        crop_grids=crop_grids,
    )


def build_tiny_next(seed: int = 0):
    """A random LlavaNextForConditionalGeneration (CLIP tower, Llama LLM, PINPOINTS) and its LlavaNextProcessor."""
    model, processor = build_tiny_with_processor(tiny_spec("llava_next", seed))
    assert model.config.image_grid_pinpoints == PINPOINTS
    return model, processor


def build_tiny_video_llava(seed: int = 0):
    """A random VideoLlavaForConditionalGeneration (CLIP towers, Llama LLM) and its tokenizer with <video>."""
    model, tokenizer, _ = build_tiny(tiny_spec("video_llava", seed))
    return model, tokenizer


def build_tiny_onevision(seed: int = 0):
    """A random LlavaOnevisionForConditionalGeneration (SigLIP tower, Llama LLM, OV_PINPOINTS, anyres_max_4), its
    image processor and a processor instance with the attributes its count methods read, and the tokenizer."""
    from transformers import LlavaOnevisionProcessor

    model, tokenizer, image_processor = build_tiny(tiny_spec("llava_onevision", seed, "1x1 1x2 2x1 2x2 2x3 3x2 3x3"))
    assert model.config.image_grid_pinpoints == OV_PINPOINTS and model.config.vision_aspect_ratio == "anyres_max_4"
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    processor.__dict__.update(
        image_processor=image_processor,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        num_image_tokens=SIDE * SIDE,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_4",
    )
    return model, processor, tokenizer
