"""VisionZip on the multi-crop / multi-frame families (LLaVA-NeXT, Video-LLaVA, LLaVA-OneVision), with tiny random
models at the geometry of ``tests/tiny_families.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip_tune as vzt
from conftest import fed_to_llm
from reference_visionzip import reference_visionzip
from visionzip_tune.families import family_name, tokens_per_image
from visionzip_tune.families.llava_next import grid_order
from visionzip_tune.demo.tiny import IMAGE_TOKEN
from tiny_families import (
    CROP,
    FRAMES,
    PATCH,
    PINPOINTS,
    SIDE,
    build_tiny_next,
    build_tiny_onevision,
    build_tiny_video_llava,
)

PROMPT = "USER: <image>\nWhat colour is the shape? ASSISTANT:"

# ----------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT: 56 px crops of 14 px patches (a 4 x 4 patch grid, 17 tokens with CLS), grids 1x2, 2x1 and 2x2.

# (height, width) -> crops: 1x2 grid (3 crops), 2x2 (5), 2x1 (3), 1x2 with heavy unpadding, 2x2 almost square.
SIZES = [(40, 100), (100, 90), (100, 40), (57, 300), (120, 121)]


@pytest.fixture
def tiny_next():
    return build_tiny_next()


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _next_batch(processor, sizes):
    images = [_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    return processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)


def _image_tokens(model, batch) -> list[int]:
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


def _real_crops(batch) -> list[torch.Tensor]:
    """Each image's real crops (crops_i, 3, S, S), computed independently of the code under test."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    counts = [image_size_to_num_patches(size, PINPOINTS, CROP) for size in batch["image_sizes"]]
    return [pixels[:count] for pixels, count in zip(batch["pixel_values"], counts)]


def test_next_flat_equals_per_crop_reference(tiny_next):
    model, processor = tiny_next
    vzt.apply_visionzip(model, 6, 3, processor)
    assert model.config.visionzip == {"dominant": 6, "contextual": 3, "eager": False, "token_order": "flat"}
    batch = _next_batch(processor, [(40, 100), (100, 90)])
    with torch.no_grad():
        out = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    assert [t.shape[0] for t in out.pooler_output] == [3 * 9, 5 * 9]
    for features, crops in zip(out.pooler_output, _real_crops(batch)):
        # The straightforward route: the stock tower per crop, the reference algorithm per crop, concatenated.
        expected = reference_visionzip(model.model.vision_tower, crops, -2, 6, 3)
        with torch.no_grad():
            projected = model.model.multi_modal_projector(torch.cat(expected.tokens))
        torch.testing.assert_close(features, projected, rtol=0, atol=1e-5)


def _grid_order_fromtiny_spec(tokens, dominant_positions, contextual, rows, cols, side, hidden, has_cls=True):
    """The official layout, written literally: scatter each grid crop's dominant patches into a zero canvas of the
    stitched grid, read it out row by row, then the crops' CLS tokens, then their contextual tokens.

    tokens: (crops, K, hidden) per crop [CLS, dominant patches..., contextual...] ([dominant patches...,
    contextual...] without CLS); dominant_positions: per crop, the sorted tower positions of its dominant tokens.
    """
    dominant, first = len(dominant_positions[0]), int(has_cls)
    canvas = torch.zeros(rows * side, cols * side, hidden)
    filled = torch.zeros(rows * side, cols * side, dtype=torch.bool)
    for c in range(1, tokens.shape[0]):
        crop_row, crop_col = divmod(c - 1, cols)
        for slot, position in enumerate(dominant_positions[c][first:], start=first):
            r, q = divmod(position - first, side)
            canvas[crop_row * side + r, crop_col * side + q] = tokens[c, slot]
            filled[crop_row * side + r, crop_col * side + q] = True
    grid_tokens = [canvas[r, q] for r in range(rows * side) for q in range(cols * side) if filled[r, q]]
    cls_tokens = [tokens[c, 0] for c in range(1, tokens.shape[0])] if has_cls else []
    contextual_tokens = [tokens[c, dominant + j] for c in range(1, tokens.shape[0]) for j in range(contextual)]
    return torch.cat([tokens[0], torch.stack(grid_tokens + cls_tokens + contextual_tokens)])


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("rows, cols", [(2, 2), (1, 2), (2, 1)])
def test_grid_order_equals_literaltiny_spec(rows, cols, has_cls):
    dominant, contextual, hidden = 5, 2, 3
    crops, first = 1 + rows * cols, int(has_cls)
    generator = torch.Generator().manual_seed(rows * 10 + cols)

    def kept_positions():  # CLS (position 0) when the tower has one, then random patches, ascending
        patches = first + torch.randperm(SIDE * SIDE, generator=generator)[: dominant - first]
        return torch.cat([torch.zeros(first, dtype=torch.long), patches.sort().values])

    positions = torch.stack([kept_positions() for _ in range(crops)])
    tokens = torch.randn(crops, dominant + contextual, hidden, generator=generator)
    order = grid_order(positions, contextual, (rows, cols), SIDE, has_cls=has_cls)
    assert sorted(order.tolist()) == list(range(crops * (dominant + contextual)))
    expected = _grid_order_fromtiny_spec(tokens, positions.tolist(), contextual, rows, cols, SIDE, hidden, has_cls)
    assert torch.equal(tokens.flatten(0, 1)[order], expected)


