"""One error type for everything a user can get wrong.

A :class:`BqcError` carries a one-paragraph message that says what went wrong and what to do.
The CLI prints it (no traceback unless ``--debug``) and exits with code 2. Library code raises
it for bad input (files, configs, shapes, recipes); genuine bugs stay ordinary exceptions.
"""
from __future__ import annotations


class BqcError(Exception):
    """A user-facing error: bad input, with a message that explains the fix."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nHint: {hint}")


def require_file(path, what: str = "file"):
    """Return ``Path(path)`` or raise a BqcError naming the missing file."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise BqcError(f"{what} not found: {p}", hint="check the path (relative paths are taken from the current directory)")
    return p


def normal_permissions(path) -> None:
    """Give a freshly written file the usual rw-r--r-- (umask-respecting) permissions.

    safetensors writes its files 0600, which makes shipped checkpoints and artifacts
    unreadable for other users.
    """
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
