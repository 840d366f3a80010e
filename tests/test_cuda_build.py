"""CUDA build of the binary kernels without a GPU: the CUDA source uses `__popc`, nvcc turns it
into PTX with `popc.b32`, and the module exports (to be JIT-compiled on a GPU machine).

nvcc is needed for the PTX test: without it that test FAILS with a clear message unless
BQC_SKIP_CUDA=1. A last test runs the kernels on a GPU when one is present (skipped otherwise).
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from bqc import packing as P  # noqa: E402
from bqc.backends.tvm import cuda  # noqa: E402
from bqc.backends.tvm.schedules import cuda as S  # noqa: E402
from bqc.errors import BqcError  # noqa: E402
from cuda_emulator import emulate_kernel  # noqa: E402

# the kernel builders and reference cases are shared with the ARM tests
from test_arm import (  # noqa: E402
    LANES,
    bitpack_kernel,
    conv_inputs,
    conv_kernel,
    dense_inputs,
    dense_kernel,
    int8_conv_kernel,
    int8_dense_kernel,
    tie_inputs,
)

DENSE = dict(m=8, k=512, n=64)
CONV = dict(n=1, c=128, h=8, w=8, oc=32, kh=3, stride=1, pad=1)


def _module(arch="sm_80"):
    funcs = {
        "bdense": S.schedule_binary_dense(dense_kernel(**DENSE)),
        "bconv": S.schedule_binary_conv2d(conv_kernel(**CONV)),
        "bitpack": S.schedule_bitpack(bitpack_kernel(1, 70, 8, 8)),
        "i8conv": S.schedule_int8_conv2d(int8_conv_kernel(**CONV)),
        "bdense_mma": S.binary_dense_mma(DENSE["m"], DENSE["k"], DENSE["n"], form=S.mma_form(arch)),
    }
    return tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def cuda_build(request):
    return request.param, cuda.build_cuda(_module(request.param), request.param)


def _require_nvcc():
    if os.environ.get("BQC_SKIP_CUDA") == "1":
        pytest.skip("BQC_SKIP_CUDA=1: nvcc tests skipped")
    try:
        return cuda.find_nvcc()
    except BqcError as e:
        pytest.fail(f"{e}")


def test_cuda_source_uses_popc_and_thread_binding(cuda_build):
    _, ex = cuda_build
    src = cuda.cuda_source(ex)
    for name in ("bdense", "bconv"):
        m = re.search(rf'void __launch_bounds__\(\d+\) {name}_kernel\([^;{{]*\)\s*{{.*?\n}}\n', src, re.S)
        assert m, f"no CUDA kernel {name}_kernel"
        body = m.group(0)
        assert "__popc(" in body, f"{name}: no __popc in the CUDA source"
        assert "threadIdx.x" in body and "blockIdx.x" in body
        assert "acc_local" in body, f"{name}: accumulator is not thread-local"
    assert re.search(r"__global__ void __launch_bounds__\(\d+\) i8conv_kernel", src)
    assert re.search(r"__global__ void __launch_bounds__\(\d+\) bitpack_kernel", src)


def test_cuda_ptx_has_popc(cuda_build):
    _require_nvcc()
    arch, ex = cuda_build
    ev = cuda.popcount_evidence(ex, arch)
    assert ev["source"], "no __popc in the CUDA source"
    assert ev["ptx"] and all(re.search(r"popc\.b(32|64)", ln) for ln in ev["ptx"]), "no popc.b32/.b64 in the PTX"
    assert ev["ptx_target"] == [f".target {arch}"]
    # the tensor-core kernel: XOR-popc on sm_80, AND-popc on sm_90
    form = S.mma_form(arch)
    mma = [ln for ln in cuda.compile_ptx(ex, arch).splitlines() if "mma.sync" in ln]
    assert mma and all(f"m16n8k128.row.col.s32.b1.b1.s32.{form}.popc" in ln for ln in mma), mma[:2]


def test_cuda_fatbin_compiles(cuda_build):
    """ptxas accepts the kernels too (SASS for the arch)."""
    _require_nvcc()
    arch, ex = cuda_build
    assert len(cuda.compile_fatbin(ex, arch)) > 1000


def test_cuda_export_without_gpu(cuda_build, tmp_path):
    _, ex = cuda_build
    lib = cuda.export_cuda_library(ex, tmp_path / "kernels.so")
    data = lib.read_bytes()
    assert lib.stat().st_size > 0
    # the device code travels as CUDA source (JIT-compiled when loaded on a GPU machine)
    assert b"bconv_kernel" in data and b"__popc" in data


# Shapes whose reduction is a single step (1x1 conv / dense whose input fits one packed word,
# int8 with one 4-channel group): the CUDA schedule used to fail on them (IndexError in
# _acc_under_thread: compute_at leaves no reduction loop), and whole-model lowerings fell back
# to float for these layers (tiny bidm: the 1x1 convs [2, 32 -> 96 / 32, 16x1]).
SINGLE_STEP = [
    ("binary_conv2d", (2, 32, 96, 16, 1), dict(kernel_size=1, stride=1, padding=0)),
    ("binary_conv2d", (2, 32, 32, 16, 1), dict(kernel_size=1, stride=1, padding=0)),
    ("binary_conv2d", (1, 20, 24, 5, 3), dict(kernel_size=1, stride=1, padding=0)),
    ("binary_dense", (1, 8, 8), {}),
    ("binary_dense", (3, 32, 40), {}),
    ("binary01_conv2d", (2, 32, 96, 16, 1), dict(kernel_size=1, stride=1, padding=0)),  # {0, 1} activations
    ("binary01_dense", (3, 32, 40), {}),
    ("int8_conv2d", (2, 3, 16, 4, 1), dict(kernel_size=1, stride=1, padding=0)),
    ("int8_conv2d", (1, 4, 8, 3, 3), dict(kernel_size=3, stride=1, padding=1)),
    ("int8_dense", (1, 4, 8), {}),
    ("int8_dense", (2, 1, 1), {}),
]


def test_cuda_single_step_reduction_shapes_build():
    """Every kernel builder schedules and builds for cuda (no GPU) on single-step reductions;
    the binary kernels' CUDA source uses __popc with thread-local accumulators."""
    from bqc.backends.tvm.kernels import build as B

    target = cuda.cuda_target("sm_80")
    funcs = {}
    for i, (kind, args, kw) in enumerate(SINGLE_STEP):
        funcs[f"k{i}"] = getattr(B, f"{kind}_primfunc")(*args, target=target, name=f"k{i}", **kw)
    src = cuda.cuda_source(cuda.build_cuda(tvm.IRModule(funcs), "sm_80"))
    for i, (kind, _, _) in enumerate(SINGLE_STEP):
        m = re.search(rf'void __launch_bounds__\(\d+\) k{i}_kernel\([^;{{]*\)\s*{{.*?\n}}\n', src, re.S)
        assert m, f"no CUDA kernel k{i}_kernel ({kind})"
        assert "acc_local" in m.group(0), f"k{i} ({kind}): accumulator is not thread-local"
        if kind.startswith("binary"):
            assert "__popc(" in m.group(0), f"k{i} ({kind}): no __popc in the CUDA source"


