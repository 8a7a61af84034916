"""Videos and multi-crop images in the data path: read_video (frame files, real video files written with PyAV),
MediaTransform per image-processor kind, and SupervisedDataset + Collator batches that the real LLaVA-NeXT,
Video-LLaVA and OneVision models accept (their forward raises when a placeholder count is wrong)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip_tune as vzt
from tiny_families import CROP, build_tiny_next, build_tiny_onevision, build_tiny_video_llava
from visionzip_tune.training import build
from visionzip_tune.data import Collator, DataConfig, SupervisedDataset, load_samples
from visionzip_tune.data.images import MediaTransform
from visionzip_tune.data.validate import BadSample
from visionzip_tune.data.video import read_video, sample_indices
from visionzip_tune.errors import UserError
from visionzip_tune.families import sample_image_tokens, tokens_per_video
from visionzip_tune.data.processing import Processing

av = pytest.importorskip("av")


def grey(level: int, size: tuple[int, int] = (32, 24)) -> Image.Image:
    return Image.new("RGB", size, (level, level, level))


def write_video(path, levels: list[int], container: str | None = None, options: dict | None = None) -> None:
    """A tiny mpeg4 video whose frame k is a flat grey of ``levels[k]``."""
    with av.open(str(path), "w", format=container, options=options) as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()  # writes the header even for a video without frames
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def levels_of(frames: list[Image.Image]) -> list[int]:
    return [int(round(np.asarray(frame).mean())) for frame in frames]


# ----------------------------------------------------------------------------------------------------------------
# read_video


def test_sample_indices_are_uniform_with_both_ends():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(3, 5) == [0, 0, 1, 2, 2]  # fewer frames than asked: repeats
    assert sample_indices(1, 3) == [0, 0, 0]


def test_frame_list_opens_only_the_sampled_frames(tmp_path):
    names = [f"clip/{k:03d}.png" for k in range(10)]
    (tmp_path / "clip").mkdir()
    for k, name in enumerate(names):
        grey(20 * k).save(tmp_path / name)
    (tmp_path / names[1]).write_bytes(b"not a png")  # never sampled: [0, 3, 6, 9]
    frames = read_video(names, tmp_path, 4)
    assert levels_of(frames) == [0, 60, 120, 180] and frames[0].size == (32, 24) and frames[0].mode == "RGB"
    with pytest.raises(BadSample, match=r"unreadable video frame .*clip/001\.png"):
        read_video(names, tmp_path, 10)
    with pytest.raises(BadSample, match=r"missing video frame .*clip/nope\.png"):
        read_video(["clip/nope.png"], tmp_path, 2)


@pytest.mark.parametrize("name, container", [("a.mp4", None), ("a.mkv", "matroska")])
def test_video_file_frames_are_sampled_in_time_order(tmp_path, name, container):
    write_video(tmp_path / name, [20 * k for k in range(10)], container)
    with av.open(str(tmp_path / name)) as probe:  # mp4 records the frame count; matroska does not (demuxed)
        assert probe.streams.video[0].frames == (10 if container is None else 0)
    frames = read_video(name, tmp_path, 4)
    assert len(frames) == 4 and frames[0].size == (32, 32)
    assert all(abs(got - want) <= 3 for got, want in zip(levels_of(frames), [0, 60, 120, 180]))


def test_bad_video_files_name_the_file_and_reason(tmp_path):
    write_video(tmp_path / "ok.mp4", [0, 50, 100])
    (tmp_path / "junk.mp4").write_bytes(b"definitely not a video")
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    write_video(tmp_path / "empty.avi", [], "avi")
    # The frame index up front (faststart), the frames cut off: the count promises frames that never decode.
    write_video(tmp_path / "front.mp4", [20 * k for k in range(10)], options={"movflags": "faststart"})
    data = (tmp_path / "front.mp4").read_bytes()
    (tmp_path / "front.mp4").write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(BadSample, match=r"^missing video .*nope\.mp4$"):
        read_video("nope.mp4", tmp_path, 2)
    for name in ("junk.mp4", "cut.mp4"):
        with pytest.raises(BadSample, match=rf"^unreadable video .*{name}"):
            read_video(name, tmp_path, 2)
    with pytest.raises(BadSample, match=r"^unreadable video .*empty\.avi: no frames$"):
        read_video("empty.avi", tmp_path, 2)
    with pytest.raises(BadSample, match=r"^unreadable video .*front\.mp4: frame \d of 10 could not be decoded$"):
        read_video("front.mp4", tmp_path, 4)


def test_video_file_without_pyav_asks_to_install_it(tmp_path, monkeypatch):
    grey(0).save(tmp_path / "f.png")
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` sees when PyAV is not installed
    with pytest.raises(UserError, match="pip install av"):
        read_video("a.mp4", tmp_path, 2)
    assert len(read_video(["f.png"], tmp_path, 2)) == 2  # frame files need no PyAV


# ----------------------------------------------------------------------------------------------------------------
# MediaTransform


def clip_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})


def video_llava_processor():
    from transformers import VideoLlavaImageProcessor

    return VideoLlavaImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_plain_processors_give_one_tensor_per_image_and_the_padded_sizes():
    for processor in (clip_processor(), video_llava_processor()):  # the latter returns legacy pixel_values_images
        inputs, sizes = MediaTransform(processor).images([noise(40, 100), noise(30, 30)])
        assert set(inputs) == {"pixel_values"} and inputs["pixel_values"].shape == (2, 3, CROP, CROP)
        assert sizes == [(100, 100), (30, 30)]
        _, unpadded = MediaTransform(processor, image_aspect="processor").images([noise(40, 100)])
        assert unpadded == [(40, 100)]


def test_next_pads_then_tiles_the_square():
    _, processor = build_tiny_next()
    transform = MediaTransform(processor.image_processor)
    inputs, sizes = transform.images([noise(40, 100)])
    assert sizes == [(100, 100)] and inputs["image_sizes"].tolist() == [[100, 100]]
    assert inputs["pixel_values"].shape == (1, 5, 3, CROP, CROP)  # square: the 2x2 grid + the base crop
    raw, raw_sizes = MediaTransform(processor.image_processor, image_aspect="processor").images([noise(40, 100)])
    assert raw_sizes == [(40, 100)] and raw["pixel_values"].shape == (1, 3, 3, CROP, CROP)  # 1x2 grid + base


def test_onevision_multi_image_sample_is_untiled_and_counted_so():
    model, processor, _ = build_tiny_onevision()
    transform = MediaTransform(processor.image_processor, image_aspect="processor")
    alone, sizes = transform.images([noise(40, 100)])
    assert alone["pixel_values"].shape == (1, 3, 3, CROP, CROP) and alone["batch_num_images"].tolist() == [1]
    pair, pair_sizes = transform.images([noise(40, 100), noise(100, 90, 1)])
    assert pair["pixel_values"].shape == (2, 1, 3, CROP, CROP)  # base crop only
    assert pair["batch_num_images"].tolist() == [2] and pair["image_sizes"].tolist() == [[40, 100], [100, 90]]
    assert pair_sizes == [(40, 100), (100, 90)]
    vzt.apply_visionzip(model, 5, 2)
    assert sample_image_tokens(model.config, pair_sizes) == [7, 7]
    assert sample_image_tokens(model.config, sizes) == [3 * 7]


def test_video_frames_use_the_whole_frame_resized():
    frames = [noise(40, 100, seed) for seed in range(3)]
    _, next_processor = build_tiny_next()
    _, ov_processor, _ = build_tiny_onevision()
    for processor in (
        clip_processor(),
        video_llava_processor(),
        next_processor.image_processor,
        ov_processor.image_processor,
    ):
        transform = MediaTransform(processor, video_frames=3)
        video = transform.video(frames)
        assert video.shape == (1, 3, 3, CROP, CROP)
        # Each frame as the processor alone would make it, unpadded; anyres: crop 0 (the whole frame resized).
        alone = MediaTransform(processor, image_aspect="processor").images([frames[1]])[0]["pixel_values"][0]
        torch.testing.assert_close(video[0, 1], alone[0] if alone.dim() == 4 else alone)
    with pytest.raises(ValueError, match="a video of 2 frames; this transform samples 3"):
        transform.video(frames[:2])


# ----------------------------------------------------------------------------------------------------------------
# SupervisedDataset + Collator -> the real model's forward


def turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


@pytest.fixture
def media(tmp_path):
    """Images of several shapes and a 5-frame video as frame files and as an mp4."""
    folder = tmp_path / "media"
    (folder / "clip").mkdir(parents=True)
    for name, (h, w) in {"wide": (40, 100), "tall": (100, 40), "big": (150, 120)}.items():
        noise(h, w, len(name)).save(folder / f"{name}.png")
    for k in range(5):
        noise(48, 64, 10 + k).save(folder / "clip" / f"{k:03d}.png")
    write_video(folder / "clip.mp4", [40 * k for k in range(5)])
    return folder


def dataset(
    tmp_path, folder, samples, model, tokenizer, image_processor, *, video=True, frames=3, skip_log=None, **data
):
    """A dataset of ``samples`` with ``model``'s own counts (without its video input when ``video`` is false);
    ``data``: DataConfig fields."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    placeholders = build.placeholders(model.config)
    if not video:
        placeholders = placeholders._replace(video_tokens=None, video_token_id=None)
    return SupervisedDataset(
        load_samples(path, cache_dir=tmp_path / "cache"),
        DataConfig(**{"image_folder": folder, "video_frames": frames, **data}),
        Processing(tokenizer, image_processor, None),
        placeholders,
        skip_log=skip_log,
    )


