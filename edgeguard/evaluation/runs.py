"""Finished runs on disk: the report folder's runs.jsonl (append-only, so a killed evaluation resumes) and the
scratch cache under $EDGEGUARD_CACHE/scratch (a scratch run is trained once and reused by every model)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.fileio import atomic_write_text

from .. import cache


class RunLog:
    """Append-only JSONL of finished runs; a line is written only after its run completed."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.done[row["key"]] = row
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by a crash is simply redone

    def add(self, row: dict) -> None:
        self.done[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def accuracy(self) -> dict[str, float]:
        return {k: r["accuracy"] for k, r in self.done.items()}


def cached_scratch(key: str) -> dict | None:
    """A scratch run's row from the cache (None: not there, or cut by a crash and removed)."""
    path = cache.cache_dir("scratch") / f"{key}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        path.unlink(missing_ok=True)
        return None


def cache_scratch(row: dict) -> None:
    folder = cache.cache_dir("scratch")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{row['key']}.json", json.dumps(row))
