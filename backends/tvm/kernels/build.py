"""Builders: scheduled PrimFuncs (for ``relax.call_tir``) and standalone compiled kernels.

``*_primfunc(...)`` returns a scheduled ``tvm.tirx.PrimFunc`` with ``global_symbol`` set and
``op_pattern = 8`` (opaque: FuseOps/FuseTIR leave it alone). Its parameters are the inputs
then the output (destination-passing style, as ``relax.call_tir`` expects):

====================================  ====================================================
``bitpack_primfunc``                  ``x f32[N,C,H,W]`` (or NHWC), [``tau f32[C]``] -> ``u32[N,H,W,CW]``
                                      (``unsigned``: ``x``, ``step f32[1]``: {0, 1} codes' bits)
``binary_conv2d_primfunc``            ``x u32[N,H,W,CW]``, ``w u32[OCB,KH,KW,CW,L]``,
                                      ``base i32[LH,HH,LW,HW,OCB*L]`` -> ``i32[N,OH,OW,OC]``
``binary_dense_primfunc``             ``x u32[M,KW]``, ``w u32[NB,KW,L]`` [, ``base i32[NB*L]``
                                      (``unsigned``)] -> ``i32[M,N]``
``binary01_*_primfunc``               the two above with ``unsigned=True``: {0, 1} activation
                                      bits (``out = base - acc``, base from
                                      ``conv_base_table(..., unsigned=True)`` / ``weight_popcount``)
``quantize_primfunc``                 ``x f32[N,C,H,W]`` (or ``[M,K]``), ``scale f32[1]`` -> ``u8[N,H,W,C4]``
``int8_conv2d_primfunc`` (``w1ak_``)  ``x u8[N,H,W,C4]``, ``w i8[OCB,KH,KW,C4/4,L,4]``,
                                      ``bias i32[OCB*L]`` -> ``i32[N,OH,OW,OC]``
``int8_dense_primfunc`` (``w1ak_``)   ``x u8[M,K4]``, ``w i8[NB,K4/4,L,4]``, ``bias i32[NB*L]`` -> ``i32[M,N]``
``int_matmul_primfunc``               ``a i8[BT,M,K]``, ``b i8[BT,K,N]`` [, ``scale f32[1]``] -> ``i32[BT,M,N]``
                                      (``f32`` with the scale: ``f32(acc) * scale``)
====================================  ====================================================

Conv and dense builders take ``epilogue="scale_bias"`` (or ``"scale_bias_kmap"`` for conv):
the output becomes float32 ``value * scale[oc] (* kmap[n, oh, ow]) + out_bias[oc]``, fused
into the kernel, with the extra inputs placed after the integer ones.

The constant inputs come from :mod:`bqc.packing`: ``block_oc`` / ``conv_base_table`` (W1A1),
``block_oc_int8`` / ``int8_bias`` (int8 route). ``build_*`` compiles one PrimFunc alone with
``tvm.compile`` and wraps it in a :class:`Kernel` (numpy in, numpy out), cached per shape and
target for the process.
"""
from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import te, tirx

from bqc.packing import INT8_GROUP, num_words
from ..target import as_target, is_cpu
from . import binary as _bin
from . import int8 as _i8

OP_PATTERN_OPAQUE = 8


