"""The answers an evaluation has computed, kept per request, so that an eval killed at any point and run again with
the same command skips every request it had answered.

Keys are sha256 digests of everything that decides an answer. A setting (:func:`setting_identity`) is the model's
base weights (their fingerprint), its projector tensors, its VisionZip budget, dtype and device type, and for a
tuned run the export's checksum; each setting has its own folder. Within it a request (:func:`request_key`) is its
exact model inputs -- token ids, the labels of a scored answer, the bytes of every vision tensor -- and its generation
settings. So a changed model, export, budget, prompt template, image or task is never served from the store, while
the batch size, the number of processes and the order of the requests do not matter.

Layout: ``ROOT/<setting label>-<digest>/setting.json`` (the identity, for people) and ``rank<R>.jsonl``, one JSON
line ``{"key", "answer"}`` per request, appended by rank R alone (ranks never share a file) and flushed to disk after
every batch. Every rank reads every file, since a rerun may use another number of processes. A kill can only cut
the last line of a file short: that line is dropped when the file is next opened, before anything is appended.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from visionzip_tune.export import weights_fingerprint
from visionzip_tune.families import projector_parameters
from visionzip_tune.files import atomic_write, disk_errors

SETTING_FILE = "setting.json"


def tensor_digest(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and bytes (from wherever it lives) into ``digest``."""
    data = tensor.detach().contiguous().cpu()
    digest.update(f"{name}:{data.dtype}:{list(data.shape)};".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def setting_identity(model, *, export_checksum: str | None = None) -> dict[str, Any]:
    """What decides every answer of a loaded model, apart from its inputs (see the module docstring)."""
    digest = hashlib.sha256()
    for name, param in sorted(projector_parameters(model).items()):
        tensor_digest(digest, name, param)
    return {
        "model_class": type(model).__name__,
        "weights": weights_fingerprint(model),
        "projector": digest.hexdigest()[:32],
        "visionzip": dict(getattr(model.config, "visionzip", None) or {}),
        "dtype": str(model.dtype),
        "device": model.device.type,
        "export": export_checksum,
    }


def request_key(kind: str, tensors: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> str:
    """The key of one request: its kind (``generate_until``, ``loglikelihood``), every model-input tensor by name,
    and the settings that shape its answer (generation settings, stop strings)."""
    digest = hashlib.sha256(kind.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        tensor_digest(digest, name, tensors[name])
    return digest.hexdigest()


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+]+", "-", label).strip("-").lower() or "setting"


class AnswerStore:
    """The answers of one setting under ``root`` (module docstring); ``rank`` appends to its own file."""

    def __init__(self, root: str | Path, label: str, identity: Mapping[str, Any], rank: int = 0):
        blob = json.dumps(identity, sort_keys=True, default=str)
        self.folder = Path(root) / f"{_slug(label)}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        self.path = self.folder / f"rank{rank}.jsonl"
        with disk_errors(self.folder, "the answer store"):
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / SETTING_FILE).is_file():
                atomic_write(self.folder / SETTING_FILE, (json.dumps(identity, indent=2, default=str) + "\n").encode())
        self.answers: dict[str, Any] = {}
        for path in sorted(self.folder.glob("rank*.jsonl")):
            self.answers.update(_read_lines(path))
        self.loaded = len(self.answers)
        self._file = None

    def __len__(self) -> int:
        return len(self.answers)

    def get(self, key: str):
        return self.answers.get(key)

    def put(self, answered: Iterable[tuple[str, Any]]) -> None:
        """Append ``(key, answer)`` pairs as lines and flush them to disk (one write, then fsync)."""
        answered = list(answered)
        if not answered:
            return
        with disk_errors(self.path, "answers"):
            if self._file is None:
                _drop_cut_line(self.path)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write("".join(json.dumps({"key": key, "answer": answer}) + "\n" for key, answer in answered))
            self._file.flush()
            os.fsync(self._file.fileno())
        self.answers.update(answered)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_lines(path: Path) -> dict[str, Any]:
    """Every complete line of a store file (a line cut short by a kill, the last one, is skipped)."""
    answers = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            answers[record["key"]] = record["answer"]
    return answers


def _drop_cut_line(path: Path) -> None:
    """Truncate ``path`` after its last newline, so an append never continues a line a kill cut short."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
