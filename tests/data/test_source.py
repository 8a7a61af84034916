"""Loading LLaVA JSON (array and JSONL) into datasets, the structural validation rules, and word lengths."""

from __future__ import annotations

import json

import pytest

from visionzip_tune.data.dataset import modality_lengths
from visionzip_tune.data.jsonstream import iter_records
from visionzip_tune.data.source import load_samples, source_of
from visionzip_tune.errors import UserError


def turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


SAMPLES = [
    {"id": 33471, "image": "coco/train2017/000033471.jpg", "conversations": turns("<image>\nWhat bus?", "A red one.")},
    {"id": "sharegpt-1", "model": "", "conversations": turns("Hi ü 你好", "Hello.", "Again?", "Sure.")},
    {"id": 7, "image": "ocr_vqa/images/7.jpg", "conversations": turns("Title?\n<image>", "Dune")},
]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_json_array_ids_become_strings_and_spans_are_exact_bytes(tmp_path, cache):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(SAMPLES, indent=2, ensure_ascii=False), encoding="utf-8")
    ds = load_samples(path, cache_dir=cache)
    assert ds["id"][:] == ["33471", "sharegpt-1", "7"]
    assert ds.features["id"].dtype == "string"
    assert ds["images"][:] == [["coco/train2017/000033471.jpg"], [], ["ocr_vqa/images/7.jpg"]]
    assert ds["source"][:] == ["coco", "text-only", "ocr_vqa"]
    assert ds["problem"][:] == [None, None, None]
    raw = path.read_bytes()
    for row, original in zip(ds, SAMPLES):
        assert json.loads(raw[row["offset"] : row["offset"] + row["nbytes"]]) == original


def test_jsonl_loads_like_the_array(tmp_path, cache):
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n\n" for s in SAMPLES), encoding="utf-8")
    ds = load_samples(path, cache_dir=cache)
    assert ds["id"][:] == ["33471", "sharegpt-1", "7"]
    assert ds[1]["conversations"][0]["value"] == "Hi ü 你好"
    raw = path.read_bytes()
    assert [json.loads(raw[r["offset"] : r["offset"] + r["nbytes"]]) for r in ds] == SAMPLES


def test_records_longer_than_the_read_chunk_are_streamed(tmp_path, monkeypatch):
    import visionzip_tune.data.jsonstream as js

    monkeypatch.setattr(js, "_CHUNK_CHARS", 7)  # every record and number straddles chunk boundaries
    samples = [{"id": 10**k, "conversations": turns("q" * k, "a")} for k in range(1, 12)]
    path = tmp_path / "small-chunks.json"
    path.write_text(json.dumps(samples), encoding="utf-8")
    assert [r.value for r in iter_records(path)] == samples


def test_cache_is_rebuilt_when_the_file_changes(tmp_path, cache):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(SAMPLES[:1]))
    assert len(load_samples(path, cache_dir=cache)) == 1
    path.write_text(json.dumps(SAMPLES))
    assert len(load_samples(path, cache_dir=cache)) == 3


@pytest.mark.parametrize(
    "text, where",
    [
        ('[\n  {"id": 1},\n  {"id": 2,}\n]', "line 3, column 12"),
        ('[\n  {"id": 1}\n  {"id": 2}\n]', "line 3, column 3: expected ',' or ']'"),
        ('[\n  {"id": 1},\n', "line 3, column 1"),
        ('[{"id": 1}] x', "extra data after the closing ']'"),
        ('{"id": 1}\n{"id": 2\n', "line 2, column 9"),
        ("hello", "expected a JSON array"),
        ("", "the file is empty"),
    ],
)
def test_malformed_json_names_file_line_and_column(tmp_path, cache, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match=str(path)) as err:
        load_samples(path, cache_dir=cache)
    assert where in str(err.value)


def test_missing_and_non_utf8_files(tmp_path, cache):
    with pytest.raises(UserError, match="no such file"):
        load_samples(tmp_path / "nope.json", cache_dir=cache)
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(UserError, match="not UTF-8"):
        load_samples(path, cache_dir=cache)


