"""Batched requests through the ``visionzip`` lmms-eval model, for every family, stock and zipped: every request's
answer is the one it gets alone (greedy text identical, loss to float tolerance, is_greedy identical), padding never
changes what a real position sees, and answers come back in the caller's order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import lmms_eval_or_skip
from PIL import Image

from visionzip_tune.data.template import IGNORE_INDEX
from visionzip_tune.demo.tiny import TinySpec, save_tiny
from visionzip_tune.families import FAMILIES, language_model

lmms_eval_or_skip()
from lmms_eval.api.instance import Instance  # noqa: E402

from visionzip_tune.evaluation.lmms import VisionZipModel, ZippedModel  # noqa: E402

LOSS_TOLERANCE = 1e-5  # float32 on a CPU: batched matmuls sum in another order (observed up to 1e-6)
FRAMES = 4
QUESTIONS = [
    "What is it?",
    "What colour is the background of this picture? Answer with one word.",
    "Shape?",
    "Is there a red square on the left side of the image, or is it on the right side?",
    "Hi",
    "Describe the picture in a few words, please.",
    "Count the shapes.",
    "Which corner is the brightest one?",
    "Is it round?",
]


def spec(family: str) -> TinySpec:
    qwen = family.startswith("qwen")
    return TinySpec(
        family=family,
        image_size=112 if qwen else 56,  # Qwen: enough merged tokens per image for a ratio budget
        patch_size=14,
        vision_hidden=32,
        vision_layers=2,
        text_hidden=32,
        text_init_std=0.2,  # decisive logits: a greedy tie would make "identical" depend on the last bit
    )


def budget(family: str) -> dict:
    return (
        dict(dominant_ratio=0.45, contextual_ratio=0.05)
        if family.startswith("qwen")
        else dict(dominant=5, contextual=2)
    )


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Images of many sizes and aspect ratios (anyres grids, Qwen grids and pad-to-square all vary), and three
    videos given as directories of frame images."""
    root = tmp_path_factory.mktemp("batched-media")
    rng = np.random.default_rng(0)
    docs = []
    for k, _ in enumerate(QUESTIONS):
        height, width = (int(v) for v in rng.integers(40, 200, 2))
        docs.append({"visual": [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))]})
    videos = []
    for v in range(3):
        folder = root / f"video{v}"
        folder.mkdir()
        for t in range(FRAMES):
            frame = Image.new("RGB", (64, 64), (30 * v, 20, 120))
            frame.paste((230, 200, 30), (4 + 8 * t + 5 * v, 20, 24 + 8 * t, 40))
            frame.save(folder / f"{t:03d}.png")
        videos.append({"visual": [str(folder)]})
    return docs, videos


def requests(docs: list[dict], kind: str) -> list[Instance]:
    """Generation requests in two groups of generation settings, or two scored continuations per document."""
    out = []
    for k, doc in enumerate(docs):
        question = QUESTIONS[k % len(QUESTIONS)]
        if kind == "generate_until":
            seconds = [{"max_new_tokens": 5 if k % 2 else 3, "until": ["\n"], "temperature": 0, "do_sample": False}]
        else:
            seconds = [" red", " a small blue square"]
        for idx, second in enumerate(seconds):
            args = (question, second, lambda d: d["visual"], k, "t", "test")
            out.append(Instance(kind, args, idx=idx, metadata={"task": "t", "doc_id": k, "repeats": 1}))
    return out


def wrapped(lm: VisionZipModel, batch_size: int, docs: list[dict]) -> ZippedModel:
    """Another lmms-eval view of ``lm``'s model at ``batch_size``, serving ``docs``."""
    view = ZippedModel(lm.model, lm.prompter, batch_size=batch_size)
    view.task_dict = {"t": {"test": docs}}
    return view


def losses(results) -> list[float]:
    return [r.text[0] for r in results]


@pytest.mark.parametrize("zipped", [True, False], ids=["visionzip", "stock"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_8_answers_every_request_as_batch_1_does(family, zipped, documents, tmp_path):
    model_dir = save_tiny(tmp_path / family, spec(family))
    # the image processor's own aspect handling: anyres images tile into grids of 3 or 5 crops, padded in a batch
    settings = dict(image_aspect="processor", video_frames=FRAMES, **(budget(family) if zipped else {}))
    lm = VisionZipModel(pretrained=str(model_dir), **settings)
    images, videos = documents
    docs = images + (videos if FAMILIES[family].has_video else [])
    one, eight = wrapped(lm, 1, docs), wrapped(lm, 8, docs)

    generated = requests(docs, "generate_until")
    texts = one.generate_until(generated)
    assert eight.generate_until(generated) == texts
    assert eight.generate_until(generated[::-1]) == texts[::-1]  # answers in the caller's order
    assert any(texts)  # decisive logits: the tiny model says something

    scored = requests(docs, "loglikelihood")
    alone, batched = one.loglikelihood(scored), eight.loglikelihood(scored)
    assert losses(batched) == pytest.approx(losses(alone), abs=LOSS_TOLERANCE, rel=0)
    assert [r.text[1] for r in batched] == [r.text[1] for r in alone]
    assert one.throughput.batch_size == 1 and eight.throughput.batch_size == 8


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_padding_changes_no_position_of_a_request(family, documents, tmp_path):
    """Left-padded generation: each row's prefill sees exactly its unbatched positions and (to float tolerance)
    its unbatched input embeddings, vision tokens included; and the pad tokens are never attended: any other pad
    id gives bit-identical first-token logits on every row."""
    model_dir = save_tiny(tmp_path / family, spec(family))
    lm = VisionZipModel(pretrained=str(model_dir), image_aspect="processor", **budget(family))
    prompter, model = lm.prompter, lm.model
    images, _ = documents
    rows = []
    for k, doc in enumerate(images[:5]):
        media = prompter.media(doc["visual"])
        ids = prompter.prompt([], QUESTIONS[k], media)
        rows.append((ids, [IGNORE_INDEX] * len(ids), media))
    assert len({len(ids) for ids, _, _ in rows}) > 1  # rows of different lengths: there is padding

    def prefill(batch_rows, pad_id=None):
        inputs = prompter.batch(batch_rows, padding_side="left")
        inputs.pop("labels")
        if pad_id is not None:
            inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, pad_id)
        seen = {}

        def grab(module, args, kwargs):
            if "embeds" not in seen:
                seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs["position_ids"]

        handle = language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=1,
                    do_sample=False,
                    pad_token_id=prompter.pad_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
        finally:
            handle.remove()
        return seen["embeds"], seen["positions"], out.logits[0]

    embeds, positions, logits = prefill(rows)
    for r, row in enumerate(rows):
        alone_embeds, alone_positions, alone_logits = prefill([row])
        n = len(row[0])
        assert torch.equal(positions[..., r, -n:], alone_positions[..., 0, :])  # Qwen: all 3 MRoPE axes
        torch.testing.assert_close(embeds[r, -n:], alone_embeds[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[r], alone_logits[0], rtol=0, atol=1e-4)
    other_pad = next(t for t in range(3, 50) if t not in prompter.placeholder_ids and t != prompter.pad_token_id)
    assert torch.equal(prefill(rows, pad_id=other_pad)[2], logits)