def test_next_grid_order_through_the_model(tiny_next):
    model, processor = tiny_next
    batch = _next_batch(processor, [(100, 90), (40, 100)])  # 2x2 and 1x2 grids
    vzt.apply_visionzip(model, 6, 3, processor)
    with torch.no_grad():
        flat = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    vzt.apply_visionzip(model, token_order="grid")  # the budget stays, only the order changes
    assert model.config.visionzip["token_order"] == "grid" and model.config.visionzip["dominant"] == 6
    with torch.no_grad():
        grid = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    for flat_tokens, grid_tokens, crops, (rows, cols) in zip(flat, grid, _real_crops(batch), [(2, 2), (1, 2)]):
        positions = reference_visionzip(model.model.vision_tower, crops, -2, 6, 3).dominant
        expected = _grid_order_fromtiny_spec(
            flat_tokens.view(len(crops), 9, -1), positions, 3, rows, cols, SIDE, flat_tokens.shape[-1]
        )
        torch.testing.assert_close(grid_tokens, expected, rtol=0, atol=0)
    assert not torch.equal(flat[0], grid[0])  # the orders really differ


@pytest.mark.parametrize("token_order", ["flat", "grid"])
def test_next_processor_count_equals_model_rows(tiny_next, token_order):
    model, processor = tiny_next
    stock = []
    for size in SIZES:
        batch = _next_batch(processor, [size])
        stock.append(_image_tokens(model, batch)[0])
        with torch.no_grad():
            _, fed = fed_to_llm(model, **batch)  # stock: get_placeholder_mask accepts the count
        assert fed["image"].shape[0] == stock[-1] == tokens_per_image(model.config, size)
    vzt.apply_visionzip(model, 6, 3, processor, token_order=token_order)
    batch = _next_batch(processor, SIZES)  # one padded batch of 3- and 5-crop images
    expected = [tokens_per_image(model.config, size) for size in SIZES]
    assert expected == [27, 45, 27, 27, 45]
    assert _image_tokens(model, batch) == expected
    with torch.no_grad():
        _, fed = fed_to_llm(model, **batch)
    assert fed["image"].shape[0] == sum(expected)
    assert all(zipped < full for zipped, full in zip(expected, stock))


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_only_projector_gets_gradients(family, request):
    """Projector mode as training sets it up (build.prepare_trainable): the loss reaches every projector tensor and
    nothing else, through the zipped features."""
    from visionzip_tune.training.build import prepare_trainable
    from visionzip_tune.training.config import TrainConfig
    from visionzip_tune.families import projector_parameters

    if family == "llava":
        model, processor = request.getfixturevalue("tiny_clip")
        vzt.apply_visionzip(model, 54, 10, processor)
        batch = processor(images=[_image(60, 80, k) for k in range(2)], text=[PROMPT] * 2, return_tensors="pt")
    else:
        model, processor = request.getfixturevalue("tiny_next")
        vzt.apply_visionzip(model, 6, 3, processor, token_order="grid")
        batch = _next_batch(processor, [(40, 100), (100, 90)])
    model, trainable = prepare_trainable(model, TrainConfig(mode="projector"))
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    expected = {f"model.{name}" for name in projector_parameters(model)}
    assert with_grad == {name for name, _ in trainable} == expected
    assert all(p.grad.abs().sum() > 0 for p in projector_parameters(model).values())


