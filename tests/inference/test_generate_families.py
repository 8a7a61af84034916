"""`python -m visionzip_tune generate` on LLaVA-NeXT (anyres crops), Video-LLaVA and OneVision (images and videos).

Each family: a tiny random base saved to disk, zipped, its projector changed as training would, exported with
``export_projector`` and loaded back by the CLI. The expected answer comes from the TRAINING data path
(``SupervisedDataset`` on a one-sample JSON holding the same media) and a direct ``model.generate``: the CLI must
build the same placeholders, pixels and prompt.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import cli_error, greedy_answer, perturb_projector
from PIL import Image

from visionzip_tune.__main__ import main as cli
from visionzip_tune.training import build
from visionzip_tune.data import DataConfig, SupervisedDataset, load_samples
from visionzip_tune.errors import UserError
from visionzip_tune.export import export_projector
from visionzip_tune.inference.chat import Chat
from visionzip_tune.inference.prompts import Prompter
from visionzip_tune.inference.load import load_model
from visionzip_tune.families import apply_visionzip
from visionzip_tune.data.processing import load_processing
from visionzip_tune.demo.tiny import TinySpec, save_tiny

MAX_NEW = 4
DOMINANT, CONTEXTUAL = 5, 2  # K = 7 tokens per crop / frame
K = DOMINANT + CONTEXTUAL
RECIPE_FRAMES = 4  # data.video_frames recorded in the export's recipe: the CLI's default
QUESTION = "What is it?"


def _export(root, family: str):
    """``(trained model, export dir)``: a tiny ``family`` base at 56 px crops, zipped to 5 + 2, projector
    perturbed, exported with a recipe recording ``data.video_frames``."""
    from transformers import AutoModelForImageTextToText

    spec = TinySpec(
        family=family,
        image_size=56,
        patch_size=14,
        vision_hidden=32,
        vision_layers=2,
        text_hidden=32,
        text_init_std=0.2,
    )
    base = save_tiny(root / f"base-{family}", spec)
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    apply_visionzip(model, DOMINANT, CONTEXTUAL)
    perturb_projector(model, seed=3)
    recipe = {"config": {"data": {"video_frames": RECIPE_FRAMES, "template": "vicuna_v1"}}}
    export = export_projector(model, root / f"export-{family}", metadata={"base_model": str(base), "recipe": recipe})
    return model, export


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An image that tiles into a 2x2 grid of crops once padded square, a directory of 6 PNG frames of a square
    moving right, and (with PyAV) the same frames as an mp4."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 150, 3), dtype=np.uint8)).save(root / "wide.png")
    frames = root / "frames"
    frames.mkdir()
    for t in range(6):
        frame = Image.new("RGB", (64, 64), (20, 20, 120))
        frame.paste((230, 200, 30), (4 + 8 * t, 20, 24 + 8 * t, 40))
        frame.save(frames / f"{t:03d}.png")
    return root


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: _export(root, family) for family in ("llava_next", "video_llava", "llava_onevision")}


def _write_mp4(frames_dir, path) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for frame in sorted(frames_dir.iterdir()):
            container.mux(stream.encode(av.VideoFrame.from_image(Image.open(frame).convert("RGB"))))
        container.mux(stream.encode())


def _reference(model, base, media, *, image: str | None = None, video=None) -> tuple[str, list[int]]:
    """The greedy answer to QUESTION about ``image`` / ``video`` (paths relative to ``media``), with the prompt
    and vision inputs built by the training dataset (vicuna_v1, pad, RECIPE_FRAMES frames)."""
    processing = load_processing(str(base))
    sample = {"id": "q", "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "x"}]}
    if image is not None:
        sample["image"] = image
    if video is not None:
        sample["video"] = video
    path = media / "sample.json"
    path.write_text(json.dumps([sample]))
    dataset = SupervisedDataset(
        load_samples(path),
        DataConfig(image_folder=media, video_frames=RECIPE_FRAMES),
        processing,
        build.placeholders(model.config),
    )
    return greedy_answer(model, processing.tokenizer, dataset[0], MAX_NEW)


def _generate(export, capsys, *media_args: str) -> tuple[str, str]:
    """(answer, stderr) of the CLI on ``export`` with ``media_args``."""
    capsys.readouterr()
    argv = [
        "generate",
        "--projector",
        str(export),
        *media_args,
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        str(MAX_NEW),
        "--show-prompt",
    ]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    return captured.out.strip(), captured.err


def test_next_image_tiles_into_crops(exports, media, capsys):
    model, export = exports["llava_next"]
    answer, err = _generate(export, capsys, "--image", str(media / "wide.png"))
    expected, prompt = _reference(model, export.parent / "base-llava_next", media, image="wide.png")
    crops = 5  # padded square -> the 2x2 grid of 56 px crops + the base crop
    assert prompt.count(model.config.image_token_id) == crops * K
    assert f"USER: <image>x{crops * K}\n{QUESTION} ASSISTANT:" in err
    assert f"(VisionZip {DOMINANT} + {CONTEXTUAL}: {crops * K} tokens per image)" in err
    assert expected and answer == expected


def test_onevision_image_and_video(exports, media, capsys):
    model, export = exports["llava_onevision"]
    base = export.parent / "base-llava_onevision"
    answer, err = _generate(export, capsys, "--image", str(media / "wide.png"), "--video", str(media / "frames"))
    frames = sorted(p.name for p in (media / "frames").iterdir())
    expected, prompt = _reference(model, base, media, image="wide.png", video=[f"frames/{f}" for f in frames])
    assert prompt.count(model.config.video_token_id) == RECIPE_FRAMES * K
    assert f"USER: <video>x{RECIPE_FRAMES * K}\n<image>x{5 * K}\n{QUESTION} ASSISTANT:" in err
    assert expected and answer == expected
    # Video alone, with another frame count than the recipe's.
    _, err = _generate(export, capsys, "--video", str(media / "frames"), "--video-frames", "3")
    assert f"USER: <video>x{3 * K}\n{QUESTION} ASSISTANT:" in err and "<image>" not in err


def test_video_llava_image_frames_and_mp4(exports, media, capsys):
    model, export = exports["video_llava"]
    base = export.parent / "base-video_llava"
    answer, err = _generate(export, capsys, "--image", str(media / "wide.png"))
    assert f"USER: <image>x{K}\n{QUESTION} ASSISTANT:" in err
    assert answer == _reference(model, base, media, image="wide.png")[0]

    answer, err = _generate(export, capsys, "--video", str(media / "frames"))
    frames = sorted(p.name for p in (media / "frames").iterdir())
    expected, prompt = _reference(model, base, media, video=[f"frames/{f}" for f in frames])
    assert prompt.count(model.config.video_token_id) == RECIPE_FRAMES * K
    assert f"USER: <video>x{RECIPE_FRAMES * K}\n{QUESTION} ASSISTANT:" in err
    assert f"{RECIPE_FRAMES * K} tokens per video of {RECIPE_FRAMES} frames" in err
    assert expected and answer == expected

    _write_mp4(media / "frames", media / "clip.mp4")
    answer, err = _generate(export, capsys, "--video", str(media / "clip.mp4"))
    assert f"USER: <video>x{RECIPE_FRAMES * K}\n{QUESTION} ASSISTANT:" in err
    assert answer == _reference(model, base, media, video="clip.mp4")[0]


def test_interactive_video_command_starts_over(exports, media, capsys, monkeypatch):
    _, export = exports["video_llava"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/video {media / 'frames'}\n{QUESTION}\n\n"))
    argv = [
        "generate",
        "--projector",
        str(export),
        "--image",
        str(media / "wide.png"),
        "--interactive",
        "--max-new-tokens",
        str(MAX_NEW),
        "--show-prompt",
    ]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 2  # one answer per question
    first, _, second = captured.err.partition(f"(new conversation about {media / 'frames'})")
    assert f"USER: <image>x{K}\n{QUESTION} ASSISTANT:" in first and "<video>" not in first
    # A new conversation about the video and the image kept from before: the first exchange is gone.
    assert f"USER: <video>x{RECIPE_FRAMES * K}\n<image>x{K}\n{QUESTION} ASSISTANT:" in second
    assert second.count("USER:") == 1


def test_generate_media_errors(exports, media, capsys, tmp_path):
    _, next_export = exports["llava_next"]
    _, video_export = exports["video_llava"]
    common = ["--prompt", QUESTION, "--max-new-tokens", "1"]
    message = cli_error(
        ["generate", "--projector", str(next_export), "--video", str(media / "frames"), *common], capsys
    )
    assert "LlavaNextForConditionalGeneration has no video input" in message and "frames" in message
    missing = tmp_path / "none.mp4"
    assert f"missing video {missing}" in cli_error(
        ["generate", "--projector", str(video_export), "--video", str(missing), *common], capsys
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no frame images" in cli_error(
        ["generate", "--projector", str(video_export), "--video", str(empty), *common], capsys
    )
    assert "give an image (--image FILE) and/or a video" in cli_error(
        ["generate", "--projector", str(video_export), *common], capsys
    )
    frames = ["--video", str(media / "frames"), "--video-frames", "0"]
    assert "--video-frames 0: give at least 1 frame per video" in cli_error(
        ["generate", "--projector", str(video_export), *frames, *common], capsys
    )
    model, processing, _ = load_model(None, str(video_export))
    with pytest.raises(UserError, match=r"give an image \(--image FILE\) and/or a video"):
        Chat(model, Prompter.for_recipe(model, processing, None))


def test_full_run_export_generates_with_its_whole_model(exports, media, capsys, tmp_path):
    import copy

    from visionzip_tune.families import language_model, remove_visionzip

    trained, export = exports["video_llava"]
    base = export.parent / "base-video_llava"
    full = copy.deepcopy(trained)  # a 'full' run trains the language model too
    with torch.no_grad():
        for param in language_model(full).layers[0].parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
    recipe = json.loads((export / "visionzip.json").read_text())["recipe"]
    metadata = {"base_model": str(base), "mode": "full", "recipe": recipe}
    full_export = export_projector(full, tmp_path / "full", metadata=metadata, processing=load_processing(str(base)))
    answer, err = _generate(full_export, capsys, "--video", str(media / "frames"))
    frames = [f"frames/{f}" for f in sorted(p.name for p in (media / "frames").iterdir())]
    expected = _reference(full, base, media, video=frames)[0]
    assert expected and answer == expected
    assert expected != _reference(trained, base, media, video=frames)[0]  # the trained language model is used
    assert f"<video>x{RECIPE_FRAMES * K}" in err
    # A full run without VisionZip: a stock model, every patch of every frame (17 with CLS).
    stock = copy.deepcopy(full)
    remove_visionzip(stock)
    stock_export = export_projector(stock, tmp_path / "stock", metadata=metadata, processing=load_processing(str(base)))
    assert f"<video>x{RECIPE_FRAMES * 17}" in _generate(stock_export, capsys, "--video", str(media / "frames"))[1]
    assert "holds the whole trained model" in cli_error(
        [
            "generate",
            "--projector",
            str(full_export),
            "--model",
            str(base),
            "--video",
            str(media / "frames"),
            "--prompt",
            QUESTION,
        ],
        capsys,
    )
