"""The integer cores of the deploy graph as torch custom ops, and their reference kernels.

Namespace ``bqc``: ``sign_pack``, ``unsigned_pack``, ``quantize_codes``, ``binary_conv2d``, ``binary_dense``,
``int_conv2d``, ``int_dense``, ``int_matmul``. Each has a fake (meta) kernel, so ``torch.export``
of a deploy graph (:func:`bqc.deploy.export_program`, dynamic batch) keeps each of them as one
node: that is the hand-off to the TVM lowering (``from_exported_program(custom_convert_map=...)``).
Their CPU kernels unpack the :mod:`bqc.packing` words and run exact float convolutions (the
*reference executor* every backend is tested against): float32 when every partial sum of the
integer dot product stays below 2^24 in magnitude (then any summation order is exact), else
float64 (:func:`_exact_dtype`); the slower bit-level references of
:mod:`bqc.packing` (popcount) are reachable through ``layer.accumulate(x, impl="packing")`` and
give identical accumulators (tested).

Input kinds (:data:`INPUT_KINDS`): ``"bits"`` (packed signs, values ±1), ``"bits01"`` (packed
{0, 1} codes of an unsigned 1-bit activation, :func:`unsigned_pack`), ``"codes"`` (integer
codes), ``"float"``. For bits/bits01/codes inputs the accumulator is exact (int32 semantics) and the output is
``sum_b float(acc_b) * scale[b]`` in the scale's float dtype, bases added in order (a backend
doing the same int32 -> float multiply gets bit-identical results).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bqc import packing
from bqc.errors import BqcError
from bqc.packing import pair as _pair
from bqc.packing import words_numpy

LAYOUT_VERSION = packing.LAYOUT_VERSION
INPUT_KINDS = ("float", "bits", "bits01", "codes")
#: the packed input kinds (uint32 words, :mod:`bqc.packing`): ±1 signs, {0, 1} unsigned codes
PACKED_KINDS = ("bits", "bits01")

#: the custom ops (``torch.ops.bqc.<name>``) this module registers
OP_NAMES = ("sign_pack", "unsigned_pack", "quantize_codes", "binary_conv2d", "binary_dense", "int_conv2d", "int_dense",
            "int_matmul")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _cview(p: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def _words_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint32))


def unpack_words(words: torch.Tensor, n: int, unsigned: bool = False) -> torch.Tensor:
    """Inverse of the packing along the last axis: int8 ±1 tensor with ``n`` values there
    ({0, 1} with ``unsigned``)."""
    return torch.from_numpy(packing.unpack_bits(words_numpy(words), n, axis=-1, unsigned=unsigned))


def _int_dtype(qmin: int, qmax: int) -> torch.dtype:
    return torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16


def _conv_out(size, k, s, p, d) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------------------------------------
# integer cores as torch custom ops (the reference kernels)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("bqc::sign_pack", mutates_args=())
def sign_pack(x: torch.Tensor, tau: torch.Tensor | None, ch_axis: int) -> torch.Tensor:
    """Bits of ``sign(x + tau)`` packed along ``ch_axis`` (moved last): NCHW -> uint32 NHWC-packed
    ``[N, H, W, CW]``; ``[..., K]`` (``ch_axis=-1``) -> ``[..., KW]``."""
    v = x if tau is None else x + _cview(tau.to(x.dtype), x.dim(), ch_axis)
    v = torch.movedim(v.detach().cpu(), ch_axis, -1)
    return _words_tensor(packing.pack_bits(v.numpy(), axis=-1))


def _packed_fake(x, ch_axis):
    shape = list(x.shape)
    c = shape.pop(ch_axis)
    return x.new_empty([*shape, packing.num_words(c)], dtype=torch.uint32)


sign_pack.register_fake(lambda x, tau, ch_axis: _packed_fake(x, ch_axis))


def _rounded(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``round_half_even(clamp(x / scale, qmin, qmax))`` in x's float dtype: the codes of
    :func:`quantize_codes` and (levels {0, 1}) the bits of :func:`unsigned_pack`."""
    return torch.round(torch.clamp(x / scale.to(x.dtype), qmin, qmax))