def test_next_generate(tiny_next):
    model, processor = tiny_next
    vzt.apply_visionzip(model, 6, 3, processor)
    batch = _next_batch(processor, [(100, 90)])
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        first = model(**batch).logits[0, -1].argmax()
    assert generated.shape == (1, batch["input_ids"].shape[1] + 4)
    assert generated[0, batch["input_ids"].shape[1]] == first


def test_next_remove_restores_stock(tiny_next):
    model, processor = tiny_next
    batch = _next_batch(processor, [(40, 100), (100, 90)])
    with torch.no_grad():
        before = model(**batch).logits
    vzt.apply_visionzip(model, 6, 3, processor, token_order="grid")
    assert _image_tokens(model, _next_batch(processor, [(40, 100), (100, 90)])) == [27, 45]
    vzt.remove_visionzip(model, processor)
    assert not hasattr(model.config, "visionzip") and "get_image_features" not in model.model.__dict__
    again = _next_batch(processor, [(40, 100), (100, 90)])
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, before)


def test_next_family_and_bad_inputs(tiny_next):
    model, processor = tiny_next
    assert family_name(model) == family_name(model.config) == "llava_next"
    with pytest.raises(ValueError, match=r"token_order='raster' is not available .* flat, grid"):
        vzt.apply_visionzip(model, 6, 3, token_order="raster")
    assert tokens_per_image(model.config) == 16 + 1  # no size: one untiled crop (base + newline in stock)
    with pytest.raises(ValueError, match=r"dominant=10, contextual=10 for N=17"):
        vzt.apply_visionzip(model, 10, 10)
    assert not hasattr(model.config, "visionzip")  # refused budgets leave the model stock
    vzt.apply_visionzip(model, 6, 3)
    assert tokens_per_image(model.config) == 9  # per crop


def test_llava_has_one_token_order(tiny_clip):
    model, _ = tiny_clip
    with pytest.raises(ValueError, match=r"token_order='grid' is not available for LlavaForConditionalGeneration"):
        vzt.apply_visionzip(model, 54, 10, token_order="grid")
    vzt.apply_visionzip(model, 54, 10, token_order="flat")
    assert "token_order" not in model.config.visionzip  # a family without a choice records none


# ----------------------------------------------------------------------------------------------------------------
# Video-LLaVA: 56 px frames and images of 14 px patches (16 patches + CLS); separate image and video towers.
# VideoLlavaProcessor cannot be constructed here (its video processor needs torchvision), so the model is fed
# hand-built input_ids, and the processor override is exercised on an instance created without __init__.


@pytest.fixture
def tiny_video_llava():
    return build_tiny_video_llava()


def _video_inputs(model, tokenizer, videos: int = 2) -> dict:
    """input_ids with one <image> run and one <video> run per sample, counts from the model's count functions."""
    from visionzip_tune.families import tokens_per_video

    config = model.config
    text = tokenizer("What happens in the video?")["input_ids"]
    ids = (
        text
        + [config.image_token_id] * tokens_per_image(config)
        + [config.video_token_id] * tokens_per_video(config, FRAMES)
        + text[1:]
    )
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.tensor([ids] * videos),
        "pixel_values": torch.randn(videos, 3, CROP, CROP, generator=generator),
        "pixel_values_videos": torch.randn(videos, FRAMES, 3, CROP, CROP, generator=generator),
    }


def test_video_llava_equals_per_frame_reference(tiny_video_llava):
    model, _ = tiny_video_llava
    vzt.apply_visionzip(model, 6, 3)
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, CROP, CROP, generator=generator)
    videos = torch.randn(2, FRAMES, 3, CROP, CROP, generator=generator)
    with torch.no_grad():
        image_out = model.model.get_image_features(pixel_values=images)
        video_out = model.model.get_video_features(pixel_values_videos=videos)
        expected_images = torch.stack(reference_visionzip(model.model.image_tower, images, -2, 6, 3).tokens)
        torch.testing.assert_close(
            image_out.pooler_output, model.model.multi_modal_projector(expected_images), rtol=0, atol=1e-5
        )
        assert video_out.pooler_output.shape == (2, FRAMES * 9, 32)
        for video, features in zip(videos, video_out.pooler_output):
            frames = reference_visionzip(model.model.video_tower, video, -2, 6, 3).tokens  # frame by frame
            torch.testing.assert_close(
                features, model.model.multi_modal_projector(torch.cat(frames)), rtol=0, atol=1e-5
            )
    # The two towers really are used: video frames through the image tower would give other tokens.
    with torch.no_grad():
        through_image_tower = reference_visionzip(model.model.image_tower, videos[0], -2, 6, 3).tokens
    assert not torch.allclose(torch.cat(through_image_tower), video_out.last_hidden_state[:FRAMES].flatten(0, 1))


