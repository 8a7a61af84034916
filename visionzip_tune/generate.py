"""``python -m visionzip_tune generate``: answer prompts about an image with a tuned projector and its budget.

    python -m visionzip_tune generate --projector runs/x/export --image cat.jpg --prompt "What is this?"
    python -m visionzip_tune generate --projector runs/x/export --image cat.jpg --interactive   # multi-turn

The base model comes from ``--model`` or, by default, the export's ``base_model``; ``load_projector`` checks it,
loads the tuned projector and applies the VisionZip budget it was tuned for. Without ``--projector`` this is stock
inference, optionally with training-free VisionZip (``--dominant/--contextual``).

Prompts are built exactly as training builds samples (``visionzip_tune.data``'s templater and image transform, with
the template and image aspect of the export's recipe unless given): the prompt is the training sample of the
conversation with an empty final answer, cut where that answer's supervised tokens begin.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from visionzip_tune.data.images import ImageTransform, open_image
from visionzip_tune.data.template import IGNORE_INDEX, Templater, Turn
from visionzip_tune.data.validate import BadSample
from visionzip_tune.errors import UserError
from visionzip_tune.export import load_projector, read_export
from visionzip_tune.models import apply_visionzip, tokens_per_image

DEFAULT_TEMPLATE = "vicuna_v1"
DEFAULT_ASPECT = "pad"


class Chat:
    """A multi-turn conversation about one image, templated as in training; greedy decoding."""

    def __init__(self, model, processor, image: str | Path, *, template: str = DEFAULT_TEMPLATE,
                 image_aspect: str = DEFAULT_ASPECT, max_new_tokens: int = 128):
        self.model = model
        self.tokenizer = processor.tokenizer
        self.image_token_id = model.config.image_token_index
        self.templater = Templater(
            self.tokenizer, template, self.image_token_id, getattr(processor, "chat_template", None)
        )
        self.transform = ImageTransform(processor.image_processor, image_aspect)
        self.max_new_tokens = max_new_tokens
        self.set_image(image)

    def set_image(self, image: str | Path) -> None:
        """Start a new conversation about ``image`` (one image per conversation, as LLaVA-1.5 was trained)."""
        try:
            picture = open_image(image)
        except BadSample as err:
            raise UserError(f"--image: {err.reason}") from None
        self.pixel_values = self.transform([picture]).to(self.model.device, self.model.dtype)
        self.image_tokens = tokens_per_image(self.model.config, (picture.height, picture.width))
        self.history: list[tuple[str, str]] = []
        self.prompt_ids: list[int] = []

    def prompt(self, question: str) -> list[int]:
        """Token ids the model is given to answer ``question`` after the conversation so far."""
        turns = []
        for k, (asked, answered) in enumerate([*self.history, (question, "")]):
            turns += [Turn("human", int(k == 0), asked.strip()), Turn("gpt", 0, answered)]
        ids, labels = self.templater(turns, [self.image_tokens])
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
            pixel_values=self.pixel_values,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answer = self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        self.history.append((question, answer))
        return answer

    def show_prompt(self) -> str:
        """The last prompt as text, each run of image placeholders shown once as ``<image>xN``."""
        image = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        pieces = []
        for is_image, run in itertools.groupby(self.prompt_ids, key=lambda token: token == self.image_token_id):
            run = list(run)
            pieces.append(f"{image}x{len(run)}" if is_image else self.tokenizer.decode(run))
        return "".join(pieces)


def load_model(model_dir: str | None, projector: str | None, dominant: int | None = None,
               contextual: int | None = None, *, check_fingerprint: bool = True, dtype: str = "float32",
               device: str | None = None):
    """``(model, processor, record)``: the base model with the exported projector and budget (``record`` = its
    visionzip.json), or stock with an optional training-free budget when ``projector`` is None."""
    if projector is not None and (dominant is not None or contextual is not None):
        raise UserError(
            "--dominant/--contextual set a training-free budget; with --projector the export's budget is used "
            "(the projector was tuned for it). Give one or the other."
        )
    if (dominant is None) != (contextual is None):
        raise UserError("give both --dominant and --contextual (e.g. 54 and 10 for 64 tokens per image), or neither.")
    record = read_export(projector) if projector is not None else None
    source = model_dir or (record["base_model"] if record else None)
    if source is None:
        raise UserError("give --model (a save_pretrained directory or hub id) or --projector (an export).")
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=getattr(torch, dtype))
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the model {source}: {err}") from None
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if projector is not None:
        load_projector(model, projector, processor=processor, check_fingerprint=check_fingerprint)
    elif dominant is not None:
        try:
            apply_visionzip(model, dominant, contextual, processor=processor)
        except ValueError as err:
            raise UserError(f"--dominant {dominant} --contextual {contextual}: {err}") from None
    return model, processor, record


def _recipe_value(record: dict | None, section: str, key: str, default: str) -> str:
    """A data setting of the recipe the projector was trained with, when the export records it."""
    recipe = (record or {}).get("recipe") or {}
    return ((recipe.get("config") or {}).get(section) or {}).get(key) or default


def _answer(chat: Chat, question: str, show_prompt: bool) -> None:
    answer = chat.ask(question)
    if show_prompt:
        print(chat.show_prompt(), file=sys.stderr)
    print(answer, flush=True)


def _interact(chat: Chat, first_image: str, show_prompt: bool) -> None:
    """Questions from stdin until an empty line or EOF; ``/image PATH`` starts over with another image."""
    tty = sys.stdin.isatty()
    print(f"(image {first_image}; an empty line ends, /image PATH switches the image)", file=sys.stderr)
    while True:
        if tty:
            print("USER: ", end="", file=sys.stderr, flush=True)
        question = sys.stdin.readline().strip()
        if not question:
            return
        if question.startswith("/image "):
            path = question[len("/image ") :].strip()
            chat.set_image(path)
            print(f"(new conversation about {path})", file=sys.stderr)
        else:
            _answer(chat, question, show_prompt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune generate",
        description="Answer a prompt about an image with a tuned projector and its VisionZip budget.",
    )
    parser.add_argument(
        "--projector", help="export directory (projector + budget); its base_model is the default --model"
    )
    parser.add_argument("--model", help="base model: a save_pretrained directory or hub id")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", help="question about the image (with --interactive: the first question)")
    parser.add_argument("--interactive", action="store_true", help="multi-turn chat reading questions from stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--template", choices=("vicuna_v1", "chat_template"),
                        help="prompt template (default: the export's recipe, else vicuna_v1)")
    parser.add_argument("--image-aspect", choices=("pad", "processor"),
                        help="image transform (default: the export's recipe, else pad)")
    parser.add_argument("--dominant", type=int, help="without --projector: training-free VisionZip dominant tokens")
    parser.add_argument("--contextual", type=int, help="without --projector: training-free VisionZip contextual tokens")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-check-fingerprint", action="store_true",
                        help="load the projector even if the base weights differ from the ones it was tuned on")
    parser.add_argument("--show-prompt", action="store_true", help="print each prompt (to stderr) as the model sees it")
    args = parser.parse_args(argv)
    if not args.interactive and not args.prompt:
        parser.error("--prompt is required (or use --interactive)")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")

    model, processor, record = load_model(
        args.model, args.projector, args.dominant, args.contextual,
        check_fingerprint=not args.no_check_fingerprint, dtype=args.dtype, device=args.device,
    )
    chat = Chat(
        model, processor, args.image,
        template=args.template or _recipe_value(record, "data", "template", DEFAULT_TEMPLATE),
        image_aspect=args.image_aspect or _recipe_value(record, "data", "image_aspect", DEFAULT_ASPECT),
        max_new_tokens=args.max_new_tokens,
    )
    budget = getattr(model.config, "visionzip", None)
    zipped = f"VisionZip {budget['dominant']} + {budget['contextual']}" if budget else "stock"
    print(f"({zipped}: {chat.image_tokens} tokens per image)", file=sys.stderr)
    if args.prompt:
        _answer(chat, args.prompt, args.show_prompt)
    if args.interactive:
        _interact(chat, args.image, args.show_prompt)
    return 0
