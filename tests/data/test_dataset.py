"""SupervisedDataset on real image files: token counts, image transforms, the bad-sample policy, the collator."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from PIL import Image

from visionzip_tune.data import IGNORE_INDEX, Collator, DataConfig, Placeholders, SupervisedDataset, load_samples
from visionzip_tune.errors import UserError
from visionzip_tune.data.processing import Processing
from visionzip_tune.demo.tiny import TinySpec, build_processor

RED = (230, 20, 20)


def turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return build_processor(TinySpec(), tiny_tokenizer)


@pytest.fixture
def data_dir(tmp_path):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    Image.new("RGB", (448, 224), RED).save(images / "coco" / "wide.png")
    Image.new("RGB", (100, 150), (0, 0, 255)).save(images / "coco" / "tall.jpg", quality=95)
    Image.new("RGB", (64, 64), RED).save(images / "coco" / "whole.jpg")
    jpeg = (images / "coco" / "whole.jpg").read_bytes()
    (images / "coco" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return tmp_path


def write(data_dir, samples, name="data.json"):
    path = data_dir / name
    path.write_text(json.dumps(samples))
    return load_samples(path, cache_dir=data_dir / "cache")


def make(data_dir, processor, samples, *, image_tokens=None, image_token_id=None, skip_log=None, **data):
    """A dataset of ``samples`` whose images each become 16 placeholders unless ``image_tokens`` says otherwise;
    ``data``: DataConfig fields."""
    placeholders = Placeholders(
        image_tokens or (lambda sizes: [16] * len(sizes)),
        image_token_id or processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    return SupervisedDataset(
        write(data_dir, samples),
        DataConfig(**{"image_folder": data_dir / "images", **data}),
        Processing(processor.tokenizer, processor.image_processor, None),
        placeholders,
        skip_log=skip_log,
    )


GOOD = [
    {"id": 1, "image": "coco/wide.png", "conversations": turns("<image>\nWhat colour?", "red")},
    {"id": "t", "conversations": turns("What is the capital of France?", "Paris")},
    {"id": 3, "image": "coco/tall.jpg", "conversations": turns("Colour?<image>", "blue", "Sure?", "yes")},
]


def test_items_have_the_image_token_count_of_their_image_size(data_dir, processor):
    seen = []

    def count(sizes):
        seen.extend(sizes)
        return [7 if hw == (448, 448) else 11 for hw in sizes]

    ds = make(data_dir, processor, GOOD, image_tokens=count)
    image_id = ds.placeholders.image_token_id
    first, text, third = ds[0], ds[1], ds[2]
    assert seen == [(448, 448), (150, 150)]  # the sizes the processor saw: padded to squares
    assert (first["input_ids"] == image_id).sum() == 7 and (third["input_ids"] == image_id).sum() == 11
    assert first["id"] == "1" and first["input_ids"].dtype == torch.long
    assert first["vision"]["pixel_values"].shape == (1, 3, 224, 224) and set(first["vision"]) == {"pixel_values"}
    assert text["vision"] == {} and (text["input_ids"] == image_id).sum() == 0
    assert (first["labels"][first["input_ids"] == image_id] == IGNORE_INDEX).all()
    assert ds.lengths == [4, -7, 4]  # LLaVA modality_lengths: words, negative for text-only


def test_pad_fills_with_the_mean_colour_and_processor_crops(data_dir, processor):
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    red = (torch.tensor(RED).view(3, 1, 1) / 255 - mean) / std
    padded = make(data_dir, processor, GOOD[:1], image_aspect="pad")[0]["vision"]["pixel_values"][0]
    cropped = make(data_dir, processor, GOOD[:1], image_aspect="processor")[0]["vision"]["pixel_values"][0]
    # The 448x224 image fills the middle half of the padded square; the bands above and below are the mean colour.
    assert torch.allclose(padded[:, :40, :], torch.zeros(3, 1, 1), atol=0.02)
    assert torch.allclose(padded[:, 90:130, :], red, atol=0.02)
    assert torch.allclose(cropped, red.expand_as(cropped), atol=0.02)


def test_error_policy_names_file_sample_and_reason(data_dir, processor):
    bad_structure = GOOD + [{"id": "b1", "conversations": turns("hi", "")}]
    with pytest.raises(UserError, match=r"data\.json: 1 unusable sample.*id b1: conversations\[1\]: empty gpt turn"):
        make(data_dir, processor, bad_structure)
    missing = make(data_dir, processor, [{"id": "m", "image": "coco/nope.jpg", "conversations": turns("<image>", "x")}])
    with pytest.raises(UserError, match=r"data\.json: sample id m: missing image .*coco/nope\.jpg"):
        missing[0]
    broken = make(data_dir, processor, [{"id": "u", "image": "coco/truncated.jpg", "conversations": turns("q", "x")}])
    with pytest.raises(UserError, match=r"sample id u: unreadable image .*truncated\.jpg"):
        broken[0]


def test_skip_policy_substitutes_logs_and_summarises(data_dir, processor):
    samples = [
        {"id": "b1", "conversations": turns("hi", "")},
        {"id": "m", "image": "coco/nope.jpg", "conversations": turns("<image>", "x")},
        *GOOD,
        {"id": "u", "image": "coco/truncated.jpg", "conversations": turns("q", "x")},
    ]
    log = data_dir / "run" / "skipped.jsonl"
    ds = make(data_dir, processor, samples, on_bad_sample="skip", skip_log=log)
    assert len(ds) == 5 and len(ds.lengths) == 5  # the structural problem is left out up front
    assert ds[0]["id"] == "1"  # "m" has a missing image: the next sample stands in
    assert ds[4]["id"] == "1"  # "u" is last: the substitute wraps around
    assert ds.read_skipped() == {
        "b1": "conversations[1]: empty gpt turn",
        "m": f"missing image {data_dir / 'images' / 'coco' / 'nope.jpg'}",
        "u": ds.read_skipped()["u"],
    }
    assert ds.read_skipped()["u"].startswith("unreadable image")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["id"] for entry in lines] == ["b1", "m", "u"]
    ds[0]
    assert len(log.read_text().splitlines()) == 3  # a sample seen again is not logged twice
    kinds = "1 malformed, 1 missing image, 1 unreadable image"
    assert ds.skip_summary() == f"skipped 3 of 6 samples ({kinds}); list in {log}"


def test_skips_in_dataloader_workers_reach_the_shared_log(data_dir, processor):
    samples = [
        {"id": f"m{k}", "image": f"coco/missing{k}.jpg", "conversations": turns("<image>", "x")} for k in range(4)
    ]
    log = data_dir / "skipped.jsonl"
    ds = make(data_dir, processor, samples + GOOD, on_bad_sample="skip", skip_log=log)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=Collator(0))
    ids = [i for batch in loader for i in batch["ids"]]
    assert len(ids) == len(ds) and not any(i.startswith("m") for i in ids)
    assert sorted(ds.read_skipped()) == ["m0", "m1", "m2", "m3"]


def test_too_long_samples_are_dropped_and_counted_under_either_policy(data_dir, processor):
    long_answer = " ".join(["red"] * 300)
    samples = [
        {"id": "long", "image": "coco/wide.png", "conversations": turns("<image>\nWhat colour?", long_answer)},
        {"id": "huge-image", "image": "coco/wide.png", "conversations": turns("<image>\nWhat?", "red")},
        GOOD[1],
    ]

    ds = make(data_dir, processor, samples, max_length=120, image_tokens=lambda sizes: [16] * len(sizes))
    cut = ds[0]
    assert cut["id"] == "long" and len(cut["input_ids"]) == 120  # cut in text: still has answer tokens
    assert (cut["labels"] != IGNORE_INDEX).any()
    ds = make(data_dir, processor, samples, max_length=80, image_tokens=lambda sizes: [100] * len(sizes))
    assert ds[1]["id"] == "t" and ds[0]["id"] == "t"  # the image run alone is past max_length
    assert ds.read_skipped()["huge-image"].startswith("too long")
    assert "too long" in ds.skip_summary()


def test_collator_pads_right_and_concatenates_images(data_dir, processor):
    ds = make(data_dir, processor, GOOD)
    items = [ds[0], ds[1], ds[2]]
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for row, item in enumerate(items):
        n = lengths[row]
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    pixels = [items[0]["vision"]["pixel_values"], items[2]["vision"]["pixel_values"]]
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))
    assert batch["ids"] == ["1", "t", "3"]
    assert "pixel_values" not in Collator(0)([items[1]])


def test_batches_run_through_a_visionzip_model(data_dir, tiny_clip):
    """The data path and the model agree on the token count (else LLaVA raises a placeholder mismatch)."""
    import visionzip_tune as vzt
    from visionzip_tune.families import sample_image_tokens

    model, processor = tiny_clip
    vzt.apply_visionzip(model, dominant=54, contextual=10)
    ds = make(
        data_dir,
        processor,
        GOOD,
        image_tokens=functools.partial(sample_image_tokens, model.config),
        image_token_id=model.config.image_token_index,
    )
    assert (ds[0]["input_ids"] == model.config.image_token_index).sum() == 64
    batch = Collator(processor.tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])
    batch.pop("ids")
    loss = model(**batch).loss
    assert torch.isfinite(loss)
