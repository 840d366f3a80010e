"""``custom_convert_map`` for ``from_exported_program``: the ``bqc.*`` integer cores -> Relax.

Each converter gets ``(node, importer)`` (TVM 0.27 calls custom converters with the importer),
reads static shapes from the node's fake tensors (the program is exported with a static
batch), and emits into ``importer.block_builder``:

==========================  ==================================================================
``bqc.sign_pack``           ``call_tir`` of :func:`kernels.build.bitpack_primfunc` (NCHW conv
                            input, or ``[M, 1, 1, K]`` NHWC view of a dense input) -> uint32
                            NHWC-packed words.
``bqc.binary_conv2d``       per basis ``b``: ``call_tir`` of ``binary_conv2d_primfunc`` with the
                            packed weights re-laid out by :func:`bqc.packing.block_oc` and the
                            border table :func:`bqc.packing.conv_base_table` as ``relax.const``
                            -> exact int32 NHWC; then Relax ``astype(f32) * scale[b]`` summed
                            over bases in order, and ``permute_dims`` back to NCHW.
``bqc.binary_dense``        same with ``binary_dense_primfunc`` (input reshaped to ``[M, KW]``).
``bqc.quantize_codes``      Relax ops: ``round(clip(x / f32(step), qmin, qmax))`` -> int8 codes
                            (round = half-to-even, as ``torch.round``).
``bqc.int_conv2d``          codes -> ``uint8 q + 128`` NHWC (channels padded to 4 with 128) by
                            Relax ops, ``call_tir`` of ``int8_conv2d_primfunc`` (VNNI layout from
                            :func:`bqc.packing.block_oc_int8`, zero-point bias
                            :func:`bqc.packing.int8_bias`) -> int32 NHWC -> ``* scale``, NCHW.
``bqc.int_dense``           same with ``int8_dense_primfunc``.
``bqc.int_matmul``          Relax ``matmul`` of the codes in float32 (exact while
                            ``K * 128 * 128 < 2^24``) ``* scale``.
==========================  ==================================================================

Shapes the kernels do not cover (dilation, groups, non-square kernels, float/codes inputs to a
binary layer) fall back to exact Relax float convs / matmuls on unpacked weights
(``fallbacks`` counts them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tvm import relax

from bqc import packing

__all__ = ["Converter", "BQC_OPS"]

BQC_OPS = ("sign_pack", "quantize_codes", "binary_conv2d", "binary_dense", "int_conv2d",
           "int_dense", "int_matmul")


def _shape(node) -> tuple[int, ...]:
    return tuple(int(d) for d in node.meta["val"].shape)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _words(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().contiguous()
    return a.numpy() if a.dtype == torch.uint32 else a.numpy().view(np.uint32)


@dataclass
class Converter:
    """Builds the ``custom_convert_map`` for one exported program and one target.

    ``constants`` maps the program's placeholder names (``b_..._w_packed``) to their tensors, so
    converters can re-lay packed weights out at compile time.
    """

    ep: torch.export.ExportedProgram
    target: object
    lanes: int = 16
    funcs: dict = field(default_factory=dict)  # PrimFunc name -> GlobalVar
    counts: dict = field(default_factory=dict)
    fallbacks: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # kernel schedules that failed (-> fallback)

    def __post_init__(self):
        sig = self.ep.graph_signature
        tensors = dict(self.ep.state_dict)
        tensors.update(dict(self.ep.constants))
        self.constants = {}
        for spec in sig.input_specs:
            if spec.target is not None and spec.target in tensors:
                self.constants[spec.arg.name] = tensors[spec.target]

    # --------------------------------------------------------------- helpers
    def convert_map(self) -> dict:
        m = {f"{op}.default": getattr(self, f"_{op}") for op in BQC_OPS}
        m["floor_divide.default"] = self._floor_divide  # frontend bug workaround (see there)
        m["div.Tensor_mode"] = self._floor_divide
        return m

    def _floor_divide(self, node, imp):
        """``floor_divide`` / ``div(rounding_mode="floor")`` of an int64 tensor by a python int:
        the 0.27 frontend makes the scalar an int32 constant and Relax rejects the mixed dtypes
        (TBS timestep groups ``t // k``). Other ``div`` calls go to the frontend's converter."""
        a, b = node.args[:2]
        mode = node.kwargs.get("rounding_mode", "floor" if "floor" in str(node.target) else None)
        if mode is None or mode == "trunc":
            if mode == "trunc":
                raise NotImplementedError("div(rounding_mode='trunc') is not lowered")
            lhs = imp.env[a] if hasattr(a, "op") else relax.const(float(a), "float32")
            rhs = imp.env[b] if hasattr(b, "op") else relax.const(b, lhs.ty.dtype)
            return self._emit(imp, relax.op.divide(lhs, rhs))
        lhs = imp.env[a] if hasattr(a, "op") else None
        if lhs is None or hasattr(b, "op"):
            rhs = imp.env[b] if hasattr(b, "op") else b
            if lhs is None:
                lhs = relax.const(a)
            if not isinstance(rhs, relax.Expr):
                rhs = relax.const(rhs, lhs.ty.dtype)
            return self._emit(imp, relax.op.floor_divide(lhs, rhs))
        dt = lhs.ty.dtype
        return self._emit(imp, relax.op.floor_divide(lhs, relax.const(b, dt)))

    def _const(self, node) -> torch.Tensor:
        if not hasattr(node, "name") or node.name not in self.constants:
            raise NotImplementedError(f"bqc lowering needs a constant weight, got {node}")
        return self.constants[node.name]

    def _gvar(self, bb: relax.BlockBuilder, func) -> relax.GlobalVar:
        name = str(func.attrs["global_symbol"])
        if name not in self.funcs:
            self.funcs[name] = bb.add_func(func, name)
        return self.funcs[name]

    def _kernel(self, builder, *args):
        """A scheduled kernel PrimFunc, or None (and a recorded failure) when its schedule fails
        for this shape on this target (the caller then uses the exact float fallback)."""
        try:
            return builder(*args, target=self.target, lanes=self.lanes)
        except Exception as e:  # noqa: BLE001 - a schedule gap costs speed, not correctness
            self.failures.append((builder.__name__, args, f"{type(e).__name__}: {e}"[:200]))
            return None

    def _count(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1

    @staticmethod
    def _emit(imp, expr):
        return imp.block_builder.emit(expr)

    def _call_tir(self, imp, func, args, shape, dtype):
        gv = self._gvar(imp.block_builder, func)
        return self._emit(imp, relax.call_tir(gv, args, relax.TensorType(list(shape), dtype)))

    def _scaled_sum(self, imp, accs, scale, out_ch, ndim, channel_last=True):
        """sum_b f32(acc_b) * scale[b] with scale ``[B, OC]`` (bases in order)."""
        op = relax.op
        out = None
        for b, acc in enumerate(accs):
            s = self._emit(imp, op.strided_slice(scale, axes=[0], begin=[b], end=[b + 1]))
            s = self._emit(imp, op.reshape(s, [1] * (ndim - 1) + [out_ch]))
            term = self._emit(imp, op.multiply(op.astype(acc, "float32"), s))
            out = term if out is None else self._emit(imp, op.add(out, term))
        return out

    # --------------------------------------------------------------- sign_pack
    def _sign_pack(self, node, imp):
        from .kernels.build import bitpack_primfunc

        x_node, tau_node, ch_axis = node.args[0], node.args[1], int(node.args[2])
        x = imp.env[x_node]
        tau = imp.env[tau_node] if tau_node is not None else None
        shape = _shape(x_node)
        nd = len(shape)
        ch_axis = ch_axis % nd
        c = shape[ch_axis]
        cw = packing.num_words(c)
        dtype = str(x_node.meta["val"].dtype).replace("torch.", "")
        if tau is not None and str(tau_node.meta["val"].dtype) != str(x_node.meta["val"].dtype):
            tau = self._emit(imp, relax.op.astype(tau, dtype))
        args = [x] if tau is None else [x, tau]
        self._count("sign_pack")
        if nd == 4 and ch_axis == 1:
            n, _, h, w = shape
            f = bitpack_primfunc(n, c, h, w, "NCHW", with_tau=tau is not None, target=self.target, dtype=dtype)
            return self._call_tir(imp, f, args, (n, h, w, cw), "uint32")
        # generic: channels last, flatten the rest -> NHWC [M, 1, 1, C]
        if ch_axis != nd - 1:
            perm = [i for i in range(nd) if i != ch_axis] + [ch_axis]
            x = self._emit(imp, relax.op.permute_dims(x, perm))
            lead = [shape[i] for i in range(nd) if i != ch_axis]
        else:
            lead = list(shape[:-1])
        m = int(np.prod(lead, dtype=np.int64)) if lead else 1
        x4 = self._emit(imp, relax.op.reshape(x, [m, 1, 1, c]))
        args[0] = x4
        f = bitpack_primfunc(m, c, 1, 1, "NHWC", with_tau=tau is not None, target=self.target, dtype=dtype)
        out = self._call_tir(imp, f, args, (m, 1, 1, cw), "uint32")
        return self._emit(imp, relax.op.reshape(out, lead + [cw]))

    # --------------------------------------------------------------- quantize_codes
    def _quantize_codes(self, node, imp):
        op = relax.op
        x_node, s_node, qmin, qmax = node.args
        x, s = imp.env[x_node], imp.env[s_node]
        dtype = str(x_node.meta["val"].dtype).replace("torch.", "")
        out_dtype = str(node.meta["val"].dtype).replace("torch.", "")
        s = self._emit(imp, op.astype(s, dtype))
        v = self._emit(imp, op.divide(x, s))
        v = self._emit(imp, op.clip(v, float(qmin), float(qmax)))
        v = self._emit(imp, op.round(v))
        self._count("quantize_codes")
        return self._emit(imp, op.astype(v, out_dtype))

    # --------------------------------------------------------------- binary conv / dense
    def _binary_conv2d(self, node, imp):
        from .kernels.build import binary_conv2d_primfunc

        op = relax.op
        x_node, w_node, s_node, c, stride, padding, dilation, groups, x_kind = node.args
        x, scale = imp.env[x_node], imp.env[s_node]
        words = _words(self._const(w_node))  # [B, OC, KH, KW, CW]
        nb, oc, kh, kw, _ = words.shape
        (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
        out_shape = _shape(node)  # NCHW
        geom = int(groups) == 1 and kh == kw and sh == sw and ph == pw and dh == dw == 1
        if geom and x_kind == "codes" and x_node.meta["val"].dtype == torch.int8:
            return self._w1ak_conv2d(node, imp, words, int(c), kh, sh, ph)
        if not (geom and x_kind == "bits"):
            return self._conv_fallback(node, imp, "binary")
        n, h, w, _ = _shape(x_node)
        f = self._kernel(binary_conv2d_primfunc, n, int(c), oc, h, w, kh, sh, ph)
        if f is None:
            return self._conv_fallback(node, imp, "binary")
        oh, ow = out_shape[2], out_shape[3]
        accs = []
        for b in range(nb):
            wb = relax.const(packing.block_oc(words[b], self.lanes), "uint32")
            base = relax.const(packing.conv_base_table(words[b], int(c), h, w, sh, ph, lanes=self.lanes), "int32")
            accs.append(self._call_tir(imp, f, [x, wb, base], (n, oh, ow, oc), "int32"))
        self._count("binary_conv2d")
        y = self._scaled_sum(imp, accs, scale, oc, 4)
        return self._emit(imp, op.permute_dims(y, [0, 3, 1, 2]))

    def _binary_dense(self, node, imp):
        from .kernels.build import binary_dense_primfunc

        op = relax.op
        x_node, w_node, s_node, k, x_kind = node.args
        x, scale = imp.env[x_node], imp.env[s_node]
        words = _words(self._const(w_node))  # [B, N, KW]
        nb, nout, kwords = words.shape
        if x_kind == "codes" and x_node.meta["val"].dtype == torch.int8:
            return self._w1ak_dense(node, imp, words, int(k))
        if x_kind != "bits":
            return self._dense_fallback(node, imp, "binary")
        xs = _shape(x_node)
        lead = list(xs[:-1])
        m = int(np.prod(lead, dtype=np.int64)) if lead else 1
        f = self._kernel(binary_dense_primfunc, m, int(k), nout)
        if f is None:
            return self._dense_fallback(node, imp, "binary")
        x2 = self._emit(imp, op.reshape(x, [m, kwords]))
        accs = [self._call_tir(imp, f, [x2, relax.const(packing.block_oc(words[b], self.lanes), "uint32")],
                               (m, nout), "int32") for b in range(nb)]
        self._count("binary_dense")
        y = self._scaled_sum(imp, accs, scale, nout, 2)
        return self._emit(imp, op.reshape(y, lead + [nout]))

    # --------------------------------------------------------------- W1Ak (int8 route)
    def _w1ak_conv2d(self, node, imp, words, c, k, stride, pad):
        """Binary weights, k-bit code inputs: the int8 (VNNI) kernels with +-1 int8 weights."""
        from .kernels.build import int8_conv2d_primfunc

        op = relax.op
        x_node = node.args[0]
        x, scale = imp.env[x_node], imp.env[node.args[2]]
        nb, oc = words.shape[:2]
        n, _, h, w = _shape(x_node)
        oh, ow = _shape(node)[2:]
        f = self._kernel(int8_conv2d_primfunc, n, c, oc, h, w, k, stride, pad)
        if f is None:
            return self._conv_fallback(node, imp, "binary")
        xu = self._codes_u8(imp, x, c, True, perm=[0, 2, 3, 1])
        accs = []
        for b in range(nb):
            signs = packing.unpack_bits(words[b], c, axis=-1).transpose(0, 3, 1, 2)  # OIHW int8 +-1
            accs.append(self._call_tir(imp, f, [xu, relax.const(packing.block_oc_int8(signs, self.lanes), "int8"),
                                                relax.const(packing.int8_bias(signs, self.lanes), "int32")],
                                       (n, oh, ow, oc), "int32"))
        self._count("w1ak_conv2d")
        y = self._scaled_sum(imp, accs, scale, oc, 4)
        return self._emit(imp, op.permute_dims(y, [0, 3, 1, 2]))

    def _w1ak_dense(self, node, imp, words, k):
        from .kernels.build import int8_dense_primfunc

        op = relax.op
        x_node = node.args[0]
        x, scale = imp.env[x_node], imp.env[node.args[2]]
        nb, nout = words.shape[:2]
        lead = list(_shape(x_node)[:-1])
        m = int(np.prod(lead, dtype=np.int64)) if lead else 1
        f = self._kernel(int8_dense_primfunc, m, k, nout)
        if f is None:
            return self._dense_fallback(node, imp, "binary")
        xu = self._codes_u8(imp, self._emit(imp, op.reshape(x, [m, k])), k, True)
        accs = []
        for b in range(nb):
            signs = packing.unpack_bits(words[b], k, axis=-1)  # [N, K] int8 +-1
            accs.append(self._call_tir(imp, f, [xu, relax.const(packing.block_oc_int8(signs, self.lanes), "int8"),
                                                relax.const(packing.int8_bias(signs, self.lanes), "int32")],
                                       (m, nout), "int32"))
        self._count("w1ak_dense")
        y = self._scaled_sum(imp, accs, scale, nout, 2)
        return self._emit(imp, op.reshape(y, lead + [nout]))

    # --------------------------------------------------------------- int8 conv / dense
    def _codes_u8(self, imp, x, c, channel_axis_last: bool, perm=None):
        """int codes -> uint8 ``q + 128`` (channels last, padded to a multiple of 4 with 128)."""
        op = relax.op
        v = self._emit(imp, op.astype(op.add(op.astype(x, "int32"), relax.const(128, "int32")), "uint8"))
        if perm is not None:
            v = self._emit(imp, op.permute_dims(v, perm))
        c4 = -(-c // packing.INT8_GROUP) * packing.INT8_GROUP
        if c4 != c:
            shape = [int(d) for d in v.ty.shape]
            pad = relax.const(np.full(shape[:-1] + [c4 - c], 128, np.uint8), "uint8")
            v = self._emit(imp, op.concat([v, pad], axis=-1))
        return v

    def _int_conv2d(self, node, imp):
        from .kernels.build import int8_conv2d_primfunc

        op = relax.op
        x_node, w_node, s_node, stride, padding, dilation, groups, x_kind = node.args
        x, scale = imp.env[x_node], imp.env[s_node]
        wc = self._const(w_node).detach().cpu().numpy()  # int8 [OC, C, KH, KW]
        oc, c, kh, kw = wc.shape
        (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
        xdt = x_node.meta["val"].dtype
        fast = (x_kind == "codes" and xdt == torch.int8 and int(groups) == 1 and kh == kw and sh == sw
                and ph == pw and dh == dw == 1 and wc.dtype == np.int8)
        if not fast:
            return self._conv_fallback(node, imp, "int")
        n, _, h, w = _shape(x_node)
        oh, ow = _shape(node)[2:]
        f = self._kernel(int8_conv2d_primfunc, n, c, oc, h, w, kh, sh, ph)
        if f is None:
            return self._conv_fallback(node, imp, "int")
        xu = self._codes_u8(imp, x, c, True, perm=[0, 2, 3, 1])
        acc = self._call_tir(imp, f, [xu, relax.const(packing.block_oc_int8(wc, self.lanes), "int8"),
                                      relax.const(packing.int8_bias(wc, self.lanes), "int32")],
                             (n, oh, ow, oc), "int32")
        self._count("int_conv2d")
        s2 = self._emit(imp, op.reshape(scale, [1, oc]))
        y = self._scaled_sum(imp, [acc], s2, oc, 4)
        return self._emit(imp, op.permute_dims(y, [0, 3, 1, 2]))

    def _int_dense(self, node, imp):
        from .kernels.build import int8_dense_primfunc

        op = relax.op
        x_node, w_node, s_node, x_kind = node.args
        x, scale = imp.env[x_node], imp.env[s_node]
        wc = self._const(w_node).detach().cpu().numpy()  # int8 [N, K]
        nout, k = wc.shape
        if x_kind != "codes" or x_node.meta["val"].dtype != torch.int8 or wc.dtype != np.int8:
            return self._dense_fallback(node, imp, "int")
        xs = _shape(x_node)
        lead = list(xs[:-1])
        m = int(np.prod(lead, dtype=np.int64)) if lead else 1
        f = self._kernel(int8_dense_primfunc, m, k, nout)
        if f is None:
            return self._dense_fallback(node, imp, "int")
        x2 = self._emit(imp, op.reshape(x, [m, k]))
        xu = self._codes_u8(imp, x2, k, True)
        acc = self._call_tir(imp, f, [xu, relax.const(packing.block_oc_int8(wc, self.lanes), "int8"),
                                      relax.const(packing.int8_bias(wc, self.lanes), "int32")], (m, nout), "int32")
        self._count("int_dense")
        s2 = self._emit(imp, op.reshape(scale, [1, nout]))
        y = self._scaled_sum(imp, [acc], s2, nout, 2)
        return self._emit(imp, op.reshape(y, lead + [nout]))

    def _int_matmul(self, node, imp):
        op = relax.op
        a_node, b_node, s_node = node.args
        a, b, scale = imp.env[a_node], imp.env[b_node], imp.env[s_node]
        out_dtype = str(node.meta["val"].dtype).replace("torch.", "")
        y = self._emit(imp, op.matmul(op.astype(a, "float32"), op.astype(b, "float32")))
        self._count("int_matmul")
        if out_dtype != "float32":
            y = self._emit(imp, op.astype(y, out_dtype))
        return self._emit(imp, op.multiply(y, scale))

    # --------------------------------------------------------------- fallbacks (exact float)
    def _float_input(self, imp, x_node, x_kind, channels, conv: bool):
        """The float32 value of a layer input of kind bits/codes/float (bits unpacked to +-1)."""
        op = relax.op
        x = imp.env[x_node]
        if x_kind == "float":
            return x
        if x_kind == "codes":
            return self._emit(imp, op.astype(x, "float32"))
        # bits: [..., CW] -> [..., C] of +-1 (channel c = bit c % 32 of word c // 32)
        idx = np.arange(channels)
        words = self._emit(imp, op.take(x, relax.const((idx // 32).astype("int64")), axis=-1))
        shift = relax.const((idx % 32).astype(np.uint32), "uint32")
        bits = self._emit(imp, op.bitwise_and(op.right_shift(words, shift), relax.const(1, "uint32")))
        v = self._emit(imp, op.subtract(op.multiply(op.astype(bits, "float32"), relax.const(2.0, "float32")),
                                        relax.const(1.0, "float32")))
        if conv:  # NHWC -> NCHW
            v = self._emit(imp, op.permute_dims(v, [0, 3, 1, 2]))
        return v

    def _conv_fallback(self, node, imp, kind):
        op = relax.op
        if kind == "binary":
            x_node, w_node, s_node, c, stride, padding, dilation, groups, x_kind = node.args
            words = _words(self._const(w_node))
            signs = packing.unpack_bits(words, int(c), axis=-1).astype(np.float32)  # [B,OC,KH,KW,C]
            ws = [np.ascontiguousarray(signs[b].transpose(0, 3, 1, 2)) for b in range(signs.shape[0])]
            scale = imp.env[s_node]
            cin = int(c) * int(groups)
        else:
            x_node, w_node, s_node, stride, padding, dilation, groups, x_kind = node.args
            wc = self._const(w_node).detach().cpu().numpy().astype(np.float32)
            ws = [wc]
            scale = self._emit(imp, op.reshape(imp.env[s_node], [1, wc.shape[0]]))
            cin = wc.shape[1] * int(groups)
        xv = self._float_input(imp, x_node, x_kind, cin, conv=True)
        accs = []
        for w in ws:
            y = self._emit(imp, op.nn.conv2d(xv, relax.const(w), strides=list(_pair(stride)),
                                             padding=list(_pair(padding)), dilation=list(_pair(dilation)),
                                             groups=int(groups)))
            accs.append(y)
        oc = ws[0].shape[0]
        out = None
        for b, acc in enumerate(accs):
            s = self._emit(imp, op.reshape(op.strided_slice(scale, axes=[0], begin=[b], end=[b + 1]), [1, oc, 1, 1]))
            term = self._emit(imp, op.multiply(acc, s))
            out = term if out is None else self._emit(imp, op.add(out, term))
        self.fallbacks.append((node.name, f"{kind}_conv2d", x_kind))
        return out

    def _dense_fallback(self, node, imp, kind):
        op = relax.op
        if kind == "binary":
            x_node, w_node, s_node, k, x_kind = node.args
            words = _words(self._const(w_node))
            signs = packing.unpack_bits(words, int(k), axis=-1).astype(np.float32)  # [B, N, K]
            ws = [signs[b] for b in range(signs.shape[0])]
            scale = imp.env[s_node]
        else:
            x_node, w_node, s_node, x_kind = node.args
            wc = self._const(w_node).detach().cpu().numpy().astype(np.float32)
            ws, k = [wc], wc.shape[1]
            scale = self._emit(imp, op.reshape(imp.env[s_node], [1, wc.shape[0]]))
        xv = self._float_input(imp, x_node, x_kind, int(k), conv=False)
        out = None
        for b, w in enumerate(ws):
            acc = self._emit(imp, op.matmul(xv, relax.const(np.ascontiguousarray(w.T))))
            s = self._emit(imp, op.reshape(op.strided_slice(scale, axes=[0], begin=[b], end=[b + 1]), [w.shape[0]]))
            term = self._emit(imp, op.multiply(acc, s))
            out = term if out is None else self._emit(imp, op.add(out, term))
        self.fallbacks.append((node.name, f"{kind}_dense", x_kind))
        return out
