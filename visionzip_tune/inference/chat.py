"""A multi-turn conversation about an image and/or a video with a loaded model, templated as in training."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from PIL import Image

from visionzip_tune.data.video import VideoClip
from visionzip_tune.errors import UserError
from visionzip_tune.families import family_of, video_family
from visionzip_tune.inference.prompts import Prompter, image_of, video_frames_of

NO_MEDIA = "give an image (--image FILE) and/or a video (--video FILE_OR_DIR) to ask about."


class Chat:
    """A multi-turn conversation about one image and/or one video, templated as in training; greedy decoding.

    Prompts come from ``prompter`` (the same rule as every inference command: ``Prompter.for_recipe``).
    """

    def __init__(
        self,
        model,
        prompter: Prompter,
        *,
        image: str | Path | None = None,
        video: str | Path | None = None,
        max_new_tokens: int = 128,
    ):
        self.model = model
        self.prompter = prompter
        self.tokenizer = prompter.tokenizer
        self.video_frames = prompter.video_frames
        self.max_new_tokens = max_new_tokens
        self.pictures: list[Image.Image] = []  # the image (0 or 1)
        self.clip: VideoClip | None = None  # the video's frames and their times
        self.set_media(image, video)

    def set_media(self, image: str | Path | None = None, video: str | Path | None = None) -> None:
        """Start a new conversation about ``image`` and/or ``video`` (at least one)."""
        if image is None and video is None:
            raise UserError(NO_MEDIA)
        self.pictures, self.clip = [], None
        if video is not None:
            self.set_video(video)
        if image is not None:
            self.set_image(image)

    def set_image(self, image: str | Path) -> None:
        """Ask about ``image`` from now on (a video already given stays); starts a new conversation."""
        self.pictures = [image_of(image)]
        self._new_conversation()

    def set_video(self, video: str | Path) -> None:
        """Ask about ``video`` (a file, or a directory of frame images) from now on (an image already given stays);
        starts a new conversation. :class:`UserError` for a family without video input."""
        try:
            video_family(self.model.config)
        except ValueError as err:
            raise UserError(f"--video {video}: {err}. Ask about an image (--image) instead.") from None
        self.clip = video_frames_of(video, self.video_frames)
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.media = self.prompter.media(self.pictures, self.clip)
        self.history: list[tuple[str, str]] = []
        self.prompt_ids: list[int] = []

    @property
    def image_tokens(self) -> list[int]:
        """Placeholders of the image (0 or 1 entry)."""
        return self.media.image_tokens

    @property
    def video_tokens(self) -> list[int | list[str | int]]:
        """Placeholders of the video (0 or 1 entry): a count, or a layout of text and counts (Qwen3-VL)."""
        return self.media.video_tokens

    def prompt(self, question: str) -> list[int]:
        """Token ids the model is given to answer ``question`` after the conversation so far."""
        return self.prompter.prompt(self.history, question, self.media)

    @torch.no_grad()
    def ask(self, question: str) -> str:
        """The model's answer to ``question``; both are kept as context for the next question."""
        self.prompt_ids = self.prompt(question)
        input_ids = torch.tensor([self.prompt_ids], device=self.model.device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **self.prompter.model_inputs(self.media, input_ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            suppress_tokens=self.prompter.placeholder_ids,
        )
        answer = self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        self.history.append((question, answer))
        return answer

    def show_prompt(self) -> str:
        """The last prompt as text, each run of image / video placeholders shown once as ``<image>xN``."""
        prompter = self.prompter
        placeholders = {token for token in (prompter.image_token_id, prompter.video_token_id) if token is not None}
        pieces = []
        for token, run in itertools.groupby(self.prompt_ids, key=lambda t: t if t in placeholders else None):
            run = list(run)
            if token is None:
                pieces.append(self.tokenizer.decode(run))
            else:
                pieces.append(f"{self.tokenizer.convert_ids_to_tokens(token)}x{len(run)}")
        return "".join(pieces)

    def describe(self) -> str:
        """One line: the budget and the placeholder tokens of the current media."""
        budget = getattr(self.model.config, "visionzip", None)
        zipped = family_of(self.model.config).budget_of(budget).describe(budget) if budget else "stock"
        counts = [f"{n} tokens per image" for n in self.image_tokens]
        counts += [
            f"{n if isinstance(n, int) else sum(p for p in n if isinstance(p, int))} tokens per video of "
            f"{self.video_frames} frames"
            for n in self.video_tokens
        ]
        return f"({zipped}: {', '.join(counts)})"
