"""Test harness: run aarch64 code built by bqc on this (x86) machine under qemu.

Moved out of the library (``bqc.backends.tvm.arm`` keeps the target and the cross export that
``bqc lower --backend tvm-arm`` needs). Used by tests/armenv.py, test_arm.py, test_bundle.py,
test_text2img_lower.py, and by ``.ci/arm_setup.sh``, which installs the cross compiler
(``aarch64-linux-gnu-gcc``) and ``qemu-aarch64-static``, fills the ARM cache dir
(``$BQC_ARM_ROOT``, default ``~/.cache/bqc/arm64``) and runs this file's self-tests:
``python3 tests/qemu.py [build-runner [--force] | selftest | selftest-vm]``. Two ways to run:

* :func:`run_under_qemu` (kernels route) runs one kernel (a ``prim_func`` called
  destination-passing style, e.g. ``te.create_prim_func`` output; also any kernel of a Relax
  executable). A TVM-exported library is an ordinary ELF shared object whose kernels are
  TVM-FFI "safe call" functions (``__tvm_ffi_<name>``) reaching the runtime through a few
  context function pointers (``__TVMBackendParallelLaunch``, workspace allocation, error
  reporting). A small runner (C source below, compiled for aarch64 against the TVM-FFI C
  headers, cached by :func:`ensure_runner`) ``dlopen``s the library, fills those pointers with
  its own implementations (a pthread parallel launch with barriers, aligned workspaces), reads
  the inputs from raw files, calls the kernel with DLTensor arguments and writes the outputs
  back, under ``qemu-aarch64-static -L /usr/aarch64-linux-gnu`` (the cross glibc): no arm64
  root or aarch64 Python needed, ~0.2 s a call.
* :func:`run_vm_under_qemu` (full route) runs a whole Relax VM executable with TVM's real
  aarch64 runtime: python3.11 of an arm64 Debian root (debootstrap) with the aarch64 wheels of
  apache-tvm (runtime library only), apache-tvm-ffi and numpy; a few seconds a call. It loads
  the library with :func:`bqc.run.load_vm`, the loader a bundle's ``run.py`` uses on a board;
  :func:`run_python_under_qemu` runs any script there (a bundle's ``run.py``, end to end).

Emulated timings mean nothing; numerics are the real aarch64 ones.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Sequence

import numpy as np

from bqc.backends.tvm import arm
from bqc.backends.tvm.arm import SETUP_HINT, SYSROOT, arm_target, export_arm_library, inspect_asm
from bqc.errors import BqcError

QEMU = "qemu-aarch64-static"

__all__ = [
    "arm_root",
    "check_arm_run_env",
    "ensure_runner",
    "run_under_qemu",
    "check_arm_vm_env",
    "run_python_under_qemu",
    "run_vm_under_qemu",
    "selftest",
    "selftest_vm",
]


# --------------------------------------------------------------------------- environment

def arm_root() -> Path:
    """The ARM cache dir: ``$BQC_ARM_ROOT`` or ``~/.cache/bqc/arm64``."""
    env = os.environ.get("BQC_ARM_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bqc" / "arm64"


def check_arm_run_env() -> None:
    """Raise :class:`BqcError` naming ``.ci/arm_setup.sh`` unless aarch64 code can be exported
    (:func:`bqc.backends.tvm.arm.check_arm_env`) and run here (natively or under qemu)."""
    arm.check_arm_env()
    _require_qemu(SETUP_HINT)


def _require_qemu(hint: str) -> None:
    if not arm._native() and not shutil.which(QEMU):
        raise BqcError(f"`{QEMU}` is not installed, so aarch64 code cannot run here", hint=hint)


# --------------------------------------------------------------------------- runner

_RUNNER_C = r"""
/* bqc aarch64 kernel runner: loads a TVM-exported library and calls one kernel.
 * usage: runner LIB FUNC NTHREADS ARG...
 *   ARG = t,<code>,<bits>,<lanes>,<d0>x<d1>x...|-,<file>   DLTensor (input read / output written
 *                                                          per the next flag), <file> raw bytes
 *   flags: ti = input tensor, to = output tensor, ai = int64 scalar (<file> is the value),
 *          af = float64 scalar
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tvm/ffi/c_api.h>

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static char g_err[8192];
static int g_nthreads = 1;

__attribute__((visibility("default"))) void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* msg) {
  snprintf(g_err, sizeof(g_err), "%s: %s", kind, msg);
}
__attribute__((visibility("default"))) void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  size_t off = (size_t)snprintf(g_err, sizeof(g_err), "%s: ", kind);
  for (int32_t i = 0; i < n && off < sizeof(g_err); ++i)
    off += (size_t)snprintf(g_err + off, sizeof(g_err) - off, "%s", parts[i]);
}
static void* alloc_ws(int dev_type, int dev_id, uint64_t nbytes, int code, int bits) {
  (void)dev_type; (void)dev_id; (void)code; (void)bits;
  void* p = NULL;
  if (posix_memalign(&p, 64, nbytes ? nbytes : 1) != 0) return NULL;
  return p;
}
static int free_ws(int dev_type, int dev_id, void* ptr) { (void)dev_type; (void)dev_id; free(ptr); return 0; }

typedef struct { FTVMParallelLambda f; void* cdata; TVMParallelGroupEnv* env; int id; int ret; } Task;
static void* task_main(void* arg) { Task* t = (Task*)arg; t->ret = t->f(t->id, t->env, t->cdata); return NULL; }
static int parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  if (num_task <= 0) num_task = g_nthreads;
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, (unsigned)num_task);
  TVMParallelGroupEnv env = {&bar, num_task};
  Task* tasks = (Task*)calloc((size_t)num_task, sizeof(Task));
  pthread_t* th = (pthread_t*)calloc((size_t)num_task, sizeof(pthread_t));
  for (int i = 0; i < num_task; ++i) {
    tasks[i] = (Task){f, cdata, &env, i, 0};
    if (i > 0) pthread_create(&th[i], NULL, task_main, &tasks[i]);
  }
  task_main(&tasks[0]);
  int ret = tasks[0].ret;
  for (int i = 1; i < num_task; ++i) { pthread_join(th[i], NULL); if (tasks[i].ret) ret = tasks[i].ret; }
  pthread_barrier_destroy(&bar);
  free(tasks); free(th);
  return ret;
}
static int parallel_barrier(int task_id, TVMParallelGroupEnv* env) {
  (void)task_id; pthread_barrier_wait((pthread_barrier_t*)env->sync_handle); return 0;
}
static pthread_mutex_t g_once = PTHREAD_MUTEX_INITIALIZER;
static int handle_init_once(void** addr, int (*init)(void**)) {
  int ret = 0;
  pthread_mutex_lock(&g_once);
  if (*addr == NULL) ret = init(addr);
  pthread_mutex_unlock(&g_once);
  return ret;
}
static int function_call(void* f, TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  (void)f; (void)a; (void)n; (void)r;
  TVMFFIErrorSetRaisedFromCStr("RuntimeError", "bqc runner: packed function calls are not supported");
  return -1;
}
static int lookup_imports(void* ctx, const char* name, void** out) {
  (void)ctx; (void)out;
  char buf[512]; snprintf(buf, sizeof(buf), "bqc runner: cannot look up imported function %s", name);
  TVMFFIErrorSetRaisedFromCStr("RuntimeError", buf);
  return -1;
}

static void set_ctx(void* lib, const char* name, void* fn) {
  void** slot = (void**)dlsym(lib, name);
  if (slot) *slot = fn;
}

static int64_t parse_shape(const char* s, int64_t* shape) {
  if (strcmp(s, "-") == 0) return 0;
  int n = 0; char* end = (char*)s;
  while (*end) { shape[n++] = strtoll(end, &end, 10); if (*end == 'x') ++end; }
  return n;
}

int main(int argc, char** argv) {
  if (argc < 4) { fprintf(stderr, "usage: %s LIB FUNC NTHREADS ARG...\n", argv[0]); return 2; }
  g_nthreads = atoi(argv[3]); if (g_nthreads < 1) g_nthreads = 1;
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) { fprintf(stderr, "bqc runner: dlopen failed: %s\n", dlerror()); return 3; }
  set_ctx(lib, "__TVMFFIFunctionCall", (void*)function_call);
  set_ctx(lib, "__TVMFFIErrorSetRaisedFromCStr", (void*)TVMFFIErrorSetRaisedFromCStr);
  set_ctx(lib, "__TVMFFIEnvModLookupFromImports", (void*)lookup_imports);
  set_ctx(lib, "__TVMFFIHandleInitOnce", (void*)handle_init_once);
  set_ctx(lib, "__TVMBackendAllocWorkspace", (void*)alloc_ws);
  set_ctx(lib, "__TVMBackendFreeWorkspace", (void*)free_ws);
  set_ctx(lib, "__TVMBackendParallelLaunch", (void*)parallel_launch);
  set_ctx(lib, "__TVMBackendParallelBarrier", (void*)parallel_barrier);
  char sym[512]; snprintf(sym, sizeof(sym), "__tvm_ffi_%s", argv[2]);
  TVMFFISafeCallType fn = (TVMFFISafeCallType)dlsym(lib, sym);
  if (!fn) { fprintf(stderr, "bqc runner: function %s not found in %s\n", argv[2], argv[1]); return 4; }

  int nargs = argc - 4;
  TVMFFIAny* args = (TVMFFIAny*)calloc((size_t)nargs + 1, sizeof(TVMFFIAny));
  DLTensor* tens = (DLTensor*)calloc((size_t)nargs + 1, sizeof(DLTensor));
  int64_t* shapes = (int64_t*)calloc((size_t)nargs * 16 + 1, sizeof(int64_t));
  size_t* nbytes = (size_t*)calloc((size_t)nargs + 1, sizeof(size_t));
  char** files = (char**)calloc((size_t)nargs + 1, sizeof(char*));
  char* kinds = (char*)calloc((size_t)nargs + 1, 1);
  for (int i = 0; i < nargs; ++i) {
    char* spec = strdup(argv[4 + i]);
    char* f[7]; int nf = 0; char* save = NULL;
    for (char* tok = strtok_r(spec, ",", &save); tok && nf < 7; tok = strtok_r(NULL, ",", &save)) f[nf++] = tok;
    if (nf == 2 && (strcmp(f[0], "ai") == 0 || strcmp(f[0], "af") == 0)) {
      if (f[0][1] == 'i') { args[i].type_index = kTVMFFIInt; args[i].v_int64 = strtoll(f[1], NULL, 10); }
      else { args[i].type_index = kTVMFFIFloat; args[i].v_float64 = strtod(f[1], NULL); }
      kinds[i] = 's';
      continue;
    }
    if (nf != 6 || (strcmp(f[0], "ti") && strcmp(f[0], "to"))) { fprintf(stderr, "bqc runner: bad argument %s\n", argv[4 + i]); return 2; }
    kinds[i] = f[0][1];
    DLTensor* t = &tens[i];
    t->device.device_type = kDLCPU; t->device.device_id = 0;
    t->dtype.code = (uint8_t)atoi(f[1]); t->dtype.bits = (uint8_t)atoi(f[2]); t->dtype.lanes = (uint16_t)atoi(f[3]);
    t->shape = &shapes[i * 16];
    t->ndim = (int32_t)parse_shape(f[4], t->shape);
    size_t n = (size_t)((t->dtype.bits * t->dtype.lanes + 7) / 8);
    for (int d = 0; d < t->ndim; ++d) n *= (size_t)t->shape[d];
    nbytes[i] = n; files[i] = f[5];
    if (posix_memalign(&t->data, 64, n ? n : 1) != 0) { fprintf(stderr, "bqc runner: out of memory\n"); return 5; }
    memset(t->data, 0, n);
    if (kinds[i] == 'i') {
      FILE* fp = fopen(f[5], "rb");
      if (!fp || fread(t->data, 1, n, fp) != n) { fprintf(stderr, "bqc runner: cannot read %zu bytes from %s\n", n, f[5]); return 5; }
      fclose(fp);
    }
    args[i].type_index = kTVMFFIDLTensorPtr; args[i].v_ptr = t;
  }
  TVMFFIAny result; memset(&result, 0, sizeof(result)); result.type_index = kTVMFFINone;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  int rc = fn(NULL, args, nargs, &result);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  if (rc != 0) { fprintf(stderr, "bqc runner: kernel %s failed: %s\n", argv[2], g_err); return 6; }
  for (int i = 0; i < nargs; ++i) {
    if (kinds[i] != 'o') continue;
    FILE* fp = fopen(files[i], "wb");
    if (!fp || fwrite(tens[i].data, 1, nbytes[i], fp) != nbytes[i]) { fprintf(stderr, "bqc runner: cannot write %s\n", files[i]); return 5; }
    fclose(fp);
  }
  printf("ok %s %.3f ms (emulated)\n", argv[2], (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) * 1e-6);
  return 0;
}
"""


def _runner_key() -> str:
    return hashlib.sha256(_RUNNER_C.encode()).hexdigest()[:16]


def runner_path(root: Path | None = None) -> Path:
    return (root or arm_root()) / f"bqc-arm-runner-{_runner_key()}"


def ensure_runner(root: Path | None = None, *, force: bool = False) -> Path:
    """Build (once, cached by source hash) the aarch64 runner into the ARM cache dir."""
    import tvm_ffi.libinfo

    root = root or arm_root()
    exe = runner_path(root)
    if exe.exists() and not force:
        return exe
    check_arm_run_env()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "bqc_arm_runner.c"
    src.write_text(_RUNNER_C)
    inc = Path(tvm_ffi.libinfo.find_include_path())
    tmp = exe.with_suffix(".tmp")
    cmd = [arm._cc(), "-O2", "-std=gnu11", f"-I{inc}", f"-I{inc / 'dlpack' / 'include'}", "-rdynamic",
           "-o", str(tmp), str(src), "-ldl", "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BqcError(f"building the aarch64 runner failed:\n{' '.join(cmd)}\n{proc.stderr}", hint=SETUP_HINT)
    os.replace(tmp, exe)
    return exe


# read-only, not a dict: tests/conftest.py empties the module-level `_UPPER` dicts of tests/ modules
_DL_CODES = MappingProxyType({"i": 0, "u": 1, "f": 2, "b": 6})


def _dl_dtype(dtype: np.dtype) -> tuple[int, int]:
    dtype = np.dtype(dtype)
    if dtype.kind not in _DL_CODES:
        raise BqcError(f"run_under_qemu: unsupported dtype {dtype}")
    return _DL_CODES[dtype.kind], dtype.itemsize * 8


def _shape_spec(shape) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "-"


def run_under_qemu(
    lib_path,
    func_name: str,
    inputs: Sequence[np.ndarray | int | float],
    out_shapes: Sequence[Sequence[int]],
    out_dtypes: Sequence,
    *,
    threads: int = 2,
    timeout: float = 600.0,
) -> list[np.ndarray]:
    """Run kernel ``func_name`` of an exported aarch64 library and return its outputs.

    The kernel is called destination-passing style, ``func(*inputs, *outputs)``, which is what
    ``te.create_prim_func([ins..., outs...])`` builds. Array inputs are passed as DLTensors
    (copied C-contiguous); Python ints/floats as scalars. On an aarch64 host it runs natively,
    elsewhere under ``qemu-aarch64-static``.
    """
    lib_path = Path(lib_path).resolve()
    if not lib_path.exists():
        raise BqcError(f"aarch64 library not found: {lib_path}")
    if len(out_shapes) != len(out_dtypes):
        raise BqcError("run_under_qemu: out_shapes and out_dtypes differ in length")
    exe = ensure_runner()
    with tempfile.TemporaryDirectory(prefix="bqc-arm-") as td:
        td = Path(td)
        specs: list[str] = []
        for i, x in enumerate(inputs):
            if isinstance(x, (bool, int, np.integer)):
                specs.append(f"ai,{int(x)}")
                continue
            if isinstance(x, (float, np.floating)):
                specs.append(f"af,{float(x)!r}")
                continue
            a = _c_array(x)
            code, bits = _dl_dtype(a.dtype)
            f = td / f"in{i}.bin"
            a.tofile(f)
            specs.append(f"ti,{code},{bits},1,{_shape_spec(a.shape)},{f}")
        outs = []
        for j, (shape, dt) in enumerate(zip(out_shapes, out_dtypes)):
            code, bits = _dl_dtype(np.dtype(dt))
            f = td / f"out{j}.bin"
            outs.append((f, tuple(int(d) for d in shape), np.dtype(dt)))
            specs.append(f"to,{code},{bits},1,{_shape_spec(shape)},{f}")
        cmd = [] if arm._native() else [shutil.which(QEMU) or QEMU, "-L", str(SYSROOT)]
        cmd += [str(exe), str(lib_path), func_name, str(int(threads)), *specs]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BqcError(f"aarch64 kernel {func_name} did not finish in {timeout:.0f} s under qemu") from e
        if proc.returncode != 0:
            raise BqcError(
                f"aarch64 kernel {func_name} failed under qemu (exit {proc.returncode}):\n{proc.stderr.strip()}",
                hint="check that the library was built for arm_target() and exported with export_arm_library()",
            )
        return [np.fromfile(f, dtype=dt).reshape(shape) for f, shape, dt in outs]


# --------------------------------------------------------------------------- full route: Relax VM

FULL_HINT = "run `bash .ci/arm_setup.sh` (without --kernels-only: it builds the arm64 Python root with TVM's aarch64 runtime)"

_VM_DRIVER = r"""
# bqc: run a Relax VM executable inside the arm64 root (aarch64 python + TVM runtime wheels)
import importlib.util, os, sys
run_py, lib, func, io_dir, n_in = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("bqc_run", run_py)
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)  # bqc/run.py: stdlib + numpy + the TVM runtime, as on a board
import numpy as np
call = R.load_vm(lib, func)
# np.load keeps 0-d inputs (the TBS flag) 0-d; load_vm copies them into aligned memory
outs = call([np.load(os.path.join(io_dir, f"in{i}.npy")) for i in range(int(n_in))])
for j, o in enumerate(outs):
    np.save(os.path.join(io_dir, f"out{j}.npy"), o)
print(f"ok {func}: {len(outs)} outputs")
"""


def vm_root(root: Path | None = None) -> Path:
    """The arm64 root file system (Debian bookworm, python3.11) of the full route."""
    return (root or arm_root()) / "rootfs"


def vm_site(root: Path | None = None) -> Path:
    """Where the aarch64 wheels (apache-tvm runtime, apache-tvm-ffi, numpy) are installed."""
    return (root or arm_root()) / "site"


def check_arm_vm_env(root: Path | None = None) -> None:
    """Raise :class:`BqcError` unless the arm64 Python root with TVM's aarch64 runtime exists."""
    _require_qemu(FULL_HINT)
    py = vm_root(root) / "usr" / "bin" / "python3.11"
    rt = vm_site(root) / "tvm" / "lib" / "libtvm_runtime.so"
    for f in (py, rt):
        if not f.exists():
            raise BqcError(f"the arm64 Python root is incomplete ({f} is missing)", hint=FULL_HINT)


def _c_array(x) -> np.ndarray:
    """``x`` as a C-contiguous numpy array of the same shape: 0-d arrays stay 0-d (the VM
    checks ranks; ``np.ascontiguousarray`` would turn a 0-d flag into shape ``(1,)``)."""
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tvm.runtime.Tensor, torch.Tensor
        x = x.numpy()
    return np.asarray(x, order="C")


def run_python_under_qemu(args: Sequence, *, timeout: float = 900.0, what: str = "aarch64 python") \
        -> subprocess.CompletedProcess:
    """Run ``python3.11 ARGS`` of the arm64 root (under qemu on x86) with the aarch64 wheels
    (apache-tvm runtime, apache-tvm-ffi, numpy) on its path, as a board with ``pip install
    apache-tvm numpy`` has them. Returns the finished process; BqcError on a timeout or failure."""
    check_arm_vm_env()
    root, site = vm_root(), vm_site()
    py = root / "usr" / "bin" / "python3.11"
    cmd = ([str(py)] if arm._native() else [shutil.which(QEMU) or QEMU, "-L", str(root), str(py)])
    cmd += ["-S", *map(str, args)]  # -S: no host site-packages; the wheels come from PYTHONPATH
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8",
           **{k: v for k, v in os.environ.items() if k in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise BqcError(f"{what} did not finish in {timeout:.0f} s under qemu") from e
    if proc.returncode != 0:
        raise BqcError(f"{what} failed under qemu (exit {proc.returncode}):\n{proc.stderr.strip()[-4000:]}")
    return proc


def run_vm_under_qemu(lib_path, inputs: Sequence[np.ndarray], *, func: str = "main",
                      timeout: float = 900.0) -> list[np.ndarray]:
    """Run function ``func`` of an exported aarch64 Relax VM executable; return its outputs.

    ``lib_path`` is ``export_arm_library(tvm.compile(relax_mod, arm_target()), path)``. The
    VM runs in the arm64 root under qemu with TVM's real aarch64 runtime, loaded by
    :func:`bqc.run.load_vm` (tuple outputs are flattened). Startup under emulation takes
    several seconds (numpy + tvm_ffi imports).
    """
    import bqc.run

    check_arm_vm_env()
    lib_path = Path(lib_path).resolve()
    if not lib_path.exists():
        raise BqcError(f"aarch64 library not found: {lib_path}")
    with tempfile.TemporaryDirectory(prefix="bqc-armvm-") as td:
        td = Path(td)
        drv = td / "driver.py"
        drv.write_text(_VM_DRIVER)
        for i, x in enumerate(inputs):
            np.save(td / f"in{i}.npy", _c_array(x))
        run_python_under_qemu([drv, bqc.run.__file__, lib_path, func, td, len(inputs)], timeout=timeout,
                              what=f"aarch64 VM function {func}")
        outs = sorted(td.glob("out*.npy"), key=lambda f: int(f.stem[3:]))
        return [np.load(f) for f in outs]


def _selftest_dense(m: int = 4, k: int = 100, n: int = 32, lanes: int = 16):
    """bqc's binary dense kernel with the NEON schedule, its inputs and numpy reference."""
    from tvm import te

    from bqc import packing as P
    from bqc.backends.tvm.kernels.binary import binary_dense
    from bqc.backends.tvm.schedules.arm import schedule_binary_dense

    kw = P.num_words(k)
    xp = te.placeholder((m, kw), "uint32", name="x")
    wp = te.placeholder((-(-n // lanes), kw, lanes), "uint32", name="w")
    func = schedule_binary_dense(te.create_prim_func([xp, wp, binary_dense(xp, wp, k, n)]))
    rng = np.random.default_rng(0)
    xb = P.pack_bits(rng.standard_normal((m, k)))
    wb = P.pack_dense_weights(rng.standard_normal((n, k)))
    return func.with_attr("global_symbol", "bqc_selftest_dense"), xb, P.block_oc(wb, lanes), P.ref_binary_dense(xb, wb, k)


def selftest() -> str:
    """bqc's binary dense for aarch64: NEON ``cnt`` in the asm, the qemu run equals numpy."""
    import tvm

    func, xb, wk, ref = _selftest_dense()
    ex = tvm.compile(tvm.IRModule({"bqc_selftest_dense": func}), arm_target(2))
    asm = inspect_asm(ex)
    if not any(line.split()[:1] == ["cnt"] and ".16b" in line for line in asm.splitlines()):
        raise BqcError("aarch64 self-test: the binary dense kernel's assembly has no NEON `cnt`")
    with tempfile.TemporaryDirectory(prefix="bqc-arm-selftest-") as td:
        lib = export_arm_library(ex, Path(td) / "selftest.so")
        (out,) = run_under_qemu(lib, "bqc_selftest_dense", [xb, wk], [ref.shape], [ref.dtype])
    if not np.array_equal(out, ref):
        raise BqcError("aarch64 self-test: kernel output differs from numpy")
    return "arm kernel self-test ok: NEON cnt in asm, qemu run matches numpy"


def selftest_vm() -> str:
    """A Relax VM executable (call_tir of the binary dense + an op) run in the arm64 root."""
    import tvm
    from tvm import relax

    func, xb, wk, ref = _selftest_dense()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(xb.shape, "uint32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(func, "bqc_selftest_dense")
            y = bb.emit(relax.call_tir(gv, [x, relax.const(wk)], relax.TensorType(ref.shape, "int32")))
            out = bb.emit_output(bb.emit(relax.op.multiply(y, relax.const(np.int32(3)))))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), arm_target(2))
    with tempfile.TemporaryDirectory(prefix="bqc-armvm-selftest-") as td:
        lib = export_arm_library(ex, Path(td) / "selftest_vm.so")
        (got,) = run_vm_under_qemu(lib, [xb])
    if not np.array_equal(got, 3 * ref):
        raise BqcError("aarch64 VM self-test: output differs from numpy")
    return "arm VM self-test ok: Relax VM executable ran in the arm64 root, matches numpy"


if __name__ == "__main__":  # used by .ci/arm_setup.sh
    import sys

    cmd = sys.argv[1] if len(sys.argv) > 1 else "build-runner"
    try:
        if cmd == "build-runner":
            print(ensure_runner(force="--force" in sys.argv))
        elif cmd == "selftest":
            print(selftest())
        elif cmd == "selftest-vm":
            print(selftest_vm())
        else:
            raise SystemExit("usage: python3 tests/qemu.py [build-runner [--force] | selftest | selftest-vm]")
    except BqcError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
