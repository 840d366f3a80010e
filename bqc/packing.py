"""The bit-packed and int8 tensor layouts: THE one definition (exporter, kernels, tests).

Pure numpy (torch tensors are accepted as inputs); nothing here imports TVM.

Sign convention
---------------
``sign(v) = +1 if v >= 0 else -1`` (so ``sign(0) = +1``, unlike ``torch.sign``). A binarized
activation is ``sign(x + tau_c)`` with an optional per-input-channel threshold ``tau``.

Bit-packed layout, ``LAYOUT_VERSION = 1``
----------------------------------------
* Words are ``uint32`` (``WORD_BITS = 32``). Bits are packed along the *reduction* axis
  (input channels for conv, input features for dense), **LSB-first**: channel ``c`` lives
  in word ``c // 32``, bit ``c % 32`` (``(word >> (c % 32)) & 1``).
* Bit value 1 means +1, bit value 0 means -1.
* The last word is padded with **0 bits** when the channel count ``C`` is not a multiple of
  32; ``CW = ceil(C / 32)`` words. Kernels always take the true ``C`` as a parameter and
  never count pad bits (a pad bit is 0 in both operands, so it never shows up in ``a ^ w``).
* Activations (conv): **NHWC-packed** ``uint32[N, H, W, CW]`` (channels innermost).
  Activations (dense): ``uint32[M, KW]``, ``KW = ceil(K / 32)``.
* Weights (conv), canonical: ``uint32[OC, KH, KW, CW]`` (OHWI, input channels packed).
  Weights (dense), canonical: ``uint32[N, KW]``.
* Kernel weight layout (derived, :func:`block_oc`): output channels split into blocks of
  ``L`` lanes, lanes innermost: conv ``uint32[ceil(OC/L), KH, KW, CW, L]``, dense
  ``uint32[ceil(N/L), KW, L]``; the output channel ``oc`` is block ``oc // L`` lane
  ``oc % L``; missing output channels of the last block are all-zero words (their outputs
  are never written). x86 kernels use ``L = 16`` (one AVX-512 vector of uint32).
* Binary dot product: for ``K`` valid +-1 pairs, ``dot = K - 2 * popcount(a ^ w)``
  (equivalently ``2 * popcount(~(a ^ w) & mask) - K``).
* Unsigned 1-bit activations (input kind ``"bits01"``: DoReFa's 1-bit activation, codes
  ``q = round(clamp(x / s, 0, 1))`` in {0, 1}): the same words with bit 1 = code 1, bit 0 =
  code 0 (:func:`unsigned_bits`, :func:`pack_mask`); weights as above (bit 1 = +1). Per
  channel ``a * w = wb - [a != wb]``, so ``dot = popcount(w) - popcount(a ^ w)`` (the weight
  row's total popcount, :func:`weight_popcount`, minus the XNOR kernels' own accumulator).
  A zero-padded tap (activation words 0) adds ``popcount(w)`` to both terms and cancels, as
  do pad bits (0 in both operands): the conv kernels' base table is ``popcount(w[oc])`` in
  every border class (``conv_base_table(..., unsigned=True)``).
* Zero padding of a conv is *real zero* (a padded tap contributes 0, exactly like
  ``torch.conv2d(sign(x), sign(W), padding=p)``), not -1 or +1. Kernels compute every tap
  over an input padded with 0 words (as if padded with -1) and subtract, for each output
  position, the contribution of its padded taps: ``sum over padded taps of
  (C - 2 * popcount(w[oc, kh, kw, :]))``. The correction only depends on how many taps
  fall off the top/bottom (``lo_h, hi_h``) and left/right (``lo_w, hi_w``) of the input.
* Outputs of binary conv / dense kernels are exact ``int32`` in **NHWC**
  ``[N, OH, OW, OC]`` (dense ``[M, N]``); the float epilogue (per-channel scale, K map,
  bias) is applied afterwards.

k-bit activation (W1Ak) and int8 layout
---------------------------------------
* Activation codes are signed LSQ integers ``q`` in ``[-2^(k-1), 2^(k-1) - 1]`` (k = 2..8),
  stored one per byte as **uint8 ``q + 128``** (``ZERO_POINT = 128``) in NHWC
  ``uint8[N, H, W, C4]`` where ``C4 = 4 * ceil(C / 4)``; pad channels hold 128 (code 0).
  Dense: ``uint8[M, K4]``.
* Weights are int8: +-1 for W1Ak, any int8 code for 8-bit head/tail layers. Canonical conv
  weights ``int8[OC, KH, KW, C]`` (OHWI), dense ``int8[N, K]``. Kernel layout
  (:func:`block_oc_int8`): ``int8[ceil(OC/L), KH, KW, C4/4, L, 4]`` (dense
  ``int8[ceil(N/L), K4/4, L, 4]``): groups of 4 consecutive input channels innermost, the
  operand shape of AVX-512 VNNI ``vpdpbusd`` (u8 x s8, 4-way, int32 accumulate); pad
  channels and missing output channels have weight 0.
* Conv zero padding pads the uint8 input with 128 (code 0), so every tap computes
  ``sum (q + 128) * w`` and the result is ``acc - 128 * sum_{kh,kw,c} w[oc]``: a
  per-output-channel constant, no border case. Outputs are exact int32 NHWC.
"""
from __future__ import annotations

