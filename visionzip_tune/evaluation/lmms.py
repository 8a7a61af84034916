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
* ``check_fingerprint``: ``false`` loads a projector onto base weights other than the ones it was tuned on.

Prompts are :class:`~visionzip_tune.inference.prompts.Prompter` prompts: the training template and media transform, so a
tuned projector sees the inputs it was trained on. ``generate_until`` decodes greedily unless the task asks for
sampling; ``loglikelihood`` returns lmms-eval's ``(loss, is_greedy)`` where the loss is the mean negative log-likelihood
of the continuation's tokens, scored as the answer of a training sample (without its end-of-turn token): lmms-eval's
``multiple_choice`` takes the choice of lowest loss. Requests run one at a time (``batch_size`` is accepted and not
used), on one process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from visionzip_tune.data.config import TEMPLATES
from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.heldout import answer_logprobs
from visionzip_tune.inference.load import load_model
from visionzip_tune.inference.prompts import Media, Prompter, video_frames_of

MODEL_ID = "visionzip"
DEFAULT_MAX_NEW_TOKENS = 128


class ZippedModel(lmms):
    """lmms-eval's view of an already loaded model (any family, any budget) and its :class:`Prompter`.

    The ``eval`` command wraps each model it evaluates in one; lmms-eval's ``--model visionzip`` builds a
    :class:`VisionZipModel` from ``--model_args``.
    """

    is_simple = True

    def __init__(self, model, prompter: Prompter):
        super().__init__()
        self.model = model
        self.prompter = prompter
        self.tokenizer = prompter.tokenizer
        self._media_of: tuple[tuple, Media] | None = None  # the last document's media (multiple choice reuses it)
        # Called as requests arrive: the ``eval`` command ends its "loading the tasks" phase with it.
        self.before_first_request: Callable[[], None] = lambda: None

    # -- media ------------------------------------------------------------------------------------------------
    def _media(self, doc_to_visual, doc_id, task: str, split: str) -> Media:
        key = (task, split, doc_id)
        if self._media_of is None or self._media_of[0] != key:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
            self._media_of = (key, self._media_from(visuals or [], task))
        return self._media_of[1]

    def _media_from(self, visuals: list, task: str) -> Media:
        """Images (PIL images or image files) and at most one video (a file or a directory of frames)."""
        images, video = [], None
        for visual in visuals:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in Image.registered_extensions():
                with Image.open(visual) as picture:
                    images.append(picture.convert("RGB"))
            elif isinstance(visual, (str, Path)) and video is None:
                video = video_frames_of(visual, self.prompter.video_frames)
            else:
                raise UserError(
                    f"task {task}: a document's visual {type(visual).__name__} {str(visual)[:80]!r} is neither an "
                    "image nor a video path (or is a second video); the visionzip model takes images and one video"
                )
        return self.prompter.media(images, video)

    # -- lmms-eval's interface --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        self.before_first_request()
        answers = []
        for request in tqdm(requests, desc="visionzip generate", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            media = self._media(doc_to_visual, doc_id, task, split)
            ids = torch.tensor([self.prompter.prompt([], context, media)], device=self.model.device)
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **self.prompter.model_inputs(media, ids),
                **generation_settings(gen_kwargs),
                pad_token_id=self.tokenizer.pad_token_id,
                suppress_tokens=self.prompter.placeholder_ids,
            )
            text = self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
            answers.append(cut_at(text, gen_kwargs.get("until")).strip())
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[GenerationResult]:
        self.before_first_request()
        results = []
        for request in tqdm(requests, desc="visionzip loglikelihood", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            media = self._media(doc_to_visual, doc_id, task, split)
            ids, labels = self.prompter.sample([(context, continuation)], media)
            ids = torch.tensor([ids], device=self.model.device)
            labels = torch.tensor([labels], device=self.model.device)
            inputs = self.prompter.model_inputs(media, ids)
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
            answer = answer_logprobs(logits, labels, self.tokenizer.eos_token_id)
            loss, greedy = -answer.token.mean().item(), bool(answer.greedy.all())
            # lmms-eval 0.7.3 turns any result that is not a str or a GenerationResult into str((loss, greedy)),
            # which its multiple_choice scoring cannot unpack; a GenerationResult's text passes through untouched.
            results.append(GenerationResult(text=(loss, greedy)))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the visionzip model answers single-round requests (generate_until)")


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
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
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
                device=device,
                other_compressor=bool(other_compressor),
                **budget,
            )
        except (TypeError, ValueError) as err:
            raise UserError(f"--model_args {budget}: {err}") from None
        prompter = Prompter.for_recipe(
            model, processing, record, template=template, image_aspect=image_aspect, video_frames=video_frames
        )
        super().__init__(model, prompter)


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


def cut_at(text: str, until) -> str:
    """``text`` up to the first of the stop strings ``until`` (a string or a list; None: none)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


manifest = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{VisionZipModel.__qualname__}")
