"""Model inputs for questions about images and/or a video, built exactly as training builds its samples.

One place for every consumer that asks a model something at inference time (``generate``, the lmms-eval plugin,
``bench-infer``, ``show``): the training templater (``data.template.Templater``) renders the conversation, the training
media transform (``data.images.MediaTransform``) turns images and video frames into pixel values, and the families'
token-count functions say how many placeholders each image and video becomes under the model's live budget. A prompt is
the training sample of the conversation with an empty final answer, cut where that answer's supervised tokens begin; a
scored answer is the training sample itself, its answer tokens being the supervised ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from visionzip_tune.data.batching import Collator
from visionzip_tune.data.config import DEFAULT_IMAGE_ASPECT, DEFAULT_TEMPLATE, DEFAULT_VIDEO_FRAMES
from visionzip_tune.data.images import MediaTransform, open_image
from visionzip_tune.data.processing import Processing
from visionzip_tune.data.template import IGNORE_INDEX, Templater, Turn
from visionzip_tune.data.validate import IMAGE_TAG, VIDEO_TAG, BadSample
from visionzip_tune.data.video import VideoClip, read_video_clip
from visionzip_tune.errors import UserError
from visionzip_tune.families import id_inputs, sample_image_tokens, video_family, video_layout, video_timing
from visionzip_tune.families.forward import to_model_inputs


class Media(NamedTuple):
    """The images and video of one conversation as model inputs (on the model's device, pixels in its dtype)."""

    inputs: dict[str, torch.Tensor]
    image_tokens: list[int]  # placeholders of each image
    video_tokens: list[int | list[str | int]]  # placeholders of the video (0 or 1 entry): a count, or a layout


def recipe_data_setting(record: dict | None, key: str, default):
    """A ``data`` setting of the recipe an export was tuned with (its ``visionzip.json`` record), else ``default``."""
    recipe = (record or {}).get("recipe") or {}
    value = ((recipe.get("config") or {}).get("data") or {}).get(key)
    return default if value is None else value


def default_template(processing: Processing, record: dict | None) -> str:
    """The template prompts use unless told: the export's recipe's; else the model's chat template when it has one
    (what a stock model was trained with); else LLaVA-1.5's ``vicuna_v1``."""
    fallback = "chat_template" if processing.chat_template else DEFAULT_TEMPLATE
    return recipe_data_setting(record, "template", fallback)


def image_of(path: str | Path) -> Image.Image:
    """The RGB image at ``path``; :class:`UserError` naming ``--image`` and what is wrong with the file."""
    try:
        return open_image(path)
    except BadSample as err:
        raise UserError(f"--image: {err.reason}") from None


def video_frames_of(path: str | Path, frames: int, source: str = "--video") -> VideoClip:
    """``frames`` frames sampled uniformly from ``path`` and their times: a video file (decoded with PyAV) or a
    directory of frame images (every file with an image extension, in name order). :class:`UserError` naming
    ``source`` (where the path came from) and the path otherwise."""
    path = Path(path)
    if path.is_dir():
        extensions = Image.registered_extensions()
        names = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not names:
            raise UserError(f"{source} {path}: the directory holds no frame images (files like 000.png, 001.png).")
        video, folder = names, path
    else:
        video, folder = path.name, path.parent
    try:
        return read_video_clip(video, folder, frames)
    except BadSample as err:
        raise UserError(f"{source} {path}: {err.reason}") from None


class Prompter:
    """Token ids and pixel values of a conversation about images and/or one video, templated as in training.

    ``processing`` is ``(tokenizer, image_processor, chat_template)``; ``template``, ``image_aspect`` and
    ``video_frames`` are the data settings of the recipe (``recipe_data_setting``). The media go into the first
    user turn, the video's ``<video>`` before the images' ``<image>``, as the training templater renders them.
    """

    def __init__(
        self,
        model,
        processing: Processing,
        *,
        template: str = DEFAULT_TEMPLATE,
        image_aspect: str = DEFAULT_IMAGE_ASPECT,
        video_frames: int = DEFAULT_VIDEO_FRAMES,
    ):
        self.model = model
        self.tokenizer, image_processor, chat_template = processing
        config = model.config
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self.templater = Templater(
            self.tokenizer, template, self.image_token_id, chat_template, video_token_id=self.video_token_id
        )
        self.transform = MediaTransform(image_processor, image_aspect, video_frames)
        self.video_frames = video_frames

    @classmethod
    def for_recipe(
        cls,
        model,
        processing: Processing,
        record: dict | None,
        *,
        template: str | None = None,
        image_aspect: str | None = None,
        video_frames: int | None = None,
    ) -> Prompter:
        """The prompter of the settings given, each defaulting to the recipe of the export ``record`` (its
        visionzip.json; None without an export), then to :func:`default_template`, ``pad`` and 8 frames."""
        return cls(
            model,
            processing,
            template=template or default_template(processing, record),
            image_aspect=image_aspect or recipe_data_setting(record, "image_aspect", DEFAULT_IMAGE_ASPECT),
            video_frames=int(video_frames or recipe_data_setting(record, "video_frames", DEFAULT_VIDEO_FRAMES)),
        )

    def media(self, images: Sequence[Image.Image] = (), video: VideoClip | None = None) -> Media:
        """Model inputs of ``images`` (RGB, any number) and a ``video`` (its frames, exactly ``video_frames``, and
        their times). :class:`UserError` for a video given to a family without video input."""
        config = self.model.config
        inputs: dict[str, torch.Tensor] = {}
        image_tokens: list[int] = []
        video_tokens: list[int | list[str | int]] = []
        if video is not None:
            try:
                video_family(config)
            except ValueError as err:
                raise UserError(f"a video: {err}. Ask about images instead.") from None
            video_inputs, size = self.transform.video_inputs(list(video.frames))
            inputs.update(video_inputs, **video_timing(config, size, video.times))
            video_tokens = [video_layout(config, size, video.times)]
        if images:
            image_inputs, sizes = self.transform.images(list(images))
            inputs.update(image_inputs)
            image_tokens = sample_image_tokens(self.model.config, sizes)
        return Media(to_model_inputs(inputs, self.model.device, self.model.dtype), image_tokens, video_tokens)

    def model_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model takes besides the ids for a batch of ``input_ids`` about ``media``: the media's inputs
        and what follows from the ids alone (Qwen: ``mm_token_type_ids``)."""
        return {**media.inputs, **id_inputs(self.model.config, input_ids)}

    def batch(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int], Media]], *, padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Model inputs of several ``(input_ids, labels, media)`` rows at once (labels as :meth:`sample` gives them;
        a prompt's are all ``IGNORE_INDEX``), collated by training's collator: ``padding_side="left"`` for
        generation, ``"right"`` for scoring, the vision inputs concatenated in row order. Besides the ids,
        ``attention_mask`` and ``labels``, what follows from the padded ids (Qwen: ``mm_token_type_ids``)."""
        items = [
            {"id": k, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "vision": media.inputs}
            for k, (ids, labels, media) in enumerate(rows)
        ]
        collated = Collator(self.pad_token_id, padding_side)(items)
        inputs = to_model_inputs(collated, self.model.device, self.model.dtype)
        return {**inputs, **id_inputs(self.model.config, inputs["input_ids"])}

    @property
    def pad_token_id(self) -> int:
        """The id batches are padded with (masked out, so any id would do): the tokenizer's pad, else its eos."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    @property
    def placeholder_ids(self) -> list[int]:
        """The image and video placeholder ids: never to be generated (the next step would take one for media)."""
        return [t for t in (self.image_token_id, self.video_token_id) if t is not None]

    def sample(self, turns: Sequence[tuple[str, str]], media: Media) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of the training sample of ``turns`` (question, answer) about ``media``: labels
        are ``IGNORE_INDEX`` except on the answers (each closed by the template's end of turn). ``<image>`` and
        ``<video>`` tags in the questions are dropped, as training moves them to the first turn."""
        template_turns = []
        for k, (question, answer) in enumerate(turns):
            first = k == 0
            text = question.replace(IMAGE_TAG, "").replace(VIDEO_TAG, "").strip()
            template_turns += [
                Turn("human", len(media.image_tokens) * first, text, videos=len(media.video_tokens) * first),
                Turn("gpt", 0, answer.strip()),
            ]
        return self.templater(template_turns, media.image_tokens, media.video_tokens)

    def prompt(self, history: Sequence[tuple[str, str]], question: str, media: Media) -> list[int]:
        """Token ids the model is given to answer ``question`` after the conversation ``history``."""
        ids, labels = self.sample([*history, (question, "")], media)
        answer_start = len(labels)
        while answer_start > 0 and labels[answer_start - 1] != IGNORE_INDEX:
            answer_start -= 1
        if answer_start == len(labels):  # the empty answer left no supervised end marker to cut at
            raise UserError(f"template {self.templater.template}: cannot find where the answer starts")
        return ids[:answer_start]
