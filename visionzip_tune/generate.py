"""``python -m visionzip_tune generate``: answer prompts about an image and/or a video with a tuned projector and its
budget, for every supported family (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL).

    python -m visionzip_tune generate --projector runs/x/export --image cat.jpg --prompt "What is this?"
    python -m visionzip_tune generate --projector runs/v/export --video clip.mp4 --prompt "What happens?"
    python -m visionzip_tune generate --projector runs/x/export --image cat.jpg --interactive   # multi-turn

The base model comes from ``--model`` or, by default, the export's ``base_model``; ``load_projector`` checks it,
loads the tuned projector and applies the VisionZip budget it was tuned for (a ``full`` run's export holds the
whole trained model, which is loaded instead). Without ``--projector`` this is stock inference, optionally with
training-free VisionZip (``--dominant/--contextual``; Qwen: ``--dominant-ratio/--contextual-ratio``).

Prompts are built exactly as training builds samples (``visionzip_tune.data``'s templater, media transform, video
reader and the models' token-count functions, with the template, image aspect and video frames of the export's
recipe unless given): the prompt is the training sample of the conversation with an empty final answer, cut where
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
from visionzip_tune.data.images import MediaTransform, open_image
from visionzip_tune.data.template import IGNORE_INDEX, Templater, Turn
from visionzip_tune.data.validate import BadSample
from visionzip_tune.data.video import VideoClip, read_video_clip
from visionzip_tune.errors import UserError
from visionzip_tune.export import MODEL_DIR, load_projector, read_export, recorded_budget
from visionzip_tune.families import (
    apply_visionzip,
    id_inputs,
    sample_image_tokens,
    video_family,
    video_layout,
    video_timing,
)
from visionzip_tune.processing import Processing

NO_MEDIA = "give an image (--image FILE) and/or a video (--video FILE_OR_DIR) to ask about."


def video_frames_of(path: str | Path, frames: int) -> VideoClip:
    """``frames`` frames sampled uniformly from ``path`` and their times: a video file (decoded with PyAV) or a
    directory of frame images (every file with an image extension, in name order). :class:`UserError` naming the
    path otherwise."""
    path = Path(path)
    if path.is_dir():
        extensions = Image.registered_extensions()
        names = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not names:
            raise UserError(f"--video {path}: the directory holds no frame images (files like 000.png, 001.png).")
        video, folder = names, path
    else:
        video, folder = path.name, path.parent
    try:
        return read_video_clip(video, folder, frames)
    except BadSample as err:
        raise UserError(f"--video {path}: {err.reason}") from None


class Chat:
    """A multi-turn conversation about one image and/or one video, templated as in training; greedy decoding.

    ``processing`` is ``(tokenizer, image_processor, chat_template)``. The media go into the first user turn, the
    video's ``<video>`` before the image's ``<image>`` as the training templater renders them.
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
        self.tokenizer, image_processor, chat_template = processing
        config = model.config
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self.templater = Templater(
            self.tokenizer, template, self.image_token_id, chat_template, video_token_id=self.video_token_id
        )
        self.transform = MediaTransform(image_processor, image_aspect, video_frames)
        self.video_frames = video_frames
        self.max_new_tokens = max_new_tokens
        self.image: dict[str, torch.Tensor] = {}  # model inputs of the image ({} without one)
        self.video: dict[str, torch.Tensor] = {}  # ... of the video
        self.image_tokens: list[int] = []  # placeholders of the image (0 or 1 entry)
        self.video_tokens: list[int | list[str | int]] = []  # ... of the video: a count or a layout (0 or 1 entry)
        self.set_media(image, video)

    def set_media(self, image: str | Path | None = None, video: str | Path | None = None) -> None:
        """Start a new conversation about ``image`` and/or ``video`` (at least one)."""
        if image is None and video is None:
            raise UserError(NO_MEDIA)
        self.image, self.image_tokens, self.video, self.video_tokens = {}, [], {}, []
        if video is not None:
            self.set_video(video)
        if image is not None:
            self.set_image(image)

    def set_image(self, image: str | Path) -> None:
        """Ask about ``image`` from now on (a video already given stays); starts a new conversation."""
        try:
            picture = open_image(image)
        except BadSample as err:
            raise UserError(f"--image: {err.reason}") from None
        inputs, sizes = self.transform.images([picture])
        self.image = self._to_model(inputs)
        self.image_tokens = sample_image_tokens(self.model.config, sizes)
        self._new_conversation()

    def set_video(self, video: str | Path) -> None:
        """Ask about ``video`` (a file, or a directory of frame images) from now on (an image already given stays);
        starts a new conversation. :class:`UserError` for a family without video input."""
        config = self.model.config
        try:
            video_family(config)
        except ValueError as err:
            raise UserError(f"--video {video}: {err}. Ask about an image (--image) instead.") from None
        clip = video_frames_of(video, self.video_frames)
        inputs, size = self.transform.video_inputs(clip.frames)
        self.video = self._to_model({**inputs, **video_timing(config, size, clip.times)})
        self.video_tokens = [video_layout(config, size, clip.times)]
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.history: list[tuple[str, str]] = []
        self.prompt_ids: list[int] = []

    def _to_model(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors on the model's device; pixels in its dtype (sizes, counts and timings as they are)."""
        return {
            key: value.to(self.model.device, self.model.dtype if key.startswith("pixel_values") else value.dtype)
            for key, value in inputs.items()
        }

    def prompt(self, question: str) -> list[int]:
        """Token ids the model is given to answer ``question`` after the conversation so far."""
        turns = []
        for k, (asked, answered) in enumerate([*self.history, (question, "")]):
            first = k == 0
            turns += [
                Turn("human", len(self.image_tokens) * first, asked.strip(), videos=len(self.video_tokens) * first),
                Turn("gpt", 0, answered),
            ]
        ids, labels = self.templater(turns, self.image_tokens, self.video_tokens)
        answer_start = len(labels)
        while answer_start > 0 and labels[answer_start - 1] != IGNORE_INDEX:
            answer_start -= 1
        if answer_start == len(labels):  # the empty answer left no supervised end marker to cut at
            raise UserError(f"template {self.templater.template}: cannot find where the answer starts")
        return ids[:answer_start]

    @torch.no_grad()
    def ask(self, question: str) -> str:
        """The model's answer to ``question``; both are kept as context for the next question."""
        self.prompt_ids = self.prompt(question)
        input_ids = torch.tensor([self.prompt_ids], device=self.model.device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **self.image,
            **self.video,
            **id_inputs(self.model.config, input_ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            # A placeholder in the answer would be taken for media by the next step: never generate one.
            suppress_tokens=[t for t in (self.image_token_id, self.video_token_id) if t is not None],
        )
        answer = self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        self.history.append((question, answer))
        return answer

    def show_prompt(self) -> str:
        """The last prompt as text, each run of image / video placeholders shown once as ``<image>xN``."""
        placeholders = {token for token in (self.image_token_id, self.video_token_id) if token is not None}
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
    budget."""
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
    model = build.load_vlm(source, key="--model / the export's base model", dtype=getattr(torch, dtype))
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


def _recipe_value(record: dict | None, section: str, key: str, default):
    """A data setting of the recipe the projector was trained with, when the export records it."""
    recipe = (record or {}).get("recipe") or {}
    value = ((recipe.get("config") or {}).get(section) or {}).get(key)
    return default if value is None else value


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
        "--dominant-ratio", type=float, help="Qwen, without --projector: dominant tokens as a fraction of each image's"
    )
    parser.add_argument(
        "--contextual-ratio", type=float, help="Qwen, without --projector: contextual tokens as a fraction of them"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
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
        template=args.template or _recipe_value(record, "data", "template", DEFAULT_TEMPLATE),
        image_aspect=args.image_aspect or _recipe_value(record, "data", "image_aspect", DEFAULT_IMAGE_ASPECT),
        video_frames=args.video_frames or _recipe_value(record, "data", "video_frames", DEFAULT_VIDEO_FRAMES),
        max_new_tokens=args.max_new_tokens,
    )
    print(chat.describe(), file=sys.stderr)
    if args.prompt:
        _answer(chat, args.prompt, args.show_prompt)
    if args.interactive:
        _interact(chat, args.show_prompt)
    return 0
