"""What several commands share on their command line: the recipe and its overrides, the model / export / prompt
flags of the inference commands, and the checks of media paths made before any weight is loaded."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from visionzip_tune.data.config import IMAGE_ASPECTS, TEMPLATES
from visionzip_tune.errors import UserError
from visionzip_tune.export import read_export
from visionzip_tune.inference.prompts import Prompter, image_of
from visionzip_tune.inference.variants import parse_budgets
from visionzip_tune.loading import DTYPES


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """``[RECIPE] [key.sub=value ...]`` (train, launch)."""
    parser.add_argument("recipe", nargs="?", help="recipe YAML (recipes/<model>/<mode>.yaml); omit for defaults")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def recipe_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The recipe and the overrides of :func:`add_recipe_arguments`; a first positional that is an override and not
    a YAML file (``train key=value`` without a recipe) is an override."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        return None, [recipe, *overrides]
    return recipe, overrides


def add_media_arguments(parser: argparse.ArgumentParser) -> None:
    """``--image`` and ``--video`` (generate, bench-infer, show)."""
    parser.add_argument("--image", help="image file")
    parser.add_argument(
        "--video",
        metavar="FILE_OR_DIR",
        help="video: a video file (decoded with PyAV: pip install av) or a directory of frame images, taken in name "
        "order; for families with a video input (Video-LLaVA, OneVision, Qwen); may be given together with --image",
    )


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """How prompts and media are built; each defaults to the export's recipe (:meth:`Prompter.for_recipe`)."""
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        help="prompt template (default: the export's recipe, else the model's chat template, else vicuna_v1)",
    )
    parser.add_argument(
        "--image-aspect", choices=IMAGE_ASPECTS, help="image transform (default: the export's recipe, else pad)"
    )
    parser.add_argument("--video-frames", type=int, help="frames per video (default: the export's recipe, else 8)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, export and prompt flags ``eval``, ``bench-infer`` and ``show`` share."""
    parser.add_argument("--model", help="base model (save_pretrained directory or hub id); default: the export's")
    parser.add_argument("--projector", help="export directory of a tuned projector (adds the tuned run)")
    add_prompt_arguments(parser)
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto (default): bfloat16 on a GPU that has it, else float32"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


class CheckedMedia(NamedTuple):
    """The media paths a command was given, each checked to exist (the image also to open)."""

    image: Path | None
    video: Path | None


def _check_video_frames(args: argparse.Namespace) -> None:
    frames = getattr(args, "video_frames", None)
    if frames is not None and frames < 1:
        raise UserError(f"--video-frames {frames}: give at least 1 frame per video.")


def checked_media(args: argparse.Namespace) -> CheckedMedia:
    """``--image`` / ``--video`` (and ``--video-frames``) checked before any weight is loaded: :class:`UserError`
    naming the flag and the path that is wrong."""
    _check_video_frames(args)
    image = Path(args.image) if args.image else None
    if image is not None:
        image_of(image)  # opens and checks it
    video = Path(args.video) if args.video else None
    if video is not None and not video.exists():
        raise UserError(f"--video: missing video {video} (relative paths start at {Path.cwd()}).")
    return CheckedMedia(image, video)


def export_record_of(args: argparse.Namespace) -> dict | None:
    """The ``visionzip.json`` record of ``--projector`` (None without one); :class:`UserError` when neither a model
    nor an export is given, or the export is not readable."""
    if args.model is None and args.projector is None:
        raise UserError("give a model (--model) or a projector export (--projector), whose base model is used.")
    _check_video_frames(args)
    return read_export(args.projector) if args.projector else None


def prompter_for(model, processing, record: dict | None, args: argparse.Namespace) -> Prompter:
    """The prompter of ``args``' prompt flags, defaulting to the export's recipe (then the model's own template)."""
    return Prompter.for_recipe(
        model,
        processing,
        record,
        template=args.template,
        image_aspect=args.image_aspect,
        video_frames=args.video_frames,
    )


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    """``--budget``: one training-free budget, as an entry of eval's ``--budgets`` (any compressor)."""
    parser.add_argument(
        "--budget",
        help="without --projector: a training-free budget of any compressor, e.g. 54+10 (VisionZip), 0.45+0.05 (Qwen "
        "ratios), divprune:64, pool:64, random:64, vispruner:64, prumerge_plus:64",
    )


def budget_of_args(args: argparse.Namespace, flags: tuple[str, ...]) -> dict:
    """The training-free budget the command line asks for: ``--budget``, or the budget ``flags`` (attribute names,
    e.g. dominant and contextual) that are set; :class:`UserError` when both are given."""
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    if args.budget is None:
        return given
    if given:
        named = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise UserError(f"--budget {args.budget} and {named} both set a budget: give one or the other.")
    (budget,) = parse_budgets(args.budget, flag="--budget") or [None]
    return budget or {}


class FlagRule(NamedTuple):
    """Flags (argparse attribute names) that take effect only when ``applies(args)``; ``why`` says why they do not
    and what to do instead. The command line's counterpart of ``training.keys``: a flag given is used or refused."""

    flags: tuple[str, ...]
    applies: Callable[[argparse.Namespace], bool]
    why: str


def _flag_given(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name, None) not in (None, False)


VIDEO_FRAMES_RULE = FlagRule(
    ("video_frames",),
    lambda args: args.video is not None,
    "it sets the frames taken from --video, and no --video is given: give --video, or leave it out",
)
PROJECTOR_RULES = (
    FlagRule(
        ("other_compressor",),
        lambda args: args.projector is not None and _flag_given(args, "budget"),
        "it applies --budget's compressor under --projector, so it needs both: give them, or leave it out",
    ),
    FlagRule(
        ("no_check_fingerprint",),
        lambda args: args.projector is not None,
        "it concerns a projector's base weights, and no --projector is given: leave it out",
    ),
)


def refuse_unused_flags(args: argparse.Namespace, rules: Sequence[FlagRule]) -> None:
    """:class:`UserError`, one paragraph, naming every flag given that would not take effect."""
    problems = [
        f"--{name.replace('_', '-')}{'' if getattr(args, name) is True else f' {getattr(args, name)}'}: {rule.why}"
        for rule in rules
        for name in rule.flags
        if _flag_given(args, name) and not rule.applies(args)
    ]
    if problems:
        raise UserError(
            f"{len(problems)} flag(s) would be silently ignored: "
            + "; ".join(problems)
            + ". Every flag given takes effect or stops the command (README: Recipes)."
        )