@pytest.mark.parametrize(
    "sample, reason",
    [
        ("just a string", "not a JSON object"),
        ({"id": 1}, "no conversations"),
        ({"id": 1, "conversations": []}, "no conversations"),
        ({"id": 1, "conversations": [{"from": "user", "value": "hi"}]}, "role 'user' is not 'human' or 'gpt'"),
        ({"id": 1, "conversations": [{"from": "human", "value": 3}]}, "'value' is not a string"),
        ({"id": 1, "conversations": turns("hi", "yo", "again", "more", "x")[:3] + turns("hi")}, "do not alternate"),
        ({"id": 1, "conversations": turns("hi", "  ")}, "conversations[1]: empty gpt turn"),
        ({"id": 1, "conversations": turns("", "yo")}, "conversations[0]: empty human turn"),
        ({"id": 1, "conversations": turns("hi")}, "no gpt answer"),
        ({"id": 1, "image": "a.jpg", "conversations": turns("<image><image> hi", "yo")}, "2 <image> tags but 1 image"),
        ({"id": 1, "conversations": turns("<image> hi", "yo")}, "1 <image> tags but 0 image"),
        ({"id": 1, "image": "a.jpg", "conversations": turns("hi", "<image>")}, "<image> tag in a gpt turn"),
        ({"id": 1, "image": 5, "conversations": turns("hi", "yo")}, "'image' must be a path"),
        ({"id": 1, "image": "", "conversations": turns("hi", "yo")}, "empty image path"),
        ({"id": 1, "video": 3, "conversations": turns("hi", "yo")}, "'video' must be a video file's path or a list"),
        ({"id": 1, "video": ["a.png", 2], "conversations": turns("hi", "yo")}, "'video' must be a video file's path"),
        ({"id": 1, "video": [], "conversations": turns("hi", "yo")}, "'video' is an empty list of frames"),
        ({"id": 1, "video": " ", "conversations": turns("hi", "yo")}, "empty video path"),
        ({"id": 1, "video": ["a/0.png", ""], "conversations": turns("hi", "yo")}, "empty video path"),
        (
            {"id": 1, "video": [["a/0.png"], ["b/0.png"]], "conversations": turns("hi", "yo")},
            "2 videos: at most one video per sample",
        ),
        ({"id": 1, "video": "a.mp4", "conversations": turns("<video><video> hi", "yo")}, "2 <video> tags but 1 video"),
        ({"id": 1, "conversations": turns("<video> hi", "yo")}, "1 <video> tags but 0 video"),
        ({"id": 1, "video": "a.mp4", "conversations": turns("hi", "<video>")}, "[1]: <video> tag in a gpt turn"),
    ],
)
def test_structural_problems_are_kept_with_their_reason(tmp_path, cache, sample, reason):
    path = tmp_path / "one.json"
    path.write_text(json.dumps([SAMPLES[0], sample]))
    ds = load_samples(path, cache_dir=cache)
    assert ds[0]["problem"] is None
    assert reason in ds[1]["problem"]


def test_llava_tolerances_are_not_problems(tmp_path, cache):
    samples = [
        {"id": 1, "conversations": [{"from": "gpt", "value": "intro"}, *turns("hi", "yo")]},  # leading gpt dropped
        {"id": 2, "image": "x/a.jpg", "conversations": turns("<image>", "a caption")},  # image-only question
        {"id": 3, "image": ["x/a.jpg", "y/b.jpg"], "conversations": turns("<image> vs <image>", "same")},
        {"id": 4, "image": "x/a.jpg", "conversations": turns("no tag: the image goes first", "ok")},
        {"id": 5, "conversations": turns("hi", "yo", "unanswered")},  # the trailing question is dropped
    ]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(samples))
    ds = load_samples(path, cache_dir=cache)
    assert ds["problem"][:] == [None] * 5
    assert ds[2]["source"] == "x"


def test_video_forms_load_as_a_file_or_a_frame_list(tmp_path, cache):
    samples = [
        {"id": "file", "video": "clips/a.mp4", "conversations": turns("<video>\nWhat happens?", "it moves")},
        {"id": "frames", "video": ["k400/a/0.png", "k400/a/1.png"], "conversations": turns("What?", "x")},
        {"id": "both", "image": "coco/1.jpg", "video": "clips/b.mp4", "conversations": turns("<video><image>", "y")},
        {"id": "tag-only", "video": "clips/c.mp4", "conversations": turns("<video>", "z")},
    ]
    path = tmp_path / "videos.json"
    path.write_text(json.dumps(samples))
    ds = load_samples(path, cache_dir=cache)
    assert ds["problem"][:] == [None] * 4
    assert ds["video_file"][:] == ["clips/a.mp4", None, "clips/b.mp4", "clips/c.mp4"]
    assert ds["frame_files"][:] == [[], ["k400/a/0.png", "k400/a/1.png"], [], []]
    assert ds["source"][:] == ["clips", "k400", "coco", "clips"]  # an image's folder first, else the video's
    assert modality_lengths(ds) == [5, 2, 2, 2]  # a video makes a sample multimodal (positive)


def test_source_of():
    assert source_of(["coco/train2017/1.jpg"]) == "coco"
    assert source_of(["./vg/VG_100K/1.jpg", "gqa/2.jpg"]) == "vg"
    assert source_of(["1.png"]) == "."
    assert source_of([]) == "text-only"
    assert source_of([], "k400/a.mp4") == "k400"
    assert source_of([], ["./ssv2/1/000.png", "ssv2/1/001.png"]) == "ssv2"
    assert source_of(["coco/1.jpg"], "k400/a.mp4") == "coco"


def test_modality_lengths_are_llava_modality_lengths(tmp_path, cache):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(SAMPLES))
    ds = load_samples(path, cache_dir=cache)
    expected = [sum(len(t["value"].split()) for t in s["conversations"]) * (1 if "image" in s else -1) for s in SAMPLES]
    assert modality_lengths(ds) == expected == [6, -6, 3]
    assert modality_lengths(ds.select([2, 0])) == [3, 6]
