"""The data flow has one direction: backends take a deploy artifact and never reach back into
training code; the bundle runner (bqc/run.py, copied into every bundle as run.py) needs only the
standard library, numpy and the TVM runtime.

Checked on the source (the AST of every module, imports inside functions included), so a new
import that breaks the direction fails here without running anything.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what a backend must not import: training, quantizers, passes, recipes, QAT artifacts
BACKEND_FORBIDDEN = ("bqc.train", "bqc.quant", "bqc.passes", "bqc.pipeline", "bqc.artifact")
#: the only third-party modules the bundle runner may import
RUNNER_ALLOWED = ("numpy", "tvm_ffi")


def imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from . import x`` resolved against
    ``package``, the module's own package), at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from bqc import train`
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def backend_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / "backends").rglob("*.py")):
        rel = path.relative_to(root / "backends").with_suffix("")
        parts = ["bqc", "backends", *rel.parts]
        package = ".".join(parts if rel.name == "__init__" else parts[:-1])
        for name in sorted(imports(path, package)):
            hit = next((p for p in BACKEND_FORBIDDEN if _under(name, p)), None)
            if hit:
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


def runner_violations(root: Path = ROOT) -> list[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    path = root / "bqc" / "run.py"
    return [f"bqc/run.py imports {name}" for name in sorted(imports(path, "bqc"))
            if name.split(".")[0] not in stdlib and name.split(".")[0] not in RUNNER_ALLOWED]


def test_backends_never_import_training_code():
    assert backend_violations() == []


def test_the_runner_needs_only_stdlib_numpy_and_the_tvm_runtime():
    assert runner_violations() == []


@pytest.mark.parametrize("line", ["from bqc.train.qat import _args", "import bqc.quant.layers",
                                  "from bqc import artifact", "from bqc import pipeline as P",
                                  "    from bqc.passes import tbs_edges"])
def test_a_forbidden_backend_import_is_caught(tmp_path, line):
    """The check really fails: a copy of the tree with one forbidden import added to a backend
    module (at module level, or inside a function) is reported."""
    (tmp_path / "backends" / "tvm").mkdir(parents=True)
    src = (ROOT / "backends" / "tvm" / "lower.py").read_text()
    if line.startswith(" "):
        src += f"\n\ndef _added():\n{line}\n"
    else:
        src = f"{line}\n{src}"
    (tmp_path / "backends" / "tvm" / "lower.py").write_text(src)
    bad = backend_violations(tmp_path)
    assert bad and all(b.startswith("backends/tvm/lower.py imports bqc.") for b in bad), bad


def test_a_third_party_runner_import_is_caught(tmp_path):
    (tmp_path / "bqc").mkdir()
    (tmp_path / "bqc" / "run.py").write_text((ROOT / "bqc" / "run.py").read_text() + "\n\ndef _f():\n    import torch\n")
    assert runner_violations(tmp_path) == ["bqc/run.py imports torch"]