@torch.library.custom_op("bqc::unsigned_pack", mutates_args=())
def unsigned_pack(x: torch.Tensor, step: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """Bits of the unsigned 1-bit codes ``round(clamp(x / step, 0, 1))`` (bit 1 = code 1) packed
    along ``ch_axis`` (moved last), as :func:`sign_pack` lays them out."""
    v = torch.movedim(_rounded(x, step, 0, 1).detach().cpu(), ch_axis, -1)
    return _words_tensor(packing.pack_mask(v.numpy() == 1, axis=-1))


unsigned_pack.register_fake(lambda x, step, ch_axis: _packed_fake(x, ch_axis))


@torch.library.custom_op("bqc::quantize_codes", mutates_args=())
def quantize_codes(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes ``round_half_even(clamp(x / scale, qmin, qmax))`` (int8, int16 if wider)."""
    return _rounded(x, scale, qmin, qmax).to(_int_dtype(qmin, qmax))


@quantize_codes.register_fake
def _(x, scale, qmin, qmax):
    return torch.empty_like(x, dtype=_int_dtype(qmin, qmax))


#: below this magnitude every integer is a float32, so an integer dot product whose partial sums
#: all stay below it is exact in float32 whatever the summation order
_F32_EXACT = 2 ** 24


def _max_abs(v: torch.Tensor) -> int:
    return int(v.to(torch.int32).abs().max()) if v.numel() else 0


def _exact_dtype(x: torch.Tensor, x_kind: str, depth: int, w_max: int) -> torch.dtype | None:
    """The float dtype that computes a ``depth``-long dot product of integer inputs (``x``, bits
    or codes) and integer weights of magnitude <= ``w_max`` exactly: float32 when
    ``depth * max|x| * w_max < 2^24`` (every partial sum is then a float32 integer), else float64;
    None for float inputs (computed in their own dtype)."""
    if x_kind == "float":
        return None
    x_max = 1 if x_kind in PACKED_KINDS else _max_abs(x)
    return torch.float32 if depth * x_max * w_max < _F32_EXACT else torch.float64


def _conv_input(x: torch.Tensor, x_kind: str, channels: int, dtype=torch.float64) -> torch.Tensor:
    """NCHW values (``dtype``; float inputs as they are) of a conv input of kind bits / bits01
    (packed NHWC) / codes / float."""
    if x_kind in PACKED_KINDS:
        return unpack_words(x, channels, x_kind == "bits01").permute(0, 3, 1, 2).to(dtype)
    if x_kind == "codes":
        return x.to(dtype)
    if x_kind == "float":
        return x
    raise BqcError(f"unknown input kind {x_kind!r}; valid: {', '.join(INPUT_KINDS)}")


def _dense_input(x: torch.Tensor, x_kind: str, features: int, dtype=torch.float64) -> torch.Tensor:
    if x_kind in PACKED_KINDS:
        return unpack_words(x, features, x_kind == "bits01").to(dtype)
    return _conv_input(x, x_kind, features, dtype)


def _scaled_sum(accs: list[torch.Tensor], scale: torch.Tensor, view) -> torch.Tensor:
    """sum_b float(acc_b) * scale[b] (in scale's dtype, bases added in order)."""
    out = None
    for b, acc in enumerate(accs):
        term = acc.to(scale.dtype) * view(scale[b])
        out = term if out is None else out + term
    return out


def _binary_conv_accs(x, w_packed, in_channels, stride, padding, dilation, groups, x_kind):
    """Per-basis accumulators: exact integers (floats holding ints, :func:`_exact_dtype`) for
    bits/codes inputs."""
    signs = unpack_words(w_packed, in_channels)  # [B, OC, KH, KW, C] int8
    signs = signs.permute(0, 1, 4, 2, 3)  # [B, OC, C, KH, KW]
    depth = in_channels * signs.shape[3] * signs.shape[4]
    xv = _conv_input(x, x_kind, in_channels * groups, _exact_dtype(x, x_kind, depth, 1))
    ws = signs.to(xv.dtype)
    return [F.conv2d(xv, ws[b], None, stride, padding, dilation, groups) for b in range(ws.shape[0])]


@torch.library.custom_op("bqc::binary_conv2d", mutates_args=())
def binary_conv2d(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_channels: int,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  x_kind: str) -> torch.Tensor:
    """``sum_b scale[b, oc] * conv(x~, sign(W_b))`` with zero padding; NCHW output of scale's dtype.

    ``x`` is packed bits ``uint32[N, H, W, CW]`` (x~ = ±1 for ``"bits"``, {0, 1} for
    ``"bits01"``), integer codes NCHW, or float NCHW (``x_kind``). ``w_packed uint32[B, OC, KH, KW, CW]``,
    ``in_channels`` per group.
    """
    accs = _binary_conv_accs(x, w_packed, in_channels, stride, padding, dilation, groups, x_kind)
    if x_kind != "float":
        accs = [a.to(torch.int32) for a in accs]
    return _scaled_sum(accs, scale, lambda s: s.view(1, -1, 1, 1))


def _conv_fake_shape(x, oc, kh, kw, stride, padding, dilation, x_kind):
    if x_kind in PACKED_KINDS:
        n, h, w = x.shape[0], x.shape[1], x.shape[2]
    else:
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return [n, oc, _conv_out(h, kh, sh, ph, dh), _conv_out(w, kw, sw, pw, dw)]


@binary_conv2d.register_fake
def _(x, w_packed, scale, in_channels, stride, padding, dilation, groups, x_kind):
    shape = _conv_fake_shape(x, w_packed.shape[1], w_packed.shape[2], w_packed.shape[3],
                             stride, padding, dilation, x_kind)
    return x.new_empty(shape, dtype=scale.dtype)


def _binary_dense_accs(x, w_packed, in_features, x_kind):
    signs = unpack_words(w_packed, in_features)  # [B, N, K]
    xv = _dense_input(x, x_kind, in_features, _exact_dtype(x, x_kind, in_features, 1))
    ws = signs.to(xv.dtype)
    return [torch.matmul(xv, ws[b].t()) for b in range(ws.shape[0])]


@torch.library.custom_op("bqc::binary_dense", mutates_args=())
def binary_dense(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                 x_kind: str) -> torch.Tensor:
    """``sum_b scale[b, n] * (x~ @ sign(W_b)^T)``; x ``[..., K]`` (bits / bits01: ``uint32[..., KW]``)."""
    accs = _binary_dense_accs(x, w_packed, in_features, x_kind)
    if x_kind != "float":
        accs = [a.to(torch.int32) for a in accs]
    return _scaled_sum(accs, scale, lambda s: s)


@binary_dense.register_fake
def _(x, w_packed, scale, in_features, x_kind):
    return x.new_empty([*x.shape[:-1], w_packed.shape[1]], dtype=scale.dtype)


@torch.library.custom_op("bqc::int_conv2d", mutates_args=())
def int_conv2d(x: torch.Tensor, w_codes: torch.Tensor, scale: torch.Tensor, stride: list[int],
               padding: list[int], dilation: list[int], groups: int, x_kind: str) -> torch.Tensor:
    """``scale[oc] * conv(x, W_codes)``: exact integer accumulate for code inputs."""
    depth = w_codes.shape[1] * w_codes.shape[2] * w_codes.shape[3]
    xv = _conv_input(x, x_kind, w_codes.shape[1] * groups,
                     _exact_dtype(x, x_kind, depth, _max_abs(w_codes)))
    acc = F.conv2d(xv, w_codes.to(xv.dtype), None, stride, padding, dilation, groups)
    if x_kind != "float":
        acc = acc.to(torch.int32)
    return _scaled_sum([acc], scale.unsqueeze(0), lambda s: s.view(1, -1, 1, 1))


@int_conv2d.register_fake
def _(x, w_codes, scale, stride, padding, dilation, groups, x_kind):
    shape = _conv_fake_shape(x, w_codes.shape[0], w_codes.shape[2], w_codes.shape[3],
                             stride, padding, dilation, x_kind)
    return x.new_empty(shape, dtype=scale.dtype)


@torch.library.custom_op("bqc::int_dense", mutates_args=())
def int_dense(x: torch.Tensor, w_codes: torch.Tensor, scale: torch.Tensor, x_kind: str) -> torch.Tensor:
    """``scale[n] * (x @ W_codes^T)``; exact integer accumulate for code inputs."""
    xv = _dense_input(x, x_kind, w_codes.shape[1],
                      _exact_dtype(x, x_kind, w_codes.shape[1], _max_abs(w_codes)))
    acc = torch.matmul(xv, w_codes.to(xv.dtype).t())
    if x_kind != "float":
        acc = acc.to(torch.int32)
    return _scaled_sum([acc], scale.unsqueeze(0), lambda s: s)


@int_dense.register_fake
def _(x, w_codes, scale, x_kind):
    return x.new_empty([*x.shape[:-1], w_codes.shape[0]], dtype=scale.dtype)


@torch.library.custom_op("bqc::int_matmul", mutates_args=())
def int_matmul(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * (A @ B)`` on integer codes (exact accumulate), output of scale's dtype."""
    dt = _exact_dtype(a, "codes", a.shape[-1], _max_abs(b))
    acc = torch.matmul(a.to(dt), b.to(dt)).to(torch.int32)
    return acc.to(scale.dtype) * scale


@int_matmul.register_fake
def _(a, b, scale):
    return torch.empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                       dtype=scale.dtype, device=a.device)
