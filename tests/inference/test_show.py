"""`python -m visionzip_tune show`: the outlined cells of the written PNG, read back from its pixels, are exactly the
dominant patches an independent VisionZip (tests/reference_visionzip.py) selects, per crop for anyres."""

from __future__ import annotations

import numpy as np
import torch
from conftest import EVAL_SPEC, cli_error
from PIL import Image
from reference_visionzip import reference_visionzip

from visionzip_tune.__main__ import main as cli
from visionzip_tune.loading import load_model_processing, load_vlm
from visionzip_tune.data.images import MediaTransform
from visionzip_tune.algorithm.capture import resolve_layer
from visionzip_tune.families import vision_tower
from visionzip_tune.families.base import zip_tower
from visionzip_tune.models.mini_gemini.modeling_mini_gemini import low_resolution_views
from visionzip_tune.inference.picture import GAP, HEADER, Layout, outlined
from visionzip_tune.demo.tiny import TinySpec, save_tiny

CELL = 8
SIDE = EVAL_SPEC.image_size // EVAL_SPEC.patch_size


def expected_patches(model_dir, picture: Image.Image, dominant: int, contextual: int) -> list[list[int]]:
    """Per unit (image or crop), the dominant patches (raster indices, CLS left out) of the reference VisionZip on
    the pixels the model's image processor makes of ``picture`` (LLaVA's pad-to-square)."""
    model = load_vlm(str(model_dir))
    pixels = MediaTransform(load_model_processing(str(model_dir)).image_processor).images([picture])[0]
    units = pixels["pixel_values"].flatten(0, -4)  # (images, 3, S, S), or an anyres image's (crops, 3, S, S)
    reference = reference_visionzip(vision_tower(model), units, -2, dominant, contextual)
    return [[p - 1 for p in kept if p > 0] for kept in reference.dominant]


def show(model_dir, picture_path, out, *budget: str) -> Image.Image:
    argv = ["show", "--model", str(model_dir), "--image", str(picture_path), "--output", str(out), "--cell"]
    assert cli([*argv, str(CELL), *budget]) == 0
    return Image.open(out)


def test_outlined_cells_are_the_dominant_patches(eval_assets, tmp_path):
    model_dir = eval_assets[0]
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (70, 56, 3), dtype=np.uint8))
    picture.save(tmp_path / "noise.png")
    image = show(model_dir, tmp_path / "noise.png", tmp_path / "kept.png", "--dominant", "6", "--contextual", "2")
    size = SIDE * CELL
    assert image.height == HEADER + size and image.width >= 2 * size + GAP  # the image, its heat map beside it
    found = outlined(image, Layout(SIDE, CELL), 1)
    assert found == expected_patches(model_dir, picture, 6, 2) and len(found[0]) == 5  # CLS + 5 patches


def test_contextual_groups_each_have_their_own_colour(eval_assets, tmp_path):
    model_dir = eval_assets[0]
    plain = Image.new("RGB", (56, 56), (120, 120, 120))  # one colour: a cell's fill shows only its group
    plain.save(tmp_path / "plain.png")
    image = np.asarray(
        show(model_dir, tmp_path / "plain.png", tmp_path / "kept.png", "--dominant", "4", "--contextual", "3")
    )
    model = load_vlm(str(model_dir))
    pixels = MediaTransform(load_model_processing(str(model_dir)).image_processor).images([plain])[0]["pixel_values"]
    with torch.no_grad():
        groups = zip_tower(vision_tower(model), pixels, resolve_layer(2, -2), 4, 3).groups[0, 1:].tolist()
    layout = Layout(SIDE, CELL)
    fills = {}
    for patch, group in enumerate(groups):
        x, y = layout.cell_origin(0, patch)
        colour = tuple(image[y + CELL // 2, x + CELL // 2])
        fills.setdefault(group, set()).add(colour)
    assert all(len(colours) == 1 for colours in fills.values())  # one colour per group
    contextual = {g: c.pop() for g, c in fills.items() if g >= 0}
    assert len(set(contextual.values())) == len(contextual)  # a different colour for each group


def test_anyres_draws_every_crop(tmp_path):
    spec = TinySpec(family="llava_next", image_size=56, patch_size=14, vision_layers=2, crop_grids="1x2 2x1")
    model_dir = save_tiny(tmp_path / "tiny-next", spec)
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (56, 112, 3), dtype=np.uint8))  # wide: a 1 x 2 crop grid
    picture.save(tmp_path / "wide.png")
    image = show(model_dir, tmp_path / "wide.png", tmp_path / "kept.png", "--dominant", "5", "--contextual", "2")
    expected = expected_patches(model_dir, picture, 5, 2)
    assert len(expected) == 3  # the base crop and the two grid crops
    assert outlined(image, Layout(SIDE, CELL), len(expected)) == expected


