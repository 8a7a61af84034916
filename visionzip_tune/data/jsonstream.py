"""Read the records of a top-level JSON array or a JSON-lines file one at a time, with their byte spans.

``llava_v1_5_mix665k.json`` is a ~1 GB JSON array: ``json.load`` would turn it into several GB of Python objects.
Here only one record is a Python object at a time, and every record keeps its exact byte span in the file so a
subset can be written by copying the original bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from visionzip_tune.errors import UserError

_CHUNK_CHARS = 1 << 20
# No LLaVA record comes near this; past it a decode error is real, not a record cut by the chunk boundary.
_MAX_RECORD_CHARS = 64 << 20
_WHITESPACE = " \t\r\n\ufeff"


@dataclass(frozen=True)
class Record:
    """One element of the array (or one line): its position, exact byte span and decoded value."""

    index: int
    offset: int
    nbytes: int
    value: object


def iter_records(path: str | Path) -> Iterator[Record]:
    """Yield every record of ``path`` in file order; ``UserError`` with line and column on malformed JSON."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as raw:
        head = raw.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        with open(path, encoding="utf-8", newline="") as f:
            yield from _ArrayReader(f, path).records()
    elif head.startswith(b"{"):
        yield from _iter_lines(path)
    elif not head:
        raise UserError(f"{path}: the file is empty; expected a JSON array of samples or JSON lines")
    else:
        raise UserError(
            f"{path}: expected a JSON array of samples ('[' first) or JSON lines (one object per line, '{{' first), "
            f"but the file starts with {head[:20]!r}"
        )


def _iter_lines(path: Path) -> Iterator[Record]:
    offset, index = 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if text:
                try:
                    value = json.loads(text)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    where = f"column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else str(err)
                    raise UserError(f"{path}: invalid JSON on line {lineno}, {where}") from None
                yield Record(index, offset + len(line) - len(line.lstrip()), len(text), value)
                index += 1
            offset += len(line)


class _ArrayReader:
    """Incremental parser of ``[ value, value, ... ]`` over a text stream read in chunks.

    ``buf[mark:]`` is unconsumed text; ``mark_byte`` is the byte offset of ``buf[mark]`` in the file. Consumed text
    is dropped only when the next chunk is read, so each record costs O(its size), not O(buffer size).
    """

    def __init__(self, f: IO[str], path: Path):
        self.f, self.path = f, path
        self.buf, self.pos, self.eof = "", 0, False
        self.mark, self.mark_byte = 0, 0
        self.line0, self.col0 = 1, 1  # line/column of buf[0], for error messages
        self.decoder = json.JSONDecoder()

    def records(self) -> Iterator[Record]:
        self._skip_ws()
        assert self._peek() == "["
        self.pos += 1
        self._skip_ws()
        if self._peek() == "]":
            self.pos += 1
        else:
            index = 0
            while True:
                self._skip_ws()
                value, end = self._decode()
                offset = self._byte_at(self.pos)
                nbytes = len(self.buf[self.pos : end].encode("utf-8"))
                yield Record(index, offset, nbytes, value)
                index += 1
                self.pos, self.mark, self.mark_byte = end, end, offset + nbytes
                self._skip_ws()
                sep = self._peek()
                if sep == ",":
                    self.pos += 1
                elif sep == "]":
                    self.pos += 1
                    break
                elif sep == "":
                    self._fail(self.pos, "the file ends before the closing ']' of the array")
                else:
                    self._fail(self.pos, f"expected ',' or ']' after sample {index - 1}, found {sep!r}")
        self._skip_ws()
        if self._peek() != "":
            self._fail(self.pos, "extra data after the closing ']' of the array")

    def _decode(self) -> tuple[object, int]:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self.eof or len(self.buf) - self.pos > _MAX_RECORD_CHARS:
                    self._fail(err.pos, err.msg)
            else:
                # A number or literal that touches the end of the buffer may continue in the next chunk.
                if end < len(self.buf) or self.eof:
                    return value, end
            self._fill()

    def _byte_at(self, i: int) -> int:
        self.mark_byte += len(self.buf[self.mark : i].encode("utf-8"))
        self.mark = i
        return self.mark_byte

    def _skip_ws(self) -> None:
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < n or self.eof:
                return
            self._fill()

    def _peek(self) -> str:
        if self.pos >= len(self.buf) and not self.eof:
            self._fill()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def _fill(self) -> None:
        try:
            chunk = self.f.read(_CHUNK_CHARS)
        except UnicodeDecodeError as err:
            raise UserError(f"{self.path}: not UTF-8 text ({err.reason} near byte {self.mark_byte})") from None
        self.eof = not chunk
        drop = self.buf[: self.mark]
        newlines = drop.count("\n")
        self.line0 += newlines
        self.col0 = len(drop) - drop.rfind("\n") if newlines else self.col0 + len(drop)
        self.buf = self.buf[self.mark :] + chunk
        self.pos -= self.mark
        self.mark = 0

    def _fail(self, i: int, msg: str) -> None:
        newlines = self.buf.count("\n", 0, i)
        col = i - self.buf.rfind("\n", 0, i) if newlines else self.col0 + i
        raise UserError(f"{self.path}: invalid JSON at line {self.line0 + newlines}, column {col}: {msg}")
