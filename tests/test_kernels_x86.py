"""bqc's TVM kernels on x86: integer outputs EQUAL the numpy reference and torch, on the
Cascade Lake target (AVX-512, VNNI) and on generic LLVM; the W1Ak kernels also on x86-64-v3
(their AVX2 ``vpmaddubsw`` route; tests/test_targets.py runs every route and the v3 builds
under an emulated CPU without AVX-512).

Compiled kernels are cached per shape and target for the session (``build_*`` is memoised),
and hypothesis examples are few, so the file runs in about a minute on 2 cores.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

tvm = pytest.importorskip("tvm")

from bqc import packing as P  # noqa: E402
from bqc.backends.tvm import kernels as K  # noqa: E402
from bqc.backends import hostcpu  # noqa: E402
from bqc.backends.tvm.target import generic_target, has_vnni, kernel_route, x86_target  # noqa: E402

TARGETS = {"cascadelake": x86_target(2), "generic": generic_target()}
# the W1Ak kernels' AVX2 route (x86-64-v3), run where this CPU has AVX2
W1AK_TARGETS = dict(TARGETS, **({"x86-64-v3": x86_target(2, "x86-64-v3")}
                                if hostcpu.host_features().get("avx2") else {}))
SETTINGS = settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def torch_conv_nhwc(x, w, stride, padding):
    y = torch.conv2d(torch.as_tensor(np.asarray(x), dtype=torch.float64),
                     torch.as_tensor(np.asarray(w), dtype=torch.float64), stride=stride, padding=padding)
    return y.numpy().transpose(0, 2, 3, 1).astype(np.int32)


conv_shapes = st.tuples(
    st.integers(1, 2),                                  # batch
    st.sampled_from([1, 7, 31, 32, 33, 45, 64, 70]),    # in channels (not multiples of 32 too)
    st.sampled_from([1, 5, 16, 20, 33]),                # out channels (not multiples of 16 too)
    st.integers(1, 9), st.integers(1, 9),               # H, W
    st.sampled_from([1, 3]),                            # kernel
    st.sampled_from([1, 2]),                            # stride
    st.sampled_from([0, 1]),                            # padding
    st.integers(0, 2**31 - 1),                          # data seed
)


def _valid(h, w, k, p):
    return h + 2 * p >= k and w + 2 * p >= k


def test_targets():
    assert has_vnni(TARGETS["cascadelake"])
    assert not has_vnni(TARGETS["generic"])
    assert kernel_route(x86_target(2, "x86-64-v3"), "w1ak") == "avx2"


@pytest.mark.parametrize("tname", list(TARGETS))
@SETTINGS
@given(case=conv_shapes)
def test_binary_conv2d_exact(tname, case):
    n, c, oc, h, w, k, s, p, seed = case
    if not _valid(h, w, k, p):
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0.0
    wt = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    xb, wb = P.pack_activations(x), P.pack_conv_weights(wt)
    kern = K.build_binary_conv2d(n, c, oc, h, w, k, s, p, target=TARGETS[tname])
    got = kern(xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, P.ref_binary_conv2d(xb, wb, c, s, p))
    np.testing.assert_array_equal(got, torch_conv_nhwc(P.sign(x), P.sign(wt), s, p))


@pytest.mark.parametrize("tname", list(W1AK_TARGETS))
@SETTINGS
@given(case=conv_shapes, bits=st.sampled_from([2, 4, 8]))
def test_w1ak_conv2d_exact(tname, case, bits):
    n, c, oc, h, w, k, s, p, seed = case
    if not _valid(h, w, k, p):
        return
    rng = np.random.default_rng(seed)
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, c, h, w))
    wt = rng.standard_normal((oc, c, k, k))
    ws = P.sign(wt)
    kern = K.build_w1ak_conv2d(n, c, oc, h, w, k, s, p, target=W1AK_TARGETS[tname])
    got = kern(P.pack_codes(q), P.block_oc_int8(ws), P.int8_bias(ws))
    np.testing.assert_array_equal(got, P.ref_w1ak_conv2d(q, wt, s, p))
    np.testing.assert_array_equal(got, torch_conv_nhwc(q, ws, s, p))


@pytest.mark.parametrize("tname", list(TARGETS))
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_shapes)
def test_int8_conv2d_exact(tname, case):
    """8-bit head/tail layers: int8 codes x int8 weights, same kernel family."""
    n, c, oc, h, w, k, s, p, seed = case
    if not _valid(h, w, k, p):
        return
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (n, c, h, w))
    w8 = rng.integers(-128, 128, (oc, c, k, k))
    kern = K.build_int8_conv2d(n, c, oc, h, w, k, s, p, target=TARGETS[tname])
    got = kern(P.pack_codes(q), P.block_oc_int8(w8), P.int8_bias(w8))
    np.testing.assert_array_equal(got, P.ref_int_conv2d(q, w8, s, p))
    np.testing.assert_array_equal(got, torch_conv_nhwc(q, w8, s, p))


dense_shapes = st.tuples(st.integers(1, 9), st.sampled_from([1, 31, 32, 33, 100, 512]),
                         st.sampled_from([1, 16, 20, 48]), st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("tname", list(W1AK_TARGETS))
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=dense_shapes)
def test_binary_and_w1ak_dense_exact(tname, case):
    m, kf, nf, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, kf))
    wt = rng.standard_normal((nf, kf))
    ws = P.sign(wt)
    exact = P.sign(x).astype(np.int64) @ ws.astype(np.int64).T
    kern = K.build_binary_dense(m, kf, nf, target=W1AK_TARGETS[tname])
    got = kern(P.pack_bits(x), P.block_oc(P.pack_dense_weights(wt)))
    np.testing.assert_array_equal(got, P.ref_binary_dense(P.pack_bits(x), P.pack_dense_weights(wt), kf))
    np.testing.assert_array_equal(got, exact)
    q = rng.integers(-8, 8, (m, kf))
    kern = K.build_w1ak_dense(m, kf, nf, target=W1AK_TARGETS[tname])
    got = kern(P.pack_codes(q), P.block_oc_int8(ws), P.int8_bias(ws))
    np.testing.assert_array_equal(got, P.ref_w1ak_dense(q, wt))
    np.testing.assert_array_equal(got, q @ ws.astype(np.int64).T)


@pytest.mark.parametrize("tname", list(TARGETS))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@settings(max_examples=5, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.tuples(st.integers(1, 2), st.sampled_from([1, 31, 32, 37, 64]), st.integers(1, 6),
                       st.integers(1, 19)), seed=st.integers(0, 2**31 - 1))
def test_bitpack_kernel(tname, layout, shape, seed):
    n, c, h, w = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    tau = (0.3 * rng.standard_normal(c)).astype(np.float32)
    x[0, 0, 0, 0] = -tau[0]  # x + tau == 0 exactly -> bit 1
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    kern = K.build_bitpack(n, c, h, w, layout=layout, target=TARGETS[tname])
    np.testing.assert_array_equal(kern(xin, tau), P.pack_activations(x, tau))
    kern = K.build_bitpack(n, c, h, w, layout=layout, with_tau=False, target=TARGETS[tname])
    np.testing.assert_array_equal(kern(xin), P.pack_activations(x))


@pytest.mark.parametrize("tname", list(TARGETS))
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_shapes)
def test_binary01_conv2d_exact(tname, case):
    """{0, 1} activation bits (DoReFa W1A1) on the XNOR conv kernel with ``out = base - acc``:
    equal to conv2d(q, sign(W)) with zero padding (padded taps and pad bits cancel)."""
    n, c, oc, h, w, k, s, p, seed = case
    if not _valid(h, w, k, p):
        return
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2, (n, c, h, w))
    wt = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    xb, wb = P.pack_mask(q.transpose(0, 2, 3, 1) == 1), P.pack_conv_weights(wt)
    kern = K.build_binary_conv2d(n, c, oc, h, w, k, s, p, target=TARGETS[tname], unsigned=True)
    got = kern(xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p, unsigned=True))
    np.testing.assert_array_equal(got, torch_conv_nhwc(q, P.sign(wt), s, p))
    np.testing.assert_array_equal(got, P.ref_binary_conv2d(xb, wb, c, s, p, unsigned=True))


@pytest.mark.parametrize("tname", list(TARGETS))
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=dense_shapes)
def test_binary01_dense_exact(tname, case):
    m, kf, nf, seed = case
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2, (m, kf))
    wt = rng.standard_normal((nf, kf))
    wb = P.pack_dense_weights(wt)
    kern = K.build_binary_dense(m, kf, nf, target=TARGETS[tname], unsigned=True)
    got = kern(P.pack_mask(q == 1), P.block_oc(wb), P.weight_popcount(wb))
    np.testing.assert_array_equal(got, q @ P.sign(wt).astype(np.int64).T)
    # the fused float epilogue (what the lowering calls) on the same accumulators
    scale, bias = rng.standard_normal(nf).astype(np.float32), np.zeros(nf, np.float32)
    kern = K.build_binary_dense(m, kf, nf, target=TARGETS[tname], unsigned=True, epilogue="scale_bias")
    np.testing.assert_array_equal(kern(P.pack_mask(q == 1), P.block_oc(wb), P.weight_popcount(wb), scale, bias),
                                  got.astype(np.float32) * scale)


@pytest.mark.parametrize("tname", list(TARGETS))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bitpack01_kernel_tie(tname, layout):
    """The {0, 1} packer: bit 1 iff round_half_even(clamp(x / step, 0, 1)) == 1, bit-exact with
    the reference executor at x / step == 0.5 (code 0), its float32 neighbours, negatives, > 1."""
    from bqc.deploy import unsigned_pack
    from test_arm import tie_inputs

    (x, step), want = tie_inputs(2, 37, 3, 19, seed=5)
    x[0, :4, 0, 0] = [0.375, np.nextafter(np.float32(0.375), np.float32(1)), 1.5, -0.0]
    want = P.pack_mask(P.unsigned_bits(x, step[0]).transpose(0, 2, 3, 1))
    ref = P.words_numpy(unsigned_pack(torch.from_numpy(x), torch.tensor(float(step[0]), dtype=torch.float64), 1))
    np.testing.assert_array_equal(ref, want)
    assert want[0, 0, 0, 0] & 0xF == 0b0110  # 0.5 -> 0, next above -> 1, 2 -> 1, -0 -> 0
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    kern = K.build_bitpack(*x.shape, layout=layout, target=TARGETS[tname], unsigned=True)
    np.testing.assert_array_equal(kern(xin, step), want)


@pytest.mark.parametrize("tname", list(TARGETS))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_kernel(tname, bits):
    rng = np.random.default_rng(bits)
    x = (3 * rng.standard_normal((2, 37, 5, 6))).astype(np.float32)
    scale = np.array([0.25], np.float32)
    x[0, 0, 0, :4] = [0.125, 0.375, -0.125, -0.375]  # exact .5 ties: round half to even
    qn, qp = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.clamp(torch.round(torch.tensor(x) / float(scale[0])), qn, qp).numpy().astype(np.int32)
    kern = K.build_quantize(x.shape, bits, target=TARGETS[tname])
    np.testing.assert_array_equal(kern(x, scale), P.pack_codes(q))
    xd = (3 * rng.standard_normal((7, 37))).astype(np.float32)
    qd = torch.clamp(torch.round(torch.tensor(xd) / float(scale[0])), qn, qp).numpy().astype(np.int32)
    kern = K.build_quantize(xd.shape, bits, target=TARGETS[tname])
    np.testing.assert_array_equal(kern(xd, scale), P.pack_codes(qd))


@pytest.mark.parametrize("tname", list(TARGETS))
def test_unet_shapes_exact(tname):
    """A UNet-sized layer of each kind (multiples of the word size, 3x3 pad 1, stride 2 too)."""
    rng = np.random.default_rng(0)
    for (c, oc, hw, s) in [(128, 128, 8, 1), (128, 256, 8, 2)]:
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        wt = rng.standard_normal((oc, c, 3, 3)).astype(np.float32)
        xb, wb = P.pack_activations(x), P.pack_conv_weights(wt)
        kern = K.build_binary_conv2d(1, c, oc, hw, hw, 3, s, 1, target=TARGETS[tname])
        got = kern(xb, P.block_oc(wb), P.conv_base_table(wb, c, hw, hw, s, 1))
        np.testing.assert_array_equal(got, torch_conv_nhwc(P.sign(x), P.sign(wt), s, 1))
        q = rng.integers(-8, 8, x.shape)
        kern = K.build_w1ak_conv2d(1, c, oc, hw, hw, 3, s, 1, target=TARGETS[tname])
        got = kern(P.pack_codes(q), P.block_oc_int8(P.sign(wt)), P.int8_bias(P.sign(wt)))
        np.testing.assert_array_equal(got, torch_conv_nhwc(q, P.sign(wt), s, 1))


def test_simple_popcount_schedule_exact():
    """The plain (non-Harley-Seal) schedule, the starting point for other CPU targets."""
    rng = np.random.default_rng(3)
    n, c, oc, h, w, k, s, p = 2, 45, 20, 6, 7, 3, 2, 1
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((oc, c, k, k))
    xb, wb = P.pack_activations(x), P.pack_conv_weights(wt)
    for tname in TARGETS:
        kern = K.build_binary_conv2d(n, c, oc, h, w, k, s, p, target=TARGETS[tname], microkernel="popcount")
        got = kern(xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p))
        np.testing.assert_array_equal(got, P.ref_binary_conv2d(xb, wb, c, s, p))
        kd = K.build_binary_dense(3, 70, 20, target=TARGETS[tname], microkernel="popcount")
        xd, wd = rng.standard_normal((3, 70)), rng.standard_normal((20, 70))
        np.testing.assert_array_equal(kd(P.pack_bits(xd), P.block_oc(P.pack_dense_weights(wd))),
                                      P.ref_binary_dense(P.pack_bits(xd), P.pack_dense_weights(wd), 70))


def test_primfuncs_are_opaque_named_and_run_in_relax():
    from tvm import relax

    tgt = TARGETS["cascadelake"]
    n, c, oc, h, w = 1, 40, 20, 6, 6
    bp = K.bitpack_primfunc(n, c, h, w, target=tgt)
    bc = K.binary_conv2d_primfunc(n, c, oc, h, w, 3, 1, 1, target=tgt)
    for f in (bp, bc):
        assert int(f.attrs["op_pattern"]) == K.OP_PATTERN_OPAQUE
        assert str(f.attrs["global_symbol"]).startswith("bqc_")
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((oc, c, 3, 3)).astype(np.float32)
    tau = (0.1 * rng.standard_normal(c)).astype(np.float32)
    wb = P.pack_conv_weights(wt)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, c, h, w), "float32"))
    with bb.function("main", [x]):
        gp = bb.add_func(bp, str(bp.attrs["global_symbol"]))
        gc = bb.add_func(bc, str(bc.attrs["global_symbol"]))
        with bb.dataflow():
            xb = bb.emit(relax.call_tir(gp, [x, relax.const(tau)],
                                        relax.TensorType((n, h, w, P.num_words(c)), "uint32")))
            y = bb.emit(relax.call_tir(gc, [xb, relax.const(P.block_oc(wb)),
                                            relax.const(P.conv_base_table(wb, c, h, w, 1, 1))],
                                       relax.TensorType((n, h, w, oc), "int32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=tgt)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xin = rng.standard_normal((n, c, h, w)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xin)).numpy()
    np.testing.assert_array_equal(got, P.ref_binary_conv2d(P.pack_activations(xin, tau), wb, c, 1, 1))


def test_bad_shapes_rejected():
    from tvm import te

    from bqc.backends.tvm.kernels import binary

    x = te.placeholder((1, 4, 4, 2), "uint32")
    w = te.placeholder((1, 3, 3, 1, 16), "uint32")
    base = te.placeholder((2, 2, 2, 2, 16), "int32")
    with pytest.raises(ValueError):
        binary.binary_conv2d_nhwc(x, w, base, 64, 16, 1, 1)
    with pytest.raises(NotImplementedError):
        K.binary_conv2d_primfunc(1, 32, 16, 4, 4, target=tvm.target.Target({"kind": "c"}))


@pytest.mark.parametrize("tname", list(TARGETS))
def test_fused_float_epilogue(tname):
    """``epilogue="scale_bias[_kmap]"``: float32 = exact int * scale[oc] (* kmap) + bias[oc]."""
    rng = np.random.default_rng(5)
    n, c, oc, h, w, k, s, p = 2, 40, 20, 5, 6, 3, 1, 1
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((oc, c, k, k))
    scale = rng.random(oc).astype(np.float32)
    bias = rng.standard_normal(oc).astype(np.float32)
    kmap = rng.random((n, h, w)).astype(np.float32)
    xb, wb = P.pack_activations(x), P.pack_conv_weights(wt)
    exact = P.ref_binary_conv2d(xb, wb, c, s, p).astype(np.float32)
    b_in = (xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p))
    kern = K.build_binary_conv2d(n, c, oc, h, w, k, s, p, target=TARGETS[tname], epilogue="scale_bias_kmap")
    got = kern(*b_in, scale, bias, kmap)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, exact * scale * kmap[..., None] + bias, rtol=1e-6, atol=1e-5)
    q = rng.integers(-8, 8, (n, c, h, w))
    ws = P.sign(wt)
    kern = K.build_w1ak_conv2d(n, c, oc, h, w, k, s, p, target=TARGETS[tname], epilogue="scale_bias")
    got = kern(P.pack_codes(q), P.block_oc_int8(ws), P.int8_bias(ws), scale, bias)
    np.testing.assert_allclose(got, P.ref_w1ak_conv2d(q, wt, s, p) * scale + bias, rtol=1e-6, atol=1e-5)
    xd, wd = rng.standard_normal((3, 70)), rng.standard_normal((oc, 70))
    kd = K.build_binary_dense(3, 70, oc, target=TARGETS[tname], epilogue="scale_bias")
    got = kd(P.pack_bits(xd), P.block_oc(P.pack_dense_weights(wd)), scale, bias)
    ref = P.ref_binary_dense(P.pack_bits(xd), P.pack_dense_weights(wd), 70) * scale + bias
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    kq = K.build_w1ak_dense(3, 70, oc, target=TARGETS[tname], epilogue="scale_bias")
    qd = rng.integers(-8, 8, (3, 70))
    got = kq(P.pack_codes(qd), P.block_oc_int8(P.sign(wd)), P.int8_bias(P.sign(wd)), scale, bias)
    np.testing.assert_allclose(got, P.ref_w1ak_dense(qd, wd) * scale + bias, rtol=1e-6, atol=1e-5)


def test_microkernel_auto_choice():
    from bqc.backends.tvm.schedules.x86 import pick_microkernel

    assert pick_microkernel(TARGETS["cascadelake"]) == "harley-seal"
    assert pick_microkernel(TARGETS["generic"]) == "harley-seal"
    assert pick_microkernel(x86_target(1, mcpu="icelake-server")) == "popcount"
    with pytest.raises(ValueError):
        pick_microkernel(TARGETS["generic"], "nope")


@pytest.mark.skipif(not hostcpu.host_features().get("avx512vpopcntdq"), reason="host CPU lacks AVX-512 VPOPCNTDQ")
def test_icelake_vpopcnt_build_exact():
    rng = np.random.default_rng(11)
    n, c, oc, h, w, k, s, p = 1, 70, 20, 5, 6, 3, 2, 1
    x, wt = rng.standard_normal((n, c, h, w)), rng.standard_normal((oc, c, k, k))
    xb, wb = P.pack_activations(x), P.pack_conv_weights(wt)
    kern = K.build_binary_conv2d(n, c, oc, h, w, k, s, p, target=x86_target(1, mcpu="icelake-server"))
    got = kern(xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p))
    np.testing.assert_array_equal(got, P.ref_binary_conv2d(xb, wb, c, s, p))


def test_schedule_options_exact():
    """Non-default schedule knobs stay exact: Harley-Seal tile of 2 pixels (stride 2 too),
    fixed counter depths, int8 tiles that do not divide OW evenly fall back to divisors."""
    from tvm import te

    from bqc.backends.tvm.kernels import binary
    from bqc.backends.tvm.schedules import x86

    rng = np.random.default_rng(9)
    tgt = TARGETS["cascadelake"]
    for (n, c, oc, h, w, k, s, p, tile, depth) in [(1, 70, 20, 6, 8, 3, 2, 1, 2, None),
                                                    (2, 33, 16, 5, 6, 3, 1, 1, 2, 0),
                                                    (1, 64, 16, 4, 4, 1, 1, 0, 4, 6)]:
        x, wt = rng.standard_normal((n, c, h, w)), rng.standard_normal((oc, c, k, k))
        xb, wb = P.pack_activations(x), P.pack_conv_weights(wt)
        g = binary.conv_geometry(h, w, k, k, s, p)
        xs = te.placeholder(xb.shape, "uint32", name="x")
        ws = te.placeholder(P.block_oc(wb).shape, "uint32", name="w")
        base = te.placeholder(g["table"] + (P.block_oc(wb).shape[0] * 16,), "int32", name="base")
        func = te.create_prim_func([xs, ws, base, binary.binary_conv2d_nhwc(xs, ws, base, c, oc, s, p)])
        func = x86.schedule_binary_conv2d(func.with_attr("global_symbol", "t"), tgt, tile=tile,
                                          counter_depth=depth)
        kern = K.Kernel(func.with_attr("global_symbol", "t"), tgt)
        got = kern(xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p))
        np.testing.assert_array_equal(got, P.ref_binary_conv2d(xb, wb, c, s, p))
    q = rng.integers(-8, 8, (1, 20, 7, 7))
    w8 = rng.integers(-128, 128, (16, 20, 3, 3))
    kern = K.build_int8_conv2d(1, 20, 16, 7, 7, 3, 2, 1, target=tgt, tile=3)  # OW=4: tile 3 -> 2
    np.testing.assert_array_equal(kern(P.pack_codes(q), P.block_oc_int8(w8), P.int8_bias(w8)),
                                  P.ref_int_conv2d(q, w8, 2, 1))


@pytest.mark.parametrize("tname", list(TARGETS))
def test_int_matmul_exact_beyond_float32(tname):
    """Attention on codes: the int32 kernel is exact where a float32 matmul of the codes is
    not (K = 2048 with all codes -128: partial sums pass 2^24; one odd product makes the
    exact sum unrepresentable in float32)."""
    target = TARGETS[tname]
    a = np.full((2, 3, 2048), -128, np.int8)
    b = np.full((2, 2048, 20), -128, np.int8)
    a[0, 0, 5], b[0, 5, 0] = 1, 1
    exact = np.matmul(a.astype(np.int64), b.astype(np.int64))
    assert exact.max() > 2**24 and not np.array_equal(np.matmul(a.astype(np.float32), b.astype(np.float32)), exact)
    got = K.build_int_matmul(2, 3, 2048, 20, target=target, with_scale=False)(a, b)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, exact)
    # the scaled form rounds once, like the reference op (bqc.int_matmul: f32(acc) * scale)
    scale = np.array([0.0123], np.float32)
    from bqc import deploy as D

    want = D.int_matmul(torch.from_numpy(a), torch.from_numpy(b), torch.tensor(scale[0])).numpy()
    np.testing.assert_array_equal(K.build_int_matmul(2, 3, 2048, 20, target=target)(a, b, scale), want)


@pytest.mark.parametrize("tname", list(TARGETS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 100, 7), (2, 16, 64, 48)])
def test_int_matmul_random(tname, shape):
    bt, m, k, n = shape
    rng = np.random.default_rng(k)
    a = rng.integers(-128, 128, (bt, m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (bt, k, n), dtype=np.int8)
    got = K.build_int_matmul(bt, m, k, n, target=TARGETS[tname], with_scale=False)(a, b)
    np.testing.assert_array_equal(got, np.matmul(a.astype(np.int64), b.astype(np.int64)))
