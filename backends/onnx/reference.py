"""An executable reference of the ``ai.bqc`` domain: onnx's ``ReferenceEvaluator`` with the
custom ops implemented in numpy on :mod:`bqc.packing`'s bit-level references (XNOR-popcount
for bits x bits, also {0, 1} bits, integer GEMMs for codes). Slow; meant for tests and for checking a third-party
implementation of the domain on small models.

    from bqc.backends.onnx.reference import run
    outputs = run("out/model.onnx", {"x": x, "t": t})
"""
from __future__ import annotations

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bqc import packing

from .ops import DOMAIN


def _attr(op: OpRun, name: str, default=None):
    v = getattr(op, name, None)
    return default if v is None else v


def _conv_geometry(op: OpRun):
    strides = list(_attr(op, "strides", [1, 1]))
    pads = list(_attr(op, "pads", [0, 0, 0, 0]))
    dil = list(_attr(op, "dilations", [1, 1]))
    group = int(_attr(op, "group", 1))
    if strides[0] != strides[1] or len(set(pads)) != 1 or dil != [1, 1] or group != 1:
        raise NotImplementedError("the ai.bqc reference supports square stride, equal pads, dilation 1, group 1")
    return strides[0], pads[0]


def _nchw(y_nhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(y_nhwc.transpose(0, 3, 1, 2))


def _float_conv(x, w, stride, pad):
    """Plain float conv (NCHW, OIHW) in float64 for the reference's float-input case."""
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    oh = packing.conv_out_size(h, kh, stride, pad)
    ow = packing.conv_out_size(wd, kw, stride, pad)
    xp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad), np.float64)
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    out = np.zeros((n, oc, oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            xs = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", xs, w[:, :, i, j].astype(np.float64))
    return out


class SignPack(OpRun):
    op_domain = DOMAIN

    def _run(self, x, tau=None, axis=None, channels=None, layout_version=None):
        axis = int(_attr(self, "axis", 1))
        v = x.astype(np.float32)
        if tau is not None:
            shape = [1] * v.ndim
            shape[axis] = -1
            v = v + tau.astype(np.float32).reshape(shape)
        return (packing.pack_bits(np.moveaxis(v, axis, -1), axis=-1),)


class UnsignedPack(OpRun):
    op_domain = DOMAIN

    def _run(self, x, step, axis=None, channels=None, layout_version=None):
        axis = int(_attr(self, "axis", 1))
        bits = packing.unsigned_bits(x.astype(np.float32), np.float32(step))
        return (packing.pack_mask(np.moveaxis(bits, axis, -1), axis=-1),)


class QuantizeCodes(OpRun):
    op_domain = DOMAIN

    def _run(self, x, scale, qmin=None, qmax=None, bits=None):
        lo, hi = int(self.qmin), int(self.qmax)
        q = np.round(np.clip(x / scale.astype(x.dtype), lo, hi))  # numpy rounds half to even
        return (q.astype(np.int8 if lo >= -128 and hi <= 127 else np.int16),)


class BinaryConv2d(OpRun):
    op_domain = DOMAIN

    def _run(self, x, w, scale, **_):
        stride, pad = _conv_geometry(self)
        c, kind = int(self.in_channels), self.input_kind
        y = 0.0
        for b in range(w.shape[0]):
            if kind in ("bits", "bits01"):
                acc = _nchw(packing.ref_binary_conv2d(x, w[b], c, stride, pad, unsigned=kind == "bits01"))
            else:
                signs = packing.unpack_bits(w[b], c, axis=-1).transpose(0, 3, 1, 2)
                if kind == "codes":
                    acc = _nchw(packing.ref_w1ak_conv2d(x, signs, stride, pad))
                else:
                    acc = _float_conv(x, signs, stride, pad).astype(np.float32)
            y = y + acc.astype(np.float32) * scale[b].astype(np.float32).reshape(1, -1, 1, 1)
        return (np.asarray(y, np.float32),)


class BinaryGemm(OpRun):
    op_domain = DOMAIN

    def _run(self, x, w, scale, **_):
        k, kind = int(self.in_features), self.input_kind
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = 0.0
        for b in range(w.shape[0]):
            if kind in ("bits", "bits01"):
                acc = packing.ref_binary_dense(x2, w[b], k, unsigned=kind == "bits01")
            else:
                signs = packing.unpack_bits(w[b], k, axis=-1)
                acc = packing.ref_w1ak_dense(x2, signs) if kind == "codes" else \
                    (x2.astype(np.float64) @ signs.T.astype(np.float64)).astype(np.float32)
            y = y + acc.astype(np.float32) * scale[b].astype(np.float32)
        return (np.asarray(y, np.float32).reshape(*lead, -1),)


class IntConv2d(OpRun):
    op_domain = DOMAIN

    def _run(self, x, w, scale, **_):
        stride, pad = _conv_geometry(self)
        if self.input_kind == "codes":
            acc = _nchw(packing.ref_int_conv2d(x, w, stride, pad))
        else:
            acc = _float_conv(x, w, stride, pad).astype(np.float32)
        return ((acc.astype(np.float32) * scale.astype(np.float32).reshape(1, -1, 1, 1)).astype(np.float32),)


class IntGemm(OpRun):
    op_domain = DOMAIN

    def _run(self, x, w, scale, **_):
        x2 = x.reshape(-1, x.shape[-1])
        acc = packing.ref_int_dense(x2, w) if self.input_kind == "codes" else \
            (x2.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)
        return ((acc.astype(np.float32) * scale.astype(np.float32)).reshape(*x.shape[:-1], -1),)


class IntMatMul(OpRun):
    op_domain = DOMAIN

    def _run(self, a, b, scale):
        acc = np.matmul(a.astype(np.int64), b.astype(np.int64)).astype(np.int32)
        return ((acc.astype(np.float32) * scale.astype(np.float32)).astype(np.float32),)


CUSTOM_OPS = [SignPack, UnsignedPack, QuantizeCodes, BinaryConv2d, BinaryGemm, IntConv2d, IntGemm, IntMatMul]


def evaluator(model) -> ReferenceEvaluator:
    """A ReferenceEvaluator for a bqc ONNX model (path or ModelProto) with the ai.bqc ops."""
    if not hasattr(model, "graph"):
        model = str(model)
    return ReferenceEvaluator(model, new_ops=CUSTOM_OPS)


def run(model, feeds: dict) -> list[np.ndarray]:
    return evaluator(model).run(None, {k: np.asarray(v) for k, v in feeds.items()})
