"""Shared fixtures. ``pytest --update-golden`` rewrites tests/golden/*.txt from the current code."""
from __future__ import annotations

import difflib
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden graph dumps")


#: test processes by default (pytest-xdist): every test runs torch on one thread, so two
#: processes use two cores; more would multiply the suite's peak memory (8 GB budget)
DEFAULT_WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run the suite in ``min(2, cores)`` processes, one test file per process at a time
    (``--dist loadfile``: a file's shared lowerings stay in one process), when pytest-xdist is
    installed (the dev extra) and the command line does not choose (``-n 0``: one process)."""
    opt = config.option
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if getattr(opt, "numprocesses", None) is not None or opt.collectonly or getattr(opt, "pdb", False):
        return
    import os

    n = min(DEFAULT_WORKERS, os.cpu_count() or 1)
    if n > 1:
        opt.numprocesses, opt.dist = n, "loadfile"


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


def _release_memory(module) -> None:
    """What one test module built must not stay resident for the rest of the session (the
    README's command runs every file in one process, on machines with 8 GB): the module's own
    caches (module-level dicts named like ``_CACHE``), bqc's kernel build cache, torch.export /
    dynamo state, then a full collection and ``malloc_trim`` so freed arenas go back to the OS."""
    import gc
    import sys

    here = Path(__file__).parent
    mods = {module} | {m for m in list(sys.modules.values())  # test modules imported by others (test_deploy.qat)
                       if Path(getattr(m, "__file__", None) or "/").parent == here}
    for m in mods:
        for name, value in list(vars(m).items()):
            if name.startswith("_") and name.lstrip("_").isupper() and isinstance(value, dict):
                value.clear()
    try:
        from bqc.backends.tvm.kernels import build

        build._build_cached.cache_clear()
    except Exception:  # noqa: BLE001 - TVM is optional
        pass
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(scope="module", autouse=True)
def _module_memory(request):
    yield
    _release_memory(request.module)


@pytest.fixture
def golden(request):
    """``golden(name, text)``: compare text with tests/golden/NAME.txt (or rewrite it)."""

    def check(name: str, text: str) -> None:
        path = GOLDEN / f"{name}.txt"
        if request.config.getoption("--update-golden"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"{path} missing: run pytest --update-golden"
        want = path.read_text()
        if want != text:
            diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), "golden", "now", n=2))
            pytest.fail(f"graph differs from {path} (pytest --update-golden accepts it):\n{diff[:6000]}")

    return check


TINY_CONFIG = dict(
    image_size=8, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
    attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 1), num_head_channels=16,
)


@pytest.fixture
def tiny_unet():
    """The small reference UNet of the golden tests (openaimodel family, ~100k params)."""
    from bqc.models.unet import UNetModel

    torch.manual_seed(0)
    m = UNetModel(**TINY_CONFIG).eval()
    with torch.no_grad():  # openaimodel zero-inits the output conv; give it weights so outputs differ
        m.out[2].weight.normal_(0, 0.05)
        for name, p in m.named_parameters():
            if "out_layers.3" in name and p.dim() == 4:
                p.normal_(0, 0.05)
    return m


@pytest.fixture
def tiny_source(tiny_unet):
    from bqc.frontend import _from_module

    return _from_module(tiny_unet, "zoo", "tiny reference UNet", config=TINY_CONFIG)