def forward(model, items, pad_token_id):
    """The collated batch through the model, with labels; returns the batch and the loss."""
    batch = Collator(pad_token_id)(items)
    ids = batch.pop("ids")
    assert ids == [item["id"] for item in items]
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    return batch


FRAMES = [f"clip/{k:03d}.png" for k in range(5)]
IMAGE_SAMPLES = [
    {"id": "wide", "image": "wide.png", "conversations": turns("<image>\nWhat is it?", "red")},
    {"id": "text", "conversations": turns("What is the capital of France?", "Paris")},
    {"id": "tall", "image": "tall.png", "conversations": turns("Colour?<image>", "blue", "Sure?", "yes")},
]
VIDEO_SAMPLES = [
    {"id": "frames", "video": FRAMES, "conversations": turns("<video>\nWhich way does the shape move?", "left")},
    {"id": "file", "video": "clip.mp4", "conversations": turns("What happens?", "nothing")},
]


@pytest.mark.parametrize("zipped", [False, True])
@pytest.mark.parametrize("aspect", ["pad", "processor"])
def test_next_batches_with_crops_run_through_the_model(tmp_path, media, zipped, aspect):
    model, processor = build_tiny_next()
    if zipped:
        vzt.apply_visionzip(model, 6, 3)
    samples = [*IMAGE_SAMPLES, {"id": "big", "image": "big.png", "conversations": turns("<image>\nAnd?", "no")}]
    ds = dataset(
        tmp_path,
        media,
        samples,
        model,
        processor.tokenizer,
        processor.image_processor,
        video=False,
        image_aspect=aspect,
    )
    items = [ds[k] for k in range(len(ds))]
    assert items[1]["vision"] == {}
    for item in (items[0], items[2], items[3]):
        sizes = [tuple(size) for size in item["vision"]["image_sizes"].tolist()]
        expected = sample_image_tokens(model.config, sizes)
        assert (item["input_ids"] == model.config.image_token_id).sum() == sum(expected)
    batch = forward(model, items, processor.tokenizer.pad_token_id)
    crops = [item["vision"]["pixel_values"].shape[1] for item in (items[0], items[2], items[3])]
    assert len(set(crops)) > 1 or aspect == "pad"  # the collator padded different crop counts
    assert batch["pixel_values"].shape == (3, max(crops), 3, CROP, CROP) and batch["image_sizes"].shape == (3, 2)