def _finish(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    return func.with_attr("global_symbol", name).with_attr("op_pattern", OP_PATTERN_OPAQUE)


def _schedules(target):
    """The schedule module of a target family: ``schedules/x86.py`` (any LLVM CPU target but
    aarch64/arm), ``schedules/arm.py`` (LLVM with an aarch64/arm ``mtriple``),
    ``schedules/cuda.py`` (kind ``cuda``)."""
    import importlib

    target = as_target(target)
    kind = target.kind.name
    family = None
    if is_cpu(target):
        mtriple = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
        family = "arm" if mtriple.startswith(("aarch64", "arm")) else "x86"
    elif kind == "cuda":
        family = "cuda"
    if family is None:
        raise NotImplementedError(f"no bqc schedules for target kind {kind!r} "
                                  "(write backends/tvm/schedules/<target>.py on top of the TE computes)")
    try:
        return importlib.import_module(f"..schedules.{family}", __package__)
    except ImportError as e:  # pragma: no cover
        raise NotImplementedError(f"bqc schedules for {family} are not written yet "
                                  f"(backends/tvm/schedules/{family}.py)") from e


EPILOGUES = ("none", "scale_bias", "scale_bias_kmap")


def _epilogue_inputs(epilogue: str, oc: int, kmap_shape=None):
    """Placeholders ``(scale, bias, kmap)`` for an epilogue kind (None where unused)."""
    if epilogue not in EPILOGUES or (epilogue == "scale_bias_kmap" and kmap_shape is None):
        raise ValueError(f"epilogue must be one of {EPILOGUES} (kmap for conv only), got {epilogue!r}")
    if epilogue == "none":
        return None, None, None
    scale = te.placeholder((oc,), "float32", name="scale")
    bias = te.placeholder((oc,), "float32", name="out_bias")
    kmap = te.placeholder(kmap_shape, "float32", name="kmap") if epilogue == "scale_bias_kmap" else None
    return scale, bias, kmap


def _epi_params(scale, bias, kmap):
    return [t for t in (scale, bias, kmap) if t is not None]


def _schedule(target, kind: str, func, **options):
    """Call ``schedules.<target family>.schedule_<kind>(func, target, **options)``, passing only
    the options that schedule accepts (target families share the stage names, not every knob)."""
    import inspect

    mod = _schedules(target)
    fn = getattr(mod, f"schedule_{kind}", None)
    if fn is None:
        raise NotImplementedError(f"{mod.__name__} has no schedule_{kind}")
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return fn(func, target, **options)


def _create(tensors, name):
    return te.create_prim_func(tensors).with_attr("global_symbol", name)


def bitpack_primfunc(batch: int, channels: int, height: int, width: int, layout: str = "NCHW",
                     with_tau: bool = True, target=None, name: str | None = None,
                     dtype: str = "float32", unsigned: bool = False) -> tirx.PrimFunc:
    """Fused activation binarizer + packer: ``sign(x + tau)`` -> packed NHWC uint32 words;
    ``unsigned``: the bits of {0, 1} codes, ``x / step > 0.5`` (input ``step [1]``, no tau)."""
    shape = (batch, channels, height, width) if layout == "NCHW" else (batch, height, width, channels)
    x = te.placeholder(shape, dtype, name="x")
    tau = te.placeholder((channels,), dtype, name="tau") if with_tau and not unsigned else None
    step = te.placeholder((1,), dtype, name="step") if unsigned else None
    out = _bin.bitpack(x, tau, layout, step=step)
    suffix = "_step" if unsigned else ("_tau" if tau is not None else "")
    name = name or f"bqc_bitpack_{layout.lower()}_n{batch}c{channels}h{height}w{width}{suffix}"
    func = _create([t for t in (x, tau, step, out) if t is not None], name)
    return _finish(_schedule(target, "bitpack", func), name)


def binary_conv2d_primfunc(batch: int, in_channels: int, out_channels: int, height: int, width: int,
                           kernel_size: int = 3, stride: int = 1, padding: int = 1, target=None,
                           lanes: int = 16, microkernel: str = "auto", epilogue: str = "none",
                           name: str | None = None, unsigned: bool = False) -> tirx.PrimFunc:
    """W1A1 XNOR-popcount conv2d: exact int32 NHWC output, or float32 NHWC with a fused
    ``epilogue`` (``"scale_bias"``: ``* scale[oc] + bias[oc]``; ``"scale_bias_kmap"``: also
    ``* kmap[n, oh, ow]``; extra inputs ``scale f32[OC], out_bias f32[OC][, kmap f32[N,OH,OW]]``
    after ``base``). ``unsigned``: {0, 1} activation bits (:func:`binary01_conv2d_primfunc`)."""
    cw = num_words(in_channels)
    ocb = -(-out_channels // lanes)
    g = _bin.conv_geometry(height, width, kernel_size, kernel_size, stride, padding)
    x = te.placeholder((batch, height, width, cw), "uint32", name="x")
    w = te.placeholder((ocb, kernel_size, kernel_size, cw, lanes), "uint32", name="w")
    base = te.placeholder(g["table"] + (ocb * lanes,), "int32", name="base")
    scale, bias, kmap = _epilogue_inputs(epilogue, out_channels, (batch, g["oh"], g["ow"]))
    out = _bin.binary_conv2d_nhwc(x, w, base, in_channels, out_channels, stride, padding, scale, bias, kmap,
                                  unsigned=unsigned)
    name = name or (f"bqc_bconv2d_n{batch}_c{in_channels}_o{out_channels}_h{height}w{width}"
                    f"_k{kernel_size}s{stride}p{padding}" + ("_u01" if unsigned else "")
                    + ("" if epilogue == "none" else f"_{epilogue}"))
    func = _create([x, w, base, *_epi_params(scale, bias, kmap), out], name)
    return _finish(_schedule(target, "binary_conv2d", func, microkernel=microkernel), name)


def binary_dense_primfunc(batch: int, in_features: int, out_features: int, target=None,
                          lanes: int = 16, microkernel: str = "auto", epilogue: str = "none",
                          name: str | None = None, unsigned: bool = False) -> tirx.PrimFunc:
    """W1A1 XNOR-popcount dense: exact int32 output, or float32 with ``epilogue="scale_bias"``
    (inputs ``scale f32[N], out_bias f32[N]`` after ``w``). ``unsigned``: {0, 1} activation bits,
    input ``base i32[NB*L]`` (:func:`bqc.packing.weight_popcount`) after ``w``."""
    kw = num_words(in_features)
    nb = -(-out_features // lanes)
    x = te.placeholder((batch, kw), "uint32", name="x")
    w = te.placeholder((nb, kw, lanes), "uint32", name="w")
    base = te.placeholder((nb * lanes,), "int32", name="base") if unsigned else None
    scale, bias, _ = _epilogue_inputs(epilogue, out_features)
    out = _bin.binary_dense(x, w, in_features, out_features, scale, bias, base=base)
    name = name or (f"bqc_bdense_m{batch}_k{in_features}_n{out_features}" + ("_u01" if unsigned else "")
                    + ("" if epilogue == "none" else f"_{epilogue}"))
    func = _create([x, w, *([base] if unsigned else []), *_epi_params(scale, bias, None), out], name)
    return _finish(_schedule(target, "binary_dense", func, microkernel=microkernel), name)


def binary01_conv2d_primfunc(*args, **kwargs) -> tirx.PrimFunc:
    """W1A1 conv on unsigned {0, 1} activation bits (input kind ``"bits01"``):
    :func:`binary_conv2d_primfunc` with ``unsigned=True`` (``out = base - acc``)."""
    return binary_conv2d_primfunc(*args, unsigned=True, **kwargs)


def binary01_dense_primfunc(*args, **kwargs) -> tirx.PrimFunc:
    """W1A1 dense on unsigned {0, 1} activation bits: :func:`binary_dense_primfunc` with
    ``unsigned=True`` (input ``base`` after ``w``)."""
    return binary_dense_primfunc(*args, unsigned=True, **kwargs)


def quantize_primfunc(shape: tuple, bits: int, layout: str = "NCHW", target=None,
                      name: str | None = None, dtype: str = "float32") -> tirx.PrimFunc:
    """Float activations -> uint8 LSQ codes (+128) in the int8-kernel layout."""
    x = te.placeholder(tuple(shape), dtype, name="x")
    scale = te.placeholder((1,), dtype, name="scale")
    out = _i8.quantize_u8(x, scale, bits, layout)
    name = name or f"bqc_quantize_a{bits}_{layout.lower() if len(shape) == 4 else 'mk'}_" + "x".join(map(str, shape))
    func = _create([x, scale, out], name)
    return _finish(_schedule(target, "quantize", func), name)


def int8_conv2d_primfunc(batch: int, in_channels: int, out_channels: int, height: int, width: int,
                         kernel_size: int = 3, stride: int = 1, padding: int = 1, target=None,
                         lanes: int = 16, tile: int | None = None, epilogue: str = "none",
                         name: str | None = None, binary_weights: bool = False) -> tirx.PrimFunc:
    """u8 codes x int8 weights conv2d (int8 x int8; W1Ak: :func:`w1ak_conv2d_primfunc`), int32
    NHWC (float32 with a fused ``epilogue`` as in :func:`binary_conv2d_primfunc`, inputs after
    ``bias``). ``binary_weights``: the weights are +-1, which lets the schedule use the target's
    ``w1ak`` route instead of its ``int8`` route (:data:`bqc.backends.tvm.target.KERNEL_ROUTES`)."""
    c4 = -(-in_channels // INT8_GROUP) * INT8_GROUP
    ocb = -(-out_channels // lanes)
    x = te.placeholder((batch, height, width, c4), "uint8", name="x")
    w = te.placeholder((ocb, kernel_size, kernel_size, c4 // INT8_GROUP, lanes, INT8_GROUP), "int8", name="w")
    bias = te.placeholder((ocb * lanes,), "int32", name="bias")
    g = _bin.conv_geometry(height, width, kernel_size, kernel_size, stride, padding)
    scale, obias, kmap = _epilogue_inputs(epilogue, out_channels, (batch, g["oh"], g["ow"]))
    out = _i8.int8_conv2d_nhwc(x, w, bias, out_channels, stride, padding, scale, obias, kmap)
    name = name or (f"bqc_{'w1ak' if binary_weights else 'q'}conv2d_n{batch}_c{in_channels}_o{out_channels}"
                    f"_h{height}w{width}_k{kernel_size}s{stride}p{padding}"
                    + ("" if epilogue == "none" else f"_{epilogue}"))
    func = _create([x, w, bias, *_epi_params(scale, obias, kmap), out], name)
    return _finish(_schedule(target, "int8_conv2d", func, tile=tile, binary_weights=binary_weights), name)


def int8_dense_primfunc(batch: int, in_features: int, out_features: int, target=None,
                        lanes: int = 16, tile: int | None = None, epilogue: str = "none",
                        name: str | None = None, binary_weights: bool = False) -> tirx.PrimFunc:
    """u8 codes x int8 weights dense (int8 x int8; W1Ak: :func:`w1ak_dense_primfunc`), int32
    ``[M, N]`` (float32 with ``epilogue="scale_bias"``, inputs ``scale, out_bias`` after ``bias``);
    ``binary_weights`` as in :func:`int8_conv2d_primfunc`."""
    k4 = -(-in_features // INT8_GROUP) * INT8_GROUP
    nb = -(-out_features // lanes)
    x = te.placeholder((batch, k4), "uint8", name="x")
    w = te.placeholder((nb, k4 // INT8_GROUP, lanes, INT8_GROUP), "int8", name="w")
    bias = te.placeholder((nb * lanes,), "int32", name="bias")
    scale, obias, _ = _epilogue_inputs(epilogue, out_features)
    out = _i8.int8_dense(x, w, bias, out_features, scale, obias)
    name = name or (f"bqc_{'w1ak' if binary_weights else 'q'}dense_m{batch}_k{in_features}_n{out_features}"
                    + ("" if epilogue == "none" else f"_{epilogue}"))
    func = _create([x, w, bias, *_epi_params(scale, obias, None), out], name)
    return _finish(_schedule(target, "int8_dense", func, tile=tile, binary_weights=binary_weights), name)


def int_matmul_primfunc(batch: int, m: int, k: int, n: int, target=None, with_scale: bool = True,
                        dtype: str = "int8", lanes: int | None = None, name: str | None = None) -> tirx.PrimFunc:
    """Batched matmul of integer codes (``bqc.int_matmul``, attention on codes) with an exact
    int32 accumulator for any ``K``; with ``with_scale`` the output is float32
    ``f32(acc) * scale[0]`` (bit-identical to the reference executor). ``lanes`` is unused
    (no weight blocking; accepted so all builders share the converter's call signature)."""
    a = te.placeholder((batch, m, k), dtype, name="a")
    b = te.placeholder((batch, k, n), dtype, name="b")
    scale = te.placeholder((1,), "float32", name="scale") if with_scale else None
    out = _i8.int_matmul(a, b, scale)
    name = name or f"bqc_imatmul_b{batch}_m{m}_k{k}_n{n}" + ("_scale" if with_scale else "")
    func = _create([a, b, scale, out] if with_scale else [a, b, out], name)
    return _finish(_schedule(target, "int_matmul", func), name)


def w1ak_conv2d_primfunc(*args, **kwargs) -> tirx.PrimFunc:
    """W1Ak conv2d: :func:`int8_conv2d_primfunc` with +-1 int8 weights (``binary_weights=True``:
    the target's ``w1ak`` route; kernels named ``bqc_w1akconv2d_*``)."""
    return int8_conv2d_primfunc(*args, binary_weights=True, **kwargs)


def w1ak_dense_primfunc(*args, **kwargs) -> tirx.PrimFunc:
    """W1Ak dense: :func:`int8_dense_primfunc` with +-1 int8 weights (``binary_weights=True``)."""
    return int8_dense_primfunc(*args, binary_weights=True, **kwargs)


class Kernel:
    """One compiled PrimFunc: ``kernel(*inputs) -> numpy output`` (allocates the output)."""

    def __init__(self, func: tirx.PrimFunc, target):
        self.target = as_target(target)
        self.name = str(func.attrs["global_symbol"])
        self.func = func
        self.executable = tvm.compile(tvm.IRModule({self.name: func}), target=self.target)
        self.dev = tvm.cpu(0)
        self._fn = self.executable[self.name]
        params = list(func.params)
        self.in_specs = [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in params[:-1]]
        self.out_spec = (tuple(int(d) for d in params[-1].shape), str(params[-1].dtype))

    def _args(self, arrays):
        if len(arrays) != len(self.in_specs):
            raise TypeError(f"{self.name} takes {len(self.in_specs)} inputs, got {len(arrays)}")
        args = []
        for a, (shape, dtype) in zip(arrays, self.in_specs):
            a = np.ascontiguousarray(np.asarray(a), dtype=dtype)
            if a.shape != shape:
                raise ValueError(f"{self.name}: input shape {a.shape} != expected {shape}")
            args.append(tvm.runtime.tensor(a, self.dev))
        out = tvm.runtime.tensor(np.zeros(self.out_spec[0], self.out_spec[1]), self.dev)
        return args, out

    def __call__(self, *arrays) -> np.ndarray:
        args, out = self._args(arrays)
        self._fn(*args, out)
        return out.numpy()

    def time(self, *arrays, number: int = 10, repeat: int = 7, min_repeat_ms: int = 0) -> list[float]:
        """Seconds per call for each of ``repeat`` runs of ``number`` calls."""
        args, out = self._args(arrays)
        ev = self.executable.mod.time_evaluator(self.name, self.dev, number=number, repeat=repeat,
                                                min_repeat_ms=min_repeat_ms)
        return list(ev(*args, out).results)


_TARGETS: dict = {}


def _target_key(target) -> str:
    target = as_target(target)
    key = str(target)
    _TARGETS.setdefault(key, target)
    return key


@functools.lru_cache(maxsize=None)
def _build_cached(kind: str, key: tuple, target_key: str):
    target = _TARGETS[target_key]
    builder = {
        "bitpack": bitpack_primfunc, "binary_conv2d": binary_conv2d_primfunc,
        "binary_dense": binary_dense_primfunc, "quantize": quantize_primfunc,
        "int8_conv2d": int8_conv2d_primfunc, "int8_dense": int8_dense_primfunc,
        "int_matmul": int_matmul_primfunc,
    }[kind]
    args, kwargs = key
    return Kernel(builder(*args, target=target, **dict(kwargs)), target)


def _build(kind, target, *args, **kwargs):
    return _build_cached(kind, (args, tuple(sorted(kwargs.items()))), _target_key(target))


def build_bitpack(batch, channels, height, width, layout="NCHW", with_tau=True, target=None,
                  unsigned=False) -> Kernel:
    return _build("bitpack", target, batch, channels, height, width, layout=layout, with_tau=with_tau,
                  unsigned=unsigned)


def build_binary_conv2d(batch, in_channels, out_channels, height, width, kernel_size=3, stride=1,
                        padding=1, target=None, microkernel="auto", epilogue="none", unsigned=False) -> Kernel:
    return _build("binary_conv2d", target, batch, in_channels, out_channels, height, width,
                  kernel_size=kernel_size, stride=stride, padding=padding, microkernel=microkernel,
                  epilogue=epilogue, unsigned=unsigned)


def build_binary_dense(batch, in_features, out_features, target=None, microkernel="auto",
                       epilogue="none", unsigned=False) -> Kernel:
    return _build("binary_dense", target, batch, in_features, out_features, microkernel=microkernel,
                  epilogue=epilogue, unsigned=unsigned)


def build_quantize(shape, bits, layout="NCHW", target=None) -> Kernel:
    return _build("quantize", target, tuple(shape), bits, layout=layout)


def build_int8_conv2d(batch, in_channels, out_channels, height, width, kernel_size=3, stride=1,
                      padding=1, target=None, tile=None, epilogue="none", binary_weights=False) -> Kernel:
    return _build("int8_conv2d", target, batch, in_channels, out_channels, height, width,
                  kernel_size=kernel_size, stride=stride, padding=padding, tile=tile, epilogue=epilogue,
                  binary_weights=binary_weights)


def build_int8_dense(batch, in_features, out_features, target=None, tile=None, epilogue="none",
                     binary_weights=False) -> Kernel:
    return _build("int8_dense", target, batch, in_features, out_features, tile=tile, epilogue=epilogue,
                  binary_weights=binary_weights)


def build_w1ak_conv2d(*args, **kwargs) -> Kernel:
    """:func:`build_int8_conv2d` for +-1 weights (the target's ``w1ak`` route)."""
    return build_int8_conv2d(*args, binary_weights=True, **kwargs)


def build_w1ak_dense(*args, **kwargs) -> Kernel:
    """:func:`build_int8_dense` for +-1 weights (the target's ``w1ak`` route)."""
    return build_int8_dense(*args, binary_weights=True, **kwargs)


def build_int_matmul(batch, m, k, n, target=None, with_scale=True, dtype="int8") -> Kernel:
    return _build("int_matmul", target, batch, m, k, n, with_scale=with_scale, dtype=dtype)
