"""``python -m visionzip_tune data check|preview|demo`` and their error handling, called in-process."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from visionzip_tune.__main__ import main as vzt_main
from visionzip_tune.data import load_samples
from visionzip_tune.demo.dataset import make_demo_dataset
from visionzip_tune.cli.data import main
from visionzip_tune.demo.dataset import COLOURS, QUESTIONS
from visionzip_tune.errors import UserError


def turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


@pytest.mark.parametrize("command", [[], ["subset"], ["check"], ["preview"], ["demo"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: python -m visionzip_tune data" in capsys.readouterr().out


def test_check_lists_every_bad_sample_and_exits_nonzero(tmp_path, capsys):
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(images / "ok.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    samples = [
        {"id": "good", "image": "coco/ok.jpg", "conversations": turns("<image>\nColour?", "red")},
        {"id": "text", "conversations": turns("Hi", "Hello")},
        {"id": 404, "image": "coco/missing.jpg", "conversations": turns("<image>", "x")},
        {"id": "broken", "image": "coco/broken.png", "conversations": turns("<image>", "x")},
        {"id": "empty", "conversations": []},
        {"id": "order", "conversations": turns("a") + turns("b", "c")},
        {"id": "blank", "conversations": turns("a", " ")},
        {"id": "tags", "image": "coco/ok.jpg", "conversations": turns("<image> <image>", "x")},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    code = vzt_main(
        ["data", "check", "--data", str(data), "--image-folder", str(tmp_path / "images"), "--workers", "2", "--quiet"]
    )
    out = capsys.readouterr()
    assert code == 1 and "Traceback" not in out.out + out.err
    assert "checked 8 samples (4 with images, 0 with a video, 4 text-only): 6 unusable" in out.out
    listed = {line.split(":")[0].strip(): line for line in out.out.splitlines()[1:]}
    assert set(listed) == {"id 404", "id broken", "id empty", "id order", "id blank", "id tags"}
    assert "missing image" in listed["id 404"] and "coco/missing.jpg" in listed["id 404"]
    assert "unreadable image" in listed["id broken"]
    assert "no conversations" in listed["id empty"]
    assert "do not alternate" in listed["id order"]
    assert "empty gpt turn" in listed["id blank"]
    assert "2 <image> tags but 1 image" in listed["id tags"]


def test_check_passes_on_the_demo_and_needs_an_image_folder(tmp_path, capsys):
    paths = make_demo_dataset(tmp_path / "demo", n=20, seed=0)
    assert main(["check", "--data", str(paths.train), "--image-folder", str(paths.images), "--quiet"]) == 0
    assert "all usable" in capsys.readouterr().out
    code = vzt_main(["data", "check", "--data", str(paths.train), "--quiet"])
    err = " ".join(capsys.readouterr().err.split())  # __main__ wraps the message
    assert code == 2 and "have images but no --image-folder was given" in err and "Traceback" not in err


def test_preview_json_uses_the_models_token_count(tmp_path, tiny_clip_dir, capsys):
    paths = make_demo_dataset(tmp_path / "demo", n=12, seed=1)
    common = [
        "preview",
        "--data",
        str(paths.train),
        "--image-folder",
        str(paths.images),
        "--model",
        str(tiny_clip_dir),
        "--n",
        "4",
    ]
    assert main([*common, "--json", "--dominant", "54", "--contextual", "10"]) == 0
    zipped = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*common, "--json"]) == 0
    stock = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    train = json.loads(paths.train.read_text())
    assert [r["id"] for r in zipped] == [s["id"] for s in train[:4]]
    image_id = 601
    for z, s, sample in zip(zipped, stock, train):
        has_image = "image" in sample
        assert z["input_ids"].count(image_id) == (64 if has_image else 0)
        assert s["input_ids"].count(image_id) == (256 if has_image else 0)
        assert len(z["labels"]) == len(z["input_ids"])
        assert sum(label != -100 for label in z["labels"]) >= 2


def test_preview_text_marks_answers_and_image_runs(tmp_path, tiny_clip_dir, capsys):
    paths = make_demo_dataset(tmp_path / "demo", n=8, seed=2)
    assert (
        main(
            [
                "preview",
                "--data",
                str(paths.train),
                "--image-folder",
                str(paths.images),
                "--model",
                str(tiny_clip_dir),
                "--n",
                "1",
                "--dominant",
                "54",
                "--contextual",
                "10",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    first = json.loads(paths.train.read_text())[0]
    answer = first["conversations"][1]["value"]
    assert "<image×64>" in out and f"«{answer}</s>»" in out.replace(" ", "")
    assert "A chat between a curious user" in out


def test_preview_bad_arguments(tmp_path, tiny_clip_dir):
    paths = make_demo_dataset(tmp_path / "demo", n=8, seed=2)
    common = ["preview", "--data", str(paths.train), "--image-folder", str(paths.images)]
    with pytest.raises(UserError, match="both --dominant and --contextual"):
        main([*common, "--model", str(tiny_clip_dir), "--dominant", "54"])
    with pytest.raises(UserError, match="cannot load a saved model config and processor"):
        main([*common, "--model", str(tmp_path / "no-model")])


def test_preview_refuses_a_flag_that_does_not_apply_to_the_model(tmp_path, tiny_clip_dir):
    """A LLaVA model counts its budget in tokens and has no video input: Qwen's ratios and the video flags are
    refused, not ignored."""
    paths = make_demo_dataset(tmp_path / "demo", n=8, seed=2)
    common = ["preview", "--data", str(paths.train), "--image-folder", str(paths.images), "--model", str(tiny_clip_dir)]
    counts = ["--dominant", "6", "--contextual", "2"]
    with pytest.raises(UserError, match=r"--dominant-ratio and --contextual-ratio do\(es\) not apply to it"):
        main([*common, *counts, "--dominant-ratio", "0.4", "--contextual-ratio", "0.1"])
    with pytest.raises(UserError, match="--video-frames 4: LlavaForConditionalGeneration has no video input"):
        main([*common, *counts, "--video-frames", "4"])
    assert main([*common, *counts]) == 0


def test_demo_is_deterministic_balanced_and_valid(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n=400, seed=7, n_eval=200)
    b = make_demo_dataset(tmp_path / "b", n=400, seed=7, n_eval=200)
    c = make_demo_dataset(tmp_path / "c", n=400, seed=8, n_eval=200)
    assert a.train.read_bytes() == b.train.read_bytes() and a.eval.read_bytes() == b.eval.read_bytes()
    assert (a.images / "train_000003.png").read_bytes() == (b.images / "train_000003.png").read_bytes()
    assert a.train.read_bytes() != c.train.read_bytes()

    train, evaluation = json.loads(a.train.read_text()), json.loads(a.eval.read_text())
    assert len(train) == 400 and len(evaluation) == 200
    n_turns = Counter(len(s["conversations"]) // 2 for s in train if "image" in s)
    assert n_turns[1] > 0 and n_turns[2] > 0
    assert 5 <= sum("image" not in s for s in train) <= 40  # a few text-only samples
    for s in evaluation:
        assert len(s["conversations"]) == 2 and s["conversations"][-1]["value"] in s["choices"]
    background = Counter(
        s["conversations"][-1]["value"]
        for s in evaluation
        if QUESTIONS["background"].text in s["conversations"][0]["value"]
    )
    assert set(background) == set(COLOURS) and max(background.values()) - min(background.values()) <= 1
    assert all(load_samples(p)["problem"][:] == [None] * n for p, n in ((a.train, 400), (a.eval, 200)))
    with Image.open(a.images / "eval_000000.png") as img:
        assert img.format == "PNG" and img.size == (224, 224)


def test_demo_background_answer_matches_the_pixels(tmp_path):
    paths = make_demo_dataset(tmp_path / "demo", n=60, seed=3)
    for s in json.loads(paths.train.read_text()):
        for question, answer in zip(s["conversations"][::2], s["conversations"][1::2]):
            if QUESTIONS["background"].text in question["value"]:
                with Image.open(paths.images / s["image"]) as img:
                    corners = {img.getpixel(xy) for xy in ((0, 0), (223, 0), (0, 223), (223, 223))}
                assert COLOURS[answer["value"]] in corners


def test_demo_answer_sets_are_disjoint_and_of_equal_token_length(tiny_tokenizer):
    """A question-agnostic projector can serve all question types at once only if their answers never collide;
    summed log-probability scoring is unbiased only if a question's choices have equal token counts."""
    seen: set[str] = set()
    for question in QUESTIONS.values():
        assert not seen & set(question.choices)
        seen |= set(question.choices)
        lengths = {len(tiny_tokenizer.encode(c, add_special_tokens=False)) for c in question.choices}
        assert len(lengths) == 1, question.text