import numpy as np

LAYOUT_VERSION = 1
WORD_BITS = 32
WORD_DTYPE = np.uint32
ZERO_POINT = 128
INT8_GROUP = 4

__all__ = [
    "LAYOUT_VERSION", "WORD_BITS", "WORD_DTYPE", "ZERO_POINT", "INT8_GROUP",
    "sign", "num_words", "pack_bits", "pack_mask", "unpack_bits", "unsigned_bits", "weight_popcount",
    "pack_activations", "pack_conv_weights", "pack_dense_weights", "block_oc",
    "codes_to_u8", "pack_codes", "block_oc_int8", "conv_out_size",
    "ref_binary_conv2d", "ref_binary_dense", "ref_w1ak_conv2d", "ref_w1ak_dense",
    "ref_int_conv2d", "ref_int_dense", "border_taps", "border_table_shape",
    "conv_base_table", "int8_bias",
]


def _np(x) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def sign(x) -> np.ndarray:
    """+1 where ``x >= 0`` else -1, as int8 (the bqc sign: ``sign(0) = +1``)."""
    x = _np(x)
    return np.where(x >= 0, 1, -1).astype(np.int8)


def pair(v) -> tuple[int, int]:
    """(a, b) of a conv geometry argument (stride, padding, ...): an int, a pair, or a 1-element
    list (aten's conv2d accepts ``stride=[1]``)."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def words_numpy(t) -> np.ndarray:
    """Packed words (a numpy array or torch tensor of uint32, or int32 holding the same bits) as
    C-contiguous numpy uint32."""
    a = np.ascontiguousarray(_np(t))
    if a.dtype == np.uint32:
        return a
    if a.dtype == np.int32:
        return a.view(np.uint32)
    raise TypeError(f"packed words must be uint32 (or int32 bit patterns), got {a.dtype}")


def num_words(n: int, word_bits: int = WORD_BITS) -> int:
    """Words needed for ``n`` bits."""
    return (int(n) + word_bits - 1) // word_bits


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a conv axis (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def pack_bits(x, axis: int = -1, word_bits: int = WORD_BITS) -> np.ndarray:
    """Pack ``x >= 0`` (the sign of a real or +-1 tensor) along ``axis`` into words.

    LSB-first, bit 1 = +1, pad bits 0. The packed axis keeps its position and has length
    ``ceil(n / word_bits)``. ``word_bits`` is 32 (uint32, the layout) or 64 (uint64) or 8.
    """
    return pack_mask(_np(x) >= 0, axis, word_bits)


def pack_mask(bits, axis: int = -1, word_bits: int = WORD_BITS) -> np.ndarray:
    """Pack a boolean tensor (True = bit 1) along ``axis`` into words, as :func:`pack_bits`
    (which packs ``x >= 0``); unsigned activations pack ``unsigned_bits(x, step)``."""
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[word_bits]
    bits = np.moveaxis(np.asarray(_np(bits), bool), axis, -1)
    n = bits.shape[-1]
    nw = num_words(n, word_bits)
    pad = nw * word_bits - n
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    bits = bits.reshape(bits.shape[:-1] + (nw, word_bits)).astype(dtype)
    weights = (np.ones((), dtype) << np.arange(word_bits, dtype=dtype)).astype(dtype)
    words = (bits * weights).sum(axis=-1, dtype=dtype)  # disjoint bits: sum == or
    return np.moveaxis(words, -1, axis)


def unsigned_bits(x, step) -> np.ndarray:
    """The bits of unsigned 1-bit activations: ``round_half_even(clamp(x / step, 0, 1)) == 1``,
    computed in ``x``'s float dtype (step cast to it first), like the reference executor; that is
    ``x / step > 0.5`` (exactly 0.5 rounds to code 0; NaN gives 0)."""
    x = _np(x)
    q = np.round(np.clip(x / np.asarray(step, dtype=x.dtype), 0, 1))  # numpy rounds half to even
    return q == 1


def unpack_bits(words, n: int, axis: int = -1, unsigned: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_bits`: int8 +-1 values, ``n`` of them along ``axis`` (``unsigned``:
    the {0, 1} codes of unsigned activations)."""
    words = _np(words)
    word_bits = words.dtype.itemsize * 8
    w = np.moveaxis(words, axis, -1)
    shifts = np.arange(word_bits, dtype=w.dtype)
    bits = (w[..., None] >> shifts) & np.ones((), w.dtype)
    bits = bits.reshape(w.shape[:-1] + (w.shape[-1] * word_bits,))[..., :n]
    return np.moveaxis(np.where(bits == 1, 1, 0 if unsigned else -1).astype(np.int8), -1, axis)


