"""One error family: messages name the file, the field and the fix; the CLI prints them without a traceback."""
from __future__ import annotations


class EdgeguardError(Exception):
    """Bad input or a missing resource: the CLI prints the message and exits 2."""

    exit_code = 2


class CheckFailed(EdgeguardError):
    """A check ran and failed (integrity, accuracy bound): the CLI exits 1."""

    exit_code = 1