EMU_CASES = [
    ("bconv", dict(n=2, c=70, h=9, w=7, oc=16, kh=3, stride=2, pad=1)),
    ("bconv", dict(n=1, c=64, h=6, w=6, oc=40, kh=3, stride=1, pad=1)),
    ("bconv", dict(n=2, c=32, h=4, w=1, oc=40, kh=1, stride=1, pad=0)),  # single-step reduction
    ("bdense", dict(m=5, k=100, n=40)),
    ("bdense", dict(m=1, k=20, n=24)),  # single-step reduction
    ("bconv01", dict(n=2, c=70, h=9, w=7, oc=16, kh=3, stride=2, pad=1)),  # {0, 1} activation bits
    ("bconv01", dict(n=2, c=32, h=4, w=1, oc=40, kh=1, stride=1, pad=0)),
    ("bdense01", dict(m=5, k=100, n=40)),
    ("bitpack01", dict(n=2, c=70, h=5, w=6)),  # the x / step == 0.5 tie and its neighbours
    ("i8conv", dict(n=1, c=70, h=5, w=5, oc=40, kh=3, stride=1, pad=1)),
    ("i8conv", dict(n=1, c=3, h=4, w=2, oc=24, kh=1, stride=1, pad=0)),  # single-step reduction
    ("i8dense", dict(m=5, k=100, n=40)),
    ("i8dense", dict(m=2, k=3, n=20)),  # single-step reduction
    ("imatmul", dict(bt=2, m=3, k=1100, n=40)),  # K > 1024: exact int32 accumulation
    ("bitpack", dict(n=2, c=70, h=5, w=6)),
    ("quantize", dict(n=1, c=70, h=5, w=6)),
    ("mma_xor", dict(m=20, k=200, n=40)),
    ("mma_and", dict(m=20, k=200, n=40)),
]