def test_demo_cli_replaces_a_demo_but_not_other_folders(tmp_path, capsys):
    out = tmp_path / "demo"
    assert vzt_main(["data", "demo", "--output", str(out), "--n", "10", "--seed", "1"]) == 0
    assert vzt_main(["data", "demo", "--output", str(out), "--n", "12", "--seed", "1"]) == 0
    assert len(json.loads((out / "train.json").read_text())) == 12
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert vzt_main(["data", "demo", "--output", str(other), "--n", "10"]) == 2
    assert "is not a demo dataset" in " ".join(capsys.readouterr().err.split())
    assert (other / "notes.txt").read_text() == "keep me" and not (other / "train.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# Videos


def test_check_opens_videos_and_names_bad_ones(tmp_path, capsys):
    av = pytest.importorskip("av")
    videos = tmp_path / "videos"
    (videos / "clip").mkdir(parents=True)
    for k in range(4):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(videos / "clip" / f"{k}.png")
    (videos / "clip" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with av.open(str(videos / "ok.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for k in range(3):
            out.mux(stream.encode(av.VideoFrame.from_image(Image.new("RGB", (16, 16), (0, 60 * k, 0)))))
        out.mux(stream.encode())
    (videos / "junk.mp4").write_bytes(b"junk")
    frames = [f"clip/{k}.png" for k in range(4)]
    samples = [
        {"id": "frames", "video": frames, "conversations": turns("<video>\nWhat?", "x")},
        {"id": "file", "video": "ok.mp4", "conversations": turns("<video>\nWhat?", "x")},
        {"id": "text", "conversations": turns("Hi", "Hello")},
        {"id": "gone", "video": "gone.mp4", "conversations": turns("<video>\nWhat?", "x")},
        {"id": "junk", "video": "junk.mp4", "conversations": turns("What?", "x")},
        {"id": "hole", "video": [*frames, "clip/broken.png"], "conversations": turns("What?", "x")},
        {"id": "tags", "video": "ok.mp4", "conversations": turns("<video><video>", "x")},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    code = main(
        [
            "check",
            "--data",
            str(data),
            "--video-folder",
            str(videos),
            "--video-frames",
            "2",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1 and "checked 7 samples (0 with images, 6 with a video, 1 text-only): 4 unusable" in out
    listed = {line.split(":")[0].strip(): line for line in out.splitlines()[1:]}
    assert set(listed) == {"id gone", "id junk", "id hole", "id tags"}
    assert "missing video" in listed["id gone"] and "gone.mp4" in listed["id gone"]
    assert "unreadable video" in listed["id junk"] and "junk.mp4" in listed["id junk"]
    assert "unreadable video frame" in listed["id hole"] and "broken.png" in listed["id hole"]  # every frame opened
    assert "2 <video> tags but 1 video" in listed["id tags"]
    with pytest.raises(UserError, match="5 samples have videos but no --video-folder was given"):
        main(["check", "--data", str(data), "--quiet"])


def test_demo_videos_move_the_way_the_answer_says(tmp_path):
    from visionzip_tune.demo.dataset import COLOURS, DIRECTIONS, MOTION_QUESTION, VIDEO_FRAMES

    paths = make_demo_dataset(tmp_path / "demo", n=20, seed=0, n_eval=8, videos=8)
    train, evaluation = json.loads(paths.train.read_text()), json.loads(paths.eval.read_text())
    assert len(train) == 20 and len(evaluation) == 8
    clips = [s for s in train if "video" in s]
    held_out = [s for s in evaluation if "video" in s]
    assert len(clips) == 8 and len(held_out) == 3 and all("image" not in s for s in clips + held_out)
    assert Counter(s["conversations"][1]["value"] for s in clips) == dict.fromkeys(DIRECTIONS, 2)  # balanced
    assert all(s["choices"] == list(DIRECTIONS) for s in held_out)
    for s in clips + held_out:
        assert s["conversations"][0]["value"] == f"<video>\n{MOTION_QUESTION}"
        assert s["video"] == [f"videos/{s['id']}/{t:03d}.png" for t in range(VIDEO_FRAMES)]
        first, last = (np.asarray(Image.open(paths.images / s["video"][k])) for k in (0, -1))
        background = np.array(COLOURS[min(COLOURS, key=lambda c: np.abs(first[0, 0] - COLOURS[c]).sum())])
        centres = [np.argwhere((frame != background).any(-1)).mean(0) for frame in (first, last)]  # (y, x)
        dy, dx = centres[1] - centres[0]
        assert DIRECTIONS[s["conversations"][1]["value"]] == (int(np.sign(round(dx))), int(np.sign(round(dy))))
    assert all(p is None for p in load_samples(paths.train)["problem"][:])
    assert main(["check", "--data", str(paths.train), "--image-folder", str(paths.images), "--quiet"]) == 0


def test_demo_direction_answers_have_equal_token_length(tiny_tokenizer):
    from visionzip_tune.demo.dataset import DIRECTIONS

    assert len({len(tiny_tokenizer.encode(d, add_special_tokens=False)) for d in DIRECTIONS}) == 1


def test_preview_shows_video_runs_of_a_video_model(tmp_path, capsys):
    from visionzip_tune.demo.tiny import TinySpec, save_tiny

    model_dir = save_tiny(tmp_path / "tiny-video-llava", TinySpec(family="video_llava", image_size=56, vision_layers=2))
    paths = make_demo_dataset(tmp_path / "demo", n=4, seed=0, n_eval=1, videos=1)
    common = ["preview", "--data", str(paths.train), "--image-folder", str(paths.images), "--model", str(model_dir)]
    assert main([*common, "--n", "4", "--dominant", "6", "--contextual", "2", "--video-frames", "4"]) == 0
    out = capsys.readouterr().out
    assert "<video×32>" in out and "<image×8>" in out  # 4 frames x 8 tokens; 8 tokens per image
    assert out.index("<video×32>") < out.index("Which way does the shape move?")
    assert main([*common, "--n", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[-1]["input_ids"].count(602) == 8 * 17  # stock: 8 frames x (16 patches + CLS)
