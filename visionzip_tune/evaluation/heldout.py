"""Held-out answer accuracy on samples with a closed answer set (``"choices"``).

For every sample, each choice replaces the last gpt turn; the sample is templated exactly as in training and the
model scores the choice by the summed log-probability of its answer tokens (the last supervised span, without the
end-of-turn token). The prediction is the best-scoring choice; accuracy is the fraction of samples whose
prediction equals the gold answer (the original last gpt turn). Each choice is a row of the batch with its own
copy of the image: simple, and cheap for held-out sets of a few hundred samples.

Sharding: every rank scores its own slice of the samples and the counts are all-reduced. Every rank runs the same
number of forward passes (short slices are padded with a repeated sample whose result is discarded), because under
ZeRO-3 each forward pass is a collective.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from visionzip_tune.data import Collator, SupervisedDataset
from visionzip_tune.data.template import IGNORE_INDEX
from visionzip_tune.data.validate import BadSample, row_video
from visionzip_tune.distributed import all_reduce_sum
from visionzip_tune.errors import UserError
from visionzip_tune.families.forward import forward_with_vision, to_model_inputs


@dataclass(frozen=True)
class ChoiceSample:
    sample: dict  # a row of load_samples (id, images, conversations, ...)
    choices: list[str]
    gold: int  # index of the gold answer in choices


def read_choices(dataset: SupervisedDataset) -> list[ChoiceSample]:
    """The usable samples of ``dataset`` that carry ``"choices"`` (read from each sample's own bytes in the file)."""
    samples = dataset.samples
    path = Path(samples.info.description)
    out = []
    with open(path, "rb") as f:
        for row in dataset.rows:
            sample = samples[row]
            f.seek(sample["offset"])
            record = json.loads(f.read(sample["nbytes"]))
            choices = record.get("choices")
            if choices is None:
                continue
            gold = sample["conversations"][-1]
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
                raise UserError(f"{path}: sample id {sample['id']}: 'choices' must be a list of at least 2 strings")
            if gold["from"] != "gpt" or gold["value"] not in choices:
                raise UserError(
                    f"{path}: sample id {sample['id']}: the last gpt turn is the gold answer and must be one of its "
                    f"choices {choices}, got {gold['value']!r} ({gold['from']} turn)"
                )
            out.append(ChoiceSample(sample, choices, choices.index(gold["value"])))
    if not out:
        raise UserError(f"{path}: no sample carries 'choices', so held-out accuracy cannot be measured")
    return out


def with_answer(sample: dict, answer: str) -> dict:
    """``sample`` with its last (gpt) turn replaced by ``answer``."""
    turns = list(sample["conversations"])
    turns[-1] = {**turns[-1], "value": answer}
    return {**sample, "conversations": turns}


def answer_mask(labels: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """(B, T) labels -> (B, T) bool: the final answer's tokens -- the last contiguous run of supervised positions,
    without the end-of-turn ``eos_token_id`` that closes it (it scores the stop, not the answer)."""
    supervised = labels != IGNORE_INDEX
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last = torch.where(supervised, positions, -1).max(dim=1, keepdim=True).values
    # The run's start: one past the last unsupervised position before its end.
    gap = torch.where(~supervised & (positions < last), positions, -1).max(dim=1, keepdim=True).values
    run = supervised & (positions > gap) & (positions <= last)
    if eos_token_id is not None:
        run &= ~((positions == last) & (labels == eos_token_id))
    return run


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor, eos_token_id: int | None) -> AnswerLogprobs:
    """The log-probabilities of each row's final answer tokens (the last supervised span, without its end-of-turn
    token): (B, T, V) logits and (B, T) labels -> :class:`AnswerLogprobs`, fp32."""
    mask = answer_mask(labels, eos_token_id)[:, 1:]  # token t is predicted by the logits at t - 1
    picked = logits[:, :-1][mask].float().log_softmax(-1)  # only the answer positions: (n, V)
    targets = labels[:, 1:][mask]
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    return AnswerLogprobs(picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1), picked.argmax(-1) == targets, rows)