def test_video_frames_are_drawn_one_per_row_after_the_image(tmp_path):
    spec = TinySpec(
        family="video_llava", image_size=56, patch_size=14, vision_hidden=32, vision_layers=2, text_hidden=32
    )
    model_dir = save_tiny(tmp_path / "tiny-video", spec)
    rng = np.random.default_rng(2)
    (tmp_path / "frames").mkdir()
    frames = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(3)]
    for t, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"{t:03d}.png")
    picture = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    argv = ["--video", str(tmp_path / "frames"), "--video-frames", "3", "--dominant", "5", "--contextual", "2"]
    image = show(model_dir, tmp_path / "picture.png", tmp_path / "kept.png", *argv)
    model = load_vlm(str(model_dir))
    transform = MediaTransform(load_model_processing(str(model_dir)).image_processor, video_frames=3)
    video = transform.video(frames)[0]  # (3, 3, S, S): the frames as the video tower sees them
    by_frame = reference_visionzip(model.model.video_tower, video, -2, 5, 2).dominant
    expected = expected_patches(model_dir, picture, 5, 2) + [[p - 1 for p in kept if p > 0] for kept in by_frame]
    assert outlined(image, Layout(SIDE, CELL), 4) == expected


def test_mini_gemini_draws_the_low_resolution_view_clip_saw(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny-mgm", TinySpec(family="mini_gemini", image_size=56, vision_layers=2))
    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    image = show(model_dir, tmp_path / "picture.png", tmp_path / "kept.png", "--dominant", "5", "--contextual", "2")
    model = load_vlm(str(model_dir))
    high = MediaTransform(load_model_processing(str(model_dir)).image_processor).images([picture])[0]["pixel_values"]
    views = low_resolution_views(high, model.config)  # selection reads CLIP's CLS attention; mining comes after
    kept = reference_visionzip(model.model.vision_tower, views, model.config.vision_feature_layer, 5, 2).dominant
    assert outlined(image, Layout(SIDE, CELL), 1) == [[p - 1 for p in kept[0] if p > 0]]


def test_qwen_is_refused_with_what_to_use_instead(tmp_path, capsys):
    spec = TinySpec(family="qwen2_5_vl", image_size=112, vision_hidden=32, vision_layers=2, text_hidden=32)
    model_dir = save_tiny(tmp_path / "tiny-qwen", spec)
    Image.new("RGB", (56, 56)).save(tmp_path / "x.png")
    argv = ["show", "--model", str(model_dir), "--image", str(tmp_path / "x.png"), "--output", str(tmp_path / "k.png")]
    assert "does not draw yet. Time or score Qwen budgets with bench-infer or eval" in cli_error(argv, capsys)
    assert not (tmp_path / "k.png").exists()


def test_show_needs_a_budget(eval_assets, tmp_path, capsys):
    Image.new("RGB", (56, 56)).save(tmp_path / "x.png")
    argv = ["show", "--model", str(eval_assets[0]), "--image", str(tmp_path / "x.png")]
    assert "no budget to show" in cli_error(argv, capsys)


def test_other_compressors_are_drawn_from_the_groups_they_record(eval_assets, tmp_path):
    """--budget divprune:5: the outlined cells are the patches an independent DivPrune keeps (on the pixels the
    model's image processor makes); --budget pool:4: no cell is outlined and the four 2 x 2 bins each have one
    colour of their own, on a one-colour image."""
    import reference_compressors

    model_dir = eval_assets[0]
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    picture.save(tmp_path / "noise.png")
    image = show(model_dir, tmp_path / "noise.png", tmp_path / "kept.png", "--budget", "divprune:5")
    model = load_vlm(str(model_dir))
    pixels = MediaTransform(load_model_processing(str(model_dir)).image_processor).images([picture])[0]
    (unit,) = reference_compressors.tower_signals(vision_tower(model), pixels["pixel_values"], -2)
    assert outlined(image, Layout(SIDE, CELL), 1) == [reference_compressors.divprune_kept(unit.patches, 5)]

    Image.new("RGB", (56, 56), (120, 120, 120)).save(tmp_path / "plain.png")
    pooled = show(model_dir, tmp_path / "plain.png", tmp_path / "pooled.png", "--budget", "pool:4")
    assert outlined(pooled, Layout(SIDE, CELL), 1) == [[]]
    pixels, layout = np.asarray(pooled), Layout(SIDE, CELL)
    colour = {}
    for patch in range(SIDE * SIDE):
        x, y = layout.cell_origin(0, patch)
        colour.setdefault((patch // SIDE // 2, patch % SIDE // 2), set()).add(
            tuple(pixels[y + CELL // 2, x + CELL // 2])
        )
    assert all(len(c) == 1 for c in colour.values()) and len({c.pop() for c in colour.values()}) == 4


def test_a_budget_is_given_one_way(eval_assets, tmp_path, capsys):
    model_dir = eval_assets[0]
    Image.new("RGB", (56, 56)).save(tmp_path / "x.png")
    argv = ["show", "--model", str(model_dir), "--image", str(tmp_path / "x.png"), "--budget", "pool:4"]
    assert "--budget pool:4 and --dominant both set a budget" in cli_error([*argv, "--dominant", "4"], capsys)
    assert "--budget: 'pool4' is neither" in cli_error([*argv[:-1], "pool4"], capsys)
    assert "--video-frames 4: it sets the frames taken from --video" in cli_error(
        [*argv, "--video-frames", "4"], capsys
    )