def test_video_llava_counts_forward_backward(tiny_video_llava):
    from visionzip_tune.families import tokens_per_video

    model, tokenizer = tiny_video_llava
    assert (tokens_per_image(model.config), tokens_per_video(model.config, FRAMES)) == (16, FRAMES * 17)
    with torch.no_grad():
        _, stock = fed_to_llm(model, **_video_inputs(model, tokenizer))  # the stock counts are accepted
    assert stock["video"].shape == (2 * FRAMES * 17, 32)
    vzt.apply_visionzip(model, 6, 3)
    assert (tokens_per_image(model.config), tokens_per_video(model.config, FRAMES)) == (9, FRAMES * 9)
    batch = _video_inputs(model, tokenizer)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.train()
    out, fed = fed_to_llm(model, **batch, labels=batch["input_ids"])
    assert fed["image"].shape == (2 * 9, 32) and fed["video"].shape == (2 * FRAMES * 9, 32)
    out.loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {
        f"model.multi_modal_projector.{n}" for n, _ in model.model.multi_modal_projector.named_parameters()
    }


def test_video_llava_generate_and_remove(tiny_video_llava):
    model, tokenizer = tiny_video_llava
    stock_batch = _video_inputs(model, tokenizer, videos=1)
    with torch.no_grad():
        before = model(**stock_batch).logits
    vzt.apply_visionzip(model, 6, 3)
    batch = _video_inputs(model, tokenizer, videos=1)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        first = model(**batch).logits[0, -1].argmax()
    assert generated[0, batch["input_ids"].shape[1]] == first
    vzt.remove_visionzip(model)
    assert not {"get_image_features", "get_video_features"} & set(model.model.__dict__)
    with torch.no_grad():
        assert torch.equal(model(**stock_batch).logits, before)


