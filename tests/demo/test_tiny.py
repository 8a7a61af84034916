"""Tiny random models of every family (visionzip_tune.demo.tiny): saved, reloaded through the Auto classes and
load_processing, and fed real image-processor output with the placeholder counts the families compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import fed_to_llm

from visionzip_tune.errors import UserError
from visionzip_tune.families import family_name, language_model, sample_image_tokens, tokens_per_video
from visionzip_tune.data.processing import load_processing
from visionzip_tune.demo.tiny import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    TinySpec,
    build_processor,
    build_tiny,
    build_tiny_with_processor,
    image_grid_pinpoints,
    save_tiny,
)

FAMILIES = ["llava", "llava_next", "video_llava", "llava_onevision"]
CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "video_llava": "VideoLlavaForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
FRAMES = 3
IMAGE_HW = (40, 70)  # not square: the anyres families tile it into a grid and (stock) unpad it


def tiny_spec(family: str, **changes) -> TinySpec:
    """28 px images / crops / frames of 14 px patches (2 x 2 patches), 16-wide one- and two-layer models."""
    geometry = dict(
        image_size=28,
        patch_size=14,
        vision_hidden=16,
        vision_layers=2,
        vision_heads=2,
        text_hidden=16,
        text_layers=1,
        text_heads=2,
    )
    return TinySpec(family=family, **{**geometry, **changes})


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _image_inputs(family: str, image_processor, images: list[Image.Image]) -> tuple[dict, list[tuple[int, int]]]:
    """One sample's images through the image processor: the model's image kwargs and the (h, w) each image counts
    with (the processor's image_sizes rows for anyres families, the PIL size otherwise)."""
    batch = image_processor([images] if family == "llava_onevision" else images, return_tensors="pt")
    inputs = {("pixel_values" if key == "pixel_values_images" else key): value for key, value in batch.items()}
    if "image_sizes" in inputs:
        return inputs, [(int(h), int(w)) for h, w in inputs["image_sizes"]]
    return inputs, [(image.height, image.width) for image in images]


def _video_inputs(image_processor, frames: list[Image.Image]) -> dict:
    """pixel_values_videos (1, T, 3, S, S): every frame through the image processor, the base crop of anyres ones."""
    pixels = image_processor(frames, return_tensors="pt")
    pixels = pixels.get("pixel_values", pixels.get("pixel_values_images"))
    return {"pixel_values_videos": (pixels[:, 0] if pixels.dim() == 5 else pixels).unsqueeze(0)}


def _ids(tokenizer, token: str, count: int) -> torch.Tensor:
    """<s>, ``count`` placeholder tokens, then a question: one sample's input_ids (1, T)."""
    text = tokenizer("What is in it?")["input_ids"]
    return torch.tensor([text[:1] + [tokenizer.convert_tokens_to_ids(token)] * count + text[1:]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model saved once by save_tiny (the tests only read the directories)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(root / family, tiny_spec(family)) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_loads_through_auto_classes_and_load_processing(saved, family):
    model = AutoModelForImageTextToText.from_pretrained(saved[family])
    assert type(model).__name__ == CLASSES[family] and family_name(model) == family
    built, _, _ = build_tiny(tiny_spec(family))  # what was saved is the seeded random model, weight for weight
    loaded, expected = model.state_dict(), built.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    tokenizer, image_processor, chat_template = load_processing(str(saved[family]))
    assert chat_template == CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id
    assert tokenizer.pad_token_id == model.config.pad_token_id == model.config.text_config.pad_token_id
    if family in ("video_llava", "llava_onevision"):
        assert tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) == model.config.video_token_id
    else:
        assert VIDEO_TOKEN not in tokenizer.get_vocab()
    expected_processor = {
        "llava": "CLIPImageProcessorPil",
        "llava_next": "LlavaNextImageProcessorPil",
        "video_llava": "VideoLlavaImageProcessor",
        "llava_onevision": "LlavaOnevisionImageProcessorPil",
    }[family]
    assert type(image_processor).__name__ == expected_processor
    if family in ("llava", "llava_next"):  # their whole processor is saved too
        assert type(AutoProcessor.from_pretrained(saved[family])).__name__ == CLASSES[family].replace(
            "ForConditionalGeneration", "Processor"
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_image_forward_with_the_counted_placeholders(saved, family):
    model = AutoModelForImageTextToText.from_pretrained(saved[family])
    tokenizer, image_processor, _ = load_processing(str(saved[family]))
    inputs, sizes = _image_inputs(family, image_processor, [_image(*IMAGE_HW)])
    (count,) = sample_image_tokens(model.config, sizes)
    if family in ("llava_next", "llava_onevision"):
        assert inputs["pixel_values"].shape[1] == 5  # a base crop and a 2 x 2 grid
        assert count > 4 + 4  # more than the base crop's 4 patches: the grid is fed too
    with torch.no_grad():
        _, fed = fed_to_llm(model, input_ids=_ids(tokenizer, IMAGE_TOKEN, count), **inputs)
        assert fed["image"].shape[0] == count
        with pytest.raises(ValueError, match="do not match"):  # one placeholder more is refused: the count is exact
            model(input_ids=_ids(tokenizer, IMAGE_TOKEN, count + 1), **inputs)


def test_onevision_multi_image_sample_is_fed_untiled(saved):
    model = AutoModelForImageTextToText.from_pretrained(saved["llava_onevision"])
    tokenizer, image_processor, _ = load_processing(str(saved["llava_onevision"]))
    inputs, sizes = _image_inputs("llava_onevision", image_processor, [_image(*IMAGE_HW), _image(70, 40, seed=1)])
    counts = sample_image_tokens(model.config, sizes)
    assert inputs["pixel_values"].shape[:2] == (2, 1) and counts == [4 + 1, 4 + 1]  # base crop + newline each
    with torch.no_grad():
        assert (
            fed_to_llm(model, input_ids=_ids(tokenizer, IMAGE_TOKEN, sum(counts)), **inputs)[1]["image"].shape[0] == 10
        )


@pytest.mark.parametrize("family", ["video_llava", "llava_onevision"])
def test_video_forward_with_the_counted_placeholders(saved, family):
    model = AutoModelForImageTextToText.from_pretrained(saved[family])
    tokenizer, image_processor, _ = load_processing(str(saved[family]))
    videos = _video_inputs(image_processor, [_image(*IMAGE_HW, seed=f) for f in range(FRAMES)])
    assert videos["pixel_values_videos"].shape == (1, FRAMES, 3, 28, 28)
    count = tokens_per_video(model.config, FRAMES)
    assert count == {"video_llava": FRAMES * (4 + 1), "llava_onevision": FRAMES * 1 + 1}[family]
    with torch.no_grad():
        _, fed = fed_to_llm(model, input_ids=_ids(tokenizer, VIDEO_TOKEN, count), **videos)
        assert fed["video"].shape[0] == count  # frames x tokens (+ OneVision's newline)
        with pytest.raises(ValueError, match="do not match"):
            model(input_ids=_ids(tokenizer, VIDEO_TOKEN, count + 1), **videos)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_init_std_and_seed_apply_to_every_family(family):
    wide, _, _ = build_tiny(tiny_spec(family, text_init_std=0.5))
    narrow, _, _ = build_tiny(tiny_spec(family))
    for model, std in ((wide, 0.5), (narrow, 0.02)):
        llm_weight = language_model(model).layers[0].mlp.gate_proj.weight
        assert llm_weight.std().item() == pytest.approx(std, rel=0.2)
        assert model.model.multi_modal_projector.linear_1.weight.std().item() == pytest.approx(std, rel=0.2)
    again, _, _ = build_tiny(tiny_spec(family))
    other, _, _ = build_tiny(tiny_spec(family, seed=1))
    weight = narrow.model.multi_modal_projector.linear_1.weight
    assert torch.equal(again.model.multi_modal_projector.linear_1.weight, weight)
    assert not torch.equal(other.model.multi_modal_projector.linear_1.weight, weight)


def test_towers_follow_the_family_unless_given():
    towers = {family: type(build_tiny(tiny_spec(family))[0].config.vision_config).__name__ for family in FAMILIES}
    assert towers == {
        "llava": "CLIPVisionConfig",
        "llava_next": "CLIPVisionConfig",
        "video_llava": "CLIPVisionConfig",
        "llava_onevision": "SiglipVisionConfig",
    }
    siglip_llava, _, image_processor = build_tiny(tiny_spec("llava", tower="siglip"))
    assert type(siglip_llava.config.vision_config).__name__ == "SiglipVisionConfig"
    config = siglip_llava.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert type(image_processor).__name__ == "SiglipImageProcessorPil"


def test_crop_grids_become_pinpoints():
    spec = tiny_spec("llava_next", crop_grids="1x2 2x1 3x3")
    assert image_grid_pinpoints(spec) == [[28, 56], [56, 28], [84, 84]]
    model, _, image_processor = build_tiny(spec)
    assert model.config.image_grid_pinpoints == image_processor.image_grid_pinpoints == [[28, 56], [56, 28], [84, 84]]
    for bad in ("2 x 2", "2x0", "axb", ""):
        with pytest.raises(UserError, match="model.tiny.crop_grids"):
            image_grid_pinpoints(tiny_spec("llava_next", crop_grids=bad))


def test_processor_classes_that_need_torchvision_are_refused():
    tokenizer = build_tiny(tiny_spec("video_llava"))[1]
    with pytest.raises(ValueError, match="needs torchvision"):
        build_processor(tiny_spec("video_llava"), tokenizer)
    with pytest.raises(ValueError, match="needs torchvision"):
        build_tiny_with_processor(tiny_spec("llava_onevision"))


def test_save_tiny_replaces_a_directory_atomically(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier build")
    save_tiny(out, tiny_spec("llava_next", seed=3))
    assert not (out / "stale.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["model"]
    loaded = AutoModelForImageTextToText.from_pretrained(out).model.multi_modal_projector.linear_1.weight
    assert torch.equal(
        loaded, build_tiny(tiny_spec("llava_next", seed=3))[0].model.multi_modal_projector.linear_1.weight
    )
