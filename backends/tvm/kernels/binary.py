"""TE compute definitions of the W1A1 (XNOR-popcount) kernels and the activation bit-packer.

Target-independent: these only say *what* is computed, in the layout of
:mod:`bqc.packing` (uint32 words, LSB-first, bit 1 = +1, NHWC-packed activations, weights
blocked by ``L`` output-channel lanes). Schedules live in ``backends/tvm/schedules/<target>.py``
and refer to the stages by name:

* ``binary_conv2d_nhwc``: ``"xpad"`` (zero-word padding), ``"acc"`` (int32
  ``[N, OH, OW, OCB, L]``, sum over ``kh, kw, cw`` of ``popcount(x ^ w)``), ``"out"``
  (int32 NHWC ``[N, OH, OW, OC]`` = ``base[border class, oc] - 2 * acc``).
* ``binary_dense``: ``"acc"`` (``[M, NB, L]``), ``"out"`` (``[M, N]`` = ``K - 2 * acc``).
* ``bitpack``: ``"bitpack"`` (uint32 ``[N, H, W, CW]``, a sum over the 32 bits of each word).

Unsigned 1-bit activations (input kind ``"bits01"``, {0, 1} codes; bit 1 = code 1): the same
stages with ``out = base - acc``, ``base`` the weights' total popcount per output channel
(conv: in every border class of the table; dense: a ``base int32[NB*L]`` input), since
``sum_c a w = popcount(w) - popcount(a ^ w)`` and zero padding cancels by itself
(:mod:`bqc.packing`); the packer sets bit 1 iff ``x / step > 0.5`` (``step``: the quantizer's
step, ``f32[1]``), which is ``round_half_even(clamp(x / step, 0, 1)) == 1``.
"""
from __future__ import annotations

from tvm import te, tirx

from bqc.packing import WORD_BITS, border_table_shape, conv_out_size, num_words


def conv_geometry(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> dict:
    """Output size and base-table extents of a conv (dilation 1)."""
    oh = conv_out_size(h, kh, stride, padding)
    ow = conv_out_size(w, kw, stride, padding)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"empty conv output for input {h}x{w}, kernel {kh}x{kw}, stride {stride}, padding {padding}")
    lh, hh = border_table_shape(h, kh, stride, padding)
    lw, hw = border_table_shape(w, kw, stride, padding)
    return {"oh": oh, "ow": ow, "table": (lh, hh, lw, hw)}


def _clip(e, lo, hi):
    return tirx.max(tirx.min(e, hi), lo)


def pad_nhwc(x: te.Tensor, padding: int, fill, name: str = "xpad") -> te.Tensor:
    """``x [N, H, W, C]`` padded by ``padding`` rows/columns of ``fill`` (a TIR constant of
    ``x``'s dtype) on each side: the ``"xpad"`` stage of the conv kernels."""
    n, h, w, ch = (int(v) for v in x.shape)
    p = padding
    return te.compute(
        (n, h + 2 * p, w + 2 * p, ch),
        lambda i, y, z, c: tirx.if_then_else(
            tirx.all(y >= p, y < h + p, z >= p, z < w + p), x[i, y - p, z - p, c], fill),
        name=name)


def affine_epilogue(value, oc, scale=None, bias=None, kmap=None, pos=None):
    """Optional float epilogue of an exact integer result: ``value * scale[oc] * kmap[pos] +
    bias[oc]`` in float32 (each factor only if its tensor is given); ``value`` unchanged
    (int32) when none is given. ``kmap`` is a per-position map (e.g. XNOR-Net's K) indexed by
    ``pos`` (``(n, oh, ow)`` for conv, ``(m,)`` for dense)."""
    if scale is None and bias is None and kmap is None:
        return value
    v = value.astype("float32")
    if scale is not None:
        v = v * scale[oc]
    if kmap is not None:
        v = v * kmap[pos]
    if bias is not None:
        v = v + bias[oc]
    return v


def bitpack(x: te.Tensor, tau: te.Tensor | None = None, layout: str = "NCHW",
            name: str = "bitpack", step: te.Tensor | None = None) -> te.Tensor:
    """Float activations -> packed ``uint32[N, H, W, CW]``: bit ``c % 32`` of word ``c // 32``
    is 1 iff ``x[c] + tau[c] >= 0`` (with ``step`` ``[1]`` instead, unsigned 1-bit codes: iff
    ``x[c] / step > 0.5``); pad bits 0. ``x`` is NCHW or NHWC float."""
    if tau is not None and step is not None:
        raise ValueError("bitpack takes a sign threshold (tau) or an unsigned step, not both")
    if layout == "NCHW":
        n, c, h, w = (int(v) for v in x.shape)
        load = lambda i, ch, y, z: x[i, ch, y, z]  # noqa: E731
    elif layout == "NHWC":
        n, h, w, c = (int(v) for v in x.shape)
        load = lambda i, ch, y, z: x[i, y, z, ch]  # noqa: E731
    else:
        raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")
    cw = num_words(c)
    b = te.reduce_axis((0, WORD_BITS), name="b")

    def f(i, y, z, wd):
        ch = wd * WORD_BITS + b
        chc = tirx.min(ch, c - 1)  # keep the load in bounds; masked by `valid` below
        v = load(i, chc, y, z)
        if tau is not None:
            v = v + tau[chc]
        on = v >= tirx.const(0, x.dtype) if step is None else v / step[0] > tirx.const(0.5, x.dtype)
        bit = tirx.Select(tirx.all(ch < c, on),
                          tirx.const(1, "uint32") << b.var.astype("uint32"), tirx.const(0, "uint32"))
        return te.sum(bit, axis=b)

    return te.compute((n, h, w, cw), f, name=name)


