"""Issue 12 part 2: no file runs code unless the user said ``--trust-pickle``.

Each test builds a hostile file in ``tmp_path`` whose payload would write a marker file, runs
``python -m bqc ...`` in a subprocess, and asserts: exit code 2, one-paragraph error (no
traceback), and no marker.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from bqc import frontend
from bqc.errors import BqcError

ROOT = Path(__file__).resolve().parents[1]


class _Tiny(torch.nn.Module):
    """Smallest thing bqc can capture: (x, t) -> eps with a time embedding."""

    in_channels, image_size = 3, 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Linear(1, 3)
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x, t):
        return self.conv(x) + self.emb(t.float()[:, None])[:, :, None, None] + self.shift[None, :, None, None]


class _Payload:
    """Unpickling this writes the marker file (stands for any code an attacker wants run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=2)


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "tiny.pt2"
    b = torch.export.Dim("batch")
    x, t = torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,))
    ep = torch.export.export(_Tiny().eval(), (x, t), dynamic_shapes={"x": {0: b}, "t": {0: b}})
    torch.export.save(ep, str(path))
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a zip member by member; ``edit(rel_name, data)`` returns new bytes, or None to drop."""
    zin = zipfile.ZipFile(src)
    with zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            rel = item.filename.split("/", 1)[1]
            data = edit(rel, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)
        root = zin.infolist()[0].filename.split("/", 1)[0]
        for rel, data in getattr(edit, "extra", {}).items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _bqc(*args: str, cwd: Path, path: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m bqc ARGS`` in ``cwd``; ``path``: a folder put first on its PYTHONPATH."""
    # wide console: the checks look for paths and names in the message, which an 80-column console
    # folds mid-word when a path is long (pytest-xdist's tmp paths are)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "bqc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _assert_refused(res: subprocess.CompletedProcess, marker: Path, *words: str) -> None:
    assert not marker.exists(), f"the payload ran: {res.stderr[-2000:]}"
    assert res.returncode == 2, (res.returncode, res.stdout[-1000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words:
        assert w.lower() in " ".join(res.stderr.split()).lower(), res.stderr[-2000:]


# hostile .pt2 archives ------------------------------------------------------------------------
def _sample_inputs_pickle(marker):
    """torch.export.load unpickles the sample inputs with weights_only=False when the restricted
    load fails: a payload there ran under `bqc inspect` before the fix."""
    return lambda rel, data: _payload(marker) if rel.startswith("data/sample_inputs/") else data


def _weights_pickle(marker):
    def edit(rel, data):
        if rel == "data/weights/model_weights_config.json":
            cfg = json.loads(data)
            first = next(iter(cfg["config"].values()))
            first["use_pickle"] = True
            return json.dumps(cfg).encode()
        if rel == "data/weights/weight_0":
            return _payload(marker)
        return data
    return edit


def _opaque_constant(marker):
    """A constant whose file name says 'opaque object' is pickle.loads-ed, whatever its config says."""
    meta = {"dtype": 7, "sizes": [{"as_int": 1}], "requires_grad": False, "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 5}

    def edit(rel, data):
        if rel == "data/constants/model_constants_config.json":
            cfg = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False,
                                       "tensor_meta": meta}}}
            return json.dumps(cfg).encode()
        return data
    edit.extra = {"data/constants/opaque_obj_0": _payload(marker)}
    return edit


def _legacy_weights(marker):
    def edit(rel, data):
        return None if rel.startswith("data/weights/") else data
    edit.extra = {"data/weights/model.pt": _payload(marker)}
    return edit


def _program_json(edit_doc):
    def edit(rel, data):
        if rel.startswith("models/") and rel.endswith(".json"):
            doc = json.loads(data)
            edit_doc(doc)
            return json.dumps(doc).encode()
        return data
    return edit


def _sympy_expression(marker):
    """torch's deserializer hands every symbolic shape to sympy.sympify, which eval()s it: this
    ran with exit code 0 before the fix, in a file with no pickle at all."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"

    def edit_doc(doc):
        text = json.dumps(doc)
        sym = text[text.index('"expr_str": "') + 13:].split('"')[0]
        evil = f"(__import__('builtins').exec({code!r}) or {sym})"
        doc.clear()
        doc.update(json.loads(text.replace(f'"expr_str": "{sym}"', '"expr_str": ' + json.dumps(evil))))
    return _program_json(edit_doc)


def _guards_code(marker):
    """ep.module() exec()s the program's guards_code strings into a function."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return _program_json(lambda doc: doc.update(guards_code=[f"(__import__('builtins').exec({code!r}) or True)"]))


