"""Test harness: run the CUDA C that TVM generates for one bqc kernel on the CPU (no GPU).

Moved out of the library (``bqc.backends.tvm.cuda`` keeps the build, PTX and export that
``bqc lower --backend tvm-cuda`` needs); used by tests/test_cuda_build.py. :func:`emulate_kernel`
compiles the kernel's generated source as C++ with a small emulation layer (one std::thread per
CUDA thread, blocks one after another, ``__popc``, ``__syncthreads`` and the warp-collective b1
``mma.sync`` emulated per the PTX fragment layout) and runs it on numpy inputs: the numerics of
the CUDA schedules (``bqc.backends.tvm.schedules.cuda``) are checked here, not on a device.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bqc.backends.tvm.cuda import DEFAULT_ARCH, build_cuda, cuda_source
from bqc.errors import BqcError

__all__ = ["emulate_kernel"]

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