@pytest.mark.parametrize("zipped", [False, True])
def test_video_llava_batches_of_images_and_videos_run_through_the_model(tmp_path, media, zipped):
    model, tokenizer = build_tiny_video_llava()
    if zipped:
        vzt.apply_visionzip(model, 6, 3)
    both = {"id": "both", "image": "wide.png", "video": FRAMES, "conversations": turns("<image> and <video>?", "x")}
    ds = dataset(tmp_path, media, [*IMAGE_SAMPLES, *VIDEO_SAMPLES, both], model, tokenizer, video_llava_processor())
    items = [ds[k] for k in range(len(ds))]
    video_id = model.config.video_token_id
    for item in items:
        has_video = "pixel_values_videos" in item["vision"]
        assert (item["input_ids"] == video_id).sum() == (tokens_per_video(model.config, 3) if has_video else 0)
        assert (item["labels"][item["input_ids"] == video_id] == -100).all()
    assert items[3]["vision"]["pixel_values_videos"].shape == (1, 3, 3, CROP, CROP)
    # Video-LLaVA's prompt: "USER: <video>\n<image>\n..." -- the video run comes first.
    ids = items[5]["input_ids"].tolist()
    assert ids.index(video_id) < ids.index(model.config.image_token_id)
    batch = forward(model, items, tokenizer.pad_token_id)
    assert batch["pixel_values_videos"].shape == (3, 3, 3, CROP, CROP) and batch["pixel_values"].shape[0] == 3