def binary_conv2d_nhwc(x_bits: te.Tensor, w_blk: te.Tensor, base: te.Tensor, in_channels: int,
                       out_channels: int, stride: int = 1, padding: int = 0, scale=None, bias=None,
                       kmap=None, unsigned: bool = False) -> te.Tensor:
    """W1A1 conv, exact int32 NHWC output.

    ``x_bits uint32[N, H, W, CW]``; ``w_blk uint32[OCB, KH, KW, CW, L]``
    (:func:`bqc.packing.block_oc`); ``base int32[LH, HH, LW, HW, OCB*L]``
    (:func:`bqc.packing.conv_base_table`). Returns ``out int32[N, OH, OW, OC]`` equal to
    ``conv2d(sign(x), sign(W), stride, padding)`` with true zero padding; with ``scale
    f32[OC]`` / ``bias f32[OC]`` / ``kmap f32[N, OH, OW]`` the output is float32
    (:func:`affine_epilogue`, fused into the same loop nest). ``unsigned``: ``x_bits`` are {0, 1}
    codes and ``base`` is ``conv_base_table(..., unsigned=True)``; ``out = base - acc`` equals
    ``conv2d(q, sign(W), stride, padding)``.
    """
    n, h, w, cw = (int(v) for v in x_bits.shape)
    ocb, kh_, kw_, cw2, lanes = (int(v) for v in w_blk.shape)
    if cw != cw2 or cw != num_words(in_channels):
        raise ValueError(f"word counts disagree: x {cw}, w {cw2}, in_channels {in_channels}")
    if ocb * lanes < out_channels:
        raise ValueError("w_blk holds fewer output channels than out_channels")
    g = conv_geometry(h, w, kh_, kw_, stride, padding)
    oh, ow = g["oh"], g["ow"]
    if tuple(int(v) for v in base.shape) != g["table"] + (ocb * lanes,):
        raise ValueError(f"base table shape {tuple(base.shape)} != {g['table'] + (ocb * lanes,)}")
    p, s = padding, stride
    xpad = pad_nhwc(x_bits, p, tirx.const(0, "uint32"))
    rkh = te.reduce_axis((0, kh_), name="kh")
    rkw = te.reduce_axis((0, kw_), name="kw")
    rcw = te.reduce_axis((0, cw), name="cw")
    acc = te.compute(
        (n, oh, ow, ocb, lanes),
        lambda i, y, z, ob, l: te.sum(
            tirx.popcount(xpad[i, y * s + rkh, z * s + rkw, rcw] ^ w_blk[ob, rkh, rkw, rcw, l]).astype("int32"),
            axis=[rkh, rkw, rcw]),
        name="acc")
    lh, hh, lw, hw = g["table"]
    k = 1 if unsigned else 2

    def out_f(i, y, z, oc):
        lo_h = _clip(p - y * s, 0, lh - 1)
        hi_h = _clip(y * s - p + kh_ - h, 0, hh - 1)
        lo_w = _clip(p - z * s, 0, lw - 1)
        hi_w = _clip(z * s - p + kw_ - w, 0, hw - 1)
        v = base[lo_h, hi_h, lo_w, hi_w, oc] - k * acc[i, y, z, oc // lanes, oc % lanes]
        return affine_epilogue(v, oc, scale, bias, kmap, (i, y, z))

    return te.compute((n, oh, ow, out_channels), out_f, name="out")


def binary_dense(x_bits: te.Tensor, w_blk: te.Tensor, in_features: int, out_features: int,
                 scale=None, bias=None, base: te.Tensor | None = None) -> te.Tensor:
    """W1A1 dense: ``x_bits uint32[M, KW]``, ``w_blk uint32[NB, KW, L]`` -> int32 ``[M, N]``
    (float32 with the optional ``scale``/``bias`` epilogue). With ``base int32[NB*L]``
    (:func:`bqc.packing.weight_popcount`) the activation bits are unsigned {0, 1} codes and
    ``out = base[n] - acc``."""
    m, kwd = (int(v) for v in x_bits.shape)
    nb, kwd2, lanes = (int(v) for v in w_blk.shape)
    if kwd != kwd2 or kwd != num_words(in_features):
        raise ValueError(f"word counts disagree: x {kwd}, w {kwd2}, in_features {in_features}")
    if nb * lanes < out_features:
        raise ValueError("w_blk holds fewer outputs than out_features")
    rk = te.reduce_axis((0, kwd), name="k")
    acc = te.compute(
        (m, nb, lanes),
        lambda i, b, l: te.sum(tirx.popcount(x_bits[i, rk] ^ w_blk[b, rk, l]).astype("int32"), axis=rk),
        name="acc")
    if base is not None and tuple(int(v) for v in base.shape) != (nb * lanes,):
        raise ValueError(f"base shape {tuple(base.shape)} != {(nb * lanes,)}")

    def out_f(i, j):
        a = acc[i, j // lanes, j % lanes]
        return affine_epilogue(in_features - 2 * a if base is None else base[j] - a, j, scale, bias)

    return te.compute((m, out_features), out_f, name="out")
