"""aarch64 (NEON) build of the binary kernels: assembly has `cnt`, and the kernels, run under
qemu, give exactly bqc.packing's numpy reference and the x86 build's outputs.

The run tests need the cross toolchain and qemu from `.ci/arm_setup.sh` (the VM tests also its
arm64 Python root); without them they SKIP with the reason (naming the script), unless
BQC_REQUIRE_ARM=1 (set by `.ci/run`, which runs the setup first), which makes a missing
environment a FAILURE. BQC_SKIP_ARM=1 skips them even when the environment is there. The
assembly test needs only TVM.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from bqc import packing as P  # noqa: E402
from bqc.backends.tvm import arm  # noqa: E402
from bqc.backends.tvm.schedules import arm as arm_sched  # noqa: E402
from bqc.errors import BqcError  # noqa: E402
from armenv import require_arm  # noqa: E402
import qemu  # noqa: E402

LANES = 16
DENSE_CASES = [dict(m=8, k=512, n=64), dict(m=3, k=200, n=48), dict(m=1, k=96, n=24)]
CONV_CASES = [
    dict(n=1, c=128, h=8, w=8, oc=32, kh=3, stride=1, pad=1),
    dict(n=2, c=70, h=9, w=7, oc=16, kh=3, stride=2, pad=1),
    dict(n=1, c=64, h=6, w=6, oc=48, kh=1, stride=1, pad=0),
    dict(n=1, c=32, h=5, w=6, oc=24, kh=3, stride=1, pad=1),
]


def dense_kernel(m, k, n, unsigned=False):
    """W1A1 dense; ``unsigned``: {0, 1} activation bits, with the ``base`` input."""
    from tvm import te

    from bqc.backends.tvm.kernels.binary import binary_dense

    nb = -(-n // LANES)
    x = te.placeholder((m, P.num_words(k)), "uint32", name="x")
    w = te.placeholder((nb, P.num_words(k), LANES), "uint32", name="w")
    base = te.placeholder((nb * LANES,), "int32", name="base") if unsigned else None
    return te.create_prim_func([x, w, *([base] if unsigned else []), binary_dense(x, w, k, n, base=base)])


def conv_kernel(n, c, h, w, oc, kh, stride, pad, unsigned=False):
    from tvm import te

    from bqc.backends.tvm.kernels.binary import binary_conv2d_nhwc, conv_geometry

    cw, ocb = P.num_words(c), -(-oc // LANES)
    x = te.placeholder((n, h, w, cw), "uint32", name="x")
    wt = te.placeholder((ocb, kh, kh, cw, LANES), "uint32", name="w")
    base = te.placeholder(conv_geometry(h, w, kh, kh, stride, pad)["table"] + (ocb * LANES,), "int32", name="base")
    out = binary_conv2d_nhwc(x, wt, base, c, oc, stride=stride, padding=pad, unsigned=unsigned)
    return te.create_prim_func([x, wt, base, out])


def _activation_bits(rng, shape, unsigned):
    """Packed activation bits along the last axis: signs of normal values, or ({0, 1} codes,
    ``unsigned``) the bits of ``round(clamp(x, 0, 1))``."""
    x = rng.standard_normal(shape).astype(np.float32)
    return P.pack_mask(P.unsigned_bits(x + 0.5, 1.0)) if unsigned else P.pack_bits(x)


def dense_inputs(m, k, n, seed, unsigned=False):
    rng = np.random.default_rng(seed)
    xb = _activation_bits(rng, (m, k), unsigned)
    wb = P.pack_dense_weights(rng.standard_normal((n, k)))
    extra = [P.weight_popcount(wb, LANES)] if unsigned else []
    return [xb, P.block_oc(wb, LANES), *extra], P.ref_binary_dense(xb, wb, k, unsigned=unsigned)


def conv_inputs(n, c, h, w, oc, kh, stride, pad, seed, unsigned=False):
    rng = np.random.default_rng(seed)
    xb = _activation_bits(rng, (n, h, w, c), unsigned)
    wt = rng.standard_normal((oc, c, kh, kh)).astype(np.float32)
    wb = P.pack_conv_weights(wt)
    base = P.conv_base_table(wb, c, h, w, stride=stride, padding=pad, lanes=LANES, unsigned=unsigned)
    ref = P.ref_binary_conv2d(xb, wb, c, stride=stride, padding=pad, unsigned=unsigned)
    return [xb, P.block_oc(wb, LANES), base], ref


def int8_conv_kernel(n, c, h, w, oc, kh, stride, pad):
    from tvm import te

    from bqc.backends.tvm.kernels.int8 import int8_conv2d_nhwc

    c4, ocb = -(-c // 4) * 4, -(-oc // LANES)
    x = te.placeholder((n, h, w, c4), "uint8", name="x")
    wt = te.placeholder((ocb, kh, kh, c4 // 4, LANES, 4), "int8", name="w")
    bias = te.placeholder((ocb * LANES,), "int32", name="bias")
    return te.create_prim_func([x, wt, bias, int8_conv2d_nhwc(x, wt, bias, oc, stride=stride, padding=pad)])


def int8_dense_kernel(m, k, n):
    from tvm import te

    from bqc.backends.tvm.kernels.int8 import int8_dense

    k4, nb = -(-k // 4) * 4, -(-n // LANES)
    x = te.placeholder((m, k4), "uint8", name="x")
    wt = te.placeholder((nb, k4 // 4, LANES, 4), "int8", name="w")
    bias = te.placeholder((nb * LANES,), "int32", name="bias")
    return te.create_prim_func([x, wt, bias, int8_dense(x, wt, bias, n)])


def int_matmul_kernel(bt, m, k, n):
    from tvm import te

    from bqc.backends.tvm.kernels.int8 import int_matmul

    a = te.placeholder((bt, m, k), "int8", name="a")
    b = te.placeholder((bt, k, n), "int8", name="b")
    return te.create_prim_func([a, b, int_matmul(a, b)])


def bitpack_kernel(n, c, h, w, unsigned=False):
    """The sign packer (input ``tau [C]``), or ``unsigned``: the {0, 1} packer (input ``step [1]``)."""
    from tvm import te

    from bqc.backends.tvm.kernels.binary import bitpack

    x = te.placeholder((n, c, h, w), "float32", name="x")
    if unsigned:
        step = te.placeholder((1,), "float32", name="step")
        return te.create_prim_func([x, step, bitpack(x, step=step)])
    tau = te.placeholder((c,), "float32", name="tau")
    return te.create_prim_func([x, tau, bitpack(x, tau)])


def tie_inputs(n, c, h, w, seed):
    """Float activations around the {0, 1} packer's tie (x / step == 0.5 and its float32
    neighbours, negatives, values > 1) and the step, with the reference bits."""
    rng = np.random.default_rng(seed)
    step = np.float32(0.75)
    half = np.float32(0.375)  # step / 2: x / step == 0.5 exactly
    special = np.array([half, np.nextafter(half, np.float32(1)), np.nextafter(half, np.float32(0)), -half,
                        0.0, step, 2 * step, -3.0], np.float32)
    x = rng.choice(special, (n, c, h, w)).astype(np.float32)
    return [x, np.array([step], np.float32)], P.pack_mask(P.unsigned_bits(x, step).transpose(0, 2, 3, 1))


def run_x86(func, inputs, ref):
    """The same kernel with the x86 schedule, built for this machine and run with the TVM runtime."""
    from bqc.backends.tvm.schedules import x86
    from bqc.backends.tvm.target import x86_target

    sched = x86.schedule_binary_dense if len(ref.shape) == 2 else x86.schedule_binary_conv2d
    ex = tvm.compile(tvm.IRModule({"main": sched(func, x86_target())}), x86_target())
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in inputs] + [tvm.runtime.tensor(np.zeros(ref.shape, ref.dtype), dev)]
    ex["main"](*args)
    return args[-1].numpy()


def _named(func, name):
    return func.with_attr("global_symbol", name)


@pytest.fixture(scope="module")
def arm_build():
    """All test kernels in one aarch64 build: ({name: (func, inputs, ref)}, Executable)."""
    funcs, cases = {}, {}
    for kind, unsigned in (("", False), ("01_", True)):  # ±1 and {0, 1} activation bits
        for i, case in enumerate(DENSE_CASES):
            name, func = f"bdense{kind}{i}", dense_kernel(**case, unsigned=unsigned)
            funcs[name] = arm_sched.schedule_binary_dense(func)
            cases[name] = (func, *dense_inputs(seed=i, **case, unsigned=unsigned))
        for i, case in enumerate(CONV_CASES):
            name, func = f"bconv{kind}{i}", conv_kernel(**case, unsigned=unsigned)
            funcs[name] = arm_sched.schedule_binary_conv2d(func)
            cases[name] = (func, *conv_inputs(seed=100 + i, **case, unsigned=unsigned))
    rng = np.random.default_rng(7)
    # W1Ak (4-bit codes x +-1 weights) through the int8 kernels
    cc = dict(n=1, c=70, h=6, w=6, oc=32, kh=3, stride=1, pad=1)
    q, w = rng.integers(-8, 8, (1, 70, 6, 6)), rng.choice([-1, 1], (32, 70, 3, 3))
    funcs["i8conv"] = arm_sched.schedule_int8_conv2d(int8_conv_kernel(**cc))
    cases["i8conv"] = (None, [P.pack_codes(q), P.block_oc_int8(w), P.int8_bias(w)], P.ref_w1ak_conv2d(q, w, 1, 1))
    q, w = rng.integers(-8, 8, (5, 100)), rng.choice([-1, 1], (40, 100))
    funcs["i8dense"] = arm_sched.schedule_int8_dense(int8_dense_kernel(5, 100, 40))
    cases["i8dense"] = (None, [P.pack_codes(q), P.block_oc_int8(w), P.int8_bias(w)], P.ref_w1ak_dense(q, w))
    # exact int32 matmul of codes (attention), K > 1024
    a, b = rng.integers(-128, 128, (2, 3, 1100), dtype=np.int8), rng.integers(-128, 128, (2, 1100, 20), dtype=np.int8)
    funcs["imatmul"] = arm_sched.schedule_int_matmul(int_matmul_kernel(2, 3, 1100, 20))
    cases["imatmul"] = (None, [a, b], np.matmul(a.astype(np.int64), b.astype(np.int64)).astype(np.int32))
    x = rng.standard_normal((2, 70, 5, 6)).astype(np.float32)
    tau = (0.1 * rng.standard_normal(70)).astype(np.float32)
    funcs["bitpack"] = arm_sched.schedule_bitpack(bitpack_kernel(2, 70, 5, 6))
    cases["bitpack"] = (None, [x, tau], P.pack_activations(x, tau))
    funcs["bitpack01"] = arm_sched.schedule_bitpack(bitpack_kernel(2, 70, 5, 6, unsigned=True))
    cases["bitpack01"] = (None, *tie_inputs(2, 70, 5, 6, seed=8))
    mod = tvm.IRModule({name: _named(f, name) for name, f in funcs.items()})
    return cases, tvm.compile(mod, arm.arm_target(num_cores=2))


def test_arm_asm_has_neon_cnt(arm_build):
    _, ex = arm_build
    asm = arm.inspect_asm(ex)
    assert re.search(r"\bcnt\s+v\d+\.16b", asm), "no NEON `cnt v.16b` in the aarch64 assembly"
    assert re.search(r"\buadalp\s+v\d+\.4s|\buaddlp\s+v\d+\.4s", asm), "popcounts are not pairwise-accumulated"
    assert "mtriple" not in asm  # plain text assembly
    # the popcount must not be scalarised: no scalar `cnt` through the general registers
    assert not re.search(r"\bcnt\s+[wx]\d+", asm)


@pytest.fixture(scope="module")
def arm_lib(arm_build, tmp_path_factory):
    require_arm()
    _, ex = arm_build
    return arm.export_arm_library(ex, tmp_path_factory.mktemp("arm") / "kernels.so")


@pytest.mark.parametrize("kind,count", [("bdense", len(DENSE_CASES)), ("bconv", len(CONV_CASES)),
                                        ("bdense01_", len(DENSE_CASES)), ("bconv01_", len(CONV_CASES))])
def test_arm_kernels_match_reference_and_x86(arm_build, arm_lib, kind, count):
    cases, _ = arm_build
    for i in range(count):
        name = f"{kind}{i}"
        func, inputs, ref = cases[name]
        (got,) = qemu.run_under_qemu(arm_lib, name, inputs, [ref.shape], [ref.dtype])
        np.testing.assert_array_equal(got, ref, err_msg=f"{name}: aarch64 output differs from numpy")
        np.testing.assert_array_equal(got, run_x86(func, inputs, ref), err_msg=f"{name}: aarch64 differs from x86")


def test_arm_int8_matmul_and_bitpack_match_reference(arm_build, arm_lib):
    cases, _ = arm_build
    for name in ("i8conv", "i8dense", "imatmul", "bitpack", "bitpack01"):
        _, inputs, ref = cases[name]
        (got,) = qemu.run_under_qemu(arm_lib, name, inputs, [ref.shape], [ref.dtype])
        np.testing.assert_array_equal(got, ref, err_msg=f"{name}: aarch64 output differs from numpy")


def test_arm_relax_vm_with_binary_conv(arm_build, tmp_path):
    """A Relax VM executable (call_tir of the NEON binary conv + a float epilogue) run by TVM's
    real aarch64 runtime in the arm64 root (the full route of .ci/arm_setup.sh)."""
    require_arm(vm=True)
    from tvm import relax

    cases, _ = arm_build
    func, (xb, wk, base), ref = cases["bconv0"]
    scale = np.linspace(0.5, 1.5, ref.shape[-1]).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(xb.shape, "uint32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(_named(arm_sched.schedule_binary_conv2d(func), "bconv"), "bconv")
            acc = bb.emit(relax.call_tir(gv, [x, relax.const(wk), relax.const(base)], relax.TensorType(ref.shape, "int32")))
            y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale)))
            out = bb.emit_output(bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2])))
        bb.emit_func_output(out)
    lib = arm.export_arm_library(tvm.compile(bb.get(), arm.arm_target(2)), tmp_path / "vm.so")
    (got,) = qemu.run_vm_under_qemu(lib, [xb])
    np.testing.assert_array_equal(got, (ref.astype(np.float32) * scale).transpose(0, 3, 1, 2))


def test_arm_vm_keeps_0d_inputs(tmp_path):
    """run_vm_under_qemu passes a 0-d input (the TBS flag of bidm models) as 0-d: the VM checks
    ranks, and np.ascontiguousarray would make it shape (1,)."""
    require_arm(vm=True)
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    flag = relax.Var("flag", relax.TensorType((), "float32"))
    with bb.function("main", [x, flag]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.multiply(x, flag), relax.const(np.float32(1))))
            out = bb.emit_output(bb.emit(relax.op.multiply(flag, relax.const(np.float32(3)))))
            y = bb.emit_output(y)
        bb.emit_func_output(relax.Tuple([y, out]))
    lib = arm.export_arm_library(tvm.compile(bb.get(), arm.arm_target(2)), tmp_path / "flag.so")
    xs = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1]  # not C-contiguous either
    got_y, got_f = qemu.run_vm_under_qemu(lib, [xs, np.array(2.0, np.float32)])
    np.testing.assert_array_equal(got_y, xs * 2 + 1)
    assert got_f.shape == () and float(got_f) == 6.0


def test_arm_runner_reports_kernel_errors(arm_lib):
    with pytest.raises(BqcError, match="not found"):
        qemu.run_under_qemu(arm_lib, "no_such_kernel", [], [], [])
    bad = np.zeros((3, 1), np.uint32)  # wrong shape: the kernel's own argument check fails
    with pytest.raises(BqcError, match="argument #"):
        qemu.run_under_qemu(arm_lib, "bdense0", [bad, bad], [(3, 1)], [np.int32])


def test_missing_toolchain_names_setup_script(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-gcc, no qemu
    monkeypatch.setattr(arm, "_native", lambda: False)
    for check in (arm.check_arm_env, qemu.check_arm_run_env):  # export (library), export + run (harness)
        with pytest.raises(BqcError) as e:
            check()
        assert ".ci/arm_setup.sh" in str(e.value)
