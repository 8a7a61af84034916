"""``python -m visionzip_tune generate``: answer prompts about an image and/or a video with a tuned projector and its
budget, for every supported family (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL,
Mini-Gemini).

    python -m visionzip_tune generate --projector runs/x/export --image cat.jpg --prompt "What is this?"
    python -m visionzip_tune generate --projector runs/v/export --video clip.mp4 --prompt "What happens?"
    python -m visionzip_tune generate --projector runs/x/export --image cat.jpg --interactive   # multi-turn

The base model comes from ``--model`` or, by default, the export's ``base_model``; ``load_projector`` checks it,
loads the tuned projector and applies the VisionZip budget it was tuned for (a ``full`` run's export holds the
whole trained model, which is loaded instead). Without ``--projector`` this is stock inference, optionally with
training-free VisionZip (``--dominant/--contextual``; Qwen: ``--dominant-ratio/--contextual-ratio``).

Prompts are built exactly as training builds samples (``prompts.Prompter``: ``visionzip_tune.data``'s templater,
media transform, video reader and the models' token-count functions, with the template, image aspect and video
frames of the export's recipe unless given): the prompt is the training sample of the conversation with an empty final answer, cut where
that answer's supervised tokens begin. The tokenizer and image processor are loaded with ``load_processing`` (the
multimodal processor classes of Video-LLaVA and OneVision need torchvision, which the data path never uses).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from visionzip_tune import build
from visionzip_tune.data.config import (
    DEFAULT_IMAGE_ASPECT,
    DEFAULT_TEMPLATE,
    DEFAULT_VIDEO_FRAMES,
    IMAGE_ASPECTS,
    TEMPLATES,
)
from visionzip_tune.data.images import open_image
from visionzip_tune.data.validate import BadSample
from visionzip_tune.data.video import VideoClip
from visionzip_tune.errors import UserError
from visionzip_tune.export import MODEL_DIR, load_projector, read_export, recorded_budget
from visionzip_tune.families import apply_visionzip, video_family
from visionzip_tune.processing import Processing
from visionzip_tune.prompts import Prompter, recipe_data_setting, video_frames_of

DTYPES = ("auto", "float32", "bfloat16", "float16")
NO_MEDIA = "give an image (--image FILE) and/or a video (--video FILE_OR_DIR) to ask about."


class Chat:
    """A multi-turn conversation about one image and/or one video, templated as in training; greedy decoding.

    ``processing`` is ``(tokenizer, image_processor, chat_template)``. Prompts come from a
    :class:`~visionzip_tune.prompts.Prompter` with the recipe's ``template``, ``image_aspect`` and ``video_frames``.
    """

    def __init__(
        self,
        model,
        processing: Processing,
        *,
        image: str | Path | None = None,
        video: str | Path | None = None,
        template: str = DEFAULT_TEMPLATE,
        image_aspect: str = DEFAULT_IMAGE_ASPECT,
        video_frames: int = DEFAULT_VIDEO_FRAMES,
        max_new_tokens: int = 128,
    ):
        self.model = model
        self.prompter = Prompter(
            model, processing, template=template, image_aspect=image_aspect, video_frames=video_frames
        )
        self.tokenizer = self.prompter.tokenizer
        self.video_frames = video_frames
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
        try:
            self.pictures = [open_image(image)]
        except BadSample as err:
            raise UserError(f"--image: {err.reason}") from None
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
        if not budget:
            zipped = "stock"
        elif "dominant" in budget:
            zipped = f"VisionZip {budget['dominant']} + {budget['contextual']}"
        else:
            zipped = f"VisionZip {budget['dominant_ratio']} + {budget['contextual_ratio']} of each image's tokens"
        counts = [f"{n} tokens per image" for n in self.image_tokens]
        counts += [
            f"{n if isinstance(n, int) else sum(p for p in n if isinstance(p, int))} tokens per video of "
            f"{self.video_frames} frames"
            for n in self.video_tokens
        ]
        return f"({zipped}: {', '.join(counts)})"


def load_model(
    model_dir: str | None,
    projector: str | None,
    dominant: int | None = None,
    contextual: int | None = None,
    *,
    check_fingerprint: bool = True,
    dtype: str = "float32",
    device: str | None = None,
    **ratios: float | None,
) -> tuple[Any, Processing, dict | None]:
    """``(model, processing, record)``: the base model with the exported projector and budget (``record`` = its
    visionzip.json), or stock with an optional training-free budget (``dominant`` + ``contextual``; Qwen: the
    ``dominant_ratio`` / ``contextual_ratio`` keywords) when ``projector`` is None. A ``full`` run's export holds
    the whole trained model with its tokenizer and image processor: it is loaded and re-zipped with its recorded
    budget. ``dtype`` is one of :data:`DTYPES` (``auto``: bfloat16 on a GPU that supports it, else
    float32); ``device`` defaults to cuda when available, else cpu."""
    free = {k: v for k, v in {"dominant": dominant, "contextual": contextual, **ratios}.items() if v is not None}
    if projector is not None and free:
        raise UserError(
            f"{', '.join(free)} set a training-free budget; with a projector export the export's budget is used "
            "(the projector was tuned for it). Give one or the other."
        )
    if (dominant is None) != (contextual is None):
        raise UserError("give both dominant and contextual (e.g. 54 and 10 for 64 tokens per image), or neither.")
    record = read_export(projector) if projector is not None else None
    whole = record is not None and record.get("mode") == "full"
    if whole and model_dir is not None:
        raise UserError(
            f"{projector} comes from a 'full' run: it holds the whole trained model ({MODEL_DIR}/), so no other "
            "model can replace it. Leave the model out."
        )
    if whole:
        source = str(Path(projector) / record.get("model", MODEL_DIR))
    else:
        source = model_dir or (record["base_model"] if record else None)
    if source is None:
        raise UserError("give a model (a save_pretrained directory or hub id) or a projector export.")
    model = build.load_vlm(source, key="--model / the export's base model", dtype=getattr(torch, resolve_dtype(dtype)))
    processing = build.load_model_processing(source, key="model")
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if whole:
        if recorded_budget(record) is not None:  # a run without VisionZip saved a stock model
            apply_visionzip(model)  # the budget recorded in its config.json
    elif projector is not None:
        load_projector(
            model, projector, check_fingerprint=check_fingerprint, image_processor=processing.image_processor
        )
    elif free:
        try:
            apply_visionzip(model, **free)
        except ValueError as err:
            raise UserError(f"{', '.join(f'{k}={v}' for k, v in free.items())}: {err}") from None
    return model, processing, record


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> bfloat16 on a GPU that supports it, else float32; other names of :data:`DTYPES` as given."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def _answer(chat: Chat, question: str, show_prompt: bool) -> None:
    answer = chat.ask(question)
    if show_prompt:
        print(chat.show_prompt(), file=sys.stderr)
    print(answer, flush=True)


def _interact(chat: Chat, show_prompt: bool) -> None:
    """Questions from stdin until an empty line or EOF; ``/image PATH`` / ``/video PATH`` start a new conversation
    with that image / video (the other medium, if any, stays)."""
    tty = sys.stdin.isatty()
    print("(an empty line ends; /image PATH or /video PATH starts over with other media)", file=sys.stderr)
    while True:
        if tty:
            print("USER: ", end="", file=sys.stderr, flush=True)
        question = sys.stdin.readline().strip()
        if not question:
            return
        command, _, path = question.partition(" ")
        if command in ("/image", "/video") and path.strip():
            path = path.strip()
            (chat.set_image if command == "/image" else chat.set_video)(path)
            print(f"(new conversation about {path}) {chat.describe()}", file=sys.stderr)
        else:
            _answer(chat, question, show_prompt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune generate",
        description="Answer a prompt about an image and/or a video with a tuned projector and its VisionZip budget.",
    )
    parser.add_argument(
        "--projector", help="export directory (projector + budget); its base_model is the default --model"
    )
    parser.add_argument("--model", help="base model: a save_pretrained directory or hub id")
    parser.add_argument("--image", help="image file")
    parser.add_argument(
        "--video",
        metavar="FILE_OR_DIR",
        help="video: a video file (decoded with PyAV: pip install av) or a directory of frame images, taken in name "
        "order; for families with a video input (Video-LLaVA, OneVision, Qwen); may be given together with --image",
    )
    parser.add_argument(
        "--video-frames", type=int, help="frames sampled uniformly from --video (default: the export's recipe, else 8)"
    )
    parser.add_argument("--prompt", help="question about the media (with --interactive: the first question)")
    parser.add_argument("--interactive", action="store_true", help="multi-turn chat reading questions from stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument(
        "--template", choices=TEMPLATES, help="prompt template (default: the export's recipe, else vicuna_v1)"
    )
    parser.add_argument(
        "--image-aspect", choices=IMAGE_ASPECTS, help="image transform (default: the export's recipe, else pad)"
    )
    parser.add_argument("--dominant", type=int, help="without --projector: training-free VisionZip dominant tokens")
    parser.add_argument("--contextual", type=int, help="without --projector: training-free VisionZip contextual tokens")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="auto: bfloat16 on a GPU that has it (default float32)"
    )
    parser.add_argument(
        "--dominant-ratio", type=float, help="Qwen, without --projector: dominant tokens as a fraction of each image's"
    )
    parser.add_argument(
        "--contextual-ratio", type=float, help="Qwen, without --projector: contextual tokens as a fraction of them"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--no-check-fingerprint",
        action="store_true",
        help="load the projector even if the base weights differ from the ones it was tuned on",
    )
    parser.add_argument("--show-prompt", action="store_true", help="print each prompt (to stderr) as the model sees it")
    args = parser.parse_args(argv)
    if not args.interactive and not args.prompt:
        parser.error("--prompt is required (or use --interactive)")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.video_frames is not None and args.video_frames < 1:
        parser.error("--video-frames must be >= 1")
    if args.image is None and args.video is None:
        raise UserError(NO_MEDIA)
    if (args.dominant is None) != (args.contextual is None):
        raise UserError("give both --dominant and --contextual (e.g. 54 and 10 for 64 tokens per image), or neither.")
    if args.projector is not None and (
        args.dominant is not None or args.dominant_ratio is not None or args.contextual_ratio is not None
    ):
        raise UserError(
            "--dominant/--contextual (--dominant-ratio/--contextual-ratio) set a training-free budget; with "
            "--projector the export's budget is used (the projector was tuned for it). Give one or the other."
        )

    model, processing, record = load_model(
        args.model,
        args.projector,
        args.dominant,
        args.contextual,
        dominant_ratio=args.dominant_ratio,
        contextual_ratio=args.contextual_ratio,
        check_fingerprint=not args.no_check_fingerprint,
        dtype=args.dtype,
        device=args.device,
    )
    chat = Chat(
        model,
        processing,
        image=args.image,
        video=args.video,
        template=args.template or recipe_data_setting(record, "template", DEFAULT_TEMPLATE),
        image_aspect=args.image_aspect or recipe_data_setting(record, "image_aspect", DEFAULT_IMAGE_ASPECT),
        video_frames=args.video_frames or recipe_data_setting(record, "video_frames", DEFAULT_VIDEO_FRAMES),
        max_new_tokens=args.max_new_tokens,
    )
    print(chat.describe(), file=sys.stderr)
    if args.prompt:
        _answer(chat, args.prompt, args.show_prompt)
    if args.interactive:
        _interact(chat, args.show_prompt)
    return 0
