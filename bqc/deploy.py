"""The deploy graph: trained quantized layers folded into their inference form.

``to_deploy(gm)`` (the ``fold_deploy`` pass, on a copy) replaces every ``quant.<name>``
module of a trained QAT graph by a *deploy module* defined here, and every TBS blend by its
buffer-only twin. Nothing else in the graph changes: the signature stays
``(x, t[, y], *tbs_caches, tbs_flag) -> (eps, *tbs_features)``, so :class:`bqc.graph.BqcModel`
and the samplers run the deploy graph exactly like the QAT graph, and every node keeps its
name and annotation (``node.meta["bqc"]["deploy"]`` adds the layer's inference form).

Before / after (one BiDM W1A1 conv)::

    conv2d_25 = call_module quant.conv2d_1:QConv2d(silu_1)        # SignScale, SignAct, KMap, Shortcut
    conv2d_25 = call_module deploy.conv2d_1:BinaryConv2d(silu_1)  # packed bits, threshold, K map, shortcut

Deploy modules (all state is buffers; their torch forward is the *reference executor*, the
oracle every backend is tested against):

=================  ======================================================================
``BinaryConv2d``   1-bit weights: ``w_packed uint32[B, OC, KH, KW, CW]`` (bqc.packing layout,
``BinaryLinear``   one slice per basis; B = 1, or 2 for EBB stage 1 / LMB) and ``w_scale
                   float32[B, OC]``. Dense: ``w_packed uint32[B, N, KW]``.
``IntConv2d``      k-bit weights (8-bit head/tail): ``w_codes int8[OC, C, KH, KW]`` (dense
``IntLinear``      ``[N, K]``), ``w_scale float32[OC]``, ``w_bits``.
``FloatConv2d``    float weights (``weight``) with a quantized input (e.g. W32A4) or with
``FloatLinear``    the quantizer switched off (``quant_active`` False at fold time).
``IntMatmul``      activation x activation product (attention) on integer codes.
``TBSBlend``       BiDM cross-timestep blend ``F + flag * a[g(t)] * (cache - F)``.
=================  ======================================================================

Every layer is ``y = epilogue(x, core(x))``:

* ``act`` (input quantizer): ``None`` (float input), :class:`SignBinarize` (``sign(x + tau)``,
  packed to bits with ``bqc::sign_pack``) or :class:`QuantizeCodes` (``q = round(clamp(x / s,
  qmin, qmax))``, integer codes). ``input_kind`` is ``"float" | "bits" | "codes"``.
* ``core``: the integer op. For bits/codes inputs the accumulator is exact (int32 semantics),
  ``core(x) = sum_b (s_a * w_scale[b])[oc] * acc_b`` computed as ``float(acc_0) * scale_0
  [+ float(acc_1) * scale_1]`` in the input's float dtype (a backend doing the same int32 ->
  float multiply gets bit-identical results).
* ``epilogue`` (real-valued, in this order): ``* kmap(x)`` (K = k ⊛ mean_c|x|), ``*
  out_scale`` (XNOR++ alpha_o beta_h gamma_w), ``+ bias``, ``+ shortcut(x)`` (|s| * avg-pool /
  nearest-resize / 1x1 conv of the float input), ``post`` (RPReLU).

The integer cores are torch custom ops (namespace ``bqc``: ``sign_pack``, ``quantize_codes``,
``binary_conv2d``, ``binary_dense``, ``int_conv2d``, ``int_dense``, ``int_matmul``), with fake
(meta) kernels, so ``torch.export`` of a deploy graph (:func:`export_program`, dynamic batch)
keeps each of them as one node: that is the hand-off to the TVM lowering
(``from_exported_program(custom_convert_map=...)``). Their
CPU kernels unpack the bqc.packing words and run exact float64 convolutions; the slower
bit-level references of :mod:`bqc.packing` (popcount) are reachable through
``layer.accumulate(x, impl="packing")`` and give identical accumulators (tested).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bqc import ir, packing
from bqc.errors import BqcError

LAYOUT_VERSION = packing.LAYOUT_VERSION
INPUT_KINDS = ("float", "bits", "codes")

__all__ = [
    "LAYOUT_VERSION", "INPUT_KINDS",
    "SignBinarize", "QuantizeCodes", "KMap", "OutScale", "Shortcut", "RPReLU", "TBSBlend",
    "BinaryConv2d", "IntConv2d", "FloatConv2d", "BinaryLinear", "IntLinear", "FloatLinear",
    "IntMatmul", "DEPLOY_LAYERS", "to_deploy", "is_deployed", "deploy_layers", "deploy_summary",
    "format_summary", "unpack_words", "words_numpy", "export_program", "example_inputs",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _cview(p: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def words_numpy(t: torch.Tensor) -> np.ndarray:
    """Packed words of a torch tensor (uint32, or int32 holding the same bits) as numpy uint32."""
    a = t.detach().cpu().contiguous()
    if a.dtype == torch.uint32:
        return a.numpy()
    if a.dtype == torch.int32:
        return a.numpy().view(np.uint32)
    raise TypeError(f"packed words must be uint32 (or int32 bit patterns), got {a.dtype}")


def _words_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint32))


def unpack_words(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of the packing along the last axis: int8 ±1 tensor with ``n`` values there."""
    return torch.from_numpy(packing.unpack_bits(words_numpy(words), n, axis=-1))


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


