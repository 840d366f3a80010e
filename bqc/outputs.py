"""May a command write its output here? One rule for every command that writes.

Every writing command (``transform``, ``train``, ``pretrain``, ``sample``, ``fold``, ``lower``, ``demo``)
calls :func:`check_output` before doing any work. The rule:

* a path that does not exist is fine if it can be created (its nearest existing ancestor is a
  writable folder; not a path under a file);
* an existing **folder** is fine when it is empty or already holds bqc's output of the same
  kind (recognised by its marker files: an artifact's ``bqc.json``, a training run's
  ``train/checkpoint.safetensors`` or ``train.json``, a deploy artifact's ``deploy.json``, a
  lowered folder's ``manifest.json`` / ``export.json``, a graph dump's ``00_input.txt`` and
  ``NN_<pass>.txt`` files only, ...). Anything else (your own files, or bqc's output of another kind) is
  refused unless ``--force``; bqc then writes only the files it names itself (:data:`OWN_FILES`)
  and never deletes anything else, and it refuses a folder that is no bqc output but already holds
  one of those names (your own ``model.safetensors`` next to your notes is not replaced);
* an existing **file** output (``sample -o grid.png``, ``--npz``) is fine when bqc wrote it
  (bqc marks its PNGs with a ``Software: bqc`` text chunk and its NPZs with a zip comment; its
  latents files, ``bqc encode`` and latent ``bqc sample``, carry ``format: bqc-latents`` in their
  safetensors metadata); any other existing file needs ``--force``;
* a file is never replaced by a folder, nor a folder by a file (``--force`` or not);
* a file output that is a symbolic link is written only when the link points to a file bqc
  wrote; bqc never writes through a link into another file, nor creates one where a dangling
  link points (``--force`` or not); nor into an output folder where a name it writes there
  (:data:`OWN_FILES`) is a link.

Refusals are :class:`~bqc.errors.BqcError` (exit code 2).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from bqc.errors import BqcError, json_object_or_empty

__all__ = ["check_output", "output_kind", "OWN_FILES", "PNG_MARK", "mark_npz", "is_bqc_file"]

_ARTIFACT = ("bqc.json", "base.pt2", "model.safetensors", "graph.txt")

#: the names bqc writes in an output folder of each kind (folders end in "/")
OWN_FILES: dict[str, tuple[str, ...]] = {
    "artifact": _ARTIFACT,
    "run": _ARTIFACT + ("train.json", "train/", ".artifact/"),
    "model": ("config.json", "model.safetensors", "train/"),
    "compiled": ("manifest.json", "model.so", "model.cu", "run.py", "export.json", "model.onnx", "model_fakequant.onnx",
                 "model.onnx.data", "model_fakequant.onnx.data"),
    "demo": ("summary.json", "fp_samples.png", "<recipe>/"),
    "deploy": ("deploy.json", "deploy.safetensors"),
    "dump": ("00_input.txt", "NN_<pass>.txt"),  # `transform --dump-dir`: the graph before and after each pass
}

#: the names of a graph dump's files (bqc.pipeline: f"{i:02d}_{pass}.txt")
DUMP_NAME = re.compile(r"^\d\d_[\w.-]+\.txt$")

_WHAT = {
    "artifact": "transformed-model artifact (bqc transform)",
    "run": "training run (bqc train)",
    "model": "pretrained model folder (bqc pretrain)",
    "compiled": "lowered model folder (bqc lower)",
    "demo": "demo folder (bqc demo)",
    "deploy": "deploy artifact (bqc fold)",
    "dump": "graph dump (bqc transform --dump-dir)",
}

PNG_MARK = ("Software", "bqc")  # tEXt chunk of every PNG bqc writes
_NPZ_MARK = b"written by bqc"   # zip comment of every NPZ bqc writes


def output_kind(path) -> str | None:
    """Which bqc output a folder is (a key of :data:`OWN_FILES`), or None."""
    p = Path(path)
    if not p.is_dir():
        return None
    ckpt = p / "train" / "checkpoint.safetensors"
    if (p / "bqc.json").is_file() and "bqc_version" in json_object_or_empty(p / "bqc.json"):  # (a user's own bqc.json is not one)
        return "run" if (p / "train.json").is_file() or ckpt.is_file() else "artifact"
    if (p / "config.json").is_file() and "pretrain" in (json_object_or_empty(p / "config.json").get("meta") or {}):
        return "model"
    if ckpt.is_file():  # a run stopped before its first model was written: the checkpoint says which
        try:
            from bqc.checkpoint import read_checkpoint_meta

            task = (read_checkpoint_meta(ckpt).get("fingerprint") or {}).get("task")
        except BqcError:
            return None
        return "model" if task == "pretrain-eps" else "run"
    if json_object_or_empty(p / "manifest.json").get("format") == "bqc-tvm" or json_object_or_empty(p / "export.json").get("format") == "bqc-onnx":
        return "compiled"
    if json_object_or_empty(p / "deploy.json").get("format") == "bqc-deploy":
        return "deploy"
    if (p / "summary.json").is_file() and {"rows", "wall_s", "options"} <= set(json_object_or_empty(p / "summary.json")):
        return "demo"
    if (p / "fp_samples.png").is_file() and is_bqc_file(p / "fp_samples.png"):
        return "demo"
    if (p / "00_input.txt").is_file() and all(DUMP_NAME.match(e.name) for e in p.iterdir()):
        return "dump"
    return None


#: the ``format`` a safetensors file bqc writes records in its metadata (bqc.data.LATENTS_FORMAT)
SAFETENSORS_FORMATS = ("bqc-latents",)
_MAX_HEADER = 1 << 24  # a safetensors header larger than this is not one bqc wrote


def is_bqc_file(path) -> bool:
    """True for a PNG, NPZ or latents safetensors file that bqc wrote (see the module docstring)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if head == b"\x89PNG\r\n\x1a\n":
                return _png_marked(p)
            if p.suffix == ".safetensors" and len(head) == 8:
                n = int.from_bytes(head, "little")
                if 0 < n <= _MAX_HEADER:
                    meta = json.loads(f.read(n)).get("__metadata__") or {}
                    return isinstance(meta, dict) and meta.get("format") in SAFETENSORS_FORMATS
                return False
        if head[:2] == b"PK":
            import zipfile

            with zipfile.ZipFile(p) as z:
                return z.comment == _NPZ_MARK
    except (OSError, ValueError, Exception):  # noqa: BLE001 - an unreadable file is not ours
        return False
    return False


