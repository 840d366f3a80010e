"""The ``ai.bqc`` ONNX domain (version 1): op specs and how deploy layers are written in it.

The ops (full reference: ``docs/onnx.md``; executable reference: :mod:`.reference`):

``SignPack(X, [Tau]) -> Bits``
    Bits of ``sign(X + Tau)`` (sign(0) = +1), ``Tau`` per channel along ``axis``, packed
    LSB-first into ``uint32`` words along that axis, which moves last: NCHW float ->
    ``uint32[N, H, W, ceil(C/32)]`` (``axis=1``), ``[..., K]`` -> ``[..., ceil(K/32)]``
    (``axis=-1``). Attributes ``axis``, ``channels``, ``layout_version``.
``UnsignedPack(X, Step) -> Bits`` (domain version 2)
    Bits of the unsigned 1-bit codes ``round_half_even(clip(X / Step, 0, 1))`` (bit 1 = code 1,
    i.e. ``X / Step > 0.5``), packed like ``SignPack``. Attributes ``axis``, ``channels``,
    ``layout_version``.
``QuantizeCodes(X, Scale) -> Codes``
    ``round_half_even(clip(X / Scale, qmin, qmax))`` as int8 (int16 when the range is wider).
    Attributes ``qmin``, ``qmax``, ``bits``.
``BinaryConv2d(X, W, Scale) -> Y``
    ``Y = sum_b Scale[b, oc] * conv(X~, sign(W_b))`` with real zero padding, float32 NCHW.
    ``W uint32[B, OC, KH, KW, ceil(C/32)]`` (bqc.packing canonical conv layout per basis),
    ``Scale float32[B, OC]`` (activation step times weight scale). ``input_kind``: ``"bits"``
    (X = SignPack output, X~ = ±1), ``"bits01"`` (X = UnsignedPack output, X~ = {0, 1}; domain
    version 2), ``"codes"`` (X = QuantizeCodes output), ``"float"``.
    Attributes ``kernel_shape, strides, pads, dilations, group, in_channels, bases, input_kind,
    layout_version``.
``BinaryGemm(X, W, Scale) -> Y``
    ``Y[..., n] = sum_b Scale[b, n] * (X~ @ sign(W_b)^T)``, ``W uint32[B, N, ceil(K/32)]``.
    Attributes ``in_features, bases, input_kind, layout_version``.
``IntConv2d(X, W, Scale) -> Y`` / ``IntGemm(X, W, Scale) -> Y``
    ``Scale[oc] * conv(X, W)`` (``X @ W^T``) with ``W int8[OC, C, KH, KW]`` (``[N, K]``) and
    exact integer accumulation for code inputs. Attributes as above plus ``w_bits``.
``IntMatMul(A, B, Scale) -> Y``
    ``Scale * (A @ B)`` on integer codes (exact accumulation), float32.

Each symbolic below carries a temporary ``bqc_layer`` attribute (the fx node name) that the
exporter turns into node / initializer names and then removes.
"""
from __future__ import annotations

import numpy as np
import torch

from bqc import deploy as D

DOMAIN = "ai.bqc"
#: the newest ``ai.bqc`` version; a model declares the lowest one that holds its ops and input
#: kinds (:func:`domain_version`), so a model without the version-2 additions stays version 1
DOMAIN_VERSION = 2
#: what each version after 1 added: op types, and ``input_kind`` values of the binary ops
SINCE = {"UnsignedPack": 2, "bits01": 2}

#: op -> (inputs, attributes): the contract, checked by the tests against exported models
OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "SignPack": (("X", "Tau?"), ("axis", "channels", "layout_version")),
    "UnsignedPack": (("X", "Step"), ("axis", "channels", "layout_version")),
    "QuantizeCodes": (("X", "Scale"), ("qmin", "qmax", "bits")),
    "BinaryConv2d": (("X", "W", "Scale"), ("kernel_shape", "strides", "pads", "dilations", "group",
                                            "in_channels", "bases", "input_kind", "layout_version")),
    "BinaryGemm": (("X", "W", "Scale"), ("in_features", "bases", "input_kind", "layout_version")),
    "IntConv2d": (("X", "W", "Scale"), ("kernel_shape", "strides", "pads", "dilations", "group",
                                         "in_channels", "w_bits", "input_kind")),
    "IntGemm": (("X", "W", "Scale"), ("in_features", "w_bits", "input_kind")),
    "IntMatMul": (("A", "B", "Scale"), ()),
}


def domain_version(features) -> int:
    """The ``ai.bqc`` version a model using these op types / input kinds must declare."""
    return max([1] + [SINCE.get(f, 1) for f in features])


def _i32(t: torch.Tensor) -> torch.Tensor:
    """uint32 words as int32 (same bits): the TorchScript exporter has no uint32.

    Goes through numpy so that nothing is traced (``Tensor.view(dtype)`` is not traceable)."""
    if t.dtype != torch.uint32:
        return t
    return torch.from_numpy(D.words_numpy(t).view(np.int32).copy())


