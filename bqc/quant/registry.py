"""Names recipes use for quantizers, and builders for quantized layers from those names.

A recipe says e.g. ``weight = "ebb"``, ``act = "lsq"``, ``a_bits = 4``; passes call
``make_weight_quantizer`` / ``make_act_quantizer`` / ``make_qconv2d`` with those strings.
"fp" (or "none") means "leave in float" and gives ``None``.
"""
from __future__ import annotations

from functools import partial

import torch

from ..errors import BqcError
from .binact import RPReLU, SignAct
from .binary import EBB, LMB, BinaryWeight, ReSTEWeight, SignScale
from .layers import QConv2d, QLinear
from .parts import FactorisedScale, KMap, Shortcut
from .uniform import LSQ, DoReFaAct, LSQWeight, UniformAct, UniformWeight

FLOAT_NAMES = ("fp", "none")

# name -> constructor(weight, bits, **opts)
WEIGHT_QUANTIZERS = {
    "sign_scale": SignScale,                                             # BinaryDM baseline, learned alpha
    "bidm": partial(SignScale, learnable=False, detach=True, kind="bidm"),      # recomputed, detached
    "xnor": partial(SignScale, learnable=False, detach=False, kind="xnor"),     # mean|W_o|, grad flows
    "dorefa": partial(SignScale, learnable=False, per_channel=False, kind="dorefa"),  # E|W| per layer
    "reste": ReSTEWeight,
    "ebb": EBB,
    "lmb": LMB,
    "uniform": UniformWeight,
    "lsq": LSQWeight,
}

# name -> constructor; multi-bit ones take (bits, **opts), 1-bit signs take (channels, ch_axis, **opts)
ACT_QUANTIZERS = {
    "lsq": LSQ,
    "uniform": UniformAct,
    "dorefa": DoReFaAct,
    "sign": partial(SignAct, backward="ste"),
    "reste": partial(SignAct, backward="reste", kind="reste"),
    "rsign": partial(SignAct, backward="approx", kind="rsign"),   # ReActNet: threshold per channel
    "bidm": partial(SignAct, backward="approx", kind="bidm"),     # BiDM: threshold (+ K map in the conv)
}
_THRESHOLDED = ("rsign", "bidm")


def _unknown(kind: str, name: str, table) -> BqcError:
    valid = ", ".join(sorted([*table, *FLOAT_NAMES]))
    return BqcError(f"unknown {kind} quantizer {name!r}; valid names: {valid}")


def _construct(what: str, ctor, *args, **opts):
    try:
        return ctor(*args, **opts)
    except TypeError as e:
        raise BqcError(f"bad options for {what}: {opts}", hint=str(e)) from e


def _target(ctor):
    return ctor.func if isinstance(ctor, partial) else ctor


def make_weight_quantizer(name: str, weight: torch.Tensor, bits: int = 1, **opts):
    """Weight quantizer ``name`` for ``weight`` at ``bits`` (binary ones: 1), or None for "fp"."""
    if name in FLOAT_NAMES:
        return None
    if name not in WEIGHT_QUANTIZERS:
        raise _unknown("weight", name, WEIGHT_QUANTIZERS)
    ctor, what = WEIGHT_QUANTIZERS[name], f"weight quantizer {name!r}"
    if issubclass(_target(ctor), BinaryWeight):
        if bits != 1:
            raise BqcError(f"{what} does not support bits={bits}; supported: 1")
        return _construct(what, ctor, weight, **opts)
    return _construct(what, ctor, weight, bits, **opts)


def make_act_quantizer(name: str, bits: int | None = None, *, channels: int | None = None,
                       ch_axis: int = 1, **opts):
    """Activation quantizer ``name`` at ``bits`` (None: its default), or None for "fp".

    ``channels``/``ch_axis`` locate the per-channel threshold of "rsign"/"bidm".
    """
    if name in FLOAT_NAMES:
        return None
    if name not in ACT_QUANTIZERS:
        raise _unknown("activation", name, ACT_QUANTIZERS)
    ctor, what = ACT_QUANTIZERS[name], f"activation quantizer {name!r}"
    if not issubclass(_target(ctor), SignAct):
        return _construct(what, ctor, **opts) if bits is None else _construct(what, ctor, bits, **opts)
    if bits not in (None, 1):
        raise BqcError(f"{what} does not support bits={bits}; supported: 1")
    if name not in _THRESHOLDED:
        return _construct(what, ctor, None, **opts)
    if channels is None:
        raise BqcError(f"{what} needs the channel count (it has a per-channel threshold)")
    return _construct(what, ctor, channels, ch_axis=ch_axis, **opts)


