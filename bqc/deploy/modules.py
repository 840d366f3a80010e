"""Deploy modules: trained quantized layers in their inference form.

All their state is buffers (packed words, integer codes, scales) plus a few plain attributes
(geometry, bit widths); their torch forward is the *reference executor*, the oracle every
backend is tested against. :mod:`bqc.deploy.folding` builds them from a trained QAT graph;
:mod:`bqc.deploy.artifact` saves and rebuilds them (``deploy.json`` + ``deploy.safetensors``).

Before / after folding (one BiDM W1A1 conv)::

    conv2d_25 = call_module quant.conv2d_1:QConv2d(silu_1)        # SignScale, SignAct, KMap, Shortcut
    conv2d_25 = call_module deploy.conv2d_1:BinaryConv2d(silu_1)  # packed bits, threshold, K map, shortcut

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
``OutputSkip``     ``eps = c_in[t] x + c_out[t] F`` (pass ``output_skip``; the same module in
                   QAT and deploy graphs: two fixed float32 tables, no parameters).
=================  ======================================================================

Every layer is ``y = epilogue(x, core(x))``:

* ``act`` (input quantizer): ``None`` (float input), :class:`SignBinarize` (``sign(x + tau)``,
  packed to bits with ``bqc::sign_pack``), :class:`QuantizeCodes` (``q = round(clamp(x / s,
  qmin, qmax))``, integer codes) or, on binary-weight layers, :class:`UnsignedBinarize` (the
  same codes with levels {0, 1}, DoReFa's 1-bit activation, packed to bits with
  ``bqc::unsigned_pack`` for the XNOR/popcount kernels). ``input_kind`` is ``"float" | "bits" |
  "bits01" | "codes"``.
* ``core``: the integer op (a ``bqc::*`` custom op, :mod:`bqc.deploy.ops`). For bits/codes
  inputs the accumulator is exact (int32 semantics), ``core(x) = sum_b (s_a * w_scale[b])[oc] *
  acc_b`` computed as ``float(acc_0) * scale_0 [+ float(acc_1) * scale_1]`` in the input's
  float dtype.
* ``epilogue`` (real-valued, in this order): ``* kmap(x)`` (K = k ⊛ mean_c|x|), ``*
  out_scale`` (XNOR++ alpha_o beta_h gamma_w), ``+ bias``, ``+ shortcut(x)`` (|s| * avg-pool /
  nearest-resize / 1x1 conv of the float input), ``post`` (RPReLU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bqc import packing
from bqc.errors import BqcError

from .ops import PACKED_KINDS, _binary_conv_accs, _binary_dense_accs, _cview, _pair, unpack_words, words_numpy


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
        self._set_step(scale)

    def _set_step(self, scale) -> None:
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


class UnsignedBinarize(QuantizeCodes):
    """A 1-bit unsigned activation, packed: codes ``q = round(clamp(x / s, 0, 1))`` in {0, 1}
    (DoReFa's 1-bit activation; value ``q * s``), consumed by binary-weight layers as packed
    bits (input kind ``"bits01"``: bit 1 iff ``q == 1``, i.e. iff ``x / s > 0.5``; exactly 0.5
    rounds half to even to 0), along ``ch_axis`` like :class:`SignBinarize`. The popcount
    kernels compute ``sum_c q w = popcount(w) - popcount(a ^ w)`` (bqc.packing).

    A :class:`QuantizeCodes` with the levels fixed at {0, 1}: its codes and fake-quant value are
    the parent's (flip forcing and unfolding treat it as one); only what the integer core
    consumes (:meth:`quantize`) differs.
    """

    kind = "bits01"
    qmin, qmax, bits = 0, 1, 1

    def __init__(self, scale, ch_axis: int = 1):
        nn.Module.__init__(self)  # the levels are the class's, not per-instance attributes
        self.ch_axis = int(ch_axis)
        self._set_step(scale)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Packed words (bqc.packing layout) of the {0, 1} codes."""
        return torch.ops.bqc.unsigned_pack(x, self.step, self.ch_axis)

    def describe(self) -> dict:
        return {"kind": "bits01", "bits": 1, "qmin": 0, "qmax": 1}

    def extra_repr(self) -> str:
        return f"values={{0, 1}}, step={float(self.step):.6g}, ch_axis={self.ch_axis}"


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


class OutputSkip(nn.Module):
    """``eps = c_in[t] * x + c_out[t] * F``: the real-valued input-to-output path of the
    ``output_skip`` pass, with ``c_in = sqrt(1 - abar_t)``, ``c_out = sqrt(abar_t)`` of the model's
    schedule (``T`` entries each; ``t`` is clamped to ``[0, T)``)."""

    bqc_kind = "output_skip"

    def __init__(self, c_in: torch.Tensor, c_out: torch.Tensor):
        super().__init__()
        if c_in.shape != c_out.shape or c_in.dim() != 1:
            raise BqcError(f"OutputSkip tables must be two vectors of one length, got {tuple(c_in.shape)} "
                           f"and {tuple(c_out.shape)}")
        self.register_buffer("c_in", c_in.detach().clone().float())
        self.register_buffer("c_out", c_out.detach().clone().float())

    @classmethod
    def from_alphas_cumprod(cls, abar) -> "OutputSkip":
        abar = torch.as_tensor(abar, dtype=torch.float64)
        return cls((1.0 - abar).sqrt(), abar.sqrt())

    def forward(self, f: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx = t.long().clamp(0, self.c_in.shape[0] - 1)
        shape = (-1, *([1] * (f.dim() - 1)))
        return self.c_in[idx].view(shape).to(x.dtype) * x + self.c_out[idx].view(shape).to(f.dtype) * f

    def describe(self) -> dict:
        return {"op": "OutputSkip", "timesteps": int(self.c_in.shape[0])}

    def extra_repr(self) -> str:
        return f"T={self.c_in.shape[0]}"


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
        """Integer accumulators ``int32[B, N, OC, OH, OW]`` (bits/bits01/codes inputs only).

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
            if self.input_kind in PACKED_KINDS:
                o = packing.ref_binary_conv2d(words_numpy(xin), words[b], self.in_channels, stride, pad,
                                              unsigned=self.input_kind == "bits01")
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
        if self.input_kind in PACKED_KINDS:
            q = unpack_words(q, self.in_channels, self.input_kind == "bits01").permute(0, 3, 1, 2)
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
            if self.input_kind in PACKED_KINDS:
                o = packing.ref_binary_dense(words_numpy(xin).reshape(-1, xin.shape[-1]), words[b], self.in_features,
                                             unsigned=self.input_kind == "bits01")
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
        if self.input_kind in PACKED_KINDS:
            q = unpack_words(q, self.in_features, self.input_kind == "bits01")
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