def test_video_llava_processor_counts(tiny_video_llava):
    from transformers import VideoLlavaProcessor

    from visionzip_tune.families import tokens_per_video

    model, _ = tiny_video_llava
    processor = VideoLlavaProcessor.__new__(VideoLlavaProcessor)  # __init__ needs torchvision (video processor)
    processor.__dict__.update(
        image_token=IMAGE_TOKEN,
        video_token="<video>",
        patch_size=PATCH,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    images = {"pixel_values": np.zeros((1, 3, CROP, CROP), np.float32)}
    videos = {"pixel_values_videos": [np.zeros((frames, 3, CROP, CROP), np.float32) for frames in (2, 5)]}

    def counts():
        return (
            processor.replace_image_token(images, 0).count(IMAGE_TOKEN),
            [processor.replace_video_token(videos, i).count("<video>") for i in range(2)],
        )

    # The stock processor and the stock count function agree; then both follow the budget, and back.
    assert counts() == (tokens_per_image(model.config), [tokens_per_video(model.config, f) for f in (2, 5)])
    vzt.apply_visionzip(model, 6, 3, processor)
    assert counts() == (9, [18, 45])
    with torch.no_grad():
        frames = model.model.get_video_features(pixel_values_videos=torch.randn(1, 5, 3, CROP, CROP))
    assert frames.pooler_output.shape[1] == 45
    vzt.remove_visionzip(model, processor)
    assert counts() == (16, [34, 85])
    assert family_name(model) == "video_llava"
    with pytest.raises(ValueError, match="has no video input"):
        tokens_per_video(build_tiny_next()[0].config, 4)


# ----------------------------------------------------------------------------------------------------------------
# LLaVA-OneVision: SigLIP 56 px crops of 14 px patches (16 tokens, no CLS, layer -1), grids up to 3x3 and
# anyres_max_4 so that a 3x3 grid takes the stock bilinear-downscale branch. LlavaOnevisionProcessor cannot be
# constructed here (its video processor needs torchvision): its stock count methods run on an instance created
# without __init__, fed by the real LlavaOnevisionImageProcessorPil.

# 1x2 grid, 2x2, 3x3 (downscaled in the stock layout), 3x2, 1x1.
OV_SIZES = [(40, 100), (100, 90), (160, 150), (150, 100), (50, 50)]


@pytest.fixture
def tiny_onevision():
    return build_tiny_onevision()


def _ov_images(processor, samples: list[list[tuple[int, int]]]) -> dict:
    """Real image-processor output for samples of images of the given (height, width)."""
    images = [[_image(h, w, seed) for seed, (h, w) in enumerate(sample)] for sample in samples]
    return dict(processor.image_processor(images, return_tensors="pt"))


def _ov_counts(processor, inputs: dict) -> list[int]:
    """What the processor expands each <image> of the batch to."""
    return [processor.replace_image_token(inputs, i).count(IMAGE_TOKEN) for i in range(len(inputs["image_sizes"]))]


def _ov_ids(model, tokenizer, inputs: dict, counts: list[int]) -> torch.Tensor:
    """Hand-built input_ids: each sample's images' placeholder runs, then a question."""
    text = tokenizer("What is in the image?")["input_ids"]
    ids, start = [], 0
    for n in inputs["batch_num_images"].tolist():
        ids.append(text[:1] + [model.config.image_token_id] * sum(counts[start : start + n]) + text[1:])
        start += n
    assert len({len(row) for row in ids}) == 1, "test batches are built with equal lengths"
    return torch.tensor(ids)


def _ov_forward(model, tokenizer, inputs: dict, counts: list[int], **extra):
    return model(input_ids=_ov_ids(model, tokenizer, inputs, counts), **inputs, **extra)


def _ov_fed_images(model, tokenizer, inputs: dict, counts: list[int]) -> torch.Tensor:
    """The image rows the model feeds its LLM for the hand-built batch."""
    return fed_to_llm(model, input_ids=_ov_ids(model, tokenizer, inputs, counts), **inputs)[1]["image"]


def test_onevision_equals_per_crop_reference(tiny_onevision):
    model, processor, _ = tiny_onevision
    vzt.apply_visionzip(model, 5, 2, processor)
    assert model.config.visionzip == {"dominant": 5, "contextual": 2, "eager": False}  # one order: none recorded
    inputs = _ov_images(processor, [[(40, 100)], [(160, 150)]])
    with torch.no_grad():
        out = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
        )
    assert [t.shape[0] for t in out.pooler_output] == [3 * 7, 10 * 7]
    for features, pixels, count in zip(out.pooler_output, inputs["pixel_values"], (3, 10)):
        expected = reference_visionzip(model.model.vision_tower, pixels[:count], -1, 5, 2)  # SigLIP: received
        with torch.no_grad():
            torch.testing.assert_close(
                features, model.model.multi_modal_projector(torch.cat(expected.tokens)), rtol=0, atol=1e-5
            )


@pytest.mark.parametrize("zipped", [False, True])
def test_onevision_processor_count_equals_model_rows(tiny_onevision, zipped):
    model, processor, tokenizer = tiny_onevision
    if zipped:
        vzt.apply_visionzip(model, 5, 2, processor)
    for size in OV_SIZES:
        inputs = _ov_images(processor, [[size]])
        counts = _ov_counts(processor, inputs)
        assert counts == [tokens_per_image(model.config, size)]
        with torch.no_grad():
            assert _ov_fed_images(model, tokenizer, inputs, counts).shape[0] == counts[0]
    # A sample with two images: neither is tiled, in the stock layout or the zipped one.
    inputs = _ov_images(processor, [[(100, 90), (40, 100)]])
    counts = _ov_counts(processor, inputs)
    assert counts == [tokens_per_image(model.config, None)] * 2 == ([7, 7] if zipped else [17, 17])
    with torch.no_grad():
        assert _ov_fed_images(model, tokenizer, inputs, counts).shape[0] == sum(counts)
    if zipped:
        assert [tokens_per_image(model.config, s) for s in OV_SIZES] == [21, 35, 70, 49, 14]
    else:  # the 3x3 grid of (160, 150) is downscaled by the stock layout
        assert tokens_per_image(model.config, (160, 150)) < 16 + 12 * 12


