"""TE compute definitions of the int8-route kernels: W1Ak (k = 2..8) and int8 x int8.

Layout (:mod:`bqc.packing`): activations are signed codes ``q`` stored as uint8 ``q + 128``
in NHWC with channels padded to a multiple of 4 (pad = 128, code 0); weights are int8,
blocked ``[OCB, KH, KW, C4/4, L, 4]`` (conv) / ``[NB, K4/4, L, 4]`` (dense). The kernels
accumulate ``sum (q + 128) * w`` in int32 and add ``bias[oc] = -128 * sum(w[oc])``
(:func:`bqc.packing.int8_bias`), so the result is exactly ``sum q * w``. Conv padding pads the
uint8 input with 128 (code 0), so there is no border case.

Stage names used by schedules: ``"xpad"``, ``"acc"`` (int32 ``[N, OH, OW, OCB, L]`` or
``[M, NB, L]``), ``"out"`` (int32 NHWC / ``[M, N]``, ``acc + bias``),
``"quantize"`` (uint8 codes).
"""
from __future__ import annotations

from tvm import te, tirx

from bqc.packing import INT8_GROUP, ZERO_POINT
from .binary import affine_epilogue, conv_geometry, pad_nhwc


def quantize_u8(x: te.Tensor, scale: te.Tensor, bits: int, layout: str = "NCHW",
                name: str = "quantize") -> te.Tensor:
    """Float activations -> uint8 codes ``clip(round(x / scale), -2^(b-1), 2^(b-1)-1) + 128``.

    ``scale`` is a float32 ``[1]`` tensor (per-tensor LSQ step); rounding is half-to-even
    (``torch.round``). Output NHWC ``uint8[N, H, W, C4]`` (conv, 4-D input) or
    ``uint8[M, K4]`` (2-D input); pad channels hold 128.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    qn, qp = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if len(x.shape) == 2:
        m, k = (int(v) for v in x.shape)
        k4 = -(-k // INT8_GROUP) * INT8_GROUP
        shape = (m, k4)
        chan = lambda idx: idx[1]  # noqa: E731
        load = lambda idx, c: x[idx[0], c]  # noqa: E731
        nch = k
    elif layout == "NCHW":
        n, c, h, w = (int(v) for v in x.shape)
        shape = (n, h, w, -(-c // INT8_GROUP) * INT8_GROUP)
        chan = lambda idx: idx[3]  # noqa: E731
        load = lambda idx, cc: x[idx[0], cc, idx[1], idx[2]]  # noqa: E731
        nch = c
    elif layout == "NHWC":
        n, h, w, c = (int(v) for v in x.shape)
        shape = (n, h, w, -(-c // INT8_GROUP) * INT8_GROUP)
        chan = lambda idx: idx[3]  # noqa: E731
        load = lambda idx, cc: x[idx[0], idx[1], idx[2], cc]  # noqa: E731
        nch = c
    else:
        raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")

    def f(*idx):
        c = chan(idx)
        v = load(idx, tirx.min(c, nch - 1)) / scale[0]
        q = tirx.max(tirx.min(tirx.nearbyint(v), tirx.const(qp, x.dtype)), tirx.const(qn, x.dtype))
        code = (q.astype("int32") + ZERO_POINT).astype("uint8")
        return tirx.Select(c < nch, code, tirx.const(ZERO_POINT, "uint8"))

    return te.compute(shape, f, name=name)


def int8_conv2d_nhwc(x_u8: te.Tensor, w_blk: te.Tensor, bias: te.Tensor, out_channels: int,
                     stride: int = 1, padding: int = 0, out_scale=None, out_bias=None,
                     kmap=None) -> te.Tensor:
    """u8 codes x int8 weights conv, exact int32 NHWC ``[N, OH, OW, OC]``.

    ``x_u8 uint8[N, H, W, C4]``, ``w_blk int8[OCB, KH, KW, C4/4, L, 4]``,
    ``bias int32[OCB*L]`` (:func:`bqc.packing.int8_bias`). With ``out_scale f32[OC]`` /
    ``out_bias f32[OC]`` / ``kmap f32[N, OH, OW]`` the output is float32
    (:func:`bqc.backends.tvm.kernels.binary.affine_epilogue`, fused).
    """
    n, h, w, c4 = (int(v) for v in x_u8.shape)
    ocb, kh_, kw_, cg, lanes, grp = (int(v) for v in w_blk.shape)
    if grp != INT8_GROUP or cg * INT8_GROUP != c4:
        raise ValueError(f"channel groups disagree: x has {c4} channels, w {cg}x{grp}")
    if ocb * lanes < out_channels or int(bias.shape[0]) != ocb * lanes:
        raise ValueError("w_blk/bias hold a different number of output channels")
    g = conv_geometry(h, w, kh_, kw_, stride, padding)
    oh, ow = g["oh"], g["ow"]
    s = stride
    xpad = pad_nhwc(x_u8, padding, tirx.const(ZERO_POINT, "uint8"))
    rkh = te.reduce_axis((0, kh_), name="kh")
    rkw = te.reduce_axis((0, kw_), name="kw")
    rcg = te.reduce_axis((0, cg), name="cg")
    rj = te.reduce_axis((0, grp), name="j")
    acc = te.compute(
        (n, oh, ow, ocb, lanes),
        lambda i, y, z, ob, l: te.sum(
            xpad[i, y * s + rkh, z * s + rkw, rcg * grp + rj].astype("int32")
            * w_blk[ob, rkh, rkw, rcg, l, rj].astype("int32"),
            axis=[rkh, rkw, rcg, rj]),
        name="acc")
    return te.compute((n, oh, ow, out_channels),
                      lambda i, y, z, oc: affine_epilogue(acc[i, y, z, oc // lanes, oc % lanes] + bias[oc], oc,
                                                          out_scale, out_bias, kmap, (i, y, z)),
                      name="out")


def int8_dense(x_u8: te.Tensor, w_blk: te.Tensor, bias: te.Tensor, out_features: int,
               out_scale=None, out_bias=None) -> te.Tensor:
    """u8 codes ``[M, K4]`` x int8 weights ``[NB, K4/4, L, 4]`` + bias -> int32 ``[M, N]``
    (float32 with the optional ``out_scale``/``out_bias`` epilogue)."""
    m, k4 = (int(v) for v in x_u8.shape)
    nb, kg, lanes, grp = (int(v) for v in w_blk.shape)
    if grp != INT8_GROUP or kg * INT8_GROUP != k4:
        raise ValueError(f"feature groups disagree: x has {k4}, w {kg}x{grp}")
    if nb * lanes < out_features or int(bias.shape[0]) != nb * lanes:
        raise ValueError("w_blk/bias hold a different number of outputs")
    rk = te.reduce_axis((0, kg), name="kg")
    rj = te.reduce_axis((0, grp), name="j")
    acc = te.compute(
        (m, nb, lanes),
        lambda i, b, l: te.sum(x_u8[i, rk * grp + rj].astype("int32") * w_blk[b, rk, l, rj].astype("int32"),
                               axis=[rk, rj]),
        name="acc")
    return te.compute((m, out_features),
                      lambda i, j: affine_epilogue(acc[i, j // lanes, j % lanes] + bias[j], j, out_scale, out_bias),
                      name="out")


def int_matmul(a: te.Tensor, b: te.Tensor, scale: te.Tensor | None = None) -> te.Tensor:
    """Batched matmul of integer codes with an exact int32 accumulator (attention on codes).

    ``a int8[BT, M, K]`` x ``b int8[BT, K, N]`` -> ``out int32[BT, M, N]`` (stages ``"acc"``,
    ``"out"``); with ``scale f32[1]``, ``out`` is float32 ``f32(acc) * scale[0]``: the same one
    rounding as the reference ``bqc.int_matmul`` (``acc.to(f32) * scale``). Exact for any ``K``
    while ``K * 2^14 < 2^31`` (int8 codes), unlike a float32 matmul of the codes, whose partial
    sums stop being exact integers above ``2^24`` (``K >= 1024`` in the worst case).
    """
    bt, m, k = (int(v) for v in a.shape)
    bt2, k2, n = (int(v) for v in b.shape)
    if bt != bt2 or k != k2:
        raise ValueError(f"int_matmul shapes disagree: a {tuple(a.shape)}, b {tuple(b.shape)}")
    rk = te.reduce_axis((0, k), name="k")
    acc = te.compute((bt, m, n), lambda i, r, c: te.sum(a[i, r, rk].astype("int32") * b[i, rk, c].astype("int32"),
                                                       axis=rk), name="acc")
    if scale is None:
        return te.compute((bt, m, n), lambda i, r, c: acc[i, r, c], name="out")
    return te.compute((bt, m, n), lambda i, r, c: acc[i, r, c].astype("float32") * scale[0], name="out")
