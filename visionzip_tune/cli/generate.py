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

Prompts are built exactly as training builds samples (``inference.prompts.Prompter``, with the template, image
aspect and video frames of the export's recipe unless given, the same rule as ``eval``, ``bench-infer`` and
``show``): the prompt is the training sample of the conversation with an empty final answer, cut where that
answer's supervised tokens begin.
"""

from __future__ import annotations

import argparse
import sys

from visionzip_tune.cli.common import (
    VIDEO_FRAMES_RULE,
    PROJECTOR_RULES,
    refuse_unused_flags,
    add_budget_argument,
    add_media_arguments,
    add_prompt_arguments,
    budget_of_args,
    checked_media,
    prompter_for,
)
from visionzip_tune.errors import UserError
from visionzip_tune.inference.chat import NO_MEDIA, Chat
from visionzip_tune.inference.load import load_model
from visionzip_tune.loading import DTYPES


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune generate",
        description="Answer a prompt about an image and/or a video with a tuned projector and its VisionZip budget.",
    )
    parser.add_argument(
        "--projector", help="export directory (projector + budget); its base_model is the default --model"
    )
    parser.add_argument("--model", help="base model: a save_pretrained directory or hub id")
    add_media_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--prompt", help="question about the media (with --interactive: the first question)")
    parser.add_argument("--interactive", action="store_true", help="multi-turn chat reading questions from stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--dominant", type=int, help="without --projector: training-free VisionZip dominant tokens")
    parser.add_argument("--contextual", type=int, help="without --projector: training-free VisionZip contextual tokens")
    parser.add_argument(
        "--dominant-ratio", type=float, help="Qwen, without --projector: dominant tokens as a fraction of each image's"
    )
    parser.add_argument(
        "--contextual-ratio", type=float, help="Qwen, without --projector: contextual tokens as a fraction of them"
    )
    add_budget_argument(parser)
    parser.add_argument(
        "--other-compressor",
        action="store_true",
        help="with --projector: apply --budget's compressor instead of the one the projector was tuned with",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="auto: bfloat16 on a GPU that has it (default float32)"
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_unused_flags(args, (VIDEO_FRAMES_RULE, *PROJECTOR_RULES))
    if args.image is None and args.video is None:
        raise UserError(NO_MEDIA)
    media = checked_media(args)  # before any weight is read: a typo in a path costs seconds, not a model load
    budget = budget_of_args(args, ("dominant", "contextual", "dominant_ratio", "contextual_ratio"))
    model, processing, record = load_model(
        args.model,
        args.projector,
        check_fingerprint=not args.no_check_fingerprint,
        dtype=args.dtype,
        device=args.device,
        other_compressor=args.other_compressor,
        **budget,
    )
    prompter = prompter_for(model, processing, record, args)
    chat = Chat(model, prompter, image=media.image, video=media.video, max_new_tokens=args.max_new_tokens)
    print(chat.describe(), file=sys.stderr)
    if args.prompt:
        _answer(chat, args.prompt, args.show_prompt)
    if args.interactive:
        _interact(chat, args.show_prompt)
    return 0
