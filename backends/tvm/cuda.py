"""The CUDA target of the TVM backend: build, inspect, PTX, export (no GPU needed to build), load.

``tvm.compile`` for a CUDA target yields a host module (LLVM, x86) that imports a CUDA module
holding the generated CUDA C source. The apache-tvm wheel has no CUDA *compiler* step at build
time: the exported library carries that source, and the CUDA runtime (``libtvm_runtime_cuda``,
loaded when ``libcuda.so.1`` exists) JIT-compiles it when the library is loaded, through the
global function ``tvm_callback_cuda_compile``. :func:`load_cuda_library` registers bqc's own
(:func:`jit_compile`: ``nvcc --fatbin`` for the GPU's compute capability, no fast math), which
needs only TVM's runtime, not its compiler library: a lowered bundle then runs on a GPU machine
with the runtime-only part of the apache-tvm wheel (``TVM_USE_RUNTIME_LIB=1``, or the wheel
without ``libtvm_compiler.so``), ``tvm_ffi`` and nvcc. ``compile_mode="nvrtc"`` uses TVM's own
callback instead (NVRTC through the ``cuda-bindings`` package; needs TVM's compiler library).

Without a GPU, a build is checked by compiling its CUDA source to PTX with nvcc
(:func:`compile_ptx`) and looking for ``popc.b32``/``popc.b64``; its numerics are checked by
the test harness ``tests/cuda_emulator.py``, which runs the generated CUDA C on the CPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bqc.errors import BqcError
from bqc.backends.runtime import drop_native_log_lines

DEFAULT_ARCH = "sm_80"
NVCC_HINT = (
    "install the CUDA toolkit so that `nvcc` is on PATH (or set CUDA_HOME); "
    "set BQC_SKIP_CUDA=1 to skip the CUDA build tests"
)

_CUDA_HOMES = ("/usr/local/cuda",)

__all__ = [
    "DEFAULT_ARCH",
    "cuda_target",
    "build_cuda",
    "cuda_source",
    "find_nvcc",
    "compile_ptx",
    "compile_fatbin",
    "export_cuda_library",
    "jit_compile",
    "load_cuda_library",
    "popcount_evidence",
]


def _check_arch(arch: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[af]?", arch):
        raise BqcError(f"bad CUDA arch {arch!r}: expected e.g. 'sm_80' (A100) or 'sm_90' (H100)")
    return arch


def cuda_target(arch: str = DEFAULT_ARCH, *, host: dict | None = None):
    """``Target({"kind": "cuda", "arch": arch}, host=llvm)``; ``sm_80`` A100, ``sm_90`` H100."""
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": _check_arch(arch)}, host=host or {"kind": "llvm"})


def build_cuda(mod, arch: str = DEFAULT_ARCH):
    """``tvm.compile`` an IRModule / PrimFunc whose kernels are bound to GPU threads."""
    import tvm

    return tvm.compile(mod, target=cuda_target(arch))


def _cuda_modules(executable_or_module):
    mod = getattr(executable_or_module, "mod", executable_or_module)
    found, stack = [], [mod]
    while stack:
        m = stack.pop()
        if getattr(m, "kind", None) == "cuda":
            found.append(m)
        stack.extend(m.imports)
    return found


def cuda_source(executable_or_module) -> str:
    """The generated CUDA C source of a CUDA build (all device modules, concatenated)."""
    mods = _cuda_modules(executable_or_module)
    if not mods:
        raise BqcError("this build has no CUDA device module (was it built with cuda_target()?)")
    return "\n".join(m.inspect_source("cuda") for m in mods)


def find_nvcc() -> str:
    """Path of nvcc (PATH, then $CUDA_HOME/bin, /usr/local/cuda/bin); BqcError if absent."""
    cands = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *_CUDA_HOMES):
        if home:
            cands.append(str(Path(home) / "bin" / "nvcc"))
    for c in cands:
        if c and Path(c).exists():
            return c
    raise BqcError("nvcc (the CUDA compiler) was not found, so CUDA kernels cannot be compiled to PTX", hint=NVCC_HINT)


def _nvcc_compile(source: str, arch: str, fmt: str) -> bytes:
    import tvm
    import tvm.support.nvcc as nvcc

    nvcc_path = find_nvcc()
    # tvm.support.nvcc runs `nvcc` from PATH; make sure the one we found is first there.
    env_path = os.environ.get("PATH", "")
    bindir = str(Path(nvcc_path).parent)
    if shutil.which("nvcc") != nvcc_path:
        os.environ["PATH"] = bindir + os.pathsep + env_path
    try:
        with tvm.target.Target({"kind": "cuda", "arch": _check_arch(arch)}):
            out = nvcc.compile_cuda(source, target_format=fmt, arch=arch, compiler="nvcc")
    except Exception as e:  # nvcc's own error text is the useful part
        raise BqcError(f"nvcc failed to compile the generated CUDA source to {fmt} for {arch}:\n{e}") from e
    finally:
        os.environ["PATH"] = env_path
    return bytes(out)


def compile_ptx(source_or_build, arch: str = DEFAULT_ARCH) -> str:
    """PTX text of a CUDA build (or CUDA source) for ``arch``, via nvcc. Needs no GPU."""
    src = source_or_build if isinstance(source_or_build, str) else cuda_source(source_or_build)
    return _nvcc_compile(src, arch, "ptx").decode()


def compile_fatbin(source_or_build, arch: str = DEFAULT_ARCH) -> bytes:
    """A fatbin (SASS for ``arch`` + PTX) of a CUDA build, via nvcc; proves ptxas accepts it."""
    src = source_or_build if isinstance(source_or_build, str) else cuda_source(source_or_build)
    return _nvcc_compile(src, arch, "fatbin")


def popcount_evidence(executable_or_module, arch: str = DEFAULT_ARCH) -> dict:
    """Lines of the CUDA source with ``__popc`` and of the PTX with ``popc.b32/.b64``."""
    src = cuda_source(executable_or_module)
    ptx = compile_ptx(src, arch)
    return {
        "source": [ln.strip() for ln in src.splitlines() if "__popc" in ln],
        "ptx": [ln.strip() for ln in ptx.splitlines() if re.search(r"\bpopc\.b(32|64)\b", ln)],
        "ptx_target": [ln.strip() for ln in ptx.splitlines() if ln.startswith(".target")],
    }


def export_cuda_library(executable_or_module, path) -> Path:
    """Export a CUDA build as a shared library (x86 host code + the CUDA source). No GPU needed.

    On a GPU machine, :func:`load_cuda_library` loads it; the CUDA source is compiled then.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _cuda_modules(executable_or_module):
        raise BqcError("export_cuda_library: this build has no CUDA device module")
    with drop_native_log_lines("Scope Saving:"):
        executable_or_module.export_library(str(path))
    return path


