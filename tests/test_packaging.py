"""Packaging and the README contract."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"bqc": "bqc", "bqc.passes": "passes", "bqc.backends": "backends", "bqc.models": "models"}


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert cfg["package-dir"] == MAPPED
    found = set()
    for pkg, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == listed, f"add to / remove from pyproject packages: {sorted(found ^ listed)}"


def test_torch_pinned_exactly():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps and "apache-tvm==0.27.0.post1" in deps


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    cmd = re.search(r"TEST_CMD='(.*)'", ci).group(1)
    assert cmd in (ROOT / "README.md").read_text()


def test_no_generic_top_level_imports_installed():
    """`passes`, `backends`, `models` must not be importable outside the repository."""
    code = "import importlib.util as u; print([n for n in ('passes','backends','models') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "bqc", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "makes diffusion UNets binary" in out.stdout