def test_onevision_video_per_frame(tiny_onevision):
    from visionzip_tune.families import tokens_per_video

    model, processor, tokenizer = tiny_onevision
    videos = {"pixel_values_videos": torch.randn(1, FRAMES, 3, CROP, CROP, generator=torch.Generator().manual_seed(5))}
    stock = processor.replace_video_token(videos, 0).count("<video>")
    assert stock == tokens_per_video(model.config, FRAMES) == FRAMES * 4 + 1  # 2x2 pooling + newline
    vzt.apply_visionzip(model, 5, 2, processor)
    assert processor.replace_video_token(videos, 0).count("<video>") == tokens_per_video(model.config, FRAMES) == 21
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=videos["pixel_values_videos"])
        frames = reference_visionzip(model.model.vision_tower, videos["pixel_values_videos"][0], -1, 5, 2).tokens
        torch.testing.assert_close(
            out.pooler_output[0], model.model.multi_modal_projector(torch.cat(frames)), rtol=0, atol=1e-5
        )
    text = tokenizer("What happens?")["input_ids"]
    ids = torch.tensor([text[:1] + [model.config.video_token_id] * 21 + text[1:]])
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.train()
    model(input_ids=ids, labels=ids, **videos).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        f"model.multi_modal_projector.{n}" for n, _ in model.model.multi_modal_projector.named_parameters()
    }
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=ids, **videos, max_new_tokens=3, do_sample=False)
        assert generated[0, ids.shape[1]] == model(input_ids=ids, **videos).logits[0, -1].argmax()


def test_onevision_remove_restores_stock(tiny_onevision):
    model, processor, tokenizer = tiny_onevision
    inputs = _ov_images(processor, [[(100, 90)]])
    counts = _ov_counts(processor, inputs)
    with torch.no_grad():
        before = _ov_forward(model, tokenizer, inputs, counts).logits
    vzt.apply_visionzip(model, 5, 2, processor)
    assert _ov_counts(processor, inputs) == [35]
    vzt.remove_visionzip(model, processor)
    assert _ov_counts(processor, inputs) == counts
    assert family_name(model) == "llava_onevision"
    with torch.no_grad():
        assert torch.equal(_ov_forward(model, tokenizer, inputs, counts).logits, before)


# ----------------------------------------------------------------------------------------------------------------
# Export round trip, every family: a "trained" projector exported and loaded into a fresh copy of the base.


def _features(family: str, model, processor) -> list[torch.Tensor]:
    """The projected visual tokens the LLM would receive, for fixed inputs of each family."""
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        if family == "llava_next":
            batch = _next_batch(processor, [(100, 90)])
            return list(model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output)
        if family == "video_llava":
            videos = torch.randn(1, FRAMES, 3, CROP, CROP, generator=generator)
            images = torch.randn(1, 3, CROP, CROP, generator=generator)
            return [
                model.model.get_video_features(pixel_values_videos=videos).pooler_output,
                model.model.get_image_features(pixel_values=images).pooler_output,
            ]
        inputs = _ov_images(processor, [[(160, 150)]])
        return list(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)


_BUILDERS = {
    "llava_next": lambda: build_tiny_next(),
    "video_llava": lambda: (build_tiny_video_llava()[0], None),
    "llava_onevision": lambda: build_tiny_onevision()[:2],
}


def _round_trip(family: str, tmp_path, **apply_kwargs):
    from conftest import perturb_projector

    from visionzip_tune.export import export_projector

    trained, processor = _BUILDERS[family]()
    vzt.apply_visionzip(trained, 6 if family != "llava_onevision" else 5, 2, processor, **apply_kwargs)
    perturb_projector(trained)
    out = export_projector(trained, tmp_path / "export", metadata={"base_model": f"tiny-{family}"})
    fresh, fresh_processor = _BUILDERS[family]()
    vzt.load_projector(fresh, out, processor=fresh_processor)
    return trained, processor, fresh, fresh_processor


@pytest.mark.parametrize("family", sorted(_BUILDERS))
def test_export_round_trip(family, tmp_path):
    trained, processor, fresh, fresh_processor = _round_trip(family, tmp_path)
    assert family_name(fresh) == family and fresh.config.visionzip == trained.config.visionzip
    for expected, loaded in zip(_features(family, trained, processor), _features(family, fresh, fresh_processor)):
        assert torch.equal(loaded, expected)
    stock, stock_processor = _BUILDERS[family]()  # without the load the features differ: the test sees the load
    vzt.apply_visionzip(stock, **{k: trained.config.visionzip[k] for k in ("dominant", "contextual")})
    assert not torch.equal(_features(family, stock, stock_processor)[0], _features(family, trained, processor)[0])


def test_export_round_trip_keeps_grid_order(tmp_path):
    _, _, fresh, _ = _round_trip("llava_next", tmp_path, token_order="grid")
    assert fresh.config.visionzip["token_order"] == "grid"
