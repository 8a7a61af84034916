"""A feature cache on disk: ``ROOT/<key digest>/`` holds one :class:`~visionzip_tune.feature_cache.key.CacheKey`'s
entries (``key.json``, the shards), so caches of several budgets, towers or processors live side by side under one
root and a changed key never reads another's rows; ``ROOT/media-index.json`` remembers the media hashes they share.
"""

from __future__ import annotations

import json
from pathlib import Path

from visionzip_tune.feature_cache.key import CacheKey, MediaHashes
from visionzip_tune.feature_cache.store import Shards
from visionzip_tune.files import atomic_write

KEY_FILE = "key.json"
MEDIA_INDEX = "media-index.json"


class FeatureCache:
    """The cache of ``key`` under ``root``."""

    def __init__(self, root: str | Path, key: CacheKey):
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key.digest

    def shards(self) -> Shards:
        """Its complete shards as they are now."""
        return Shards(self.dir)

    def media_hashes(self) -> MediaHashes:
        return MediaHashes(self.root / MEDIA_INDEX)

    def record_key(self) -> None:
        """Write ``key.json`` (what the entries are a function of, for the messages of runs with another key)."""
        atomic_write(self.dir / KEY_FILE, json.dumps({"parts": self.key.parts}, indent=1, sort_keys=True).encode())

    def closest(self) -> tuple[Path, CacheKey] | None:
        """The other cache under the root whose key differs from this one in the fewest parts; None if none."""
        others = []
        for path in sorted(self.root.glob(f"*/{KEY_FILE}")):
            if path.parent == self.dir:
                continue
            try:
                other = CacheKey(json.loads(path.read_text())["parts"])
            except (OSError, ValueError, KeyError):  # not a cache of this format: nothing to compare with
                continue
            others.append((len(self.key.differences(other)), path.parent, other))
        return min(others, key=lambda found: found[0])[1:] if others else None

    def why_missing(self) -> str:
        """Why this key's directory holds no cache, for messages: the closest other cache and what differs."""
        closest = self.closest()
        if closest is None:
            return f"there is no cache under {self.root} yet"
        folder, other = closest
        return f"the closest cache there, {folder}, differs in {'; '.join(self.key.differences(other))}"
