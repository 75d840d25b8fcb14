"""The one progress-bar helper: tqdm on a terminal, silent otherwise (logs and CI stay clean)."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("EDGEGUARD_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not enabled(), dynamic_ncols=True)