def _emu_case(kind, case, seed):
    rng = np.random.default_rng(seed)
    if kind == "bconv":
        inputs, ref = conv_inputs(seed=seed, **case)
        return S.schedule_binary_conv2d(conv_kernel(**case)), inputs, ref
    if kind in ("bconv01", "bdense01"):
        conv = kind == "bconv01"
        inputs, ref = (conv_inputs if conv else dense_inputs)(seed=seed, **case, unsigned=True)
        sched = S.schedule_binary_conv2d if conv else S.schedule_binary_dense
        return sched((conv_kernel if conv else dense_kernel)(**case, unsigned=True)), inputs, ref
    if kind == "bitpack01":
        inputs, ref = tie_inputs(seed=seed, **case)
        return S.schedule_bitpack(bitpack_kernel(**case, unsigned=True)), inputs, ref
    if kind == "bdense":
        inputs, ref = dense_inputs(seed=seed, **case)
        return S.schedule_binary_dense(dense_kernel(**case)), inputs, ref
    if kind.startswith("mma_"):
        inputs, ref = dense_inputs(seed=seed, **case)
        return S.binary_dense_mma(case["m"], case["k"], case["n"], form=kind[4:]), inputs, ref
    if kind == "i8conv":
        q = rng.integers(-8, 8, (case["n"], case["c"], case["h"], case["w"]))
        w = rng.choice([-1, 1], (case["oc"], case["c"], case["kh"], case["kh"]))
        ref = P.ref_w1ak_conv2d(q, w, case["stride"], case["pad"])
        return S.schedule_int8_conv2d(int8_conv_kernel(**case)), [P.pack_codes(q), P.block_oc_int8(w), P.int8_bias(w)], ref
    if kind == "i8dense":
        q, w = rng.integers(-8, 8, (case["m"], case["k"])), rng.choice([-1, 1], (case["n"], case["k"]))
        return (S.schedule_int8_dense(int8_dense_kernel(case["m"], case["k"], case["n"])),
                [P.pack_codes(q), P.block_oc_int8(w), P.int8_bias(w)], P.ref_w1ak_dense(q, w))
    if kind == "imatmul":
        from bqc.backends.tvm.kernels.build import int_matmul_primfunc

        a = rng.integers(-128, 128, (case["bt"], case["m"], case["k"]), dtype=np.int8)
        b = rng.integers(-128, 128, (case["bt"], case["k"], case["n"]), dtype=np.int8)
        a[0, 0], b[0, :, 0] = -128, -128  # one output at K * 2^14 > 2^24
        func = int_matmul_primfunc(case["bt"], case["m"], case["k"], case["n"], target=cuda.cuda_target(),
                                   with_scale=False)
        return func, [a, b], np.matmul(a.astype(np.int64), b.astype(np.int64)).astype(np.int32)
    if kind == "bitpack":
        x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(np.float32)
        tau = (0.1 * rng.standard_normal(case["c"])).astype(np.float32)
        return S.schedule_bitpack(bitpack_kernel(**case)), [x, tau], P.pack_activations(x, tau)
    if kind == "quantize":
        from tvm import te

        from bqc.backends.tvm.kernels.int8 import quantize_u8

        x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(np.float32)
        scale = np.array([0.37], np.float32)
        xp, sp = te.placeholder(x.shape, "float32", name="x"), te.placeholder((1,), "float32", name="scale")
        func = te.create_prim_func([xp, sp, quantize_u8(xp, sp, bits=4)])
        q = np.clip(np.round(x / scale[0]), -8, 7).astype(np.int32)
        return S.schedule_quantize(func), [x, scale], P.pack_codes(q)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,case", EMU_CASES, ids=[f"{k}{i}" for i, (k, _) in enumerate(EMU_CASES)])