@pytest.mark.parametrize("zipped", [False, True])
def test_onevision_batches_of_single_multi_image_and_video_samples_run_through_the_model(tmp_path, media, zipped):
    model, processor, tokenizer = build_tiny_onevision()
    if zipped:
        vzt.apply_visionzip(model, 5, 2)
    pair = {"id": "pair", "image": ["wide.png", "big.png"], "conversations": turns("<image><image> Same?", "no")}
    ds = dataset(
        tmp_path,
        media,
        [*IMAGE_SAMPLES, pair, *VIDEO_SAMPLES],
        model,
        tokenizer,
        processor.image_processor,
        image_aspect="processor",
    )
    items = [ds[k] for k in range(len(ds))]
    image_id = model.config.image_token_id
    assert (items[3]["input_ids"] == image_id).sum() == 2 * (7 if zipped else 17)  # untiled: one crop each
    assert items[3]["vision"]["batch_num_images"].tolist() == [2]
    batch = forward(model, items, tokenizer.pad_token_id)
    assert batch["batch_num_images"].tolist() == [1, 1, 2] and batch["pixel_values"].shape[0] == 4
    assert batch["pixel_values_videos"].shape == (2, 3, 3, CROP, CROP)


def test_video_sample_for_a_model_without_video_input(tmp_path, media):
    model, processor = build_tiny_next()
    ds = dataset(
        tmp_path,
        media,
        [VIDEO_SAMPLES[0], IMAGE_SAMPLES[1]],
        model,
        processor.tokenizer,
        processor.image_processor,
        video=False,
        on_bad_sample="skip",
    )
    assert ds[0]["id"] == "text"
    assert ds.read_skipped() == {"frames": "video, but the model takes no video input"}
    strict = dataset(
        tmp_path, media, VIDEO_SAMPLES[:1], model, processor.tokenizer, processor.image_processor, video=False
    )
    with pytest.raises(UserError, match=r"sample id frames: video, but the model takes no video input"):
        strict[0]


def test_bad_videos_are_bad_samples_with_the_file_named(tmp_path, media):
    model, tokenizer = build_tiny_video_llava()
    (media / "junk.mp4").write_bytes(b"junk")
    samples = [
        {"id": "gone", "video": "gone.mp4", "conversations": turns("<video>\nWhat?", "x")},
        {"id": "junk", "video": "junk.mp4", "conversations": turns("<video>\nWhat?", "x")},
        {"id": "hole", "video": ["clip/000.png", "clip/404.png"], "conversations": turns("What?", "x")},
        IMAGE_SAMPLES[1],
    ]
    log = tmp_path / "skipped.jsonl"
    ds = dataset(
        tmp_path, media, samples, model, tokenizer, video_llava_processor(), on_bad_sample="skip", skip_log=log
    )
    assert ds[0]["id"] == "text"
    assert ds.read_skipped()["gone"].startswith("missing video ") and ds.read_skipped()["gone"].endswith("gone.mp4")
    assert ds.read_skipped()["junk"].startswith("unreadable video ") and "junk.mp4" in ds.read_skipped()["junk"]
    assert ds.read_skipped()["hole"].startswith("missing video frame ") and "clip/404.png" in ds.read_skipped()["hole"]
    summary = ds.skip_summary()
    assert "2 missing video" in summary and "1 unreadable video" in summary


def test_video_samples_need_a_folder(tmp_path, media):
    model, tokenizer = build_tiny_video_llava()
    ds = dataset(tmp_path, None, VIDEO_SAMPLES[:1], model, tokenizer, video_llava_processor())
    with pytest.raises(UserError, match=r"data\.json: samples have videos but no video folder was given"):
        ds[0]
    elsewhere = dataset(
        tmp_path,
        tmp_path / "no-images",
        VIDEO_SAMPLES[:1],
        model,
        tokenizer,
        video_llava_processor(),
        video_folder=media,
    )
    assert elsewhere[0]["vision"]["pixel_values_videos"].shape == (1, 3, 3, CROP, CROP)
