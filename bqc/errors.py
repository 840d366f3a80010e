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
    """Return ``Path(path)`` or raise a BqcError naming the missing file; a device, a pipe or a
    socket is refused too (no input of bqc is one: ``--weights /dev/zero`` read forever, a FIFO
    blocked). A folder passes (a model may be one)."""
    from pathlib import Path

    from bqc.run import require_regular_file

    p = Path(path)
    if not p.exists():
        raise BqcError(f"{what} not found: {p}", hint="check the path (relative paths are taken from the current directory)")
    if not p.is_dir():
        try:
            require_regular_file(p)
        except ValueError as e:
            raise BqcError(f"{what}: {e}", hint="pass the path of the file itself") from None
    return p


def read_text_file(path, what: str = "file", limit: int | None = None) -> str:
    """The text (UTF-8) of a file a user gave, read whole; a BqcError for a folder, a device, a pipe
    or a file over ``limit`` bytes (default :data:`bqc.run.MAX_TEXT_BYTES`; ``--config /dev/zero``
    filled memory, a FIFO blocked) or a file that is not UTF-8. A missing file is the system's
    OSError (one paragraph in the CLI)."""
    from bqc.run import MAX_TEXT_BYTES, read_small_file

    try:
        data = read_small_file(path, MAX_TEXT_BYTES if limit is None else limit)
    except ValueError as e:
        raise BqcError(f"{what}: {e}", hint="pass the path of the file itself") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BqcError(f"{what} {path} is not a text file (not UTF-8: byte {e.start} is {data[e.start]:#04x})",
                       hint="is it the right file?") from None


def read_json_object(path, what: str = "file", **kw) -> dict:
    """The JSON object in a file a user gave (:func:`read_text_file`); a BqcError for anything
    else: not JSON, nesting too deep for the parser (``[[[...]]]`` was a RecursionError
    traceback), or JSON that is not an object (a ``bqc.json`` holding ``[1]`` was an
    AttributeError traceback). ``kw`` goes to ``json.loads``."""
    import json

    text = read_text_file(path, what)
    try:
        doc = json.loads(text, **kw)
    except json.JSONDecodeError as e:
        raise BqcError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise BqcError(f"{what} {path} nests too deeply to be a real JSON file") from None
    if not isinstance(doc, dict):
        raise BqcError(f"{what} {path} must hold a JSON object ({{...}}), not a JSON {_json_kind(doc)}")
    return doc


def _json_kind(doc) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(doc), "number")


def json_object_or_empty(path) -> dict:
    """The JSON object in ``path``, or ``{}`` when the file is missing, unreadable, not a regular
    file, over :data:`bqc.run.MAX_TEXT_BYTES`, not JSON (nested too deep included) or not an object:
    for the quiet looks bqc takes at a file that may or may not be its own (an output folder's
    marker, a run's train.json, a bundle's manifest for a note)."""
    import json

    from bqc.run import read_small_file

    try:
        d = json.loads(read_small_file(path))
    except (OSError, ValueError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


def read_yaml_file(path, what: str = "file"):
    """A YAML file a user gave (:func:`read_text_file`), parsed with ``yaml.safe_load`` (plain data,
    no Python tags); a BqcError for anything that is not YAML, nesting too deep included."""
    import yaml

    text = read_text_file(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BqcError(f"{what} {path} is not valid YAML: {str(e)[:300]}") from None
    except RecursionError:
        raise BqcError(f"{what} {path} nests too deeply to be a real YAML file") from None


def normal_permissions(path) -> None:
    """Give a freshly written file the usual rw-r--r-- (umask-respecting) permissions.

    safetensors writes its files 0600, which makes shipped checkpoints and artifacts
    unreadable for other users.
    """
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
