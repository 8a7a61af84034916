"""``python -m visionzip_tune COMMAND ...``: dispatch to each command's ``main(argv)`` in :mod:`visionzip_tune.cli`
(``--help`` lists them)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from visionzip_tune import watchdog
from visionzip_tune.distributed import PeerFailed, exit_worker
from visionzip_tune.errors import ERROR_DIR_ENV, UserError, paragraph, user_message
from visionzip_tune.launcher import another_rank_reported

COMMANDS = {
    "train": ("train", "train a projector (or more) with VisionZip in the data path"),
    "data": ("data", "subset, check, preview LLaVA data; build the demo dataset"),
    "export": ("export", "export the projector of a run directory"),
    "generate": ("generate", "answer a prompt about an image or a video with a tuned projector"),
    "launch": ("launch", "check a recipe, then train it under torchrun (what train.sh runs)"),
    "cache": ("cache", "build the compressed-feature cache of a recipe's training data (train.feature_cache)"),
    "convert": ("convert", "convert an original Mini-Gemini checkpoint to a transformers model"),
    "eval": ("eval", "lmms-eval benchmarks per budget, as a percentage of the stock model"),
    "bench-infer": ("bench_infer", "time inference per stage (tower, VisionZip, projector, prefill, ...)"),
    "show": ("show", "draw which patches VisionZip keeps and merges, with the attention heat map"),
}


def usage() -> str:
    lines = ["usage: python -m visionzip_tune COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<12}{doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    watchdog.name_process(argv[0])
    module = importlib.import_module(f"visionzip_tune.cli.{COMMANDS[argv[0]][0]}")
    try:
        return module.main(argv[1:]) or 0
    except UserError as err:
        report_user_error(err)
        return 2
    except Exception:
        if another_rank_reported():  # e.g. a collective broken because that rank stopped: its paragraph says why
            return 2
        raise


def report_user_error(err: UserError) -> None:
    """Print the error's one paragraph; under the launcher, hand it to the launcher instead (which prints the first
    rank's once, without torchrun's tracebacks). A rank stopped only because another failed says nothing."""
    if isinstance(err, PeerFailed):
        return
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir and Path(error_dir).is_dir():
        (Path(error_dir) / f"error-rank{os.environ.get('RANK', '0')}.txt").write_text(user_message(err))
        return
    print("error: " + paragraph(user_message(err)), file=sys.stderr)


if __name__ == "__main__":
    status = main()
    if "LOCAL_RANK" in os.environ:  # a torchrun worker: gloo's teardown can abort a clean exit (see exit_worker)
        exit_worker(status)
    sys.exit(status)