#: nvcc flags of :func:`jit_compile`: TVM's own nvcc callback's, without ``--use_fast_math`` (the
#: float parts must match the PyTorch reference, as on the CPU targets)
JIT_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__")


_RUNTIME_PROBLEM: list[str] = []  # why libtvm_runtime_cuda.so did not load, for load_cuda_library's error


def ensure_cuda_runtime() -> None:
    """Load TVM's CUDA runtime (``libtvm_runtime_cuda.so``, beside ``libtvm_runtime.so``) when
    ``import tvm`` did not: a runtime-only TVM skips its CUDA backend hook, which needs the
    compiler library. Without an NVIDIA driver (no ``libcuda.so.1``) it stays unloaded and
    :func:`load_cuda_library` says so."""
    import ctypes

    import tvm.base

    libs = tvm.base._LOADED_LIBS
    if "tvm_runtime_cuda" in libs or "tvm_runtime" not in libs:
        return
    lib = Path(libs["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    if lib.is_file():
        try:
            libs["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
        except OSError as e:  # e.g. libcuda.so.1 / libcudart.so.13 not found
            _RUNTIME_PROBLEM[:] = [str(e)]


def device_arch(device_id: int = 0) -> str:
    """``sm_XY`` of the CUDA device (TVM runtime only)."""
    import tvm

    ensure_cuda_runtime()
    dev = tvm.cuda(device_id)
    if not dev.exist:
        raise BqcError("no CUDA GPU is visible here", hint="run on a machine with an NVIDIA GPU and its driver")
    return _check_arch("sm_" + dev.compute_version.replace(".", ""))


def jit_compile(code: str, arch: str | None = None) -> bytes:
    """A fatbin (SASS for ``arch``, default the GPU's, + PTX) of CUDA source, via nvcc."""
    arch = _check_arch(arch or device_arch())
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory(prefix="bqc-cuda-") as d:
        src, out = Path(d) / "model.cu", Path(d) / "model.fatbin"
        src.write_text(code)
        r = subprocess.run([nvcc, "--fatbin", f"-arch={arch}", *JIT_FLAGS, "-o", str(out), str(src)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BqcError(f"nvcc failed to compile the library's CUDA source for {arch}:\n{r.stdout}{r.stderr}"[-4000:])
        return out.read_bytes()


def _register_jit(arch: str | None) -> None:
    import tvm_ffi

    def tvm_callback_cuda_compile(code, *_target):
        return jit_compile(code, arch)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", tvm_callback_cuda_compile, override=True)


def load_cuda_library(path, *, compile_mode: str | None = None, arch: str | None = None):
    """Load an exported CUDA library on a GPU machine (``tvm.runtime.load_module``).

    The CUDA source inside is JIT-compiled on load: ``compile_mode="nvcc"`` (default when nvcc
    is found) by :func:`jit_compile` for ``arch`` (default: the GPU's), needing TVM's runtime
    only; ``"nvrtc"`` by TVM's own callback (the ``cuda-bindings`` package and TVM's compiler
    library). ``TVM_CUDA_COMPILE_MODE`` sets the default too.
    """
    import tvm

    mode = compile_mode or os.environ.get("TVM_CUDA_COMPILE_MODE")
    if mode is None:
        try:
            find_nvcc()
            mode = "nvcc"
        except BqcError:
            mode = "nvrtc"
    if mode not in ("nvcc", "nvrtc"):
        raise BqcError(f"compile_mode must be 'nvcc' or 'nvrtc', got {mode!r}")
    ensure_cuda_runtime()
    if mode == "nvcc":
        _register_jit(arch)
    else:
        import tvm.support.nvcc  # noqa: F401  (registers TVM's tvm_callback_cuda_compile)

        os.environ["TVM_CUDA_COMPILE_MODE"] = mode
    try:
        return tvm.runtime.load_module(str(path))
    except Exception as e:
        if "load_from_bytes.cuda" in str(e):
            why = f": {_RUNTIME_PROBLEM[0]}" if _RUNTIME_PROBLEM else ""
            raise BqcError(
                f"cannot load CUDA library {path}: TVM's CUDA runtime is not available here "
                f"(it needs an NVIDIA driver, libcuda.so.1, and the CUDA runtime, libcudart){why}",
            ) from e
        raise
