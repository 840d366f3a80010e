"""Model artifacts: what ``bqc transform`` / ``bqc train`` write and every later command loads.

Layout of an artifact directory (no pickled code anywhere)::

    bqc.json            manifest: format version, source model, resolved recipe, bits,
                        signature (inputs, state), file list, diffusion process (``diffusion``:
                        schedule, prediction type and where they came from)
    base.pt2            the captured full-precision program (torch.export; vetted on load so
                        it never unpickles) — the teacher, and what the recipe is replayed on
    model.safetensors   the transformed graph's state_dict (weights + quantizer state)
    graph.txt           the transformed graph as text (ir.dump); checked on load
    train.json          (trained artifacts) how it was trained

Loading replays the recorded recipe on the captured program, then loads the state dict
strictly and checks that the rebuilt graph equals ``graph.txt``. Recipes are deterministic
graph rewrites, so this reproduces the saved graph exactly without storing code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from bqc import __version__, ir
from bqc.errors import BqcError, normal_permissions, read_json_object, read_text_file, require_file
from bqc.graph import BqcModel
from bqc.signature import Signature

FORMAT_VERSION = 1


@dataclass
class Artifact:
    path: Path | None
    manifest: dict
    base_ep: object  # torch.export.ExportedProgram of the FP model
    gm: fx.GraphModule  # the transformed graph
    recipe: object  # bqc.pipeline.Recipe

    @property
    def model(self) -> BqcModel:
        return BqcModel(self.gm)

    @property
    def schedule(self):
        """The model's diffusion process (betas, T, spacing, prediction) from the manifest's
        ``diffusion`` entry; artifacts written before bqc recorded it mean linear eps."""
        from bqc.diffusion.schedule import NoiseSchedule

        return NoiseSchedule.from_manifest(self.manifest)

    def teacher(self) -> BqcModel:
        """The full-precision model, annotated, as a fresh graph (frozen by the caller)."""
        from bqc.pipeline import PassContext, get_pass

        gm = ir.from_exported(self.base_ep)
        get_pass("annotate")().run(gm, PassContext())
        return BqcModel(gm)


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors accepts: contiguous, unshared copies."""
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_artifact(out: str | Path, *, base_ep, gm: fx.GraphModule, recipe, wbits: int, abits: int,
                  source: dict, extra: dict | None = None) -> Path:
    """Write an artifact directory: built in a temp dir, then renamed into place; into an existing
    folder, bqc's own files (bqc.json last) are replaced one by one and nothing else is touched."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise BqcError(f"cannot write the artifact {out}: it is a file, not a folder", hint="choose another output path")
    existing = out.is_dir()
    if not existing:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bqc-artifact.", dir=out if existing else out.parent))
    try:
        torch.export.save(base_ep, str(tmp / "base.pt2"))
        save_file(state_dict_for_save(gm), str(tmp / "model.safetensors"))
        normal_permissions(tmp / "model.safetensors")
        os.chmod(tmp, 0o755)  # mkdtemp makes the directory 0700
        (tmp / "graph.txt").write_text(ir.dump(gm))
        manifest = {
            "format": FORMAT_VERSION,
            "bqc_version": __version__,
            "source": source,
            "recipe": recipe.to_dict(),
            "wbits": wbits,
            "abits": abits,
            "signature": Signature.of(gm).to_json(),
            **(extra or {}),
        }
        (tmp / "bqc.json").write_text(json.dumps(manifest, indent=2, default=str))
        if existing:  # replace bqc's own files one by one (manifest last); nothing else there is touched
            for name in sorted((f.name for f in tmp.iterdir()), key=lambda n: n == "bqc.json"):
                os.replace(tmp / name, out / name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / "bqc.json").is_file()


def read_manifest(path: str | Path) -> dict:
    if not (Path(path) / "bqc.json").exists():
        what = "the folder `bqc transform` writes (or a training run of one)"
        from bqc.deploy.artifact import find_deploy_artifact

        if find_deploy_artifact(path) is not None:  # `bqc train mnist16-bidm`: a folded model
            raise BqcError(f"{path} is a deploy artifact (bqc fold's output), not a trainable artifact",
                           hint=f"`bqc unfold {path} -o art` turns it back into one (then give `art`)")
        if not Path(path).exists():
            from bqc.frontend import _is_zoo_name

            if not _is_zoo_name(str(path)):
                raise BqcError(f"artifact folder not found: {path}", hint=f"check the path; this command takes {what}")
        raise BqcError(f"{path} is a model, not a bqc artifact" if not Path(path).is_dir() else
                       f"{path} is not a bqc artifact (no bqc.json in it)",
                       hint=f"this command takes {what}, e.g. `bqc transform {path} --recipe bidm -o art`, then give `art`")
    p = Path(path) / "bqc.json"
    m = read_json_object(p, "artifact manifest")
    if m.get("format") != FORMAT_VERSION:
        raise BqcError(f"{p} has artifact format {m.get('format')!r:.40}, this bqc reads format {FORMAT_VERSION}")
    for key, kind in MANIFEST_FIELDS.items():
        v = m.get(key)
        if (v is None and key in MANIFEST_REQUIRED) or (v is not None and (type(v) is not kind)):
            raise BqcError(f"{p} is damaged: its {key!r} must be a JSON {_JSON_NAMES[kind]}, not {v!r:.40}",
                           hint="write the artifact again with `bqc transform` (bqc.json is bqc's own file, not for editing)")
    return m


# bqc.json's fields by type (``format`` is checked first): a hand-edited manifest is refused here in
# one paragraph instead of failing deep inside a command (``"source": [1]`` was an AttributeError).
MANIFEST_FIELDS = {"bqc_version": str, "source": dict, "recipe": dict, "wbits": int, "abits": int, "signature": dict,
                   "diffusion": dict, "train": dict}
MANIFEST_REQUIRED = ("source", "recipe", "wbits", "abits")
_JSON_NAMES = {str: "string", dict: "object", int: "integer"}


def build_graph(base_ep, recipe, wbits: int, abits: int, *, dump_dir=None, check: bool = True, schedule=None):
    """Capture form -> annotated graph -> recipe passes. Returns (gm, ctx). ``schedule``: the
    model's diffusion process (a NoiseSchedule), for the passes that read it."""
    from bqc.pipeline import PassManager

    gm = ir.from_exported(base_ep)
    ctx = recipe.context(wbits, abits)
    ctx.schedule = schedule
    gm = PassManager(recipe.build(), dump_dir=dump_dir, check=check).run(gm, ctx)
    return gm, ctx