HOSTILE_PT2 = {
    "sympy-expression": _sympy_expression,
    "guards-code": _guards_code,
    "sample-inputs-pickle": _sample_inputs_pickle,
    "weights-use-pickle": _weights_pickle,
    "opaque-constant": _opaque_constant,
    "legacy-pickled-weights": _legacy_weights,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_PT2))
def test_hostile_pt2_is_refused_by_inspect(tmp_path, clean_pt2, kind):
    marker = tmp_path / "MARKER"
    evil = _rewrite(clean_pt2, tmp_path / "evil.pt2", HOSTILE_PT2[kind](marker))
    _assert_refused(_bqc("inspect", str(evil), cwd=tmp_path), marker, "--trust-pickle")


def test_hostile_pt2_named_pt_is_refused(tmp_path, clean_pt2):
    """Content, not the name, decides: a .pt2 archive renamed .pt is still vetted as one."""
    marker = tmp_path / "MARKER"
    evil = _rewrite(clean_pt2, tmp_path / "evil.pt", _sample_inputs_pickle(marker))
    _assert_refused(_bqc("inspect", str(evil), cwd=tmp_path), marker, "sample_inputs", "--trust-pickle")


def test_old_format_export_is_refused(tmp_path, clean_pt2):
    """The pre-2.8 torch.export zip (version + serialized_*.pt): torch's fallback path unpickles
    its example inputs without restriction when the restricted load fails (it ran before the fix)."""
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    art = serialize(torch.export.load(str(clean_pt2)))
    marker = tmp_path / "MARKER"
    evil = tmp_path / "old.pt2"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", art.exported_program)
        z.writestr("serialized_state_dict.pt", art.state_dict)
        z.writestr("serialized_constants.pt", art.constants)
        z.writestr("serialized_example_inputs.pt", _payload(marker))
    _assert_refused(_bqc("inspect", str(evil), cwd=tmp_path), marker, "pre-2.8")


def test_raw_pickle_named_pt2_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "model.pt2"
    evil.write_bytes(_payload(marker))
    _assert_refused(_bqc("inspect", str(evil), cwd=tmp_path), marker, "is a raw pickle", "--trust-pickle")


def test_aotinductor_member_is_refused(tmp_path, clean_pt2):
    """An AOTInductor package would make torch.export.load dlopen a shared library."""
    edit = lambda rel, data: data  # noqa: E731
    edit.extra = {"data/aotinductor/model/model.so": b"\x7fELF not really"}
    evil = _rewrite(clean_pt2, tmp_path / "aoti.pt2", edit)
    with pytest.raises(BqcError, match="AOTInductor"):
        frontend.load_source(str(evil))


def test_clean_pt2_named_pt_loads_and_env_is_restored(tmp_path, clean_pt2):
    """A clean archive loads whatever its name; the forced weights-only load is undone after."""
    import shutil

    renamed = tmp_path / "tiny.pt"
    shutil.copy(clean_pt2, renamed)
    src = frontend.load_source(str(renamed))
    assert src.kind == "pt2" and src.in_channels == 3 and src.image_size == 8
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# hostile base.pt2 inside an artifact ---------------------------------------------------------
@pytest.fixture(scope="module")
def clean_artifact(tmp_path_factory, clean_pt2) -> Path:
    from bqc import transform as tf

    out = tmp_path_factory.mktemp("art") / "art"
    res = tf.transform(frontend.load_source(str(clean_pt2)), "fp")
    return tf.save(res, out)


@pytest.mark.parametrize("command", [["report"], ["sample", "-n", "2", "--steps", "2"]], ids=["report", "sample"])
def test_artifact_with_hostile_base_is_refused(tmp_path, clean_artifact, command):
    import shutil

    marker = tmp_path / "MARKER"
    art = tmp_path / "art"
    shutil.copytree(clean_artifact, art)
    _rewrite(clean_artifact / "base.pt2", art / "base.pt2", _sample_inputs_pickle(marker))
    extra = ["-o", str(tmp_path / "s.png")] if command[0] == "sample" else []
    _assert_refused(_bqc(command[0], str(art), *command[1:], *extra, cwd=tmp_path), marker, "base.pt2")


