"""The aarch64 (NEON) target of the TVM backend: target and cross export.

Building for ARM needs only TVM (its LLVM emits aarch64 code): :func:`arm_target`,
:func:`inspect_asm`. Exporting a shared library (:func:`export_arm_library`, the ``model.so``
of ``bqc lower --backend tvm-arm``) needs Debian's cross compiler ``aarch64-linux-gnu-gcc`` and
the aarch64 C library (``libc6-dev-arm64-cross``); :func:`check_arm_env` checks them before any
work. The library runs on an aarch64 machine (a bundle's ``run.py``: docs/deploy.md). Running
it on an x86 machine under ``qemu-aarch64-static`` is a test harness, ``tests/qemu.py``;
``.ci/arm_setup.sh`` installs the cross compiler and qemu and builds that harness's runner.
"""
from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Sequence

from bqc.errors import BqcError
from bqc.backends.runtime import drop_native_log_lines

TRIPLE = "aarch64-linux-gnu"
CROSS_CC = f"{TRIPLE}-gcc"
SYSROOT = Path("/usr") / TRIPLE  # Debian's libc6-arm64-cross
SETUP_HINT = "run `bash .ci/arm_setup.sh` (installs gcc-aarch64-linux-gnu and qemu-user-static, builds the aarch64 runner)"
CC_HINT = ("install it: `sudo apt-get install gcc-aarch64-linux-gnu` (Debian/Ubuntu; other systems: an "
           "aarch64-linux-gnu GCC cross toolchain), or from a bqc checkout `bash .ci/arm_setup.sh`, which also "
           "sets up qemu to test ARM libraries here")

__all__ = [
    "TRIPLE",
    "arm_target",
    "cross_compiler",
    "export_arm_library",
    "check_arm_env",
    "inspect_asm",
]


# --------------------------------------------------------------------------- target

def arm_target(num_cores: int = 4, *, mcpu: str | None = None, mattr: Sequence[str] = ("+neon",)):
    """The aarch64 LLVM target: ``mtriple=aarch64-linux-gnu`` with NEON.

    ``mcpu`` (e.g. ``"cortex-a76"``, ``"neoverse-n1"``) is optional; ``mattr`` may add
    ``"+dotprod"`` for SDOT-based int8 kernels. ``num-cores`` tells TVM how many threads the
    parallel loops may use.
    """
    import tvm

    cfg = {"kind": "llvm", "mtriple": TRIPLE, "mattr": list(mattr), "num-cores": int(num_cores)}
    if mcpu:
        cfg["mcpu"] = mcpu
    return tvm.target.Target(cfg)


# --------------------------------------------------------------------------- environment

def _native() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def _cc() -> str:
    """The C compiler that produces aarch64 code here (native gcc on an aarch64 host)."""
    if shutil.which(CROSS_CC):
        return CROSS_CC
    if _native() and shutil.which("gcc"):
        return "gcc"
    raise BqcError(
        f"the aarch64 cross compiler `{CROSS_CC}` is not installed: --backend tvm-arm links the ARM library "
        "with it (checked before any work)",
        hint=CC_HINT,
    )


def cross_compiler():
    """``fcompile`` for ``export_library``: ``tvm.support.cc.cross_compiler`` with aarch64 gcc."""
    import tvm.support.cc as cc

    return cc.cross_compiler(_cc())


def check_arm_env() -> None:
    """Raise :class:`BqcError` naming ``.ci/arm_setup.sh`` unless ARM export works here (the
    aarch64 C compiler and, off an aarch64 host, the cross C library)."""
    _cc()
    if not _native():
        for f in ("crti.o", "ld-linux-aarch64.so.1"):
            if not (SYSROOT / "lib" / f).exists():
                raise BqcError(
                    f"the aarch64 C library is incomplete ({SYSROOT / 'lib' / f} is missing; "
                    "Debian packages libc6-dev-arm64-cross / libc6-arm64-cross)",
                    hint="`sudo apt-get install libc6-dev-arm64-cross`, or " + SETUP_HINT,
                )


# --------------------------------------------------------------------------- export / inspect

def _runtime_module(executable_or_module):
    """The runtime ``Module`` of a ``tvm.compile`` result (or the module itself)."""
    return getattr(executable_or_module, "mod", executable_or_module)


def export_arm_library(executable_or_module, path) -> Path:
    """Export an aarch64 build (``tvm.compile(..., arm_target())``) as a shared library.

    Works for kernel modules and Relax executables alike; the file loads on an aarch64
    machine with ``tvm.runtime.load_module`` (on x86: under qemu, ``tests/qemu.py``).
    """
    check_arm_env()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with drop_native_log_lines("Scope Saving:"):
        executable_or_module.export_library(str(path), fcompile=cross_compiler())
    return path


def inspect_asm(executable_or_module) -> str:
    """The aarch64 assembly of a build (look for ``cnt``/``uaddlp`` in binary kernels)."""
    return _runtime_module(executable_or_module).inspect_source("asm")