@sign_pack.register_fake
def _(x, tau, ch_axis):
    shape = list(x.shape)
    c = shape.pop(ch_axis)
    return x.new_empty([*shape, packing.num_words(c)], dtype=torch.uint32)


@torch.library.custom_op("bqc::quantize_codes", mutates_args=())
def quantize_codes(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes ``round_half_even(clamp(x / scale, qmin, qmax))`` (int8, int16 if wider)."""
    return torch.round(torch.clamp(x / scale.to(x.dtype), qmin, qmax)).to(_int_dtype(qmin, qmax))


@quantize_codes.register_fake
def _(x, scale, qmin, qmax):
    return torch.empty_like(x, dtype=_int_dtype(qmin, qmax))


def _conv_input(x: torch.Tensor, x_kind: str, channels: int) -> torch.Tensor:
    """Float64 NCHW values of a conv input of kind bits (packed NHWC) / codes / float."""
    if x_kind == "bits":
        return unpack_words(x, channels).permute(0, 3, 1, 2).to(torch.float64)
    if x_kind == "codes":
        return x.to(torch.float64)
    if x_kind == "float":
        return x
    raise BqcError(f"unknown input kind {x_kind!r}; valid: {', '.join(INPUT_KINDS)}")


def _dense_input(x: torch.Tensor, x_kind: str, features: int) -> torch.Tensor:
    if x_kind == "bits":
        return unpack_words(x, features).to(torch.float64)
    return _conv_input(x, x_kind, features)


def _scaled_sum(accs: list[torch.Tensor], scale: torch.Tensor, view) -> torch.Tensor:
    """sum_b float(acc_b) * scale[b] (in scale's dtype, bases added in order)."""
    out = None
    for b, acc in enumerate(accs):
        term = acc.to(scale.dtype) * view(scale[b])
        out = term if out is None else out + term
    return out


def _binary_conv_accs(x, w_packed, in_channels, stride, padding, dilation, groups, x_kind):
    """Per-basis accumulators: exact integers (float64 holding ints) for bits/codes inputs."""
    signs = unpack_words(w_packed, in_channels)  # [B, OC, KH, KW, C] int8
    signs = signs.permute(0, 1, 4, 2, 3)  # [B, OC, C, KH, KW]
    xv = _conv_input(x, x_kind, in_channels * groups)
    ws = signs.to(xv.dtype)
    return [F.conv2d(xv, ws[b], None, stride, padding, dilation, groups) for b in range(ws.shape[0])]


@torch.library.custom_op("bqc::binary_conv2d", mutates_args=())
def binary_conv2d(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_channels: int,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  x_kind: str) -> torch.Tensor:
    """``sum_b scale[b, oc] * conv(x~, sign(W_b))`` with zero padding; NCHW output of scale's dtype.

    ``x`` is packed bits ``uint32[N, H, W, CW]`` (x~ = ±1), integer codes NCHW, or float NCHW
    (``x_kind``). ``w_packed uint32[B, OC, KH, KW, CW]``, ``in_channels`` per group.
    """
    accs = _binary_conv_accs(x, w_packed, in_channels, stride, padding, dilation, groups, x_kind)
    if x_kind != "float":
        accs = [a.to(torch.int32) for a in accs]
    return _scaled_sum(accs, scale, lambda s: s.view(1, -1, 1, 1))


def _conv_fake_shape(x, oc, kh, kw, stride, padding, dilation, x_kind):
    if x_kind == "bits":
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
    xv = _dense_input(x, x_kind, in_features)
    ws = signs.to(xv.dtype)
    return [torch.matmul(xv, ws[b].t()) for b in range(ws.shape[0])]


@torch.library.custom_op("bqc::binary_dense", mutates_args=())
def binary_dense(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                 x_kind: str) -> torch.Tensor:
    """``sum_b scale[b, n] * (x~ @ sign(W_b)^T)``; x ``[..., K]`` (bits: ``uint32[..., KW]``)."""
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
    xv = _conv_input(x, x_kind, w_codes.shape[1] * groups)
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
    xv = _dense_input(x, x_kind, w_codes.shape[1])
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
    acc = torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)
    return acc.to(scale.dtype) * scale


@int_matmul.register_fake
def _(a, b, scale):
    return torch.empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                       dtype=scale.dtype, device=a.device)