# config targets ------------------------------------------------------------------------------
def _yaml(tmp_path: Path, target: str, params: dict) -> Path:
    p = tmp_path / "model.yaml"
    p.write_text(json.dumps({"target": target, "params": params}))  # JSON is YAML
    return p


@pytest.mark.parametrize("target", ["subprocess.call", "subprocess.Popen", "os.system", "builtins.exec"])
def test_config_target_must_be_a_module_class(tmp_path, target):
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    params = {
        "subprocess.call": {"args": [sys.executable, "-c", code]},
        "subprocess.Popen": {"args": [sys.executable, "-c", code]},
        "os.system": {"command": f"{sys.executable} -c \"{code}\""},
        "builtins.exec": {"source": code},
    }[target]
    res = _bqc("inspect", "--config", str(_yaml(tmp_path, target, params)), cwd=tmp_path)
    _assert_refused(res, marker, target, "nn.Module")


def test_config_target_not_a_dotted_path(tmp_path):
    with pytest.raises(BqcError, match="dotted path"):
        frontend.load_source(config=str(_yaml(tmp_path, "__import__('os')", {})))


def _evil_package(tmp_path: Path) -> tuple[Path, Path]:
    """``evilpkg`` writes MARKER when imported: (marker, the folder to put on PYTHONPATH)."""
    marker = tmp_path / "MARKER"
    pkg = tmp_path / "pp"
    pkg.mkdir()
    (pkg / "evilpkg.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nimport torch\n"
                                    "class Model(torch.nn.Module):\n    def forward(self, x, t):\n        return x\n")
    return marker, pkg


def test_config_target_outside_trusted_packages_needs_trust_code(tmp_path):
    """`target: evilpkg.Model` imported evilpkg from PYTHONPATH (running its code) on a plain
    `bqc inspect --config`: the YAML chose code to run. Refused without --trust-code (nothing
    imported), imported with it."""
    marker, pkg = _evil_package(tmp_path)
    cfg = _yaml(tmp_path, "evilpkg.Model", {})
    res = _bqc("inspect", "--config", str(cfg), cwd=tmp_path, path=pkg)
    _assert_refused(res, marker, "evilpkg.Model", "--trust-code")
    res = _bqc("inspect", "--config", str(cfg), "--trust-code", cwd=tmp_path, path=pkg)
    assert marker.exists() and "--trust-code" not in res.stderr  # imported (the bare module then fails to capture)
    with pytest.raises(BqcError, match="--trust-code"):  # the library's default too
        frontend.load_source(config=str(_yaml(tmp_path, "antigravity.Anything", {})))


def test_bench_teacher_yaml_needs_trust_code_and_takes_it(tmp_path):
    """`bqc bench X --teacher m.yaml` refused an untrusted target with a hint to pass --trust-code,
    which bench did not take. bench takes it now (and --trust-pickle), and a bad --teacher is
    refused before the target is lowered."""
    marker, pkg = _evil_package(tmp_path)
    cfg = _yaml(tmp_path, "evilpkg.Model", {})
    res = _bqc("bench", "mnist16-bidm", "--teacher", str(cfg), cwd=tmp_path, path=pkg)
    _assert_refused(res, marker, "evilpkg.Model", "--trust-code")
    assert "lower" not in res.stderr.lower(), res.stderr[-2000:]  # refused before lowering
    res = _bqc("bench", "mnist16-bidm", "--teacher", str(cfg), "--trust-code", cwd=tmp_path, path=pkg)
    assert marker.exists(), res.stderr[-2000:]  # imported (the bare module then fails to capture: exit 2)
    assert "--trust-code" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_config_nested_class_of_an_imported_module_needs_no_trust_code(tmp_path, monkeypatch):
    """A nested class target (`pkg.mod.Outer.Inner`) of a module this process has imported was
    refused without --trust-code (the rule looked for `pkg.mod.Outer` in sys.modules); it is
    found by static lookups now, and a name that would need an import is still refused."""
    import types

    mod = types.ModuleType("nestpkg_s23")

    class Outer:
        class Inner(nn.Module):
            pass

    mod.Outer = Outer
    monkeypatch.setitem(sys.modules, "nestpkg_s23", mod)
    assert frontend._resolve_module_class("nestpkg_s23.Outer.Inner", "m.yaml") is Outer.Inner
    with pytest.raises(BqcError, match="--trust-code"):
        frontend._resolve_module_class("nestpkg_s23.sub.Inner", "m.yaml")
