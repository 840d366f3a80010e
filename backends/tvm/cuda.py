"""The CUDA target of the TVM backend: build, inspect, PTX, export (no GPU needed to build).

``tvm.compile`` for a CUDA target yields a host module (LLVM, x86) that imports a CUDA module
holding the generated CUDA C source. The apache-tvm wheel has no CUDA *compiler* step at build
time: the exported library carries that source, and the CUDA runtime (``libtvm_runtime_cuda``,
loaded when ``libcuda.so.1`` exists) JIT-compiles it when the library is loaded, through the
Python callback ``tvm_callback_cuda_compile`` that ``import tvm.support.nvcc`` registers. That
callback uses NVRTC (needs the ``cuda-bindings``/``cuda-python`` package) unless
``TVM_CUDA_COMPILE_MODE=nvcc``. :func:`load_cuda_library` sets this up.

Here (no GPU) we check a build by compiling its CUDA source to PTX with nvcc
(:func:`compile_ptx`) and looking for ``popc.b32``/``popc.b64``, and check its numerics by
running the generated CUDA C on the CPU (:func:`emulate_kernel`: one std::thread per CUDA
thread, the warp-collective b1 ``mma.sync`` emulated per the PTX fragment layout).
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
    "load_cuda_library",
    "popcount_evidence",
    "emulate_kernel",
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


def load_cuda_library(path, *, compile_mode: str | None = None):
    """Load an exported CUDA library on a GPU machine (``tvm.runtime.load_module``).

    The CUDA source inside is JIT-compiled on load by ``tvm.support.nvcc``:
    ``compile_mode="nvcc"`` (default when ``TVM_CUDA_COMPILE_MODE`` is unset and nvcc exists)
    or ``"nvrtc"`` (needs the ``cuda-bindings`` package).
    """
    import tvm
    import tvm.support.nvcc  # noqa: F401  (registers tvm_callback_cuda_compile)

    mode = compile_mode or os.environ.get("TVM_CUDA_COMPILE_MODE")
    if mode is None:
        mode = "nvcc" if shutil.which("nvcc") else "nvrtc"
    if mode not in ("nvcc", "nvrtc"):
        raise BqcError(f"compile_mode must be 'nvcc' or 'nvrtc', got {mode!r}")
    os.environ["TVM_CUDA_COMPILE_MODE"] = mode
    try:
        return tvm.runtime.load_module(str(path))
    except Exception as e:
        if "load_from_bytes.cuda" in str(e):
            raise BqcError(
                f"cannot load CUDA library {path}: TVM's CUDA runtime is not available here "
                "(it needs an NVIDIA driver, libcuda.so.1)",
            ) from e
        raise


# --------------------------------------------------------------------------- CPU emulation

_EMU_HEADER = r"""
// bqc: the generated CUDA C of one kernel, compiled as C++ and run on the CPU.
// Every thread of a block is a std::thread (so __syncthreads and warp-collective MMA work);
// blocks run one after another. Only what bqc's kernels use is provided.
#include <cstdint>
#include <cmath>
#include <thread>
#include <vector>
#include <pthread.h>
struct bqc_uint3 { unsigned x, y, z; };
static thread_local bqc_uint3 threadIdx, blockIdx;
#define __global__
#define __device__ static inline
#define __forceinline__
#define __launch_bounds__(...)
#define __restrict__
#define __popc(v) ((int)__builtin_popcount((unsigned)(v)))
#define __popcll(v) ((int)__builtin_popcountll((unsigned long long)(v)))
template <class A, class B> static inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }
template <class A, class B> static inline auto max(A a, B b) -> decltype(a + b) { return a > b ? a : b; }
struct bqc_block { pthread_barrier_t all; };
struct bqc_warp { pthread_barrier_t bar; uint32_t a[32][4], b[32][2], c[32][4], d[32][4]; };
static thread_local bqc_block* bqc_tl_block;
static thread_local bqc_warp* bqc_tl_warp;
static thread_local int bqc_tl_lane;
static inline void __syncthreads() { pthread_barrier_wait(&bqc_tl_block->all); }
// mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.{xor,and}.popc, fragments per PTX ISA:
// g = lane >> 2, t = lane & 3; A row g (a0) / g + 8 (a1), k = 32 t + bit; B k = 32 t + bit,
// column g; C/D row g + 8 (i >> 1), column 2 t + (i & 1).
static inline void bqc_mma_m16n8k128_b1(bool is_and, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3,
    uint32_t a0, uint32_t a1, uint32_t b0, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  bqc_warp* w = bqc_tl_warp; int l = bqc_tl_lane;
  w->a[l][0] = a0; w->a[l][1] = a1; w->b[l][0] = b0;
  w->c[l][0] = c0; w->c[l][1] = c1; w->c[l][2] = c2; w->c[l][3] = c3;
  pthread_barrier_wait(&w->bar);
  if (l == 0) {
    for (int lane = 0; lane < 32; ++lane) {
      int g = lane >> 2, t = lane & 3;
      for (int i = 0; i < 4; ++i) {
        int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        int acc = (int)w->c[lane][i];
        for (int tt = 0; tt < 4; ++tt) {
          uint32_t av = w->a[(row & 7) * 4 + tt][row >> 3];
          uint32_t bv = w->b[col * 4 + tt][0];
          acc += __builtin_popcount(is_and ? (av & bv) : (av ^ bv));
        }
        w->d[lane][i] = (uint32_t)acc;
      }
    }
  }
  pthread_barrier_wait(&w->bar);
  d0 = w->d[l][0]; d1 = w->d[l][1]; d2 = w->d[l][2]; d3 = w->d[l][3];
}
"""


def _launch_dims(func) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    import tvm_ffi
    from tvm import tirx

    found: dict[str, int] = {}

    def visit(node):
        if node.kind == tirx.ForKind.THREAD_BINDING:
            found[str(node.thread_binding.thread_tag)] = int(node.extent)
        return node

    tvm_ffi.structural_map(func.body, [(tirx.For, visit)], order="post")
    grid = tuple(found.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(found.get(f"threadIdx.{a}", 1) for a in "xyz")
    return grid, block


def emulate_kernel(func, inputs, out_shapes, out_dtypes, *, arch: str = DEFAULT_ARCH):
    """Run a CUDA-scheduled PrimFunc's generated CUDA C on the CPU; return the outputs.

    A check for machines without a GPU: the kernel TVM generates for ``arch`` (one kernel
    per PrimFunc, as bqc's schedules make) is compiled as C++ with a small emulation layer
    (one std::thread per CUDA thread, blocks in sequence, ``__popc``, ``__syncthreads`` and the
    warp-collective b1 ``mma.sync`` emulated per the PTX ISA fragment layout) and run on
    ``inputs`` (PrimFunc parameter order, outputs last). Slow; use small shapes.
    """
    import ctypes

    import numpy as np
    import tvm

    name = "bqc_emu"
    func = func.with_attr("global_symbol", name)
    src = cuda_source(build_cuda(tvm.IRModule({name: func}), arch))
    grid, block = _launch_dims(func)
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\)\s*\{', src)
    if len(kernels) != 1:
        raise BqcError(f"emulate_kernel: expected one CUDA kernel, the build has {len(kernels)}")
    kname, params = kernels[0]
    # the asm MMA helpers are replaced by the emulation
    src = re.sub(r"__device__ void (tvm_builtin_ptx_mma_int_sync_aligned_m16n8k128_row_col_s32_b1_b1_s32_(xor|and)_popc)"
                 r"\(([^)]*)\) \{.*?\n\}\n",
                 lambda m: f"__device__ void {m.group(1)}({m.group(3)}) {{\n  bqc_mma_m16n8k128_b1({'true' if m.group(2) == 'and' else 'false'}, "
                 "__d0, __d1, __d2, __d3, __a0, __a1, __b0, __c0, __c1, __c2, __c3);\n}\n", src, flags=re.S)
    if "asm volatile" in src:
        raise BqcError("emulate_kernel: the kernel uses inline PTX the emulator does not know")
    ptypes, pnames = [], []
    for p in params.split(","):
        m = re.fullmatch(r"\s*(.*?[\s*])(\w+)_ptr\s*", p.replace("__restrict__", ""))
        if not m:
            raise BqcError(f"emulate_kernel: unsupported kernel parameter {p!r}")
        ptypes.append(m.group(1).strip())
        pnames.append(m.group(2))
    nthreads = block[0] * block[1] * block[2]
    call = ", ".join(f"({t})args[{i}]" for i, t in enumerate(ptypes))
    launcher = f"""
extern "C" int bqc_launch(void** args) {{
  const unsigned gx = {grid[0]}, gy = {grid[1]}, gz = {grid[2]}, bx = {block[0]}, by = {block[1]}, bz = {block[2]};
  const int nthreads = {nthreads};
  for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {{
    bqc_block blk; pthread_barrier_init(&blk.all, nullptr, nthreads);
    int nwarps = (nthreads + 31) / 32;
    std::vector<bqc_warp> warps(nwarps);
    for (int i = 0; i < nwarps; ++i) pthread_barrier_init(&warps[i].bar, nullptr, (i == nwarps - 1 && nthreads % 32) ? nthreads % 32 : 32);
    std::vector<std::thread> th;
    for (int tid = 0; tid < nthreads; ++tid) {{
      th.emplace_back([&, tid]() {{
        blockIdx = bqc_uint3{{x, y, z}};
        threadIdx = bqc_uint3{{(unsigned)(tid % bx), (unsigned)((tid / bx) % by), (unsigned)(tid / (bx * by))}};
        bqc_tl_block = &blk; bqc_tl_warp = &warps[tid / 32]; bqc_tl_lane = tid % 32;
        {kname}({call});
      }});
    }}
    for (auto& t : th) t.join();
    for (auto& w : warps) pthread_barrier_destroy(&w.bar);
    pthread_barrier_destroy(&blk.all);
  }}
  return 0;
}}
"""
    arrays = {}
    pnames_func = [str(p.name) for p in func.params]
    if len(pnames_func) != len(inputs) + len(out_shapes):
        raise BqcError(f"emulate_kernel: the function takes {len(pnames_func)} buffers, got "
                       f"{len(inputs)} inputs and {len(out_shapes)} outputs")
    outs = [np.zeros(s, d) for s, d in zip(out_shapes, out_dtypes)]
    for pname, arr in zip(pnames_func, [np.ascontiguousarray(a) for a in inputs] + outs):
        arrays[pname] = arr
    with tempfile.TemporaryDirectory(prefix="bqc-cuemu-") as td:
        td = Path(td)
        (td / "cuda.h").write_text("// stub\n")
        cpp = td / "k.cpp"
        cpp.write_text(_EMU_HEADER + src + launcher)
        so = td / "k.so"
        cxx = shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise BqcError("emulate_kernel needs a host C++ compiler (g++)")
        proc = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-w", f"-I{td}",
                               "-D__CUDACC_VER_MAJOR__=12", "-D__CUDACC_VER_MINOR__=0", "-o", str(so), str(cpp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BqcError(f"emulate_kernel: the CUDA source does not compile as C++:\n{proc.stderr[-4000:]}")
        lib = ctypes.CDLL(str(so))
        ptrs = (ctypes.c_void_p * len(pnames))(*[arrays[n].ctypes.data for n in pnames])
        lib.bqc_launch(ptrs)
    return outs
