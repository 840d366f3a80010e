"""bqc.packing: the bit-packed / int8 layouts and the exact numpy reference ops."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bqc import packing as P


def torch_conv_nhwc(x, w, stride, padding):
    """Exact torch conv (float64) of integer tensors, NCHW in -> NHWC int32 out."""
    y = torch.conv2d(torch.as_tensor(np.asarray(x), dtype=torch.float64),
                     torch.as_tensor(np.asarray(w), dtype=torch.float64), stride=stride, padding=padding)
    return y.numpy().transpose(0, 2, 3, 1).astype(np.int32)


def test_layout_constants():
    assert P.LAYOUT_VERSION == 1
    assert P.WORD_BITS == 32 and P.WORD_DTYPE == np.uint32
    assert P.ZERO_POINT == 128
    assert "LSB-first" in P.__doc__ and "NHWC" in P.__doc__


def test_sign_convention():
    assert P.sign(np.array([-1.0, -0.0, 0.0, 2.0])).tolist() == [-1, 1, 1, 1]
    assert P.sign(torch.tensor([-3.0, 0.0])).tolist() == [-1, 1]


def test_bit_order_lsb_first_and_pad_bits_zero():
    x = -np.ones(37)
    x[0] = 1.0   # channel 0 -> word 0 bit 0
    x[33] = 1.0  # channel 33 -> word 1 bit 1
    words = P.pack_bits(x)
    assert words.dtype == np.uint32 and words.shape == (2,)
    assert words.tolist() == [1, 2]
    ones = P.pack_bits(np.ones(37))
    assert ones.tolist() == [0xFFFFFFFF, (1 << 5) - 1]  # 5 valid bits in the last word, pad 0


@settings(max_examples=40, deadline=None, database=None)
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), axis_i=st.integers(0, 2),
       word_bits=st.sampled_from([8, 32, 64]), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(shape, axis_i, word_bits, seed):
    axis = axis_i % len(shape)
    x = np.random.default_rng(seed).standard_normal(shape)
    words = P.pack_bits(x, axis=axis, word_bits=word_bits)
    assert words.shape[axis] == P.num_words(shape[axis], word_bits)
    assert words.dtype.itemsize * 8 == word_bits
    back = P.unpack_bits(words, shape[axis], axis=axis)
    np.testing.assert_array_equal(back, P.sign(x))


def test_pack_accepts_torch_and_layouts():
    x = torch.randn(2, 5, 3, 4)
    a = P.pack_activations(x)
    b = P.pack_activations(x.permute(0, 2, 3, 1).numpy(), layout="NHWC")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 3, 4, 1)
    tau = torch.randn(5)
    np.testing.assert_array_equal(P.pack_activations(x, tau), P.pack_activations(x + tau[None, :, None, None]))
    w = torch.randn(7, 5, 3, 3)
    assert P.pack_conv_weights(w).shape == (7, 3, 3, 1)
    with pytest.raises(ValueError):
        P.pack_activations(x, layout="CHWN")


def test_block_oc_layout():
    w = np.random.default_rng(0).integers(0, 2**32, (20, 3, 3, 2), dtype=np.uint32)
    blk = P.block_oc(w, 16)
    assert blk.shape == (2, 3, 3, 2, 16)
    for oc in range(20):
        np.testing.assert_array_equal(blk[oc // 16, ..., oc % 16], w[oc])
    assert not blk[1, ..., 4:].any()  # missing output channels are zero words
    d = P.block_oc(w[:, 0, 0, :], 16)
    assert d.shape == (2, 2, 16)


def test_block_oc_int8_layout():
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, (20, 6, 3, 3))
    blk = P.block_oc_int8(w, 16)
    assert blk.shape == (2, 3, 3, 2, 16, 4) and blk.dtype == np.int8
    for oc in (0, 7, 19):
        for c in range(6):
            assert blk[oc // 16, 1, 2, c // 4, oc % 16, c % 4] == w[oc, c, 1, 2]
    assert not blk[0, :, :, 1, :, 2:].any()  # pad channels have weight 0
    dense = P.block_oc_int8(rng.integers(-1, 2, (5, 9)), 16)
    assert dense.shape == (1, 3, 16, 4)
    with pytest.raises(ValueError):
        P.block_oc_int8(np.array([[200]]))


def test_pack_codes():
    q = np.array([[[[-128]], [[127]], [[0]], [[-3]], [[5]]]])  # N=1, C=5, H=W=1
    u = P.pack_codes(q)
    assert u.dtype == np.uint8 and u.shape == (1, 1, 1, 8)
    assert u.ravel().tolist() == [0, 255, 128, 125, 133, 128, 128, 128]
    with pytest.raises(ValueError):
        P.pack_codes(np.array([[128]]))


conv_cases = st.tuples(
    st.integers(1, 2), st.sampled_from([1, 3, 31, 32, 33, 45, 70]), st.integers(1, 9),
    st.integers(1, 7), st.integers(1, 7), st.sampled_from([1, 3]), st.sampled_from([1, 2]),
    st.sampled_from([0, 1]), st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, database=None)
@given(case=conv_cases)
def test_ref_binary_conv2d_equals_torch(case):
    n, c, oc, h, w, k, s, p = case[:8]
    if h + 2 * p < k or w + 2 * p < k:
        return
    rng = np.random.default_rng(case[8])
    x = rng.standard_normal((n, c, h, w))
    x[rng.random(x.shape) < 0.05] = 0.0  # sign(0) = +1
    wt = rng.standard_normal((oc, c, k, k))
    ref = torch_conv_nhwc(P.sign(x), P.sign(wt), s, p)
    got = P.ref_binary_conv2d(P.pack_activations(x), P.pack_conv_weights(wt), c, s, p)
    np.testing.assert_array_equal(got, ref)
    # the kernels' formula: all taps over a 0-word-padded input, then the base table
    xb = P.pack_activations(x)
    wb = P.pack_conv_weights(wt)
    xp = np.pad(xb, ((0, 0), (p, p), (p, p), (0, 0)))
    full = P.ref_binary_conv2d(xp, wb, c, s, 0)  # counts padded taps as -1 activations
    acc = (k * k * c - full) // 2  # = sum over all taps of popcount(x ^ w)
    base = P.conv_base_table(wb, c, h, w, s, p, lanes=None)
    lo_h, hi_h = P.border_taps(h, k, s, p)
    lo_w, hi_w = P.border_taps(w, k, s, p)
    emul = base[lo_h[:, None], hi_h[:, None], lo_w[None, :], hi_w[None, :]][None] - 2 * acc
    np.testing.assert_array_equal(emul, ref)


@settings(max_examples=30, deadline=None, database=None)
@given(case=conv_cases, bits=st.integers(2, 8))
def test_ref_w1ak_and_int_conv2d_equal_torch(case, bits):
    n, c, oc, h, w, k, s, p = case[:8]
    if h + 2 * p < k or w + 2 * p < k:
        return
    rng = np.random.default_rng(case[8])
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, c, h, w))
    wt = rng.standard_normal((oc, c, k, k))
    np.testing.assert_array_equal(P.ref_w1ak_conv2d(q, wt, s, p), torch_conv_nhwc(q, P.sign(wt), s, p))
    w8 = rng.integers(-128, 128, (oc, c, k, k))
    np.testing.assert_array_equal(P.ref_int_conv2d(q, w8, s, p), torch_conv_nhwc(q, w8, s, p))
    # the int8 kernels' formula: codes + 128, padded with 128, plus the bias
    u = P.pack_codes(q).astype(np.int64)
    wi = P.sign(wt).astype(np.int64)
    cc = u.shape[-1]
    wi4 = np.zeros((oc, cc, k, k), np.int64)
    wi4[:, :c] = wi
    up = np.pad(u, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=128)
    acc = P.ref_int_conv2d(up, wi4, s, 0, layout="NHWC")
    np.testing.assert_array_equal(acc + P.int8_bias(wi, lanes=None), P.ref_w1ak_conv2d(q, wt, s, p))


@settings(max_examples=30, deadline=None, database=None)
@given(m=st.integers(1, 5), k=st.integers(1, 100), nf=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_ref_dense(m, k, nf, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((nf, k))
    exact = P.sign(x).astype(np.int64) @ P.sign(w).astype(np.int64).T
    np.testing.assert_array_equal(P.ref_binary_dense(P.pack_bits(x), P.pack_dense_weights(w), k), exact)
    q = rng.integers(-8, 8, (m, k))
    np.testing.assert_array_equal(P.ref_w1ak_dense(q, w), q @ P.sign(w).astype(np.int64).T)


@settings(max_examples=40, deadline=None, database=None)
@given(case=conv_cases)
def test_ref_binary_conv2d_unsigned_equals_torch(case):
    """{0, 1} activation bits x ±1 weights (DoReFa W1A1): the popcount reference equals the
    brute-force float conv with zero padding, and so does the kernels' formula (all taps over a
    0-word-padded input, ``base - acc`` with base = the weights' popcount in every border class)."""
    n, c, oc, h, w, k, s, p = case[:8]
    if h + 2 * p < k or w + 2 * p < k:
        return
    rng = np.random.default_rng(case[8])
    q = rng.integers(0, 2, (n, c, h, w))
    wt = rng.standard_normal((oc, c, k, k))
    ref = torch_conv_nhwc(q, P.sign(wt), s, p)
    xb, wb = P.pack_mask(q.transpose(0, 2, 3, 1) == 1), P.pack_conv_weights(wt)
    assert np.array_equal(P.unpack_bits(xb, c, unsigned=True), q.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(P.ref_binary_conv2d(xb, wb, c, s, p, unsigned=True), ref)
    xp = np.pad(xb, ((0, 0), (p, p), (p, p), (0, 0)))  # padded taps read 0 words (code 0)
    acc = P.weight_popcount(wb, lanes=None) - P.ref_binary_conv2d(xp, wb, c, s, 0, unsigned=True)
    base = P.conv_base_table(wb, c, h, w, s, p, lanes=None, unsigned=True)
    assert (base == P.weight_popcount(wb, lanes=None)).all()
    lo_h, hi_h = P.border_taps(h, k, s, p)
    lo_w, hi_w = P.border_taps(w, k, s, p)
    emul = base[lo_h[:, None], hi_h[:, None], lo_w[None, :], hi_w[None, :]][None] - acc
    np.testing.assert_array_equal(emul, ref)


@settings(max_examples=30, deadline=None, database=None)
@given(m=st.integers(1, 5), k=st.integers(1, 100), nf=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_ref_dense_unsigned(m, k, nf, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2, (m, k))
    w = rng.standard_normal((nf, k))
    got = P.ref_binary_dense(P.pack_mask(q == 1), P.pack_dense_weights(w), k, unsigned=True)
    np.testing.assert_array_equal(got, q @ P.sign(w).astype(np.int64).T)


def test_unsigned_bits_tie_and_neighbours():
    """Bit 1 iff round_half_even(clamp(x / step, 0, 1)) == 1 (torch's rounding: the DoReFa
    quantizer), i.e. iff x / step > 0.5: exactly 0.5 gives 0, its float32 successor 1."""
    for step in (1.0, 0.75, 0.3):
        s32 = np.float32(step)
        half = np.float32(0.5) * s32
        x = np.array([half, np.nextafter(half, np.float32(9)), np.nextafter(half, np.float32(-9)), -half, 0.0,
                      -0.0, s32, 3 * s32, -5.0, np.inf, -np.inf, np.nan], np.float32)
        want = torch.round(torch.clamp(torch.from_numpy(x) / torch.tensor(s32), 0, 1)).numpy() == 1
        got = P.unsigned_bits(x, step)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, (x / s32) > 0.5)
        assert got.tolist()[:2] == [bool(half / s32 > 0.5), True]
    assert not P.unsigned_bits(np.float32(0.5), 1.0) and P.unsigned_bits(np.nextafter(np.float32(0.5), 1), 1.0)


def test_border_taps():
    lo, hi = P.border_taps(5, 3, 2, 1)  # outputs 0..2 read rows -1..1, 1..3, 3..5
    assert lo.tolist() == [1, 0, 0] and hi.tolist() == [0, 0, 1]
    assert P.border_table_shape(5, 3, 2, 1) == (2, 2)
    assert P.border_table_shape(8, 1, 1, 0) == (1, 1)


def test_reference_errors():
    with pytest.raises(ValueError):
        P.ref_binary_conv2d(np.zeros((1, 2, 2, 1), np.uint32), np.zeros((1, 1, 1, 2), np.uint32), 32)