def _typed(y, like, dtype: torch.dtype, rank: int | None = None):
    """Give a custom node's output a type (dtype, rank) so the exporter does not warn."""
    t = like.type()
    try:
        rank = t.dim() if rank is None else rank
        t = t.with_dtype(dtype)
        if rank is not None:
            t = t.with_sizes([None] * rank)
        y.setType(t)
    except (RuntimeError, AttributeError, TypeError):  # type unknown: leave it to ONNX
        pass
    return y


class SignPack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tau, axis: int, channels: int, layer: str):
        return _i32(torch.ops.bqc.sign_pack(x, tau, axis))

    @staticmethod
    def symbolic(g, x, tau, axis, channels, layer):
        from torch.onnx.symbolic_helper import _is_none

        return _pack_node(g, "SignPack", [x] if tau is None or _is_none(tau) else [x, tau], axis, channels, layer)


def _pack_node(g, op: str, ins: list, axis, channels, layer):
    """A packer node (``SignPack`` / ``UnsignedPack``): packed words along ``axis``."""
    return _typed(g.op(f"{DOMAIN}::{op}", *ins, axis_i=axis, channels_i=channels,
                       layout_version_i=D.LAYOUT_VERSION, bqc_layer_s=layer), ins[0], torch.int32)


class UnsignedPack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, axis: int, channels: int, layer: str):
        return _i32(torch.ops.bqc.unsigned_pack(x, step, axis))

    @staticmethod
    def symbolic(g, x, step, axis, channels, layer):
        return _pack_node(g, "UnsignedPack", [x, step], axis, channels, layer)


class QuantizeCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin: int, qmax: int, bits: int, layer: str):
        return torch.ops.bqc.quantize_codes(x, scale, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, qmin, qmax, bits, layer):
        dtype = torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16
        return _typed(g.op(f"{DOMAIN}::QuantizeCodes", x, scale, qmin_i=qmin, qmax_i=qmax, bits_i=bits,
                           bqc_layer_s=layer), x, dtype)


def _conv_attrs(mod) -> dict:
    ph, pw = mod.padding
    return dict(kernel_shape_i=list(mod.kernel_size), strides_i=list(mod.stride), pads_i=[ph, pw, ph, pw],
                dilations_i=list(mod.dilation), group_i=mod.groups, in_channels_i=mod.in_channels)


class BinaryConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, mod, layer: str):
        s, p, d, g = mod._geometry()
        return torch.ops.bqc.binary_conv2d(x, w, scale, mod.in_channels // mod.groups, s, p, d, g, mod.input_kind)

    @staticmethod
    def symbolic(g, x, w, scale, mod, layer):
        return _typed(g.op(f"{DOMAIN}::BinaryConv2d", x, w, scale, **_conv_attrs(mod), bases_i=mod.bases,
                           input_kind_s=mod.input_kind, layout_version_i=D.LAYOUT_VERSION, bqc_layer_s=layer),
                      scale, torch.float32, 4)


class BinaryGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, mod, layer: str):
        return torch.ops.bqc.binary_dense(x, w, scale, mod.in_features, mod.input_kind)

    @staticmethod
    def symbolic(g, x, w, scale, mod, layer):
        return _typed(g.op(f"{DOMAIN}::BinaryGemm", x, w, scale, in_features_i=mod.in_features, bases_i=mod.bases,
                           input_kind_s=mod.input_kind, layout_version_i=D.LAYOUT_VERSION, bqc_layer_s=layer),
                      x, torch.float32)


class IntConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, mod, layer: str):
        s, p, d, g = mod._geometry()
        return torch.ops.bqc.int_conv2d(x, w, scale, s, p, d, g, mod.input_kind)

    @staticmethod
    def symbolic(g, x, w, scale, mod, layer):
        return _typed(g.op(f"{DOMAIN}::IntConv2d", x, w, scale, **_conv_attrs(mod), w_bits_i=mod.w_bits,
                           input_kind_s=mod.input_kind, bqc_layer_s=layer), scale, torch.float32, 4)


class IntGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, mod, layer: str):
        return torch.ops.bqc.int_dense(x, w, scale, mod.input_kind)

    @staticmethod
    def symbolic(g, x, w, scale, mod, layer):
        return _typed(g.op(f"{DOMAIN}::IntGemm", x, w, scale, in_features_i=mod.in_features, w_bits_i=mod.w_bits,
                           input_kind_s=mod.input_kind, bqc_layer_s=layer), x, torch.float32)


class IntMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, layer: str):
        return torch.ops.bqc.int_matmul(a, b, scale)

    @staticmethod
    def symbolic(g, a, b, scale, layer):
        return _typed(g.op(f"{DOMAIN}::IntMatMul", a, b, scale, bqc_layer_s=layer), a, torch.float32)