class AnswerLogprobs(NamedTuple):
    """Per answer token, over a batch: its log-probability, whether it is the greedy choice, and its row."""

    token: torch.Tensor  # (n,) fp32
    greedy: torch.Tensor  # (n,) bool
    rows: torch.Tensor  # (n,) int64

    def summed(self, batch: int) -> torch.Tensor:
        """(B,) each row's summed answer log-probability (held-out choice scoring)."""
        return torch.zeros(batch, device=self.token.device).index_add(0, self.rows, self.token)

    def mean(self, batch: int) -> torch.Tensor:
        """(B,) each row's mean answer log-probability (lmms-eval's loss is its negative)."""
        return self.summed(batch) / torch.bincount(self.rows, minlength=batch).to(self.token.dtype)

    def all_greedy(self, batch: int) -> torch.Tensor:
        """(B,) bool: whether every answer token of each row is its greedy choice."""
        return torch.bincount(self.rows[~self.greedy], minlength=batch) == 0


def _example(dataset: SupervisedDataset, sample: dict) -> dict:
    try:
        return dataset.example(sample)
    except BadSample as bad:  # held-out samples are never skipped silently: the accuracy would change meaning
        raise UserError(
            f"{dataset.samples.info.description}: held-out sample id {sample['id']}: {bad.reason}"
        ) from None


SAMPLE_KINDS = ("video", "image", "text")


@torch.no_grad()
def choice_accuracy(
    model: torch.nn.Module,
    dataset: SupervisedDataset,
    samples: list[ChoiceSample],
    collator: Collator,
    *,
    batch_size: int,
    eos_token_id: int | None,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """``{"accuracy", "correct", "total"}`` over ``samples``, plus ``accuracy_<kind>`` and ``total_<kind>`` for each
    kind of sample present (``video``, ``image``, ``text``: a video sample counts as video). Every rank must call
    it; counts are all-reduced."""
    mine = list(range(rank, len(samples), world_size))
    per_rank = math.ceil(len(samples) / world_size)
    padded = mine + [None] * (per_rank - len(mine))  # None: a filler whose result is not counted
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    correct = dict.fromkeys(SAMPLE_KINDS, 0)
    total = dict.fromkeys(SAMPLE_KINDS, 0)
    try:
        for start in range(0, per_rank, batch_size):
            chunk = [samples[i if i is not None else 0] for i in padded[start : start + batch_size]]
            counted = [i is not None for i in padded[start : start + batch_size]]
            items = [_example(dataset, with_answer(s.sample, c)) for s in chunk for c in s.choices]
            inputs = to_model_inputs(collator(items), param.device, param.dtype)
            labels = inputs.pop("labels")
            logits = forward_with_vision(model, inputs).logits
            scores = answer_logprobs(logits, labels, eos_token_id).summed(labels.shape[0]).cpu()
            for s, keep, row_scores in zip(chunk, counted, scores.split([len(s.choices) for s in chunk])):
                if keep:
                    kind = sample_kind(s.sample)
                    total[kind] += 1
                    correct[kind] += int(int(row_scores.argmax()) == s.gold)
    finally:
        model.train(was_training)
    summed = all_reduce_sum([correct[k] for k in SAMPLE_KINDS] + [total[k] for k in SAMPLE_KINDS])
    correct = dict(zip(SAMPLE_KINDS, summed[: len(SAMPLE_KINDS)]))
    total = dict(zip(SAMPLE_KINDS, summed[len(SAMPLE_KINDS) :]))
    result = {
        "accuracy": sum(correct.values()) / sum(total.values()),
        "correct": int(sum(correct.values())),
        "total": int(sum(total.values())),
    }
    for kind in SAMPLE_KINDS:
        if total[kind]:
            result[f"accuracy_{kind}"] = correct[kind] / total[kind]
            result[f"total_{kind}"] = int(total[kind])
    return result


def sample_kind(sample: dict) -> str:
    """``video`` for a loaded sample with a video (whatever else it holds), ``image`` with images, else ``text``."""
    if row_video(sample) is not None:
        return "video"
    return "image" if sample["images"] else "text"
