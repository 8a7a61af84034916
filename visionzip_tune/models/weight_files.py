"""Lazy reading of checkpoint weights: the files of a ``save_pretrained``-style directory (one file, or the shards
its index lists; safetensors or torch ``.bin``), names and shapes first, tensor data only when asked, so a converter
checks a 7B checkpoint's names and shapes before reading its 14 GB. Unreadable files are a :class:`UserError`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from visionzip_tune.errors import UserError

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightFile:
    """One safetensors or torch ``.bin`` file; ``.bin`` is memory-mapped, so neither loads data before asked."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            try:
                self._safetensors = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as err:
                raise UserError(f"cannot read {path} as a safetensors file: {err}") from None
            self.shapes = {k: tuple(self._safetensors.get_slice(k).get_shape()) for k in self._safetensors.keys()}
            return
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # torch.load raises many kinds (pickle, zip, runtime); the message names the file
            raise UserError(f"cannot read {path} as a torch state dict: {err}") from None
        state = state.get("state_dict", state)  # some open_clip releases wrap it
        self._state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def tensor(self, key: str) -> Tensor:
        return self._safetensors.get_tensor(key) if self.path.suffix == ".safetensors" else self._state[key]


class Tensors:
    """Named tensors gathered from several weight files (each renamed as it is added), read lazily."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[WeightFile, str]] = {}

    def add(self, path: Path, rename: Callable[[str], str | None] = lambda key: key) -> None:
        """Take the file's tensors under ``rename(key)`` (None: skip the tensor)."""
        weight_file = WeightFile(path)
        for key in weight_file.shapes:
            if (name := rename(key)) is not None:
                self._where[name] = (weight_file, key)

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self._where if name.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        weight_file, key = self._where[name]
        return weight_file.shapes[key]

    def shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors under ``prefix``, keyed relative to it."""
        return {name.removeprefix(prefix): self.shape(name) for name in self.names(prefix)}

    def tensor(self, name: str) -> Tensor:
        weight_file, key = self._where[name]
        return weight_file.tensor(key)

    def load(self, names: list[str]) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` for ``names``, file after file, with a progress bar over the files."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name][0].path, []).append(name)
        for path in tqdm(by_file, desc="reading weights", unit="file"):
            for name in by_file[path]:
                yield name, self.tensor(name)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; :class:`UserError` naming the file when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from err


def weight_files(directory: Path, what: str) -> list[Path]:
    """The weight files of a ``save_pretrained``-style directory: the shards of its index, or its single file."""
    for index_name in _INDEXES:
        if (index := directory / index_name).is_file():
            shards = sorted({directory / shard for shard in read_json(index).get("weight_map", {}).values()})
            if not shards:
                raise UserError(f"{index} has an empty weight_map")
            if missing := [shard.name for shard in shards if not shard.is_file()]:
                raise UserError(f"{index} lists shards that are not in {directory}: {', '.join(missing)}")
            return shards
    for name in _SINGLE_FILES:
        if (path := directory / name).is_file():
            return [path]
    raise UserError(
        f"{what} {directory} has no weights: expected one of {', '.join(_SINGLE_FILES)} or a sharded checkpoint "
        f"with {' or '.join(_INDEXES)}"
    )
