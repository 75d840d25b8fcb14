"""Where edgeguard keeps what it can recompute (decoded domains, scratch-training curves, pseudo-source sets):
$EDGEGUARD_CACHE, else ~/.cache/edgeguard. One place, so every cache moves together."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cache entry (created by whoever writes there first)."""
    return Path(os.environ.get("EDGEGUARD_CACHE") or Path.home() / ".cache" / "edgeguard") / kind