# ---------------------------------------------------------------------------------------------
# activation quantizers (inference form)
# ---------------------------------------------------------------------------------------------
class SignBinarize(nn.Module):
    """``sign(x + tau)`` (tau per channel along ``ch_axis``, optional); sign(0) = +1."""

    kind = "bits"
    bits = 1

    def __init__(self, tau: torch.Tensor | None = None, ch_axis: int = 1):
        super().__init__()
        self.ch_axis = int(ch_axis)
        self.register_buffer("tau", None if tau is None else tau.detach().clone().float())

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tau is None else x + _cview(self.tau.to(x.dtype), x.dim(), self.ch_axis)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """int8 ±1 codes."""
        return torch.where(self.shifted(x) >= 0, 1, -1).to(torch.int8)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """What the integer core consumes: packed words (bqc.packing layout)."""
        return torch.ops.bqc.sign_pack(x, self.tau, self.ch_axis)

    def scale(self, dtype) -> torch.Tensor:
        return torch.ones((), dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quant value ±1 in x's dtype."""
        return torch.where(self.shifted(x) >= 0, 1.0, -1.0).to(x.dtype)

    def describe(self) -> dict:
        return {"kind": "sign", "bits": 1, "threshold": self.tau is not None}

    def extra_repr(self) -> str:
        return f"threshold={self.tau is not None}, ch_axis={self.ch_axis}"


class QuantizeCodes(nn.Module):
    """Uniform codes ``q = round(clamp(x / s, qmin, qmax))``; value ``q * s``.

    ``scale`` is kept in float64 so that it casts to exactly the step the QAT quantizer used,
    in float32 and in float64 runs.
    """

    kind = "codes"

    def __init__(self, scale, qmin: int, qmax: int, bits: int):
        super().__init__()
        self.qmin, self.qmax, self.bits = int(qmin), int(qmax), int(bits)
        s = scale.detach().reshape(()).double() if torch.is_tensor(scale) else torch.tensor(float(scale), dtype=torch.float64)
        self.register_buffer("step", s.clone())

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bqc.quantize_codes(x, self.step, self.qmin, self.qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x)

    def scale(self, dtype) -> torch.Tensor:
        return self.step.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x).to(x.dtype) * self.step.to(x.dtype)

    def describe(self) -> dict:
        return {"kind": "codes", "bits": self.bits, "qmin": self.qmin, "qmax": self.qmax}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, qmin={self.qmin}, qmax={self.qmax}, step={float(self.step):.6g}"


def _act_kind(act) -> str:
    return "float" if act is None else act.kind


def _act_bits(act) -> int:
    return 32 if act is None else int(act.bits)


# ---------------------------------------------------------------------------------------------
# real-valued epilogue parts
# ---------------------------------------------------------------------------------------------
class KMap(nn.Module):
    """K = k ⊛ mean_c |x| (1-channel conv with the main conv's geometry)."""

    def __init__(self, weight: torch.Tensor, stride, padding, dilation):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs().mean(dim=1, keepdim=True)
        return F.conv2d(a, self.weight.to(x.dtype), None, self.stride, self.padding, self.dilation)


class OutScale(nn.Module):
    """XNOR++ factorised output scale alpha_o ⊗ beta_h ⊗ gamma_w."""

    def __init__(self, alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor):
        super().__init__()
        for n, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            self.register_buffer(n, v.detach().clone().float())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        d = y.dtype
        return (y * self.alpha.to(d).view(1, -1, 1, 1) * self.beta.to(d).view(1, 1, -1, 1)
                * self.gamma.to(d).view(1, 1, 1, -1))


class Shortcut(nn.Module):
    """``scale * channels(resize(avg_pool(x)))`` shaped like the conv output (``scale`` = |s|).

    ``channels``: ``"same"`` (no channel change), ``"pool"`` (parameter-free adaptive average
    over channel groups, repetition when expanding: :meth:`channel_matrix`) or ``"conv"``
    (a real 1x1 conv, ``proj``).
    """

    def __init__(self, scale: torch.Tensor, stride, channels: str = "same", out_channels: int = 0,
                 proj: torch.Tensor | None = None):
        super().__init__()
        if channels not in ("same", "pool", "conv"):
            raise BqcError(f"unknown shortcut channel mapping {channels!r}")
        self.stride = _pair(stride)
        self.channels, self.out_channels = channels, int(out_channels)
        self.register_buffer("scale", scale.detach().reshape(()).clone().float())
        self.register_buffer("proj", None if proj is None else proj.detach().clone().float())

    def channel_matrix(self, in_channels: int) -> torch.Tensor:
        """``[out, in]`` matrix of the "pool" mapping (adaptive average pooling over channels)."""
        o, c = self.out_channels, int(in_channels)
        m = torch.zeros(o, c, dtype=torch.float64)
        for j in range(o):
            lo, hi = (j * c) // o, -((-(j + 1) * c) // o)
            m[j, lo:hi] = 1.0 / (hi - lo)
        return m

    def forward(self, x: torch.Tensor, out_hw) -> torch.Tensor:
        if self.stride != (1, 1):
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=tuple(out_hw), mode="nearest")
        if self.channels == "conv":
            x = F.conv2d(x, self.proj.to(x.dtype))
        elif self.channels == "pool":
            b, c, h, w = x.shape
            x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(b, h * w, c), self.out_channels)
            x = x.reshape(b, h, w, self.out_channels).permute(0, 3, 1, 2)
        return self.scale.to(x.dtype) * x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, channels={self.channels}"