def _png_marked(p: Path) -> bool:
    from PIL import Image

    with Image.open(p) as im:
        return im.info.get(PNG_MARK[0]) == PNG_MARK[1]


def mark_npz(path) -> None:
    """Mark an NPZ as bqc's (a zip comment; the arrays are unchanged)."""
    import zipfile

    with zipfile.ZipFile(path, "a") as z:
        z.comment = _NPZ_MARK


def _writable_dir(path: Path, shown: Path) -> None:
    """``path`` (or, if it does not exist yet, its nearest existing ancestor) must be a folder
    this process can create files in."""
    q = path
    while not (q.exists() or q.is_symlink()) and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise BqcError(f"cannot write {shown}: {q} is a file, not a folder", hint="choose a path that is not under a file")
    try:  # os.access is not enough (root, read-only mounts, ACLs): try it
        fd, probe = tempfile.mkstemp(prefix=".bqc-write-test-", dir=q)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BqcError(f"cannot write {shown}: {q} is not writable ({e.strerror})",
                       hint="choose an output in a folder you can write to") from None


def _name_fits(path: Path, option: str) -> None:
    """Every name in ``path`` within the file system's limit: a name too long is found before any work,
    not when the result is written."""
    q = path
    while not (q.exists() or q.is_symlink()) and q != q.parent:
        q = q.parent
    try:
        limit = os.pathconf(q if q.is_dir() else q.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            shown = part if len(part) <= 60 else f"{part[:30]}...{part[-20:]}"
            raise BqcError(f"{option} {shown}: a name of {len(os.fsencode(part))} bytes; this file system takes at most {limit}",
                           hint="choose a shorter name")


def _foreign_clashes(p: Path, kind: str) -> list[str]:
    """The names bqc writes in an output folder of ``kind`` that already exist in ``p``, a folder
    that is no bqc output: files bqc cannot tell as its own (a marked PNG, NPZ or latents file is)
    and folders (bqc writes into its ``train/``)."""
    if kind == "dump":
        names = [e.name for e in p.iterdir() if DUMP_NAME.match(e.name)]
    else:
        names = [n for n in OWN_FILES[kind] if "<" not in n]
    def foreign(n: str) -> bool:
        q = p / n.rstrip("/")
        if q.is_symlink():
            return True
        if n.endswith("/"):
            return q.is_dir()
        return q.exists() and not (q.is_file() and is_bqc_file(q))

    return [n for n in names if foreign(n)]


def check_output(path, kind: str, *, force: bool = False, option: str = "--out", example: str = "samples.png") -> Path:
    """Raise a BqcError unless ``path`` may be written as an output of ``kind`` (``"file"`` or
    a key of :data:`OWN_FILES`); see the module docstring. ``example``: a file name the hint suggests
    when a file output names a folder. Returns ``Path(path)``."""
    p = Path(path)
    _name_fits(p, option)
    if kind == "file":
        if p.is_symlink() and not (p.is_file() and is_bqc_file(p)):
            # writing would go through the link into a file the user did not name (or create one where a
            # dangling link points): `-o link.png --force` overwrote the link's target
            raise BqcError(f"{option} {p} is a symbolic link to {os.path.realpath(p)}, which bqc did not write; bqc "
                           "does not write through a link to another file (--force or not)",
                           hint="remove the link, or choose another name")
        if p.is_dir():
            raise BqcError(f"{option} {p} is a folder; this output is a file", hint=f"name a file, e.g. {p / example}")
        if (p.exists() or p.is_symlink()) and not force and not is_bqc_file(p):
            raise BqcError(f"{option} {p} already exists and was not written by bqc; refusing to overwrite it",
                           hint="choose another name, or pass --force to replace it")
        _writable_dir(p.parent, p)
        return p
    if kind not in OWN_FILES:
        raise ValueError(f"unknown output kind {kind!r}")
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        raise BqcError(f"{option} {p} is a file; this command writes a folder there",
                       hint="choose another path (bqc never replaces a file with a folder, even with --force)")
    if p.is_dir():
        found = output_kind(p)
        try:
            entries = sorted(e.name for e in p.iterdir())
        except OSError as e:
            raise BqcError(f"cannot read the output folder {p}: {e.strerror}") from None
        if entries and found != kind and not force:
            if found is not None:
                raise BqcError(f"{option} {p} holds a {_WHAT[found]}, not a {_WHAT[kind]}; refusing to write into it",
                               hint="choose a new or empty folder, or pass --force to replace only bqc's own files there")
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise BqcError(f"{option} {p} already exists and holds files bqc did not write ({shown}); refusing to write into it",
                           hint="choose a new or empty folder, or pass --force: bqc then replaces only its own files "
                                "and leaves the others in place")
        if entries and found is None and force:
            clash = _foreign_clashes(p, kind)
            if clash:  # `--force` replaced a user's model.safetensors / bqc.json of the same name
                raise BqcError(f"{option} {p} holds {', '.join(clash)}, which bqc writes there but did not write; "
                               "--force replaces only bqc's own files, so it refuses to write into this folder",
                               hint="move those files away, or choose a new folder")
    if p.is_dir():  # bqc writes these names in the folder: none may lead elsewhere
        names = [e.name for e in p.iterdir() if DUMP_NAME.match(e.name)] if kind == "dump" else OWN_FILES[kind]
        links = [n.rstrip("/") for n in names if (p / n.rstrip("/")).is_symlink()]
        if links:
            raise BqcError(f"{option} {p}: {', '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}; "
                           "bqc would write its output through the link into another file (--force or not)",
                           hint="remove the link, or choose a new folder")
    _writable_dir(p, p)
    return p