def test_cuda_kernels_emulated_on_cpu(kind, case):
    """The generated CUDA C, run on the CPU (one std::thread per CUDA thread, the b1 mma.sync
    emulated per the PTX fragment layout), equals bqc.packing's numpy reference."""
    func, inputs, ref = _emu_case(kind, case, seed=len(kind) + sum(case.values()))
    arch = "sm_90" if kind == "mma_and" else "sm_80"
    (got,) = emulate_kernel(func, inputs, [ref.shape], [ref.dtype], arch=arch)
    np.testing.assert_array_equal(got, ref)


def test_mma_form_by_arch():
    assert S.mma_form("sm_80") == "xor" and S.mma_form("sm_86") == "xor" and S.mma_form("sm_90") == "and"
    with pytest.raises(ValueError):
        S.mma_form("sm_100")


def test_bad_arch_is_a_bqc_error():
    with pytest.raises(BqcError, match="arch"):
        cuda.cuda_target("ampere")


def test_jit_compile_is_bqcs_own_nvcc_callback(cuda_build):
    """The load-time compile callback bqc registers (it needs TVM's runtime only): nvcc turns a
    build's CUDA source into a fatbin for the named arch, with no fast math; nvcc's errors
    become a BqcError that carries them."""
    import tvm_ffi

    _require_nvcc()
    arch, ex = cuda_build
    fatbin = cuda.jit_compile(cuda.cuda_source(ex), arch)
    assert fatbin[:4] == bytes.fromhex("50ed55ba")  # the fatbin magic
    assert "--use_fast_math" not in cuda.JIT_FLAGS
    cuda._register_jit(arch)
    assert bytes(tvm_ffi.get_global_func("tvm_callback_cuda_compile")(cuda.cuda_source(ex))) == fatbin
    with pytest.raises(BqcError, match="nvcc failed"):
        cuda.jit_compile("this is not CUDA", arch)


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cuda, "_CUDA_HOMES", ())
    with pytest.raises(BqcError, match="nvcc") as e:
        cuda.find_nvcc()
    assert "BQC_SKIP_CUDA" in str(e.value)


def _have_gpu() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


@pytest.mark.skipif(not _have_gpu(), reason="no CUDA GPU here (build-only checks and the CPU emulation above still ran)")
def test_cuda_kernels_on_gpu(tmp_path):
    """On a GPU machine: every emulated case, exported, loaded (JIT-compiled) and run on the GPU."""
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "")
    try:
        form = S.mma_form(arch)
    except ValueError:
        form = None
    for i, (kind, case) in enumerate(EMU_CASES):
        if kind.startswith("mma_") and kind[4:] != form:
            continue
        func, inputs, ref = _emu_case(kind, case, seed=len(kind) + sum(case.values()))
        ex = cuda.build_cuda(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), arch)
        lib = cuda.load_cuda_library(cuda.export_cuda_library(ex, tmp_path / f"k{i}.so"))
        args = [tvm.runtime.tensor(a, dev) for a in inputs] + [tvm.runtime.tensor(np.zeros(ref.shape, ref.dtype), dev)]
        lib["k"](*args)
        np.testing.assert_array_equal(args[-1].numpy(), ref, err_msg=f"{kind}{i} on {arch}")
