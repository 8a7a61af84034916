"""The lmms-eval model ``visionzip``: any family this toolkit supports, stock, with training-free VisionZip, or with a
tuned projector export, scored on the inputs it was tuned for. Registered through the entry-point group
``lmms_eval.models`` (``setup.cfg``), so lmms-eval needs no fork and no copy of this code:

    python -m lmms_eval --model visionzip --model_args pretrained=DIR,projector=EXPORT --tasks gqa,pope
    python -m lmms_eval --model visionzip --model_args pretrained=DIR,dominant=54,contextual=10 --tasks gqa

``--model_args`` keys (all optional but one of pretrained / projector):

* ``pretrained``: the base model (a ``save_pretrained`` directory or hub id); default: the export's base model;
* ``projector``: an export directory (``python -m visionzip_tune export``): its projector and its budget;
* ``dominant``, ``contextual``: a training-free VisionZip budget (without ``projector``); ``method`` (``random``,
  ``pool``, ``divprune``, ``vispruner``, ``prumerge_plus``) and ``tokens``: another compressor; any other key
  (``eager``, ``token_order``, a family's own or a compressor's own budget keys) goes to ``vzt.apply_visionzip`` as
  a keyword argument;
* ``other_compressor``: ``true`` lets a budget be given with ``projector``, to score another compressor's rows
  under a projector tuned with its own (refused otherwise);
* ``template``, ``image_aspect``, ``video_frames``: how prompts and media are built; default: the export's recipe,
  else the model's chat template (``vicuna_v1`` when it has none), ``pad`` and 8 frames;
* ``dtype``: ``auto`` (bfloat16 on a GPU that supports it, else float32), ``float32``, ``bfloat16``, ``float16``;
* ``device``: default ``--device``, else cuda when available, else cpu;
* ``check_fingerprint``: ``false`` loads a projector onto base weights other than the ones it was tuned on;
* ``tower_share_gib``: CPU memory (GiB, default 4) for the frozen part of the media already seen, so the choices
  of a multiple-choice question run the tower once (:mod:`~visionzip_tune.evaluation.tower_share`; 0: off);
* ``answers``: a folder where every answer is kept (:mod:`~visionzip_tune.evaluation.answers`): the same command
  run again, after a kill or with more processes, answers from it what it had answered.

``--batch_size N`` (or ``auto``: :mod:`~visionzip_tune.evaluation.batch_size`) batches both request kinds, for every
family: requests in lmms-eval's order (longest first; generation requests grouped by their generation settings),
collated by training's collator (:meth:`Prompter.batch`: left padding for generation, right padding for scoring,
each request's vision inputs as it alone would have them), answers returned in the caller's order. Padding is
masked out and every row keeps its own positions (Qwen: the MRoPE positions of the unbatched request), so a
request's answer does not depend on the batch it ran in: at batch 1 and 8 in float32 on a CPU the greedy texts are
identical and the losses agree to about 1e-6 (tests/evaluation/test_batched.py). Under ``accelerate launch`` or
``torchrun`` each process takes the GPU of its local rank, and lmms-eval shards the documents over the ranks.

Prompts are :class:`~visionzip_tune.inference.prompts.Prompter` prompts: the training template and media transform, so a
tuned projector sees the inputs it was trained on. ``generate_until`` decodes greedily unless the task asks for
sampling; ``loglikelihood`` returns lmms-eval's ``(loss, is_greedy)`` where the loss is the mean negative log-likelihood
of the continuation's tokens, scored as the answer of a training sample (without its end-of-turn token): lmms-eval's
``multiple_choice`` takes the choice of lowest loss. The model measures its own throughput
(:mod:`~visionzip_tune.evaluation.throughput`, also logged into lmms-eval's ``throughput`` results).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import Collator
from PIL import Image
from tqdm import tqdm

from visionzip_tune.data.config import TEMPLATES
from visionzip_tune.data.template import IGNORE_INDEX
from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.answers import AnswerStore, request_key, setting_identity
from visionzip_tune.evaluation.batch_size import BatchSize
from visionzip_tune.evaluation.heldout import answer_logprobs
from visionzip_tune.evaluation.lmms_manifest import MODEL_ID
from visionzip_tune.evaluation.throughput import Throughput
from visionzip_tune.evaluation.tower_share import DEFAULT_GIB, TowerShare
from visionzip_tune.families.forward import encode_vision
from visionzip_tune.inference.load import load_model
from visionzip_tune.inference.prompts import Media, Prompter, video_frames_of
from visionzip_tune.inference.stage_timer import first_token

DEFAULT_MAX_NEW_TOKENS = 128
MEDIA_CACHE = 32  # documents whose media are kept: a multiple-choice document's choices reuse its media


class Built(NamedTuple):
    """One request as model inputs: its ids and labels (a prompt's are all ignored), its media, how it is
    generated (generation settings and stop strings; empty for a scored answer) and its answer-store key."""

    ids: list[int]
    labels: list[int]
    media: Media
    settings: dict
    key: str | None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every model input of the request alone, as the answer store keys it."""
        return {"input_ids": torch.tensor(self.ids), "labels": torch.tensor(self.labels), **self.media.inputs}


class ZippedModel(lmms):
    """lmms-eval's view of an already loaded model (any family, any budget) and its :class:`Prompter`; requests run
    in batches of ``batch_size`` (a number or ``auto``), answers kept in ``answers`` when given, each medium's tower
    pass shared through ``tower_share`` (:mod:`~visionzip_tune.evaluation.tower_share`; None: every request runs
    the tower).

    The ``eval`` command wraps each setting it evaluates in one; lmms-eval's ``--model visionzip`` builds a
    :class:`VisionZipModel` from ``--model_args``. :attr:`throughput` counts what the model did.
    """

    is_simple = True

    def __init__(
        self,
        model,
        prompter: Prompter,
        *,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        answers: AnswerStore | None = None,
        tower_share: TowerShare | None = None,
    ):
        super().__init__()
        self.model = model
        self.prompter = prompter
        self.tokenizer = prompter.tokenizer
        self.answers = answers
        self.tower = None if tower_share is None else tower_share.view(model)
        self.throughput = Throughput()
        # lmms-eval also sets these under several processes; the progress bar is rank 0's from the start.
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.batch = BatchSize(1 if batch_size is None else batch_size, model.device, max_batch_size, self._say)
        self._media_of: OrderedDict[tuple, Media] = OrderedDict()
        # Called as requests arrive: the ``eval`` command ends its "loading the tasks" phase with it.
        self.before_first_request: Callable[[], None] = lambda: None

    @property
    def device(self) -> torch.device:
        """Where lmms-eval's collectives over the ranks put their tensors (the GPU of this rank under NCCL)."""
        return self.model.device

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    # -- media ------------------------------------------------------------------------------------------------
    def _media(self, doc_to_visual, doc_id, task: str, split: str) -> Media:
        key = (task, split, doc_id)
        if key in self._media_of:
            self._media_of.move_to_end(key)
        else:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
            self._media_of[key] = self._media_from(visuals or [], f"task {task}, document {doc_id}")
            if len(self._media_of) > MEDIA_CACHE:
                self._media_of.popitem(last=False)
        return self._media_of[key]

    def _media_from(self, visuals: list, document: str) -> Media:
        """Images (PIL images or image files) and at most one video (a file or a directory of frames) of
        ``document`` (named in errors)."""
        images, video = [], None
        for visual in visuals:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in Image.registered_extensions():
                with Image.open(visual) as picture:
                    images.append(picture.convert("RGB"))
            elif isinstance(visual, (str, Path)) and video is None:
                video = video_frames_of(visual, self.prompter.video_frames, f"{document}: video")
            else:
                raise UserError(
                    f"{document}: the visual {type(visual).__name__} {str(visual)[:80]!r} is neither an image nor a "
                    "video path (or is a second video); the visionzip model takes images and one video"
                )
        return self.prompter.media(images, video)

    # -- requests -> model inputs -----------------------------------------------------------------------------
    def _build(self, kind: str, request) -> Built:
        context, second, doc_to_visual, doc_id, task, split = request.args
        media = self._media(doc_to_visual, doc_id, task, split)
        if kind == "generate_until":
            ids = self.prompter.prompt([], context, media)
            labels = [IGNORE_INDEX] * len(ids)
            settings = {"generate": generation_settings(second), "until": stop_strings(second.get("until"))}
        else:
            ids, labels = self.prompter.sample([(context, second)], media)
            settings = {}
        built = Built(ids, labels, media, settings, None)
        return built._replace(key=request_key(kind, built.tensors, settings)) if self.answers is not None else built

    def _vision_tokens(self, ids: Sequence[int]) -> int:
        placeholders = set(self.prompter.placeholder_ids)
        return sum(1 for t in ids if t in placeholders)

    # -- lmms-eval's interface --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        self.before_first_request()
        started, counted = time.perf_counter(), self.throughput.computed
        answers = self._answer("generate_until", requests, self._generate)
        elapsed = time.perf_counter() - started
        tokens = sum(len(self.tokenizer(answer).input_ids) for answer in answers)
        ttft = self.throughput.first_token_ms / max(1, self.throughput.timed_requests)
        extra = {"requests": self.throughput.computed - counted, "ttft_ms": ttft}
        log_metrics(elapsed, tokens, tokens / elapsed if elapsed > 0 else 0.0, additional_metrics=extra)
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[GenerationResult]:
        self.before_first_request()
        scored = self._answer("loglikelihood", requests, self._score)
        # lmms-eval 0.7.3 turns any result that is not a str or a GenerationResult into str((loss, greedy)),
        # which its multiple_choice scoring cannot unpack; a GenerationResult's text passes through untouched.
        return [GenerationResult(text=(float(loss), bool(greedy))) for loss, greedy in scored]

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the visionzip model answers single-round requests (generate_until)")

    # -- batching ---------------------------------------------------------------------------------------------
    def _answer(self, kind: str, requests, run: Callable[[list[Built]], list]) -> list:
        """Every request's answer, in request order: batches in length order, each answered from the store where
        it can be and by ``run`` (the model) otherwise."""
        started = time.perf_counter()
        texts = [r.args[0] + (r.args[1] if kind == "loglikelihood" else "") for r in requests]
        lengths = [len(ids) for ids in self.tokenizer(texts).input_ids] if texts else []
        groups = None
        if kind == "generate_until":  # one generate call per batch: one set of generation settings
            groups = [{"generation": json.dumps(r.args[1], sort_keys=True, default=str)} for r in requests]
        batches, original_order = in_length_order(lengths, groups, lambda: self.batch.size)
        answers = []
        with tqdm(total=len(requests), desc=f"visionzip {kind}", disable=self.rank != 0) as progress:
            for batch in batches:
                answers += self._answer_batch(kind, [requests[k] for k in batch], run)
                progress.update(len(batch))
        self.throughput.seconds += time.perf_counter() - started
        return original_order(answers)

    def _answer_batch(self, kind: str, requests, run: Callable[[list[Built]], list]) -> list:
        built = [self._build(kind, request) for request in requests]
        answers = [None if self.answers is None else self.answers.get(b.key) for b in built]
        todo = [k for k, answer in enumerate(answers) if answer is None]
        for k, answer in zip(todo, self.batch.run([built[k] for k in todo], run)):
            answers[k] = answer
        if self.answers is not None:
            self.answers.put((built[k].key, answers[k]) for k in todo)
        self.throughput.count([len(b.ids) for b in built], [self._vision_tokens(b.ids) for b in built], len(todo))
        return answers

    def _generate(self, rows: list[Built]) -> list[str]:
        """Greedy (or the task's sampled) answers of a batch of prompts sharing their generation settings."""
        inputs, encoded = self._inputs(rows, padding_side="left")
        inputs.pop("labels")
        with first_token(self.model) as timer:
            output = self.model.generate(
                **inputs,
                **encoded,
                **rows[0].settings["generate"],
                pad_token_id=self.prompter.pad_token_id,
                suppress_tokens=self.prompter.placeholder_ids,
            )
        self._ran(len(rows))
        self.throughput.first_token(timer.ms, len(rows))
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [cut_at(text, rows[0].settings["until"]).strip() for text in texts]

    def _score(self, rows: list[Built]) -> list[list]:
        """``[loss, is_greedy]`` of each row's answer (lmms-eval's loglikelihood convention, module docstring)."""
        inputs, encoded = self._inputs(rows, padding_side="right")
        labels = inputs.pop("labels")
        answer = answer_logprobs(self.model(**inputs, **encoded).logits, labels, self.tokenizer.eos_token_id)
        self._ran(len(rows))
        losses, greedy = (-answer.mean(len(rows))).tolist(), answer.all_greedy(len(rows)).tolist()
        return [[loss, is_greedy] for loss, is_greedy in zip(losses, greedy)]

    def _inputs(self, rows: list[Built], padding_side: str) -> tuple[dict[str, torch.Tensor], dict]:
        """The batch of ``rows`` and, when the tower is shared, the features of its media as ``mm_encoder_outputs``
        (made from their frozen parts, each computed once: :mod:`~visionzip_tune.evaluation.tower_share`)."""
        media = [r.media for r in rows]
        if self.tower is not None:
            media = self.tower.attach(media)
        inputs = self.prompter.batch([(r.ids, r.labels, m) for r, m in zip(rows, media)], padding_side=padding_side)
        if self.tower is None or not any(key.startswith("cached_") for key in inputs):
            return inputs, {}
        inputs, encoded = encode_vision(self.model, inputs, every_path=False)
        return inputs, {"mm_encoder_outputs": encoded}

    def _ran(self, rows: int) -> None:
        self.throughput.batch_size = max(self.throughput.batch_size, rows)


def in_length_order(
    lengths: Sequence[int], groups: Sequence[Any] | None, size: Callable[[], int]
) -> tuple[Iterator[list[int]], Callable[[list], list]]:
    """``(batches, original_order)`` in lmms-eval's order (its ``Collator``, as its batching models use it): batches
    of request indices, longest first (within each group of equal ``groups`` entries, when given), so the first
    batch is the largest and each holds prompts of similar length, which pad little; ``size()`` indices each, read
    per batch (``auto`` may lower it). ``original_order`` puts the answers of every batch, concatenated in batch
    order, back in request order."""
    entries = [(k, length, None if groups is None else groups[k]) for k, length in enumerate(lengths)]
    order = Collator(entries, lambda entry: -entry[1], group_fn=lambda entry: entry[2], grouping=groups is not None)
    batches = ([entry[0] for entry in batch] for batch in order.get_batched(n=0, batch_fn=lambda *_: size()))
    return batches, order.get_original


def local_device(device: str | None) -> str | None:
    """``device``, except that each of several processes on a GPU machine takes the GPU of its local rank (as
    lmms-eval's own models do under ``accelerate launch`` / ``torchrun``) unless a device index is given."""
    several = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if several and torch.cuda.is_available() and device in (None, "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


class VisionZipModel(ZippedModel):
    """``--model visionzip``: loads the model named by ``--model_args`` (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        projector: str | None = None,
        dominant: int | None = None,
        contextual: int | None = None,
        template: str | None = None,
        image_aspect: str | None = None,
        video_frames: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        check_fingerprint: bool = True,
        other_compressor: bool = False,
        answers: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        tower_share_gib: float = DEFAULT_GIB,
        **budget,
    ):
        if template is not None and template not in TEMPLATES:
            raise UserError(f"template={template}: choose one of {', '.join(TEMPLATES)}")
        try:
            model, processing, record = load_model(
                None if pretrained is None else str(pretrained),
                None if projector is None else str(projector),
                dominant,
                contextual,
                check_fingerprint=bool(check_fingerprint),
                dtype=str(dtype),
                device=local_device(device),
                other_compressor=bool(other_compressor),
                **budget,
            )
        except (TypeError, ValueError) as err:
            raise UserError(f"--model_args {budget}: {err}") from None
        prompter = Prompter.for_recipe(
            model, processing, record, template=template, image_aspect=image_aspect, video_frames=video_frames
        )
        store = None
        if answers is not None:
            identity = setting_identity(model, export_checksum=(record or {}).get("checksum"))
            store = AnswerStore(answers, MODEL_ID, identity, int(os.environ.get("RANK", 0)))
        share = TowerShare(float(tower_share_gib))
        super().__init__(
            model, prompter, batch_size=batch_size, max_batch_size=max_batch_size, answers=store, tower_share=share
        )


def generation_settings(gen_kwargs: dict) -> dict:
    """``model.generate`` settings of a task's ``generation_kwargs``: greedy unless it asks for sampling with a
    temperature above 0 (lmms-eval tasks say ``temperature: 0`` for greedy); ``until`` is applied to the text."""
    sample = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0) > 0
    settings = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
        "do_sample": sample,
    }
    if sample:
        settings.update(temperature=float(gen_kwargs["temperature"]), top_p=float(gen_kwargs.get("top_p") or 1.0))
    return settings


def stop_strings(until) -> list[str]:
    """A task's ``until`` (a string, a list or None) as a list of non-empty stop strings."""
    return [stop for stop in ([until] if isinstance(until, str) else list(until or [])) if stop]


def cut_at(text: str, until) -> str:
    """``text`` up to the first of the stop strings ``until`` (a string or a list; None: none)."""
    for stop in stop_strings(until):
        text = text.split(stop, 1)[0]
    return text
