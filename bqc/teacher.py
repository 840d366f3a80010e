"""The FP32 model ``bqc bench`` times a compiled step against, resolved on the command's side.

A backend loads no training artifact (:mod:`bqc.backends.tvm.lower`'s ``bench`` takes the model);
this module finds it: ``--teacher`` (an artifact or training run: its FP teacher; or any model
``bqc transform`` reads), else the bundle's source model when it is a zoo model (by the name the
bundle records), else none.
"""
from __future__ import annotations

from pathlib import Path


def _program_sha256(artifact_dir) -> str | None:
    from bqc.deploy.artifact import file_sha256

    f = Path(artifact_dir) / "base.pt2"
    return file_sha256(f) if f.is_file() else None


def load_teacher(spec: str, *, trust_pickle: bool = False, trust_code: bool = False):
    """(FP model, description, content hash of its program or None) for ``--teacher``: an
    artifact or training run (its FP teacher), or any model ``bqc transform`` reads, under the
    same opt-ins (``trust_pickle`` for a pickled model, ``trust_code`` for a config YAML whose
    ``target:`` lies outside bqc, torch and diffusers). ``bqc bench`` calls it before lowering, so
    a bad ``--teacher`` is refused before a minute of work."""
    from bqc import artifact as A

    if A.is_artifact(spec):
        return A.load_artifact(spec).teacher(), f"the FP teacher of {spec}", _program_sha256(spec)
    from bqc import frontend
    from bqc import transform as tf
    from bqc.graph import BqcModel

    src = frontend.load_source(spec, trust_pickle=trust_pickle, trust_code=trust_code)
    return BqcModel(tf.transform(src, "fp").gm), src.description, None


def resolve_teacher(man: dict, teacher: str | None = None, loaded=None):
    """The FP32 model ``bench`` times against: ``(model, description, note)``, or
    ``(None, None, reason)``. ``teacher`` (``--teacher``) first (``loaded``: what
    :func:`load_teacher` made of it, else it is loaded here with no opt-ins); else the bundle's source model
    when it is a zoo model (resolved by name); else none (the compiled step is timed alone). A
    ``--teacher`` artifact whose FP program differs from the one the bundle was lowered from
    (``source.teacher_sha256``) is used, with a note saying so."""
    src = man.get("source") or {}
    if teacher:
        model, desc, digest = loaded or load_teacher(teacher)
        want = src.get("teacher_sha256")
        note = None
        if digest and want and digest != want:
            note = f"{teacher}'s FP program is not the one this library was lowered from (content hash differs)"
        return model, desc, note
    from bqc import frontend

    name = (src.get("model") or {}).get("name") or (man.get("model") or {}).get("name")
    kind = (src.get("model") or {}).get("kind") or (man.get("model") or {}).get("kind")
    if kind == "zoo" and name and frontend._is_zoo_name(name):
        model, desc, _ = load_teacher(name)
        return model, f"{desc} (the bundle's source model, by name)", None
    from bqc import artifact as A

    legacy = man.get("artifact")  # libraries lowered before bundles recorded the artifact's host path
    if isinstance(legacy, str) and A.is_artifact(legacy):
        return load_teacher(legacy)[:2] + (None,)
    what = f"artifact {src['name']!r}" if src.get("name") else "an in-memory graph"
    return None, None, (f"no FP32 teacher: this library was lowered from {what} whose model bqc cannot find "
                        "by name; the compiled step is timed alone (pass --teacher MODEL: the artifact, or its "
                        "source model)")


def bundle_teacher(bundle, teacher: str | None = None, loaded=None):
    """:func:`resolve_teacher` for a compiled folder (its ``manifest.json``; BqcError for anything
    else): what ``bqc bench`` and ``bqc demo`` hand :func:`bqc.backends.tvm.lower.bench`."""
    from bqc.backends.runtime import read_compiled_manifest

    return resolve_teacher(read_compiled_manifest(bundle), teacher, loaded)
