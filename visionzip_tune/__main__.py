"""``python -m visionzip_tune {train,data,export,generate,eval,bench-infer,show} ...``: dispatch to each command's
``main(argv)``."""

from __future__ import annotations

import importlib
import sys
import textwrap

from visionzip_tune.errors import UserError, user_message

COMMANDS = {
    "train": ("visionzip_tune.train", "train a projector (or more) with VisionZip in the data path"),
    "data": ("visionzip_tune.data.cli", "subset, check, preview LLaVA data; build the demo dataset"),
    "export": ("visionzip_tune.export_run", "export the projector of a run directory"),
    "generate": ("visionzip_tune.generate", "answer a prompt about an image or a video with a tuned projector"),
    "eval": ("visionzip_tune.benchmarks", "lmms-eval benchmarks per budget, as a percentage of the stock model"),
    "bench-infer": (
        "visionzip_tune.bench_infer",
        "time inference per stage (tower, VisionZip, projector, prefill, ...)",
    ),
    "show": ("visionzip_tune.show", "draw which patches VisionZip keeps and merges, with the attention heat map"),
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
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return module.main(argv[1:]) or 0
    except UserError as err:
        print("error: " + textwrap.fill(user_message(err), width=100), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