def pack_activations(x, tau=None, layout: str = "NCHW") -> np.ndarray:
    """Float activations (NCHW or NHWC) -> packed ``uint32[N, H, W, CW]`` of sign(x + tau)."""
    x = _np(x).astype(np.float32, copy=False)
    if layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    elif layout != "NHWC":
        raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")
    if tau is not None:
        x = x + _np(tau).astype(np.float32).reshape(1, 1, 1, -1)
    return pack_bits(x, axis=-1)


def pack_conv_weights(w) -> np.ndarray:
    """Real or +-1 conv weights ``[OC, C, KH, KW]`` (torch OIHW) -> ``uint32[OC, KH, KW, CW]``."""
    return pack_bits(_np(w).transpose(0, 2, 3, 1), axis=-1)


def pack_dense_weights(w) -> np.ndarray:
    """Real or +-1 dense weights ``[N, K]`` (torch Linear) -> ``uint32[N, KW]``."""
    return pack_bits(_np(w), axis=-1)


def block_oc(w_bits, lanes: int = 16) -> np.ndarray:
    """Canonical packed weights ``[OC, ...]`` -> kernel layout ``[ceil(OC/L), ..., L]``.

    Conv ``[OC, KH, KW, CW] -> [OCB, KH, KW, CW, L]``, dense ``[N, KW] -> [NB, KW, L]``;
    missing output channels are zero words.
    """
    w = _np(w_bits)
    oc = w.shape[0]
    ocb = -(-oc // lanes)
    if ocb * lanes != oc:
        w = np.concatenate([w, np.zeros((ocb * lanes - oc,) + w.shape[1:], w.dtype)], axis=0)
    w = w.reshape((ocb, lanes) + w.shape[1:])
    return np.ascontiguousarray(np.moveaxis(w, 1, -1))


def codes_to_u8(q) -> np.ndarray:
    """Signed integer codes in [-128, 127] -> uint8 ``q + 128``."""
    q = _np(q).astype(np.int32)
    if q.size and (q.min() < -128 or q.max() > 127):
        raise ValueError("activation codes must lie in [-128, 127]")
    return (q + ZERO_POINT).astype(np.uint8)


def pack_codes(q, layout: str = "NCHW") -> np.ndarray:
    """Integer activation codes (NCHW/NHWC conv, or ``[M, K]`` dense) -> kernel uint8 layout.

    Conv: ``uint8[N, H, W, C4]``; dense: ``uint8[M, K4]``; pad channels hold 128 (code 0).
    """
    q = _np(q)
    if q.ndim == 4:
        if layout == "NCHW":
            q = q.transpose(0, 2, 3, 1)
        elif layout != "NHWC":
            raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")
    u = codes_to_u8(q)
    c = u.shape[-1]
    c4 = -(-c // INT8_GROUP) * INT8_GROUP
    if c4 != c:
        u = np.concatenate([u, np.full(u.shape[:-1] + (c4 - c,), ZERO_POINT, np.uint8)], axis=-1)
    return np.ascontiguousarray(u)


def block_oc_int8(w, lanes: int = 16) -> np.ndarray:
    """int8 weights, conv ``[OC, C, KH, KW]`` (torch OIHW) or dense ``[N, K]`` -> kernel layout.

    Conv -> ``int8[ceil(OC/L), KH, KW, C4/4, L, 4]``; dense -> ``int8[ceil(N/L), K4/4, L, 4]``.
    """
    w = _np(w)
    if w.size and (w.min() < -128 or w.max() > 127):
        raise ValueError("int8 weights must lie in [-128, 127]")
    w = w.astype(np.int8)
    if w.ndim == 4:
        w = w.transpose(0, 2, 3, 1)  # OHWI
    oc, c = w.shape[0], w.shape[-1]
    c4 = -(-c // INT8_GROUP) * INT8_GROUP
    ocb = -(-oc // lanes)
    full = np.zeros((ocb * lanes,) + w.shape[1:-1] + (c4,), np.int8)
    full[(slice(0, oc),) + (slice(None),) * (w.ndim - 2) + (slice(0, c),)] = w
    full = full.reshape((ocb, lanes) + w.shape[1:-1] + (c4 // INT8_GROUP, INT8_GROUP))
    # (ocb, L, [KH, KW,] C4/4, 4) -> (ocb, [KH, KW,] C4/4, L, 4)
    return np.ascontiguousarray(np.moveaxis(full, 1, -2))


# --------------------------------------------------------------------------------------
# Derived per-layer constants the kernels take as inputs (computed from the weights once,
# at export time; the lowered graph holds them as constants next to the packed weights).
# --------------------------------------------------------------------------------------

def border_taps(size: int, kernel: int, stride: int, padding: int):
    """For each output index ``o`` of a conv axis: ``(lo[o], hi[o])``, the number of taps that
    fall before the input (``o*stride - padding + k < 0``) and after it (``>= size``).

    ``lo = clip(padding - o*stride, 0, kernel)``, ``hi = clip(o*stride - padding + kernel - size,
    0, kernel)``; kernels evaluate exactly these expressions to index the base table.
    """
    o = np.arange(conv_out_size(size, kernel, stride, padding))
    lo = np.clip(padding - o * stride, 0, kernel)
    hi = np.clip(o * stride - padding + kernel - size, 0, kernel)
    return lo, hi


def border_table_shape(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """``(max lo + 1, max hi + 1)`` along one axis (the base table's extent for that axis)."""
    lo, hi = border_taps(size, kernel, stride, padding)
    return int(lo.max()) + 1, int(hi.max()) + 1


def weight_popcount(w_bits, lanes: int | None = 16) -> np.ndarray:
    """int32 ``[OCpad]``: the total popcount (+1 weights) of each output channel's packed
    weights (canonical ``[OC, ...]``), the ``dot = popcount(w) - popcount(a ^ w)`` base of
    unsigned activations; ``OCpad`` as in :func:`conv_base_table`."""
    w = _np(w_bits)
    oc = w.shape[0]
    ocp = oc if lanes is None else -(-oc // lanes) * lanes
    out = np.zeros(ocp, np.int32)
    out[:oc] = _popcount(w).reshape(oc, -1).sum(1)
    return out


def conv_base_table(w_bits, in_channels: int, in_h: int, in_w: int, stride: int = 1,
                    padding: int = 0, lanes: int | None = 16, unsigned: bool = False) -> np.ndarray:
    """int32 ``base[lo_h, hi_h, lo_w, hi_w, OCpad]`` for the W1A1 conv kernels.

    Kernels accumulate ``acc = sum over all KH*KW taps of popcount(x ^ w)`` over an input
    padded with 0 words (all -1), then output ``base[lo_h(oh), hi_h(oh), lo_w(ow), hi_w(ow),
    oc] - 2 * acc``. For a tap inside the input ``base`` gets ``C``; for a padded tap it gets
    ``2 * popcount(w[oc, kh, kw, :])`` (cancelling what that tap added to ``acc``, so it
    contributes exactly 0). ``w_bits`` is canonical ``uint32[OC, KH, KW, CW]``; ``OCpad`` is OC
    rounded up to ``lanes`` (pad entries 0; ``lanes=None``: no padding).

    ``unsigned`` (``{0, 1}`` activations, kernels output ``base - acc``): every entry is
    :func:`weight_popcount` (a padded tap cancels by itself, no border correction).
    """
    w = _np(w_bits)
    oc, kh_, kw_, _ = w.shape
    if unsigned:
        shape = border_table_shape(in_h, kh_, stride, padding) + border_table_shape(in_w, kw_, stride, padding)
        pop = weight_popcount(w, lanes)
        return np.ascontiguousarray(np.broadcast_to(pop, shape + pop.shape))
    wpop = _popcount(w).sum(-1)  # [OC, KH, KW]
    lh, hh = border_table_shape(in_h, kh_, stride, padding)
    lw, hw = border_table_shape(in_w, kw_, stride, padding)
    ocp = oc if lanes is None else -(-oc // lanes) * lanes
    table = np.zeros((lh, hh, lw, hw, ocp), np.int32)
    kh = np.arange(kh_)[:, None]
    kw = np.arange(kw_)[None, :]
    for a in range(lh):
        for b in range(hh):
            for c in range(lw):
                for d in range(hw):
                    pad = (kh < a) | (kh >= kh_ - b) | (kw < c) | (kw >= kw_ - d)  # [KH, KW]
                    contrib = np.where(pad[None], 2 * wpop, in_channels)
                    table[a, b, c, d, :oc] = contrib.sum((1, 2))
    return table


def int8_bias(w, lanes: int | None = 16) -> np.ndarray:
    """int32 ``[OCpad]`` = ``-ZERO_POINT * sum(w[oc])`` for the int8 / W1Ak kernels, which
    accumulate ``sum (q + 128) * w`` (``w``: int weights, conv OIHW or dense ``[N, K]``)."""
    w = _np(w).astype(np.int64)
    oc = w.shape[0]
    s = -ZERO_POINT * w.reshape(oc, -1).sum(1)
    ocp = oc if lanes is None else -(-oc // lanes) * lanes
    out = np.zeros(ocp, np.int32)
    out[:oc] = s
    return out


# --------------------------------------------------------------------------------------
# Reference implementations (exact integer arithmetic).
# --------------------------------------------------------------------------------------

def _popcount(a: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a).astype(np.int32)


def ref_binary_conv2d(x_bits, w_bits, in_channels: int, stride: int = 1, padding: int = 0,
                      unsigned: bool = False) -> np.ndarray:
    """Exact W1A1 conv on packed operands; int32 NHWC ``[N, OH, OW, OC]``.

    ``x_bits uint32[N, H, W, CW]``, ``w_bits uint32[OC, KH, KW, CW]`` (canonical layouts).
    Equals ``torch.conv2d(sign(x), sign(W), stride=stride, padding=padding)`` (permuted to
    NHWC): padded positions contribute 0. Per tap ``dot = 2 * popcount(~(a ^ w) & mask) - C``
    where ``mask`` holds the ``C`` valid channel bits, and taps outside the input are skipped.
    ``unsigned``: activation bits are {0, 1} codes, per tap ``dot = popcount(w) - popcount(a ^ w)``
    (equals ``torch.conv2d(q, sign(W), ...)``).
    """
    x = _np(x_bits)
    w = _np(w_bits)
    n, h, wd, cw = x.shape
    oc, kh_, kw_, cw2 = w.shape
    if cw != cw2 or cw != num_words(in_channels):
        raise ValueError(f"word counts disagree: x {cw}, w {cw2}, C={in_channels}")
    oh = conv_out_size(h, kh_, stride, padding)
    ow = conv_out_size(wd, kw_, stride, padding)
    p = padding
    xp = np.zeros((n, h + 2 * p, wd + 2 * p, cw), x.dtype)
    xp[:, p:p + h, p:p + wd] = x
    valid = np.zeros((h + 2 * p, wd + 2 * p), bool)
    valid[p:p + h, p:p + wd] = True
    mask = pack_bits(np.ones(in_channels))  # C valid bits
    out = np.zeros((n, oh, ow, oc), np.int32)
    for kh in range(kh_):
        for kw in range(kw_):
            rs = slice(kh, kh + stride * (oh - 1) + 1, stride)
            cs = slice(kw, kw + stride * (ow - 1) + 1, stride)
            xs = xp[:, rs, cs]  # [N, OH, OW, CW]
            v = valid[rs, cs].astype(np.int32)  # [OH, OW]
            for o in range(oc):
                if unsigned:
                    dot = _popcount(w[o, kh, kw]).sum() - _popcount(xs ^ w[o, kh, kw]).sum(-1)
                else:
                    xnor = ~(xs ^ w[o, kh, kw]) & mask
                    dot = 2 * _popcount(xnor).sum(-1) - in_channels
                out[..., o] += dot * v
    return out


def ref_binary_dense(x_bits, w_bits, in_features: int, unsigned: bool = False) -> np.ndarray:
    """Exact W1A1 dense: ``x_bits uint32[M, KW]``, ``w_bits uint32[N, KW]`` -> int32 ``[M, N]``
    (``unsigned``: {0, 1} activation bits, ``popcount(w[n]) - popcount(a ^ w[n])``)."""
    x = _np(x_bits)
    w = _np(w_bits)
    if x.shape[-1] != w.shape[-1] or x.shape[-1] != num_words(in_features):
        raise ValueError("word counts disagree")
    pc = _popcount(x[:, None, :] ^ w[None, :, :]).sum(-1)
    if unsigned:
        return (weight_popcount(w, lanes=None)[None, :] - pc).astype(np.int32)
    return (in_features - 2 * pc).astype(np.int32)


def ref_int_conv2d(q, w, stride: int = 1, padding: int = 0, layout: str = "NCHW") -> np.ndarray:
    """Exact integer conv: codes ``q`` (NCHW, or NHWC with ``layout="NHWC"``) times integer
    weights ``w[OC, C, KH, KW]`` (torch OIHW), zero padding; int32 NHWC ``[N, OH, OW, OC]``."""
    q = _np(q).astype(np.int64)
    if layout == "NCHW":
        q = q.transpose(0, 2, 3, 1)
    w = _np(w).astype(np.int64).transpose(0, 2, 3, 1)  # OHWI
    n, h, wd, c = q.shape
    oc, kh_, kw_, c2 = w.shape
    if c != c2:
        raise ValueError(f"channel counts disagree: {c} vs {c2}")
    oh = conv_out_size(h, kh_, stride, padding)
    ow = conv_out_size(wd, kw_, stride, padding)
    p = padding
    qp = np.zeros((n, h + 2 * p, wd + 2 * p, c), np.int64)
    qp[:, p:p + h, p:p + wd] = q
    out = np.zeros((n, oh, ow, oc), np.int64)
    for kh in range(kh_):
        for kw in range(kw_):
            xs = qp[:, kh:kh + stride * (oh - 1) + 1:stride, kw:kw + stride * (ow - 1) + 1:stride]
            out += xs @ w[:, kh, kw, :].T
    return out.astype(np.int32)


def ref_int_dense(q, w) -> np.ndarray:
    """Exact integer dense: ``q[M, K] @ w[N, K].T`` -> int32 ``[M, N]``."""
    return (_np(q).astype(np.int64) @ _np(w).astype(np.int64).T).astype(np.int32)


def ref_w1ak_conv2d(q, w, stride: int = 1, padding: int = 0, layout: str = "NCHW") -> np.ndarray:
    """Exact W1Ak conv: signed k-bit codes ``q`` times ``sign(w)`` (``w[OC, C, KH, KW]`` real
    or +-1); int32 NHWC. Equals ``torch.conv2d(q, sign(W), stride, padding)``."""
    return ref_int_conv2d(q, sign(w), stride, padding, layout)


def ref_w1ak_dense(q, w) -> np.ndarray:
    """Exact W1Ak dense: codes ``q[M, K]`` times ``sign(w[N, K])`` -> int32 ``[M, N]``."""
    return ref_int_dense(q, sign(w))
