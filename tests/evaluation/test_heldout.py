"""Held-out choice accuracy: the answer span, its log-probability, batching/sharding, and bad held-out data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tiny

from visionzip_tune.training import build
from visionzip_tune.data import Collator, DataConfig, SupervisedDataset, load_samples
from visionzip_tune.data.processing import Processing
from visionzip_tune.distributed import init_distributed
from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.heldout import answer_logprobs, answer_mask, choice_accuracy, read_choices, with_answer
from visionzip_tune.families import apply_visionzip

X = -100


def test_answer_mask_is_the_last_supervised_run_without_eos():
    labels = torch.tensor(
        [
            [X, X, 5, 6, 2, X, X, 7, 8, 2, X, X],  # two answers; the last is 7 8 </s>; right padding
            [X, X, X, 9, 2, X, X, X, X, X, X, X],  # one answer
            [X, X, X, X, X, X, X, X, X, X, X, X],  # nothing supervised (cut away): scores 0
        ]
    )
    mask = answer_mask(labels, eos_token_id=2)
    assert mask[0].nonzero().flatten().tolist() == [7, 8]
    assert mask[1].nonzero().flatten().tolist() == [3]
    assert not mask[2].any()
    assert answer_mask(labels, eos_token_id=None)[0].nonzero().flatten().tolist() == [7, 8, 9]


def test_answer_logprob_sums_the_answer_tokens_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[X, X, 3, 4, 2, X], [X, X, X, 7, 2, X]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4], logp[1, 2, 7]])  # token t is predicted at t - 1
    assert torch.allclose(answer_logprobs(logits, labels, eos_token_id=2).summed(2), expected)


@pytest.fixture
def eval_setup(train_assets):
    """``(model, processor, dataset_of(path))``: a zipped tiny model and a held-out dataset builder."""
    model_dir, paths = train_assets
    model, processor = load_tiny(model_dir)
    apply_visionzip(model, 6, 2)

    def dataset_of(path):
        return SupervisedDataset(
            load_samples(path),
            DataConfig(image_folder=paths.images, max_length=256),
            Processing(processor.tokenizer, processor.image_processor, None),
            build.placeholders(model.config),
        )

    return model, processor, dataset_of


def test_batched_sharded_accuracy_equals_one_choice_at_a_time(eval_setup, train_assets):
    model, processor, dataset_of = eval_setup
    dataset = dataset_of(train_assets[1].eval)
    init_distributed()
    samples = read_choices(dataset)
    collator = Collator(processor.tokenizer.pad_token_id)
    eos = processor.tokenizer.eos_token_id
    correct = 0
    with torch.no_grad():
        for s in samples:
            scores = []
            for choice in s.choices:
                batch = collator([dataset.example(with_answer(s.sample, choice))])
                batch.pop("ids")
                labels = batch.pop("labels")
                scores.append(float(answer_logprobs(model(**batch).logits, labels, eos).summed(1)[0]))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == s.gold)
    # Two "ranks" in one process (a world of one does not reduce): their shards add up to the whole.
    shards = [
        choice_accuracy(model, dataset, samples, collator, batch_size=3, eos_token_id=eos, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert sum(s["total"] for s in shards) == len(samples)
    assert sum(s["correct"] for s in shards) == correct
    whole = choice_accuracy(model, dataset, samples, collator, batch_size=5, eos_token_id=eos, rank=0, world_size=1)
    assert whole == {
        "accuracy": correct / len(samples),
        "correct": correct,
        "total": len(samples),
        "accuracy_image": correct / len(samples),
        "total_image": len(samples),
    }


def test_bad_held_out_choices_name_the_sample(eval_setup, train_assets, tmp_path):
    records = json.loads(train_assets[1].eval.read_text())
    records[1]["choices"] = [c for c in records[1]["choices"] if c != records[1]["conversations"][-1]["value"]]
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(UserError, match=rf"eval.json: sample id {records[1]['id']}: the last gpt turn is the gold"):
        read_choices(eval_setup[2](bad))
