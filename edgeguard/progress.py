"""The one progress helper: a tqdm bar on a terminal; elsewhere (a log file, CI) one plain line on stderr every
EDGEGUARD_PROGRESS_SECONDS (default 30), so a long run written to a log still shows that it is alive.

EDGEGUARD_PROGRESS=1 forces bars, EDGEGUARD_PROGRESS=0 silences both.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")
_last_line = [0.0]  # shared by every bar: at most one line per interval overall


def enabled() -> bool:
    """Whether tqdm bars are drawn (a terminal, or EDGEGUARD_PROGRESS=1)."""
    flag = os.environ.get("EDGEGUARD_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def _interval() -> float | None:
    if os.environ.get("EDGEGUARD_PROGRESS") in ("0", "false", "no"):
        return None
    try:
        return max(0.0, float(os.environ.get("EDGEGUARD_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


class LogProgress:
    """tqdm's small interface (iterate, update, set_postfix, close) as periodic plain lines."""

    def __init__(self, iterable, desc: str, total: int | None, every: float):
        self.iterable, self.desc, self.total, self.every = iterable, desc, total, every
        self.n, self.postfix, self.start = 0, "", time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - _last_line[0] >= self.every:
            _last_line[0] = now
            of = f"/{self.total}" if self.total else ""
            pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
            print(f"[{time.strftime('%H:%M:%S')}] {self.desc}: {self.n}{of}{pct}, {now - self.start:.0f} s"
                  f"{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **kw) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in kw.items())

    def close(self) -> None:
        pass


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False):
    if enabled():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)
    every = _interval()
    if every is None:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, disable=True)
    return LogProgress(iterable if iterable is not None else [], desc, total, every)