def load_artifact(path: str | Path, *, weights: str | Path | None = None) -> Artifact:
    """Load an artifact directory (optionally with another weights file, e.g. a checkpoint)."""
    from bqc.frontend import load_exported, load_safetensors
    from bqc.pipeline import Recipe

    path = Path(path)
    manifest = read_manifest(path)
    recipe = Recipe.from_dict(manifest["recipe"], f"{path / 'bqc.json'}")
    base = require_file(path / "base.pt2", "artifact base program")
    base_ep = load_exported(base)  # vetted: never unpickles, never loads native code
    from bqc.diffusion.schedule import NoiseSchedule

    gm, _ = build_graph(base_ep, recipe, manifest["wbits"], manifest["abits"],
                        schedule=NoiseSchedule.from_manifest(manifest))
    sd = load_safetensors(weights or path / "model.safetensors")
    missing, unexpected = gm.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise BqcError(
            f"weights in {weights or path / 'model.safetensors'} do not fit the graph of {path}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}",
            hint="the weights come from another model or recipe",
        )
    saved = read_text_file(path / "graph.txt", "artifact graph") if (path / "graph.txt").exists() else None
    if saved is not None and saved not in (ir.dump(gm), ir.dump(gm, details=False)):  # (the older, shorter form)
        raise BqcError(f"{path}: the rebuilt graph differs from graph.txt (artifact written by another bqc version?)",
                       hint="re-run bqc transform with this version")
    return Artifact(path, manifest, base_ep, gm, recipe)


def _compiled_manifest(target: Path) -> dict | None:
    """A compiled dir's ``manifest.json`` (None when there is none; a corrupt one is an error)."""
    compiled = target / "manifest.json"
    if not compiled.is_file():
        return None
    return read_json_object(compiled, "compiled manifest")


def source_manifest(target: str | Path) -> dict | None:
    """The ``bqc.json`` of an artifact dir; for a compiled dir (a bundle), its ``source`` record
    of the artifact it was lowered from (name, content hashes, the training data: no host path;
    older libraries recorded the artifact's path, which is read when it still exists); None for
    anything else."""
    target = Path(target)
    if is_artifact(target):
        return read_manifest(target)
    from bqc.deploy.artifact import is_deploy_artifact, read_deploy_manifest

    if is_deploy_artifact(target):  # bqc fold's folder: its provenance, train record, diffusion process
        return read_deploy_manifest(target)
    compiled = _compiled_manifest(target) or {}
    src = compiled.get("artifact")
    if src and is_artifact(src):
        return read_manifest(src)
    return compiled.get("source") or None


def trained_on(target: str | Path) -> dict | None:
    """``{"data", "resize"}`` a trained artifact (or a compiled dir lowered from one) was trained
    on, from its manifest's ``train`` record; ``None`` when nothing is recorded."""
    train = (source_manifest(target) or {}).get("train") or {}
    if not train.get("data"):
        return None
    resize = (train.get("options") or {}).get("resize")
    return {"data": train["data"], "resize": tuple(resize) if resize else None}


def read_schedule(target: str | Path):
    """The recorded diffusion process of an artifact dir (``bqc.json``) or a compiled dir
    (``manifest.json``'s ``diffusion``, else the artifact it was lowered from); ``None`` for
    anything else (a plain model: ask the front end)."""
    from bqc.diffusion.schedule import NoiseSchedule

    target = Path(target)
    compiled = None if is_artifact(target) else _compiled_manifest(target)
    if compiled is not None and compiled.get("diffusion"):
        return NoiseSchedule.from_manifest(compiled)
    man = source_manifest(target)
    if man is not None:
        return NoiseSchedule.from_manifest(man)
    return NoiseSchedule() if compiled is not None else None
