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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionzip_tune.data import Collator, SupervisedDataset
from visionzip_tune.data.template import IGNORE_INDEX
from visionzip_tune.data.validate import BadSample, row_video
from visionzip_tune.distributed import all_reduce_sum
from visionzip_tune.errors import UserError


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


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The collated batch's tensors on ``device``; pixel values (images, crops, frames) in the model's dtype (bf16
    under mixed precision)."""
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }


IMAGE_INPUTS = ("pixel_values", "image_sizes", "batch_num_images")  # what get_image_features takes, per family
VIDEO_INPUT = "pixel_values_videos"


def forward_vision_first(call: Callable[..., Any], model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Run a VLM on a batch with its vision path computed first, passed in as ``mm_encoder_outputs``.

    ``call`` runs the model (the DeepSpeed engine in training, the model itself in evaluation); ``model`` is that
    model (plain or peft-wrapped). Every batch runs the image path, and the video path for families with one. A
    batch without images (or videos) runs it on one blank image (one blank frame) and passes a zero-length slice
    of its features (LLaVA's ``image_features[0:0]``): nothing is inserted, but the LLM's inputs depend on the
    projector. So whatever a rank's batch holds, every rank runs the same modules in the same order, forward and
    backward -- under ZeRO-3 each is a collective parameter gather -- and every rank reduces the projector's
    gradients (zero for that batch) instead of waiting or asserting.
    """
    from visionzip_tune.models import blank_image_inputs, has_video_input, unwrap

    base = unwrap(model)
    inputs = dict(inputs)
    on = (inputs["input_ids"].device, base.dtype)
    images = {k: inputs.pop(k) for k in IMAGE_INPUTS if k in inputs}
    encoded = {"image": _features(base.model.get_image_features, images, lambda: blank_image_inputs(base.config), *on)}
    if has_video_input(base.config):
        size = base.config.vision_config.image_size
        videos = {VIDEO_INPUT: inputs.pop(VIDEO_INPUT)} if VIDEO_INPUT in inputs else {}
        blank_video = lambda: {VIDEO_INPUT: torch.zeros(1, 1, 3, size, size)}
        encoded["video"] = _features(base.model.get_video_features, videos, blank_video, *on)
    return call(**inputs, mm_encoder_outputs=encoded)


def _features(encode: Callable[..., Any], given: dict, blank: Callable[[], dict], device, dtype):
    """``encode(**given)``; without inputs, the features of ``blank()`` sliced to zero tokens (same graph, nothing
    inserted). Pooled features are a list of per-image tensors or one (units, tokens, hidden) tensor by family."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if given:
        return encode(**given)
    pooled = encode(**model_inputs(blank(), device, dtype)).pooler_output
    empty = [f[:0] for f in pooled] if isinstance(pooled, (list, tuple)) else pooled[:, :0]
    return BaseModelOutputWithPooling(pooler_output=empty)


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


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B,) summed log-probability of each row's final answer tokens."""
    mask = answer_mask(labels, eos_token_id)[:, 1:]  # token t is predicted by the logits at t - 1
    picked = logits[:, :-1][mask].float().log_softmax(-1)  # only the answer positions: (n, V)
    token_lp = picked.gather(-1, labels[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    return torch.zeros(labels.shape[0], device=logits.device).index_add(0, rows, token_lp)


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
            inputs = model_inputs(collator(items), param.device, param.dtype)
            labels = inputs.pop("labels")
            logits = forward_vision_first(model, model, inputs).logits
            scores = answer_logprob(logits, labels, eos_token_id).cpu()
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
