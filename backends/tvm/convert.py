"""``custom_convert_map`` for ``from_exported_program``: the ``bqc.*`` integer cores -> Relax.

Each converter gets ``(node, importer)`` (TVM 0.27 calls custom converters with the importer),
reads static shapes from the node's fake tensors (the program is exported with a static
batch), and emits into ``importer.block_builder``:

==========================  ==================================================================
``bqc.sign_pack``           ``call_tir`` of :func:`kernels.build.bitpack_primfunc` (NCHW conv
                            input, or ``[M, 1, 1, K]`` NHWC view of a dense input) -> uint32
                            NHWC-packed words.
``bqc.unsigned_pack``       the same packer with ``unsigned=True`` (bit 1 iff ``x / step > 0.5``:
                            the {0, 1} codes of DoReFa's 1-bit activation, input kind ``bits01``).
``bqc.binary_conv2d``       per basis ``b``: ``call_tir`` of ``binary_conv2d_primfunc`` with the
                            packed weights re-laid out by :func:`bqc.packing.block_oc` and the
                            border table :func:`bqc.packing.conv_base_table` as ``relax.const``,
                            and the fused ``epilogue="scale_bias"`` (``scale[b]``, zero bias)
                            -> float32 NHWC ``f32(acc) * scale[b]`` (bit-identical to the
                            reference); bases summed in order, ``permute_dims`` back to NCHW
                            (fused with the layer's float epilogue by FuseOps). Without the
                            epilogue variant (``fuse_epilogue=False`` or its schedule fails):
                            int32 kernel + Relax ``astype(f32) * scale[b]``.
``bqc.binary_dense``        same with ``binary_dense_primfunc`` (input reshaped to ``[M, KW]``).
                            ``bits01`` inputs ({0, 1} activation bits) take the same kernels
                            with ``out = base - acc`` (``binary01_*_primfunc``; base: the
                            weights' popcount per output channel, ``conv_base_table(...,
                            unsigned=True)`` / ``weight_popcount``).
``bqc.quantize_codes``      Relax ops: ``round(clip(x / f32(step), qmin, qmax))`` -> int8 codes
                            (round = half-to-even, as ``torch.round``).
``bqc.int_conv2d``          codes -> ``uint8 q + 128`` NHWC (channels padded to 4 with 128) by
                            Relax ops, ``call_tir`` of ``int8_conv2d_primfunc`` (VNNI layout from
                            :func:`bqc.packing.block_oc_int8`, zero-point bias
                            :func:`bqc.packing.int8_bias`), fused ``* scale`` -> NHWC, NCHW.
                            W1Ak binary layers (codes input) take the same layout with +-1 int8
                            weights per basis (``w1ak_conv2d_primfunc``: the target's ``w1ak``
                            kernel route, :data:`bqc.backends.tvm.target.KERNEL_ROUTES`).
``bqc.int_dense``           same with ``int8_dense_primfunc``.
``bqc.int_matmul``          Relax ``matmul`` of the codes in float32 when that is exact
                            (``K * 128 * 128 < 2^24``), else ``call_tir`` of
                            ``int_matmul_primfunc`` (int32 accumulator; float64 matmul if it
                            does not schedule), then ``* scale``.
``adaptive_avg_pool{1,2}d`` the shortcut's channel pooling: injective reshape / broadcast /
                            strided-slice sums when the pooled axis has windows of at most
                            :data:`MAX_POOL_WINDOW` elements (:meth:`Converter._pool_axis`),
                            else the frontend's converter.
``upsample_nearest2d``      integer factors: reshape + broadcast + reshape (exact).
==========================  ==================================================================

Shapes the kernels do not cover (dilation, groups, non-square kernels, float inputs to a
binary layer) fall back to exact Relax float convs / matmuls on unpacked weights
(``fallbacks`` counts them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tvm import relax

from bqc import packing
from bqc.packing import pair as _pair
from bqc.packing import words_numpy as _words

from .schedules.float_cpu import VIEW_PREFIX

__all__ = ["Converter", "BQC_OPS"]

#: adaptive average pools whose windows have at most this many elements become injective ops
MAX_POOL_WINDOW = 4

BQC_OPS = ("sign_pack", "unsigned_pack", "quantize_codes", "binary_conv2d", "binary_dense", "int_conv2d",
           "int_dense", "int_matmul")


def _shape(node) -> tuple[int, ...]:
    return tuple(int(d) for d in node.meta["val"].shape)


#: widest pixel row a 1x1 conv's kernel call is given (see :func:`pixel_rows`)
PIXEL_ROW = 64


def pixel_rows(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The ``(H', W')`` a conv kernel is called with for an ``H x W`` input.

    A 1x1, stride-1, unpadded conv treats pixels independently, and its NHWC input and output
    are the same memory under any ``H' x W' = H x W``. The kernels parallelise over rows and
    register-tile along a row, so a narrow row costs a row's setup per few pixels: the
    attention ``qkv`` / ``proj_out`` convs (conv1d over the flattened image, ``W = 1``) ran
    6-11x slower as ``64 x 1`` than as ``1 x 64`` (mnist16, W1A1 and int8 kernels alike). Such a
    conv is called with rows of the largest divisor of ``H x W`` up to :data:`PIXEL_ROW`, when
    that is wider than ``W``; anything else keeps its shape. Exact: the same per-pixel sums."""
    if (kernel, stride, padding) != (1, 1, 0) or w >= PIXEL_ROW:
        return h, w
    n = h * w
    row = max(d for d in range(1, min(n, PIXEL_ROW) + 1) if n % d == 0)
    return (n // row, row) if row > w else (h, w)


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
    #: use the kernels' fused ``scale_bias`` epilogue (float32 NHWC out) instead of separate
    #: ``astype * scale`` Relax ops after an int32 kernel
    fuse_epilogue: bool = True
    #: layers with several bases (binarydm: 2) run as one kernel call over all bases' output
    #: channels (fused epilogue only)
    merge_bases: bool = True

    def __post_init__(self):
        self._kernels = {}
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
        # the shortcut's channel pooling (``Shortcut(channels="pool")``; torch.export decomposes
        # adaptive_avg_pool1d to _adaptive_avg_pool2d): reshape/broadcast instead of TOPI's
        # adaptive pool (a reduction with data-dependent windows, slow)
        for name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d"):
            m[f"{name}.default"] = self._adaptive_avg_pool
            m[f"_{name}.default"] = self._adaptive_avg_pool
        m["upsample_nearest2d.vec"] = self._upsample_nearest2d
        return m

    def _upsample_nearest2d(self, node, imp):
        """Nearest upsampling by integer factors (the UNet decoder's 2x): ``y[h, w] = x[h // sh,
        w // sw]`` (torch's ``floor(dst * in / out)``, exact) as expand_dims + broadcast +
        reshape: injective, so it fuses with its neighbours with plain integer indexing (TOPI's
        ``resize2d`` computes float coordinates per element). Other sizes: the frontend's
        converter."""
        op = relax.op
        x = imp.env[node.args[0]]
        shape = [int(d) for d in x.ty.shape]
        out = _shape(node)
        if len(shape) != 4 or len(out) != 4 or any(o % i for o, i in zip(out[2:], shape[2:])):
            return imp._upsample_nearest2d(node)
        n, c, h, w = shape
        sh, sw = out[2] // h, out[3] // w
        v = self._emit(imp, op.reshape(x, [n, c, h, 1, w, 1]))
        v = self._emit(imp, op.broadcast_to(v, [n, c, h, sh, w, sw]))
        self._count("upsample_nearest")
        return self._emit(imp, op.reshape(v, [n, c, h * sh, w * sw]))

    def _pool_axis(self, imp, x, shape, axis, out):
        """Adaptive average pooling of one axis as injective ops (they fuse with the
        surrounding transposes into one pass, where TOPI's adaptive pool is a reduction with
        data-dependent windows, and slow):

        * ``out = k * n`` (every window one element, ``y[j] = x[j // k]``, exact):
          expand_dims + broadcast + reshape;
        * windows of at most :data:`MAX_POOL_WINDOW` elements (torch's ``start = floor(j n /
          out)``, ``end = ceil((j + 1) n / out)``): the sum of the ``t``-th element of every window
          (strided slices when all windows have ``k`` elements, else ``take`` with a mask for
          the shorter windows), added in window order like the adaptive pool's sum, divided by
          the window sizes afterwards.

        Returns ``(sum_expr, sizes)`` (``sizes``: None when no division is needed, else an int
        or a per-output list), or None."""
        op = relax.op
        n = shape[axis]
        if out == n:
            return x, None
        if out % n == 0:
            k = out // n
            v = self._emit(imp, op.expand_dims(x, [axis + 1]))
            v = self._emit(imp, op.broadcast_to(v, shape[:axis + 1] + [k] + shape[axis + 1:]))
            return self._emit(imp, op.reshape(v, shape[:axis] + [out] + shape[axis + 1:])), None
        starts = [(j * n) // out for j in range(out)]
        ends = [-((-(j + 1) * n) // out) for j in range(out)]
        sizes = [e - b for b, e in zip(starts, ends)]
        kmax = max(sizes)
        if kmax > MAX_POOL_WINDOW:
            return None
        regular = n % out == 0
        g = math.gcd(n, out)
        period, nper = n // g, out // g
        if not regular and nper * kmax <= 4 * MAX_POOL_WINDOW:
            # windows never cross a period of ``n / g`` inputs / ``out / g`` outputs: per output
            # phase r, the sum of its window's strided slices, divided by the window size,
            # then the phases interleaved (concat + reshape), all injective
            xv = self._emit(imp, op.reshape(x, shape[:axis] + [g, period] + shape[axis + 1:]))
            phases = []
            for r in range(nper):
                b, e = (r * n) // out, -((-(r + 1) * n) // out)
                acc = None
                for i in range(b, e):
                    term = self._emit(imp, op.strided_slice(xv, axes=[axis + 1], begin=[i], end=[i + 1]))
                    acc = term if acc is None else self._emit(imp, op.add(acc, term))
                phases.append(self._emit(imp, op.divide(acc, relax.const(float(e - b), "float32"))))
            v = self._emit(imp, op.concat(phases, axis=axis + 1))
            return self._emit(imp, op.reshape(v, shape[:axis] + [out] + shape[axis + 1:])), None
        acc = None
        for t in range(kmax):
            if regular:  # windows [j k, (j + 1) k): element t of each is x[t::k]
                term = self._emit(imp, op.strided_slice(x, axes=[axis], begin=[t], end=[n], strides=[kmax]))
            else:
                idx = np.array([min(b + t, e - 1) for b, e in zip(starts, ends)], np.int64)
                # indices are in range: "clip" only silences TVM's per-op "fast mode" warning
                term = self._emit(imp, op.take(x, relax.const(idx), axis=axis, mode="clip"))
                if any(b + t >= e for b, e in zip(starts, ends)):
                    mshape = [1] * len(shape)
                    mshape[axis] = out
                    mask = np.array([b + t < e for b, e in zip(starts, ends)]).reshape(mshape)
                    term = self._emit(imp, op.where(relax.const(mask), term, relax.const(0.0, "float32")))
            acc = term if acc is None else self._emit(imp, op.add(acc, term))
        return acc, (kmax if regular else sizes)

    def _adaptive_avg_pool(self, node, imp):
        """``adaptive_avg_pool{1,2}d`` whose pooled axes have regular windows (at most one axis
        really pooled; see :meth:`_pool_axis`); anything else goes to the frontend's converter."""
        op = relax.op
        name = str(node.target.__name__).lstrip("_").split(".")[0]
        x = imp.env[node.args[0]]
        size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
        size = [int(v) for v in (size if isinstance(size, (list, tuple)) else [size])]
        shape = [int(d) for d in x.ty.shape]
        nd = 1 if name.endswith("1d") else 2
        if len(size) == 1 and nd == 2:
            size = size * 2
        axes = list(range(len(shape) - nd, len(shape)))
        changed = [a for a, o in zip(axes, size) if o != shape[a]]
        res = None
        if len(changed) <= 1 and str(x.ty.dtype) == "float32":
            a = changed[0] if changed else axes[-1]
            res = self._pool_axis(imp, x, shape, a, size[axes.index(a)])
        if res is None:
            fallback = getattr(imp, f"_{name}")
            return fallback(node)
        v, sizes = res
        self._count("channel_pool")
        if sizes is None:
            return v
        if isinstance(sizes, int):
            return self._emit(imp, op.divide(v, relax.const(float(sizes), "float32")))
        dshape = [1] * len(shape)
        dshape[a] = len(sizes)
        div = relax.const(np.array(sizes, np.float32).reshape(dshape))
        return self._emit(imp, op.divide(v, div))

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

    def _kernel(self, builder, *args, **kw):
        """A scheduled kernel PrimFunc, or None (and a recorded failure) when its schedule fails
        for this shape on this target (the caller then uses the exact float fallback). Built
        once per (builder, shape, options): the UNets repeat a few layer shapes many times."""
        key = (builder.__name__, args, tuple(sorted(kw.items())))
        if key in self._kernels:
            return self._kernels[key]
        try:
            f = builder(*args, target=self.target, lanes=self.lanes, **kw)
        except Exception as e:  # noqa: BLE001 - a schedule gap costs speed, not correctness
            self.failures.append((builder.__name__ + (f"[{kw}]" if kw else ""), args,
                                  f"{type(e).__name__}: {e}"[:200]))
            f = None
        self._kernels[key] = f
        return f

    def _kernel_epi(self, builder, *args, scale=None):
        """``(func, fused)``: the kernel with the fused float epilogue ``acc * scale[oc] +
        out_bias[oc]`` (``epilogue="scale_bias"``, float32 NHWC output) when
        :attr:`fuse_epilogue` and the scale is float32 and that variant schedules, else the plain
        int32 kernel (``fused`` False), or ``(None, False)``."""
        if self.fuse_epilogue and scale is not None and str(scale.ty.dtype) == "float32":
            f = self._kernel(builder, *args, epilogue="scale_bias")
            if f is not None:
                return f, True
        return self._kernel(builder, *args), False

    def _epi_args(self, imp, scale, b, out_ch):
        """Epilogue inputs of basis ``b``: ``scale[b] f32[OC]`` and a zero ``out_bias``
        (``float(acc) * s + 0`` is exactly the reference's ``float(acc) * s``)."""
        op = relax.op
        s = self._emit(imp, op.reshape(op.strided_slice(scale, axes=[0], begin=[b], end=[b + 1]), [out_ch]))
        return [s, relax.const(np.zeros(out_ch, np.float32), "float32")]

    def _merged_bases(self, imp, builder, args, consts, scale, nb, out_ch, out_shape):
        """All ``nb`` bases of a layer as ONE kernel call with ``nb * out_ch`` output channels
        (weights concatenated along the output channels, ``consts(nb)`` builds the constant
        inputs; epilogue scale ``scale.reshape(nb * out_ch)``): the input is read once for all
        bases. Returns the float32 per-basis terms (``strided_slice`` of the output, summed in
        basis order by the caller, which FuseOps fuses with the transpose), or None when
        :attr:`merge_bases` is off or the wide kernel does not schedule."""
        if not (self.merge_bases and nb > 1):
            return None
        f = self._kernel(builder, *args, epilogue="scale_bias")
        if f is None:
            return None
        op = relax.op
        wide = nb * out_ch
        s = self._emit(imp, op.reshape(scale, [wide]))
        out = self._call_tir(imp, f, list(consts) + [s, relax.const(np.zeros(wide, np.float32), "float32")],
                             tuple(out_shape[:-1]) + (wide,), "float32")
        ax = len(out_shape) - 1
        self._count("merged_bases")
        return [self._emit(imp, op.strided_slice(out, axes=[ax], begin=[b * out_ch], end=[(b + 1) * out_ch]))
                for b in range(nb)]

    def _over_bases(self, imp, kind, builder, f, fused, shape_args, inputs, weight_consts, words, scale, out_shape):
        """A binary-weight layer as kernel calls: the ``nb`` bases of ``words`` ``[B, OC, ...]``
        in ONE call when they merge (:meth:`_merged_bases`: weights stacked along the output
        channels), else one call per basis, the scaled results summed in basis order.
        ``shape_args``: the kernel builder's arguments (output channels third, as every bqc
        kernel builder takes them); ``inputs``: the activation inputs; ``weight_consts(w)``: the
        kernel's constant inputs for packed weights ``w`` (one basis, or all stacked). Returns
        the float32 channels-last result of shape ``out_shape``."""
        nb, out_ch = words.shape[:2]
        if fused and nb > 1 and self.merge_bases:
            wide = tuple(shape_args[:2]) + (nb * out_ch,) + tuple(shape_args[3:])
            wall = words.reshape((nb * out_ch,) + words.shape[2:])
            terms = self._merged_bases(imp, builder, wide, inputs + weight_consts(wall), scale, nb, out_ch, out_shape)
            if terms is not None:
                self._count(kind)
                return self._sum_in_order(imp, terms)
        accs = []
        for b in range(nb):
            args = inputs + weight_consts(words[b])
            if fused:
                accs.append(self._call_tir(imp, f, args + self._epi_args(imp, scale, b, out_ch), out_shape, "float32"))
            else:
                accs.append(self._call_tir(imp, f, args, out_shape, "int32"))
        self._count(kind)
        return self._sum_in_order(imp, accs) if fused else self._scaled_sum(imp, accs, scale, out_ch, len(out_shape))

    def _sum_in_order(self, imp, terms):
        out = None
        for t in terms:
            out = t if out is None else self._emit(imp, relax.op.add(out, t))
        return out

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

    # --------------------------------------------------------------- sign_pack / unsigned_pack
    def _sign_pack(self, node, imp):
        return self._pack(node, imp, unsigned=False)

    def _unsigned_pack(self, node, imp):
        return self._pack(node, imp, unsigned=True)

    def _pack(self, node, imp, unsigned: bool):
        """``sign_pack(x, tau, ch_axis)`` or ``unsigned_pack(x, step, ch_axis)`` (the packer's
        second input: the per-channel threshold, or the step as ``[1]`` in x's dtype)."""
        from functools import partial

        from .kernels.build import bitpack_primfunc

        x_node, p_node, ch_axis = node.args[0], node.args[1], int(node.args[2])
        x = imp.env[x_node]
        p = imp.env[p_node] if p_node is not None else None
        shape = _shape(x_node)
        nd = len(shape)
        ch_axis = ch_axis % nd
        c = shape[ch_axis]
        cw = packing.num_words(c)
        dtype = str(x_node.meta["val"].dtype).replace("torch.", "")
        if p is not None and str(p_node.meta["val"].dtype) != str(x_node.meta["val"].dtype):
            p = self._emit(imp, relax.op.astype(p, dtype))
        if unsigned:
            p = self._emit(imp, relax.op.reshape(p, [1]))
        args = [x] if p is None else [x, p]
        self._count("unsigned_pack" if unsigned else "sign_pack")
        pack = partial(bitpack_primfunc, unsigned=unsigned, with_tau=p is not None, target=self.target, dtype=dtype)
        if nd == 4 and ch_axis == 1:
            n, _, h, w = shape
            if w == 1 and h > 1:
                # [N, C, H, 1] (attention / 1-D inputs) is the same memory as [N, C, 1, H], and
                # the packed [N, 1, H, CW] the same as [N, H, 1, CW]: pack that view, whose
                # long axis is the one the packer vectorises (W)
                args[0] = self._emit(imp, relax.op.reshape(x, [n, c, 1, h]))
                f = pack(n, c, 1, h, "NCHW")
                out = self._call_tir(imp, f, args, (n, 1, h, cw), "uint32")
                return self._emit(imp, relax.op.reshape(out, [n, h, 1, cw]))
            f = pack(n, c, h, w, "NCHW")
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
        f = pack(m, c, 1, 1, "NHWC")
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
        from .kernels.build import binary01_conv2d_primfunc, binary_conv2d_primfunc

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
        if not (geom and x_kind in ("bits", "bits01")):
            return self._conv_fallback(node, imp, "binary")
        unsigned = x_kind == "bits01"  # {0, 1} activation bits: out = popcount(w) - acc
        builder = binary01_conv2d_primfunc if unsigned else binary_conv2d_primfunc
        n, h0, w0, cw = _shape(x_node)
        h, w = pixel_rows(h0, w0, kh, sh, ph)
        f, fused = self._kernel_epi(builder, n, int(c), oc, h, w, kh, sh, ph, scale=scale)
        if f is None:
            return self._conv_fallback(node, imp, "binary")
        oh, ow = out_shape[2], out_shape[3]
        if (h, w) != (h0, w0):
            x = self._emit(imp, op.reshape(x, [n, h, w, cw]))
            self._count("pixel_rows")
        consts = lambda wb: [relax.const(packing.block_oc(wb, self.lanes), "uint32"),
                             relax.const(packing.conv_base_table(wb, int(c), h, w, sh, ph, lanes=self.lanes,
                                                                 unsigned=unsigned), "int32")]
        y = self._over_bases(imp, "binary_conv2d", builder, f, fused, (n, int(c), oc, h, w, kh, sh, ph),
                             [x], consts, words, scale, self._kernel_out(n, oc, h0, w0, h, w, oh, ow))
        return self._nchw(imp, y, (n, oh, ow, oc))

    def _binary_dense(self, node, imp):
        from .kernels.build import binary01_dense_primfunc, binary_dense_primfunc

        op = relax.op
        x_node, w_node, s_node, k, x_kind = node.args
        x, scale = imp.env[x_node], imp.env[s_node]
        words = _words(self._const(w_node))  # [B, N, KW]
        nb, nout, kwords = words.shape
        if x_kind == "codes" and x_node.meta["val"].dtype == torch.int8:
            return self._w1ak_dense(node, imp, words, int(k))
        if x_kind not in ("bits", "bits01"):
            return self._dense_fallback(node, imp, "binary")
        unsigned = x_kind == "bits01"  # {0, 1} activation bits: out = popcount(w) - acc
        builder = binary01_dense_primfunc if unsigned else binary_dense_primfunc
        xs = _shape(x_node)
        lead = list(xs[:-1])
        m = int(np.prod(lead, dtype=np.int64)) if lead else 1
        f, fused = self._kernel_epi(builder, m, int(k), nout, scale=scale)
        if f is None:
            return self._dense_fallback(node, imp, "binary")
        x2 = self._emit(imp, op.reshape(x, [m, kwords]))

        def consts(wb):
            out = [relax.const(packing.block_oc(wb, self.lanes), "uint32")]
            return out + [relax.const(packing.weight_popcount(wb, self.lanes), "int32")] if unsigned else out

        y = self._over_bases(imp, "binary_dense", builder, f, fused, (m, int(k), nout), [x2], consts,
                             words, scale, (m, nout))
        return self._emit(imp, op.reshape(y, lead + [nout]))

    # --------------------------------------------------------------- W1Ak (int8 route)
    def _w1ak_conv2d(self, node, imp, words, c, k, stride, pad):
        """Binary weights, k-bit code inputs: the int8-layout kernels with +-1 int8 weights, on the
        target's ``w1ak`` route (VNNI, AVX-512BW / AVX2 ``vpmaddubsw``, or generic)."""
        from .kernels.build import w1ak_conv2d_primfunc

        x_node = node.args[0]
        x, scale = imp.env[x_node], imp.env[node.args[2]]
        nb, oc = words.shape[:2]
        n, _, h0, w0 = _shape(x_node)
        h, w = pixel_rows(h0, w0, k, stride, pad)
        oh, ow = _shape(node)[2:]
        f, fused = self._kernel_epi(w1ak_conv2d_primfunc, n, c, oc, h, w, k, stride, pad, scale=scale)
        if f is None:
            return self._conv_fallback(node, imp, "binary")
        xu = self._rows(imp, self._codes_u8(imp, x, c, True, perm=[0, 2, 3, 1]), h, w)
        y = self._over_bases(imp, "w1ak_conv2d", w1ak_conv2d_primfunc, f, fused, (n, c, oc, h, w, k, stride, pad), [xu],
                             lambda wb: self._int8_sign_consts(packing.unpack_bits(wb, c, axis=-1).transpose(0, 3, 1, 2)),
                             words, scale, self._kernel_out(n, oc, h0, w0, h, w, oh, ow))  # OIHW int8 +-1 weights
        return self._nchw(imp, y, (n, oh, ow, oc))

    def _w1ak_dense(self, node, imp, words, k):
        from .kernels.build import w1ak_dense_primfunc

        op = relax.op
        x_node = node.args[0]
        x, scale = imp.env[x_node], imp.env[node.args[2]]
        nb, nout = words.shape[:2]
        lead = list(_shape(x_node)[:-1])
        m = int(np.prod(lead, dtype=np.int64)) if lead else 1
        f, fused = self._kernel_epi(w1ak_dense_primfunc, m, k, nout, scale=scale)
        if f is None:
            return self._dense_fallback(node, imp, "binary")
        xu = self._codes_u8(imp, self._emit(imp, op.reshape(x, [m, k])), k, True)
        y = self._over_bases(imp, "w1ak_dense", w1ak_dense_primfunc, f, fused, (m, k, nout), [xu],
                             lambda wb: self._int8_sign_consts(packing.unpack_bits(wb, k, axis=-1)),  # [N, K] int8 +-1
                             words, scale, (m, nout))
        return self._emit(imp, op.reshape(y, lead + [nout]))

    def _int8_sign_consts(self, signs):
        """The int8-layout kernels' constant inputs for +-1 weights: blocked weights and the
        per-output-channel bias that undoes the inputs' +128 offset."""
        return [relax.const(packing.block_oc_int8(signs, self.lanes), "int8"),
                relax.const(packing.int8_bias(signs, self.lanes), "int32")]

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
        n, _, h0, w0 = _shape(x_node)
        h, w = pixel_rows(h0, w0, kh, sh, ph)
        oh, ow = _shape(node)[2:]
        f, fused = self._kernel_epi(int8_conv2d_primfunc, n, c, oc, h, w, kh, sh, ph, scale=scale)
        if f is None:
            return self._conv_fallback(node, imp, "int")
        xu = self._rows(imp, self._codes_u8(imp, x, c, True, perm=[0, 2, 3, 1]), h, w)
        args = [xu, relax.const(packing.block_oc_int8(wc, self.lanes), "int8"),
                relax.const(packing.int8_bias(wc, self.lanes), "int32")]
        s2 = self._emit(imp, op.reshape(scale, [1, oc]))
        self._count("int_conv2d")
        out_shape = self._kernel_out(n, oc, h0, w0, h, w, oh, ow)
        if fused:
            y = self._call_tir(imp, f, args + self._epi_args(imp, s2, 0, oc), out_shape, "float32")
        else:
            acc = self._call_tir(imp, f, args, out_shape, "int32")
            y = self._scaled_sum(imp, [acc], s2, oc, 4)
        return self._nchw(imp, y, (n, oh, ow, oc))

    @staticmethod
    def _kernel_out(n: int, oc: int, h0: int, w0: int, h: int, w: int, oh: int, ow: int) -> tuple:
        """The NHWC output shape of a kernel called on ``h x w`` pixels for an ``h0 x w0`` input
        whose conv output is ``oh x ow``: the regrouped rows when :func:`pixel_rows` regrouped
        them (a 1x1 stride-1 conv: same pixels), else the conv's own output."""
        return (n, h, w, oc) if (h, w) != (h0, w0) else (n, oh, ow, oc)

    def _rows(self, imp, x_nhwc, h: int, w: int):
        """A channels-last kernel input regrouped to ``h x w`` pixels (:func:`pixel_rows`)."""
        shape = [int(d) for d in x_nhwc.ty.shape]
        if shape[1:3] == [h, w]:
            return x_nhwc
        self._count("pixel_rows")
        return self._view(imp, x_nhwc, [shape[0], h, w, shape[3]])

    def _nchw(self, imp, y, nhwc: tuple):
        """A kernel's channels-last output (any regrouping of its pixels) -> NCHW."""
        if [int(d) for d in y.ty.shape] != list(nhwc):
            y = self._view(imp, y, list(nhwc))
        return self._emit(imp, relax.op.permute_dims(y, [0, 3, 1, 2]))

    def _view(self, imp, x, shape: list):
        """``x`` reshaped to ``shape`` as a view that fuses with nothing (:data:`VIEW_PREFIX`):
        fused into the transpose next to it, a pixel regrouping turns the transpose's reads
        into div/mod index arithmetic that no longer tiles (measured 2.5x slower on the
        quantize + NCHW -> NHWC pass of a W1Ak 1x1 conv); left alone, the VM runs it as a
        zero-copy reshape (``RewriteDataflowReshape``; ``MarkViewsOpaque`` makes it opaque)."""
        from tvm import te, topi

        src = [int(d) for d in x.ty.shape]
        dtype = str(x.ty.dtype)
        name = f"{VIEW_PREFIX}_{'x'.join(map(str, src))}_to_{'x'.join(map(str, shape))}_{dtype}"
        if name not in self.funcs:
            a = te.placeholder(src, dtype, name="a")
            f = te.create_prim_func([a, topi.reshape(a, shape)]).without_attr("global_symbol")
            self.funcs[name] = imp.block_builder.add_func(f, name)
        return self._emit(imp, relax.call_tir(self.funcs[name], [x], relax.TensorType(list(shape), dtype)))

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
        f, fused = self._kernel_epi(int8_dense_primfunc, m, k, nout, scale=scale)
        if f is None:
            return self._dense_fallback(node, imp, "int")
        x2 = self._emit(imp, op.reshape(x, [m, k]))
        xu = self._codes_u8(imp, x2, k, True)
        args = [xu, relax.const(packing.block_oc_int8(wc, self.lanes), "int8"),
                relax.const(packing.int8_bias(wc, self.lanes), "int32")]
        s2 = self._emit(imp, op.reshape(scale, [1, nout]))
        self._count("int_dense")
        if fused:
            y = self._call_tir(imp, f, args + self._epi_args(imp, s2, 0, nout), (m, nout), "float32")
        else:
            acc = self._call_tir(imp, f, args, (m, nout), "int32")
            y = self._scaled_sum(imp, [acc], s2, nout, 2)
        return self._emit(imp, op.reshape(y, lead + [nout]))

    def _int_matmul(self, node, imp):
        op = relax.op
        a_node, b_node, s_node = node.args
        a, b, scale = imp.env[a_node], imp.env[b_node], imp.env[s_node]
        out_dtype = str(node.meta["val"].dtype).replace("torch.", "")
        k = int(a_node.meta["val"].shape[-1])
        if k * 128 * 128 < 2 ** 24:  # every partial sum of int8 products is exact in float32
            y = self._emit(imp, op.matmul(op.astype(a, "float32"), op.astype(b, "float32")))
            self._count("int_matmul")
        else:
            y = self._int_matmul_exact(node, imp, a, b, k)
        if out_dtype != "float32":
            y = self._emit(imp, op.astype(y, out_dtype))
        return self._emit(imp, op.multiply(y, scale))

    def _int_matmul_exact(self, node, imp, a, b, k):
        """``A @ B`` of int8 codes for K where float32 sums could round: our int32-accumulating
        ``int_matmul`` kernel on [BT, M, K] x [BT, K, N], or, if it does not schedule, a float64
        matmul (exact while K * 2^14 < 2^53). float32 result (the caller scales)."""
        op = relax.op
        sa, sb = _shape(node.args[0]), _shape(node.args[1])
        lead = tuple(torch.broadcast_shapes(sa[:-2], sb[:-2]))
        m, n = sa[-2], sb[-1]
        bt = int(np.prod(lead)) if lead else 1
        dt = str(node.args[0].meta["val"].dtype).replace("torch.", "")
        from .kernels.build import int_matmul_primfunc

        f = self._kernel(int_matmul_primfunc, bt, m, k, n, dtype=dt) if dt == "int8" else None
        if f is None:
            self._count("int_matmul_f64")
            y = self._emit(imp, op.matmul(op.astype(a, "float64"), op.astype(b, "float64")))
            return self._emit(imp, op.astype(y, "float32"))
        a3 = self._emit(imp, op.reshape(op.broadcast_to(a, lead + (m, k)), (bt, m, k)))
        b3 = self._emit(imp, op.reshape(op.broadcast_to(b, lead + (k, n)), (bt, k, n)))
        out = self._call_tir(imp, f, [a3, b3, relax.const(np.ones(1, np.float32), "float32")], (bt, m, n), "float32")
        self._count("int_matmul_kernel")
        return self._emit(imp, op.reshape(out, lead + (m, n)))

    # --------------------------------------------------------------- fallbacks (exact float)
    def _float_input(self, imp, x_node, x_kind, channels, conv: bool):
        """The float32 value of a layer input of kind bits/bits01/codes/float (bits unpacked to
        +-1, bits01 to 0/1)."""
        op = relax.op
        x = imp.env[x_node]
        if x_kind == "float":
            return x
        if x_kind == "codes":
            return self._emit(imp, op.astype(x, "float32"))
        # bits: [..., CW] -> [..., C] of +-1 (channel c = bit c % 32 of word c // 32)
        idx = np.arange(channels)
        words = self._emit(imp, op.take(x, relax.const((idx // 32).astype("int64")), axis=-1, mode="clip"))
        shift = relax.const((idx % 32).astype(np.uint32), "uint32")
        bits = self._emit(imp, op.bitwise_and(op.right_shift(words, shift), relax.const(1, "uint32")))
        v = self._emit(imp, op.astype(bits, "float32"))
        if x_kind == "bits":
            v = self._emit(imp, op.subtract(op.multiply(v, relax.const(2.0, "float32")), relax.const(1.0, "float32")))
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
