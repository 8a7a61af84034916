"""The one exception type for user mistakes (bad config, bad data, mismatched exports).

The command line prints its message as one paragraph and exits with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import textwrap

_WORKER_PREFIX = "Caught UserError in DataLoader worker"
# Set by the launcher for its workers: the folder where a worker leaves its error's paragraph for the launcher to
# print once (``error-rank<R>.txt``), instead of printing it among torchrun's output.
ERROR_DIR_ENV = "VZT_ERROR_DIR"


def paragraph(message: str, width: int = 100) -> str:
    """``message`` wrapped for the terminal without ever splitting a word (paths and keys stay copyable)."""
    return textwrap.fill(message, width=width, break_long_words=False, break_on_hyphens=False)


class UserError(Exception):
    """A problem the user can fix; the message says which file/sample/key and what is wrong."""


def user_message(err: UserError) -> str:
    """The message of ``err`` as its code wrote it.

    A ``UserError`` raised in a DataLoader worker process reaches the main process re-raised by torch with the
    worker's whole traceback in its message; the user needs only the original message, its last line.
    """
    text = str(err)
    if text.startswith(_WORKER_PREFIX):
        text = text.rpartition("UserError: ")[2]
    return " ".join(text.split())