class RPReLU(nn.Module):
    """PReLU(x - gamma) + zeta, per channel along ``ch_axis``."""

    def __init__(self, gamma, slope, zeta, ch_axis: int = 1):
        super().__init__()
        self.ch_axis = int(ch_axis)
        for n, v in (("gamma", gamma), ("slope", slope), ("zeta", zeta)):
            self.register_buffer(n, v.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = lambda p: _cview(p.to(x.dtype), x.dim(), self.ch_axis)  # noqa: E731
        z = x - view(self.gamma)
        return torch.where(z >= 0, z, view(self.slope) * z) + view(self.zeta)


class TBSBlend(nn.Module):
    """BiDM cross-timestep blend ``F + flag * a[g(t)] * (cache - F)``, g(t) = t * groups // T."""

    bqc_kind = "tbs"

    def __init__(self, alpha: torch.Tensor, timesteps: int):
        super().__init__()
        self.register_buffer("alpha", alpha.detach().clone().float())
        self.groups, self.timesteps = int(alpha.numel()), int(timesteps)

    def coefficient(self, t: torch.Tensor) -> torch.Tensor:
        g = (t.long() * self.groups // self.timesteps).clamp(0, self.groups - 1)
        return self.alpha[g]

    def forward(self, feat, cache, t, flag):
        a = (self.coefficient(t) * flag).view(-1, *([1] * (feat.dim() - 1))).to(feat.dtype)
        return feat + a * (cache - feat)

    def describe(self) -> dict:
        return {"op": "TBSBlend", "groups": self.groups, "timesteps": self.timesteps}

    def extra_repr(self) -> str:
        return f"groups={self.groups}, timesteps={self.timesteps}"


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
class _DeployLayer(nn.Module):
    bqc_kind = "?"
    weight_kind = "?"

    def __init__(self, act, bias, post):
        super().__init__()
        self.act = act
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.post = post

    @property
    def input_kind(self) -> str:
        return _act_kind(self.act)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The core's input: packed bits, integer codes, or x itself."""
        return x if self.act is None else self.act.quantize(x)

    def act_scale(self, dtype) -> torch.Tensor:
        return torch.ones((), dtype=dtype) if self.act is None else self.act.scale(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.epilogue(x, self.core(x))

    def core(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def epilogue(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # weight facts used by describe()/deploy_summary
    w_bits = 32
    bases = 0

    def weight_bytes(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        d = {"op": type(self).__name__, "weight": self.weight_kind, "w_bits": self.w_bits,
             "bases": self.bases, "input": self.input_kind, "a_bits": _act_bits(self.act),
             "bias": self.bias is not None}
        for part in ("kmap", "out_scale", "shortcut", "post"):
            if getattr(self, part, None) is not None:
                d[part] = True
        return d


class _DeployConv(_DeployLayer):
    bqc_kind = "conv"

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, *,
                 act=None, bias=None, kmap=None, out_scale=None, shortcut=None, post=None):
        super().__init__(act, bias, post)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = int(groups)
        self.kmap, self.out_scale, self.shortcut = kmap, out_scale, shortcut

    def epilogue(self, x, y):
        if self.kmap is not None:
            y = y * self.kmap(x)
        if self.out_scale is not None:
            y = self.out_scale(y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        if self.shortcut is not None:
            y = y + self.shortcut(x, y.shape[-2:])
        if self.post is not None:
            y = self.post(y)
        return y

    def _geometry(self):
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    def _packing_geometry(self) -> tuple[int, int]:
        s, p = self.stride, self.padding
        if s[0] != s[1] or p[0] != p[1] or self.dilation != (1, 1) or self.groups != 1:
            raise BqcError(f"the bqc.packing reference conv needs square stride/padding, dilation 1, "
                           f"groups 1 (got stride {s}, padding {p}, dilation {self.dilation}, groups {self.groups})")
        return s[0], p[0]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, input={self.input_kind}")


class _BinaryWeights:
    """Weights of :class:`BinaryConv2d` / :class:`BinaryLinear` (a mixin before the layer base):
    packed sign words per basis ``w_packed`` (uint32 words stored as int32) and a per-(basis,
    channel) scale ``w_scale [B, OC]``."""

    weight_kind = "binary"
    w_bits = 1

    def __init__(self, w_packed: torch.Tensor, w_scale: torch.Tensor, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("w_packed", w_packed)
        self.register_buffer("w_scale", w_scale.detach().clone().float())

    @property
    def bases(self) -> int:
        return int(self.w_packed.shape[0])

    def scale(self, dtype) -> torch.Tensor:
        """Combined per-(basis, channel) scale s_a * w_scale ``[B, OC]``."""
        return self.act_scale(dtype) * self.w_scale.to(dtype)

    def weight_bytes(self) -> int:
        return self.w_packed.numel() * 4


class _IntWeights:
    """Weights of :class:`IntConv2d` / :class:`IntLinear` (a mixin before the layer base): int8
    weight codes ``w_codes`` of ``w_bits`` bits and a per-channel scale ``w_scale``."""

    weight_kind = "int"

    def __init__(self, w_codes: torch.Tensor, w_scale: torch.Tensor, w_bits: int, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("w_codes", w_codes.detach().clone().to(torch.int8))
        self.register_buffer("w_scale", w_scale.detach().clone().float())
        self.w_bits = int(w_bits)

    @property
    def bases(self) -> int:
        return 1

    def scale(self, dtype) -> torch.Tensor:
        return self.act_scale(dtype) * self.w_scale.to(dtype)

    def weight_bytes(self) -> int:
        return self.w_codes.numel()


class BinaryConv2d(_BinaryWeights, _DeployConv):
    """1-bit conv: packed sign bits per basis, per-(basis, channel) scale."""

    def core(self, x):
        s, p, d, g = self._geometry()
        return torch.ops.bqc.binary_conv2d(self.quantize(x), self.w_packed, self.scale(x.dtype),
                                           self.in_channels // self.groups, s, p, d, g, self.input_kind)

    def signs(self) -> torch.Tensor:
        """int8 ±1 weights ``[B, OC, C/groups, KH, KW]`` (unpacked)."""
        return unpack_words(self.w_packed, self.in_channels // self.groups).permute(0, 1, 4, 2, 3)

    def accumulate(self, x: torch.Tensor, impl: str = "torch") -> torch.Tensor:
        """Integer accumulators ``int32[B, N, OC, OH, OW]`` (bits/codes inputs only).

        ``impl="torch"``: the custom op's kernel; ``"packing"``: bqc.packing's popcount /
        integer references on the packed operands.
        """
        if self.act is None:
            raise BqcError("a float-input layer has no integer accumulator")
        xin = self.quantize(x)
        if impl == "torch":
            s, p, d, g = self._geometry()
            accs = _binary_conv_accs(xin, self.w_packed, self.in_channels // self.groups, s, p, d, g,
                                     self.input_kind)
            return torch.stack([a.to(torch.int32) for a in accs])
        stride, pad = self._packing_geometry()
        words = words_numpy(self.w_packed)
        outs = []
        for b in range(self.bases):
            if self.input_kind == "bits":
                o = packing.ref_binary_conv2d(words_numpy(xin), words[b], self.in_channels, stride, pad)
            else:
                o = packing.ref_w1ak_conv2d(xin.numpy(), self.signs()[b].numpy(), stride, pad)
            outs.append(torch.from_numpy(o).permute(0, 3, 1, 2))
        return torch.stack(outs)


class IntConv2d(_IntWeights, _DeployConv):
    """k-bit integer weights (codes) with a per-channel scale (8-bit input/output convs)."""

    def core(self, x):
        s, p, d, g = self._geometry()
        return torch.ops.bqc.int_conv2d(self.quantize(x), self.w_codes, self.scale(x.dtype), s, p, d, g,
                                        self.input_kind)

    def accumulate(self, x: torch.Tensor, impl: str = "torch") -> torch.Tensor:
        if self.act is None:
            raise BqcError("a float-input layer has no integer accumulator")
        q = self.quantize(x)
        if self.input_kind == "bits":
            q = unpack_words(q, self.in_channels).permute(0, 3, 1, 2)
        if impl == "torch":
            s, p, d, g = self._geometry()
            acc = F.conv2d(q.double(), self.w_codes.double(), None, s, p, d, g)
            return acc.to(torch.int32).unsqueeze(0)
        stride, pad = self._packing_geometry()
        o = packing.ref_int_conv2d(q.numpy(), self.w_codes.numpy(), stride, pad)
        return torch.from_numpy(o).permute(0, 3, 1, 2).unsqueeze(0)


class FloatConv2d(_DeployConv):
    """Float weights; the input is fake-quantized (dequantized codes) when ``act`` is set."""

    weight_kind = "float"

    def __init__(self, weight: torch.Tensor, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("weight", weight.detach().clone().float())

    def core(self, x):
        xq = x if self.act is None else self.act(x)
        return F.conv2d(xq, self.weight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)

    def weight_bytes(self) -> int:
        return self.weight.numel() * 4


class _DeployLinear(_DeployLayer):
    bqc_kind = "linear"

    def __init__(self, in_features, out_features, *, act=None, bias=None, post=None):
        super().__init__(act, bias, post)
        self.in_features, self.out_features = int(in_features), int(out_features)

    def epilogue(self, x, y):
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.post is not None:
            y = self.post(y)
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, input={self.input_kind}"


class BinaryLinear(_BinaryWeights, _DeployLinear):
    """1-bit linear: packed sign bits per basis, per-(basis, output) scale."""

    def core(self, x):
        return torch.ops.bqc.binary_dense(self.quantize(x), self.w_packed, self.scale(x.dtype),
                                          self.in_features, self.input_kind)

    def signs(self) -> torch.Tensor:
        return unpack_words(self.w_packed, self.in_features)

    def accumulate(self, x: torch.Tensor, impl: str = "torch") -> torch.Tensor:
        """``int32[B, ..., N]``."""
        if self.act is None:
            raise BqcError("a float-input layer has no integer accumulator")
        xin = self.quantize(x)
        if impl == "torch":
            accs = _binary_dense_accs(xin, self.w_packed, self.in_features, self.input_kind)
            return torch.stack([a.to(torch.int32) for a in accs])
        words = words_numpy(self.w_packed)
        lead = xin.shape[:-1]
        outs = []
        for b in range(self.bases):
            if self.input_kind == "bits":
                o = packing.ref_binary_dense(words_numpy(xin).reshape(-1, xin.shape[-1]), words[b], self.in_features)
            else:
                o = packing.ref_w1ak_dense(xin.reshape(-1, xin.shape[-1]).numpy(), self.signs()[b].numpy())
            outs.append(torch.from_numpy(o).reshape(*lead, -1))
        return torch.stack(outs)


class IntLinear(_IntWeights, _DeployLinear):
    """k-bit integer weights (codes) with a per-output scale."""

    def core(self, x):
        return torch.ops.bqc.int_dense(self.quantize(x), self.w_codes, self.scale(x.dtype), self.input_kind)

    def accumulate(self, x: torch.Tensor, impl: str = "torch") -> torch.Tensor:
        if self.act is None:
            raise BqcError("a float-input layer has no integer accumulator")
        q = self.quantize(x)
        if self.input_kind == "bits":
            q = unpack_words(q, self.in_features)
        if impl == "torch":
            return torch.matmul(q.double(), self.w_codes.double().t()).to(torch.int32).unsqueeze(0)
        o = packing.ref_int_dense(q.reshape(-1, q.shape[-1]).numpy(), self.w_codes.numpy())
        return torch.from_numpy(o).reshape(*q.shape[:-1], -1).unsqueeze(0)


class FloatLinear(_DeployLinear):
    weight_kind = "float"

    def __init__(self, weight, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("weight", weight.detach().clone().float())

    def core(self, x):
        xq = x if self.act is None else self.act(x)
        return F.linear(xq, self.weight.to(x.dtype))

    def weight_bytes(self) -> int:
        return self.weight.numel() * 4


class IntMatmul(nn.Module):
    """``matmul(act_a(a), act_b(b))``: on integer codes (exact) when both operands are quantized,
    else on the fake-quant (dequantized) values."""

    bqc_kind = "matmul"
    weight_kind = "none"

    def __init__(self, act_a=None, act_b=None):
        super().__init__()
        self.act_a, self.act_b = act_a, act_b

    @property
    def integer(self) -> bool:
        return self.act_a is not None and self.act_b is not None

    def scale(self, dtype) -> torch.Tensor:
        return self.act_a.scale(dtype) * self.act_b.scale(dtype)

    def forward(self, a, b):
        if self.integer:
            return torch.ops.bqc.int_matmul(self.act_a.codes(a), self.act_b.codes(b), self.scale(a.dtype))
        a = a if self.act_a is None else self.act_a(a)
        b = b if self.act_b is None else self.act_b(b)
        return torch.matmul(a, b)

    def accumulate(self, a, b) -> torch.Tensor:
        if not self.integer:
            raise BqcError("a float matmul has no integer accumulator")
        return torch.matmul(self.act_a.codes(a).double(), self.act_b.codes(b).double()).to(torch.int32)

    def weight_bytes(self) -> int:
        return 0

    def describe(self) -> dict:
        return {"op": "IntMatmul", "weight": "none", "w_bits": _act_bits(self.act_b), "bases": 0,
                "input": _act_kind(self.act_a), "input_b": _act_kind(self.act_b),
                "a_bits": _act_bits(self.act_a), "bias": False}


DEPLOY_LAYERS = (BinaryConv2d, IntConv2d, FloatConv2d, BinaryLinear, IntLinear, FloatLinear, IntMatmul)


# ---------------------------------------------------------------------------------------------
# graph-level API
# ---------------------------------------------------------------------------------------------
def is_deployed(gm: fx.GraphModule) -> bool:
    return "deployed" in ir.graph_meta(gm).get("facts", set())


def to_deploy(gm: fx.GraphModule) -> fx.GraphModule:
    """The deploy graph of a trained (calibrated) QAT graph, built on a copy (``fold_deploy``).

    Raises :class:`BqcError` when an activation quantizer was never calibrated (no forward
    pass has initialised its scale: train, or run one batch through the QAT graph first).
    """
    from bqc.pipeline import PassContext, PassManager, get_pass

    new = ir.fresh_copy(gm)
    if is_deployed(new):
        return new
    new.eval()
    new = PassManager([get_pass("fold_deploy")()]).run(new, PassContext())
    for p in new.parameters():  # an inference graph: the remaining float parameters are constants
        p.requires_grad_(False)
    return new


def deploy_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module]]:
    """(node, deploy module) for every deploy layer (conv/linear/matmul) in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, DEPLOY_LAYERS):
                out.append((n, mod))
    return out


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def deploy_summary(gm: fx.GraphModule) -> dict:
    """Per layer: kind, bits, packed bytes; and totals for the whole graph.

    ``layers``: one row per deploy layer with ``weight_bytes`` (packed bits / int8 codes /
    float32 weights as stored), ``scale_bytes`` (w_scale, act step), ``other_bytes`` (bias,
    thresholds, K map, shortcut projection, RPReLU, XNOR++ scale) and ``nominal_bits`` (the
    METHODS §9 count: 1 bit per binary weight per basis, b bits per b-bit weight, 32 per
    other parameter). Totals add the float parameters outside the layers (norms,
    time embedding, TBS coefficients): ``total_bytes`` is what a backend stores,
    ``nominal_bytes`` the paper-style size.
    """
    rows = []
    seen: set[int] = set()
    layer_bytes = nominal_bits = 0
    for n, mod in deploy_layers(gm):
        d = mod.describe()
        wb = mod.weight_bytes()
        scale_b = _tensor_bytes(getattr(mod, "w_scale", None))
        other = 0
        for name, t in mod.named_buffers():
            if name in ("w_packed", "w_codes", "weight", "w_scale"):
                continue
            if name.endswith("step"):
                scale_b += 4  # stored as float64 for exact casts; a backend needs float32
                continue
            other += _tensor_bytes(t)
        for t in mod.buffers():
            seen.add(id(t))
        if isinstance(mod, (BinaryConv2d, BinaryLinear)):
            w_elems = mod.w_packed.shape[1] * int(np.prod(mod.w_packed.shape[2:-1], dtype=np.int64)) * (
                mod.in_channels // mod.groups if isinstance(mod, BinaryConv2d) else mod.in_features)
            nbits = w_elems * mod.bases
        elif isinstance(mod, (IntConv2d, IntLinear)):
            w_elems = mod.w_codes.numel()
            nbits = w_elems * mod.w_bits
        elif isinstance(mod, (FloatConv2d, FloatLinear)):
            w_elems = mod.weight.numel()
            nbits = w_elems * 32
        else:
            w_elems = nbits = 0
        nbits += 8 * (scale_b + other)
        rows.append({"name": n.name, "module": ir.info(n).get("module", ""), **d, "weights": int(w_elems),
                     "weight_bytes": int(wb), "scale_bytes": int(scale_b), "other_bytes": int(other),
                     "nominal_bits": int(nbits)})
        layer_bytes += wb + scale_b + other
        nominal_bits += nbits
    float_bytes = 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        float_bytes += t.numel() * 4
    total = layer_bytes + float_bytes
    return {
        "layers": rows,
        "layout_version": LAYOUT_VERSION,
        "layer_bytes": int(layer_bytes),
        "float_bytes": int(float_bytes),
        "total_bytes": int(total),
        "nominal_bytes": int((nominal_bits + 8 * float_bytes + 7) // 8),
    }


def format_summary(summary: dict) -> str:
    """A fixed-width text table of :func:`deploy_summary`."""
    lines = [f"{'layer':<22} {'op':<13} {'w':>3} {'B':>2} {'input':>6} {'a':>3} {'weights':>9} {'w_bytes':>9} {'other':>7}"]
    for r in summary["layers"]:
        lines.append(f"{r['name']:<22} {r['op']:<13} {r['w_bits']:>3} {r['bases']:>2} {r['input']:>6} "
                     f"{r['a_bits']:>3} {r['weights']:>9} {r['weight_bytes']:>9} {r['scale_bytes'] + r['other_bytes']:>7}")
    lines.append(f"# layers {summary['layer_bytes']} B + float {summary['float_bytes']} B = "
                 f"{summary['total_bytes']} B (nominal {summary['nominal_bytes']} B), layout v{summary['layout_version']}")
    return "\n".join(lines) + "\n"



class _Signature(nn.Module):
    """``gm`` with a tuple output, as torch.export wants it."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return tuple(self.gm(*args))


def uncalibrated(gm: fx.GraphModule) -> list[str]:
    """Names of the activation quantizers that no forward pass has initialised (an untrained
    QAT graph of a recipe with LSQ / uniform activations); empty for trained or deploy graphs."""
    from bqc.quant.uniform import LSQ, UniformAct

    return [name for name, m in gm.named_modules()
            if isinstance(m, (LSQ, UniformAct)) and not bool(m.initialised)]


CALIBRATION_IMAGES = 64


def calibrate(gm: fx.GraphModule, data: str, *, manifest: dict | None = None, n: int = CALIBRATION_IMAGES,
              seed: int = 0) -> str:
    """Initialise the activation quantizers of an untrained QAT graph in place; returns what was done.

    ``data``: a data set (``mnist16`` or an image folder, as ``bqc train --data``): ``n`` training
    images, noised to uniformly drawn timesteps of the model's own schedule (as training sees
    them), in one forward pass. ``"random"``: one batch of 2 Gaussian inputs, for speed
    measurements and smoke tests only (the steps it sets mean nothing).
    """
    from bqc.graph import BqcModel

    model = BqcModel(gm)
    gm.eval()
    if data == "random":
        with torch.no_grad():
            model(*example_inputs(gm, batch=2, seed=seed)[:2])
        return "random (2 Gaussian inputs; for speed measurements only)"
    from bqc.data import load_dataset
    from bqc.diffusion.schedule import NoiseSchedule, q_sample

    ds = load_dataset(data, "train")
    if tuple(ds.images.shape[1:]) != model.input_shape:
        raise BqcError(f"calibration data {data!r} has images of shape {tuple(ds.images.shape[1:])}, "
                       f"the model takes {model.input_shape}")
    sched = NoiseSchedule.from_manifest(manifest)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.images), generator=g)[:n]
    x0 = ds.images[idx]
    t = torch.randint(0, sched.T, (len(idx),), generator=g)
    x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=g))
    y = None
    if model.conditional:
        y = ds.labels[idx] if ds.labels is not None else torch.zeros(len(idx), dtype=torch.long)
    with torch.no_grad():
        model(x_t, t, y)
    return f"{data} ({len(idx)} training images at random timesteps)"


def example_inputs(gm: fx.GraphModule, batch: int = 1, seed: int = 0, state: bool = True) -> list[torch.Tensor]:
    """Example inputs in graph order: x, t[, y], TBS caches (random if ``state``, else zeros), flag."""
    meta = ir.graph_meta(gm)
    g = torch.Generator().manual_seed(seed)
    args = [torch.randn(batch, *meta["input_shape"], generator=g), torch.randint(0, 1000, (batch,), generator=g)]
    if meta.get("conditional"):
        args.append(torch.zeros(batch, dtype=torch.long))
    specs = meta.get("state_inputs", [])
    for s in specs:
        args.append(torch.randn(batch, *s["shape"], generator=g) if state else torch.zeros(batch, *s["shape"]))
    if specs:
        args.append(torch.tensor(1.0 if state else 0.0))
    return args


def export_program(gm: fx.GraphModule, args: list[torch.Tensor] | None = None, *, dynamic_batch: bool = True):
    """``torch.export`` of a deploy graph: the hand-off to compiler backends (TVM Relax).

    The integer cores stay single nodes (``bqc.sign_pack.default``, ``bqc.binary_conv2d.default``,
    ...; see the module docstring); everything else is ATen. ``args`` defaults to
    ``example_inputs(gm, batch=2)``; the batch dimension is dynamic unless
    ``dynamic_batch=False``.
    """
    if not is_deployed(gm):
        raise BqcError("export_program takes a deploy graph", hint="fold it first: bqc.deploy.to_deploy(gm)")
    if args is None:
        args = example_inputs(gm, batch=2)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        flag = ir.graph_meta(gm).get("state_flag")
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        shapes = (tuple(None if name == flag or a.dim() == 0 else {0: batch} for name, a in zip(names, args)),)
    return torch.export.export(_Signature(gm), tuple(args), dynamic_shapes=shapes, strict=False)