KMAPS = ("fixed", "learned")
#: scaled shortcut forms. "scaled": BiDM's |s| * shortcut(x), channel changes by parameter-free
#: channel pooling (bqc's default: keeps the model binary); "scaled-conv": BiDM's released code,
#: a real-valued 1x1 conv when channels change (32-bit weights, counted by ``bqc report``);
#: "real": ReActNet (s = 1, fixed).
SHORTCUTS = {"scaled": dict(scale=0.3, learnable=True),
             "scaled-conv": dict(scale=0.3, learnable=True, channels="conv"),
             "real": dict(scale=1.0, learnable=False)}


def _choice(what: str, value, valid):
    if value is not None and value not in valid:
        raise BqcError(f"unknown {what} {value!r}; valid: {', '.join(valid)} (or none)")
    return value


def make_qconv2d(weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                 weight_q: str = "fp", w_bits: int = 1, weight_opts: dict | None = None,
                 act_q: str = "fp", a_bits: int | None = None, act_opts: dict | None = None,
                 kmap: str | None = None, out_scale_hw: tuple[int, int] | None = None,
                 shortcut: str | None = None, post: str | None = None,
                 keep_bias: bool = True) -> QConv2d:
    """A QConv2d from recipe names.

    kmap: "fixed" (XNOR box filter) | "learned" (BiDM); out_scale_hw: (H, W) of the output for
    the XNOR++ factorised scale; shortcut: "scaled" (BiDM, |s| learnable init 0.3) | "scaled-conv"
    (the same with a real 1x1 conv where channels change, as BiDM's code) | "real"
    (ReActNet, s = 1 fixed); post: "rprelu"; keep_bias=False drops the bias (BiDM reference).
    """
    out_ch, in_per_group = weight.shape[:2]
    in_ch = in_per_group * int(groups)
    wq = make_weight_quantizer(weight_q, weight, w_bits, **(weight_opts or {}))
    aq = make_act_quantizer(act_q, a_bits, channels=in_ch, ch_axis=1, **(act_opts or {}))
    km = None if _choice("kmap", kmap, KMAPS) is None else KMap(
        weight.shape[-2:], stride, padding, dilation, learnable=(kmap == "learned"))
    osc = None if out_scale_hw is None else FactorisedScale(out_ch, *out_scale_hw)
    sc = None if _choice("shortcut", shortcut, tuple(SHORTCUTS)) is None else Shortcut(
        in_ch, out_ch, stride, **SHORTCUTS[shortcut])
    pp = None if _choice("post", post, ("rprelu",)) is None else RPReLU(out_ch, ch_axis=1)
    return QConv2d(weight, bias if keep_bias else None, stride, padding, dilation, groups,
                   wq=wq, aq=aq, out_scale=osc, kmap=km, shortcut=sc, post=pp)


def make_qlinear(weight, bias=None, *, weight_q: str = "fp", w_bits: int = 1,
                 weight_opts: dict | None = None, act_q: str = "fp", a_bits: int | None = None,
                 act_opts: dict | None = None, post: str | None = None,
                 keep_bias: bool = True) -> QLinear:
    """A QLinear from recipe names (channels of thresholded signs along the last axis)."""
    wq = make_weight_quantizer(weight_q, weight, w_bits, **(weight_opts or {}))
    aq = make_act_quantizer(act_q, a_bits, channels=weight.shape[1], ch_axis=-1, **(act_opts or {}))
    pp = None if _choice("post", post, ("rprelu",)) is None else RPReLU(weight.shape[0], ch_axis=-1)
    return QLinear(weight, bias if keep_bias else None, wq=wq, aq=aq, post=pp)
