"""bqc's own TVM kernels: TE compute definitions (target-independent) and builders.

* :mod:`.binary`: W1A1 XNOR-popcount conv2d / dense, activation bit-packing.
* :mod:`.int8`: int8 route (W1Ak with k = 2..8, int8 x int8) conv2d / dense, quantisation,
  exact int32 matmul of codes (attention).
* :mod:`.microkernel`: TIR micro-kernel helpers (Harley-Seal popcount, block body swap).
* :mod:`.build`: ``*_primfunc`` (scheduled PrimFuncs for ``relax.call_tir``) and ``build_*``
  (standalone compiled kernels for tests and benchmarks).

Layouts are defined once in :mod:`bqc.packing`.
"""
from .build import (  # noqa: F401
    Kernel, OP_PATTERN_OPAQUE,
    bitpack_primfunc, binary_conv2d_primfunc, binary_dense_primfunc, binary01_conv2d_primfunc,
    binary01_dense_primfunc, quantize_primfunc,
    int8_conv2d_primfunc, int8_dense_primfunc, w1ak_conv2d_primfunc, w1ak_dense_primfunc,
    int_matmul_primfunc,
    build_bitpack, build_binary_conv2d, build_binary_dense, build_quantize,
    build_int8_conv2d, build_int8_dense, build_w1ak_conv2d, build_w1ak_dense, build_int_matmul,
)
