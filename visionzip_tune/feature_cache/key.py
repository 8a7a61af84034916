"""What a feature cache's entries are a function of, and so their key.

A cache directory holds one :class:`CacheKey`'s entries: the family, the model's vision config, the weights of the
frozen modules the rows come from, the compressor and its budget (``config.visionzip``), the image processor's
settings, the media transform (image aspect, frames per video), the dtype and the cache format. Within it, an entry
is keyed by the bytes of its sample's media (:func:`entry_key`): the sha256 of each image, video or frame file, which
:class:`MediaHashes` remembers by path, size and modification time (as the datasets library keys its Arrow cache and
git its index), so a later run reads a file again only when it changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionzip_tune import families
from visionzip_tune.export import modules_fingerprint
from visionzip_tune.feature_cache.progress import Progress
from visionzip_tune.files import atomic_write, file_sha256

FORMAT_VERSION = 1  # bump when what an entry holds changes
# The key's parts, as messages name them (and where a recipe sets each).
PARTS = {
    "format": "the cache format (this version of visionzip_tune)",
    "family": "the model family",
    "model config": "the model's vision config (model.name_or_path: tower geometry, feature layer, crop grids)",
    "tower weights": "the weights the rows come from (model.name_or_path: the towers' weights fingerprint)",
    "compression": "the compressor and its budget (visionzip.*)",
    "image processor": "the image processor's settings (model.name_or_path's processor config)",
    "media transform": "the media transform (data.image_aspect, data.video_frames)",
    "dtype": "the dtype the tower runs in (deepspeed.bf16)",
}
# Config entries that record where a model came from or how its outputs are returned, not what the tower computes.
_BOOKKEEPING = {
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def _plain(value: Any) -> Any:
    """``value`` as JSON has it (tuples as lists, dtypes and enums as strings), so a key read back compares equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass(frozen=True)
class CacheKey:
    """The key of a cache directory: one JSON value per part of :data:`PARTS`."""

    parts: dict[str, Any]

    @property
    def digest(self) -> str:
        """16 hex digits of the sha256 of the parts: the cache directory's name."""
        return hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: CacheKey) -> list[str]:
        """What differs from ``other``, a phrase per part: ``the compressor and its budget (visionzip.*): dominant
        6 -> 5``."""
        return [
            f"{PARTS.get(part, part)}: {_changes(other.parts.get(part), self.parts.get(part))}"
            for part in PARTS
            if self.parts.get(part) != other.parts.get(part)
        ]


def _changes(before: Any, after: Any, limit: int = 3) -> str:
    """The entries of two JSON values that differ, ``key before -> after`` (nested keys dotted)."""
    old, new = _flat(before), _flat(after)
    changed = [
        f"{key} {old.get(key, 'unset')} -> {new.get(key, 'unset')}"
        for key in sorted({*old, *new})
        if old.get(key) != new.get(key)
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip(".") or "value": value}


def _scrubbed(config: dict) -> dict:
    """A config dict without its bookkeeping entries, at every level; without the LLM's config and the budget (a part
    of its own)."""
    return {
        key: _scrubbed(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in _BOOKKEEPING and key not in ("text_config", "visionzip")
    }


def cache_key(
    model: nn.Module,
    image_processor,
    image_aspect: str,
    video_frames: int,
    dtype: torch.dtype,
    trained: Iterable[nn.Parameter] = (),
) -> CacheKey:
    """The key of the rows ``model`` (zipped: ``config.visionzip`` set) computes from media that ``image_processor``
    and the media transform prepare, in ``dtype``; ``trained`` are the parameters that train, which the rows do not
    depend on (they are left out of the weights fingerprint). Collective under ZeRO-3 (the fingerprint)."""
    base = families.unwrap_peft(model)
    config = base.config
    tower_config = _scrubbed(config.to_dict())
    tower_config["attn_implementation"] = getattr(config.vision_config, "_attn_implementation", None)
    return CacheKey(
        _plain(
            {
                "format": FORMAT_VERSION,
                "family": families.family_name(config),
                "model config": tower_config,
                "tower weights": modules_fingerprint(families.cache_modules(base), skip=trained),
                "compression": dict(config.visionzip),
                "image processor": image_processor.to_dict(),
                "media transform": {"image_aspect": image_aspect, "video_frames": video_frames},
                "dtype": str(dtype).removeprefix("torch."),
            }
        )
    )


def entry_key(images: list[str], video: list[str], video_file: bool) -> str:
    """32 hex digits naming an entry: the sha256 of its sample's image hashes and video hashes (of one video file or
    of its frame files), in their order."""
    kind = "video-file" if video_file else "video-frames"
    text = f"images:{','.join(images)};{kind}:{','.join(video)}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class MediaHashes:
    """The sha256 of media files' bytes, remembered in ``index`` (JSON: absolute path -> size, mtime in ns, sha256)
    and trusted while a file's size and mtime are unchanged."""

    def __init__(self, index: str | Path):
        self.index = Path(index)
        try:
            self.known: dict[str, list] = json.loads(self.index.read_text())
        except (FileNotFoundError, ValueError):  # none yet, or torn by a write this filesystem did not make atomic
            self.known = {}
        self.changed: list[str] = []  # files whose bytes differ from when they were last hashed

    def hash_files(self, paths: Iterable[Path], threads: int = 8) -> dict[str, str | None]:
        """``{absolute path: sha256 or None (missing)}`` of ``paths``; reads only files that are new or changed,
        with progress."""
        result: dict[str, str | None] = {}
        todo: list[tuple[str, os.stat_result]] = []
        for path in dict.fromkeys(os.path.abspath(p) for p in paths):
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                result[path] = None
                continue
            known = self.known.get(path)
            if known is not None and known[:2] == [stat.st_size, stat.st_mtime_ns]:
                result[path] = known[2]
            else:
                todo.append((path, stat))
        if todo:
            progress = Progress("hashing new or changed media", len(todo), "files")
            with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL on large reads
                for (path, stat), digest in zip(todo, pool.map(lambda job: _sha256(job[0]), todo)):
                    progress.advance()
                    result[path] = digest
                    before = self.known.get(path)
                    if digest is not None and before is not None and before[2] != digest:
                        self.changed.append(path)
                    if digest is not None:
                        self.known[path] = [stat.st_size, stat.st_mtime_ns, digest]
            progress.finish()
        return result

    def save(self) -> None:
        """Write the index (atomically: a reader sees the old one or the new one)."""
        atomic_write(self.index, json.dumps(self.known, separators=(",", ":")).encode())


def _sha256(path: str) -> str | None:
    try:
        return file_sha256(path)
    except FileNotFoundError:  # removed since it was listed
        return None
