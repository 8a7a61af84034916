"""A cache directory's shards: safetensors files, each written whole under a temporary name and renamed (a shard
that exists is complete), holding many entries' tensors as ``KEY/FIELD`` and, in its metadata, the entries whose
media could not be used (``bad``: key -> reason). Read memory-mapped, one tensor at a time."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from visionzip_tune.files import atomic_write, disk_errors

SHARD_GLOB = "shard-*.safetensors"  # temporary files start with a dot and never match


class Shards:
    """The complete shards of ``folder`` as they were when this was made: where each entry's tensors are."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.fields: dict[str, tuple[str, list[str]]] = {}  # key -> (shard file, the entry's fields)
        self.bad: dict[str, str] = {}  # key -> why its media cannot be used
        self.nbytes = 0
        for path in sorted(self.folder.glob(SHARD_GLOB)):
            with safe_open(path, "pt") as shard:
                names, metadata = shard.keys(), shard.metadata() or {}
            for name in names:
                key, _, field = name.partition("/")
                self.fields.setdefault(key, (path.name, []))[1].append(field)
            self.bad.update(json.loads(metadata.get("bad", "{}")))
            self.nbytes += path.stat().st_size
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def __contains__(self, key: str) -> bool:
        return key in self.fields or key in self.bad

    def __len__(self) -> int:
        return len(self.fields) + len(self.bad)

    def read(self, key: str, prefix: str) -> dict[str, Tensor]:
        """The tensors of entry ``key`` whose field starts with ``prefix``, by the rest of the field's name."""
        shard, fields = self.fields[key]
        handle = self._handle(shard)
        return {
            field[len(prefix) :]: handle.get_tensor(f"{key}/{field}") for field in fields if field.startswith(prefix)
        }

    def _handle(self, shard: str):
        if self._pid != os.getpid():  # a DataLoader worker: its own maps
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, "pt")
        return self._handles[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


def write_shard(folder: str | Path, entries: dict[str, dict[str, Tensor]], bad: dict[str, str]) -> Path:
    """Write one shard of ``entries`` (key -> field -> tensor) and ``bad`` entries atomically; its name follows from
    its keys, so the same entries always make the same file. Returns its path."""
    keys = sorted([*entries, *bad])
    path = Path(folder) / f"shard-{hashlib.sha256(','.join(keys).encode()).hexdigest()[:16]}.safetensors"
    tensors = {
        f"{key}/{field}": value.contiguous() for key, fields in entries.items() for field, value in fields.items()
    }
    with disk_errors(path, "a feature-cache shard"):
        atomic_write(path, save(tensors, metadata={"bad": json.dumps(bad, sort_keys=True)}))
    return path
