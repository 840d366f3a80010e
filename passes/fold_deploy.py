"""``fold_deploy``: fold each trained quantized module into its inference form (bqc.deploy).

    before:  conv2d_25 = call_module quant.conv2d_1:QConv2d(silu_1)
    after:   conv2d_25 = call_module deploy.conv2d_1:BinaryConv2d(silu_1)
             tbs_block_5 = call_module tbs.block_5:TBSBlend(...)   (bqc.deploy.TBSBlend, buffers)

* binary weight quantizers (every basis of ``deploy_form``) -> ``w_packed`` (bqc.packing
  canonical layout, one slice per basis: EBB stage 2 / baseline = 1, EBB stage 1 / LMB = 2)
  and ``w_scale [B, OC]``;
* uniform / LSQ weights -> ``w_codes int8`` + per-channel ``w_scale``;
* LSQ / uniform / DoReFa activations -> :class:`~bqc.deploy.QuantizeCodes` (integer codes and
  a step), sign activations (with the BiDM/ReActNet threshold tau) ->
  :class:`~bqc.deploy.SignBinarize` (bits);
* K map, XNOR++ scale, shortcut, RPReLU, TBS blend stay real-valued (buffer-only copies);
* a layer whose ``quant_active`` flag is off folds to its float op.

Everything is read from the trained modules' state; the training modules themselves are
dropped (the ``quant`` container disappears). Activation quantizers must be calibrated
(their first forward sets the step): an uninitialised one is an error, not a silent step 1.
The pass is meant for trained graphs, through ``bqc.deploy.to_deploy`` (on a copy); it is not a
recipe step (a recipe replays on freshly initialised, uncalibrated quantizers).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bqc import deploy as D
from bqc import ir, packing
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassResult, register, register_fact
from bqc.quant import tbs as qtbs
from bqc.quant.binact import RPReLU, SignAct
from bqc.quant.layers import QConv2d, QLinear, QMatmul, _Quantized
from bqc.quant.parts import FactorisedScale, KMap, Shortcut
from bqc.quant.uniform import LSQ, DoReFaAct, UniformAct


# --- activations ----------------------------------------------------------------------------
def fold_act(aq, where: str):
    """Inference form of an activation quantizer (None stays None)."""
    if aq is None:
        return None
    if isinstance(aq, SignAct):
        return D.SignBinarize(aq.tau, aq.ch_axis)
    if isinstance(aq, (LSQ, UniformAct)) and not bool(aq.initialised):
        raise BqcError(f"{where}: activation quantizer {aq.kind!r} was never calibrated (its step is unset)",
                       hint="train the model, or run one batch through the QAT graph before folding")
    if isinstance(aq, LSQ):
        step = aq.scale.detach().double()
    elif isinstance(aq, UniformAct):
        step = aq.amax.detach().double() / aq.qp
    elif isinstance(aq, DoReFaAct):
        step = torch.tensor(1.0 / aq.qp, dtype=torch.float64)
    else:
        raise BqcError(f"{where}: no inference form for activation quantizer {type(aq).__name__}")
    return D.QuantizeCodes(step, aq.qn, aq.qp, aq.bits)


# --- epilogue parts -------------------------------------------------------------------------
def _fold_kmap(k: KMap | None):
    return None if k is None else D.KMap(k.weight, k.stride, k.padding, k.dilation)


def _fold_out_scale(o: FactorisedScale | None):
    return None if o is None else D.OutScale(o.alpha, o.beta, o.gamma)


def _fold_shortcut(s: Shortcut | None):
    if s is None:
        return None
    proj = getattr(s, "proj", None)
    channels = "conv" if proj is not None else getattr(s, "channels", "same")
    return D.Shortcut(s.s.detach().abs(), s.stride, channels, getattr(s, "out_channels", 0),
                      None if proj is None else proj.weight)


def _fold_post(p):
    if p is None:
        return None
    if isinstance(p, RPReLU):
        return D.RPReLU(p.gamma, p.slope, p.zeta, p.ch_axis)
    raise BqcError(f"no inference form for output module {type(p).__name__}")


# --- weights --------------------------------------------------------------------------------
def _binary_words(signs: list[torch.Tensor], conv: bool) -> torch.Tensor:
    pack = packing.pack_conv_weights if conv else packing.pack_dense_weights
    return torch.from_numpy(np.ascontiguousarray(np.stack([pack(s) for s in signs])))


def fold_conv(q: QConv2d, where: str) -> nn.Module:
    w = q.weight.detach()
    oc, cin_g, kh, kw = w.shape
    geom = (cin_g * q.groups, oc, (kh, kw), q.stride, q.padding, q.dilation, q.groups)
    if not bool(q.quant_active):
        return D.FloatConv2d(w, *geom, bias=q.bias)
    form = q.deploy_form()
    wf, bias = form["weight"], form["bias"]
    parts = dict(act=fold_act(q.aq, where), bias=bias, kmap=_fold_kmap(q.kmap),
                 out_scale=_fold_out_scale(q.out_scale), shortcut=_fold_shortcut(q.shortcut),
                 post=_fold_post(q.post))
    if wf["kind"] == "binary":
        return D.BinaryConv2d(_binary_words(wf["signs"], True), torch.stack(wf["scales"]), *geom, **parts)
    if wf["kind"] == "uniform":
        return D.IntConv2d(wf["codes"], wf["scale"], wf["bits"], *geom, **parts)
    if wf["kind"] == "float":
        return D.FloatConv2d(wf["weight"], *geom, **parts)
    raise BqcError(f"{where}: unknown weight form {wf['kind']!r}")


def fold_linear(q: QLinear, where: str) -> nn.Module:
    w = q.weight.detach()
    n, k = w.shape
    if not bool(q.quant_active):
        return D.FloatLinear(w, k, n, bias=q.bias)
    form = q.deploy_form()
    wf = form["weight"]
    parts = dict(act=fold_act(q.aq, where), bias=form["bias"], post=_fold_post(q.post))
    if wf["kind"] == "binary":
        return D.BinaryLinear(_binary_words(wf["signs"], False), torch.stack(wf["scales"]), k, n, **parts)
    if wf["kind"] == "uniform":
        return D.IntLinear(wf["codes"], wf["scale"], wf["bits"], k, n, **parts)
    if wf["kind"] == "float":
        return D.FloatLinear(wf["weight"], k, n, **parts)
    raise BqcError(f"{where}: unknown weight form {wf['kind']!r}")


def fold_matmul(q: QMatmul, where: str) -> nn.Module:
    if not bool(q.quant_active):
        return D.IntMatmul(None, None)
    return D.IntMatmul(fold_act(q.aq_a, where), fold_act(q.aq_b, where))


def fold_module(mod: nn.Module, where: str) -> nn.Module | None:
    """The deploy module for a QAT module, or None when ``mod`` is not a quantized module."""
    if isinstance(mod, QConv2d):
        return fold_conv(mod, where)
    if isinstance(mod, QLinear):
        return fold_linear(mod, where)
    if isinstance(mod, QMatmul):
        return fold_matmul(mod, where)
    if isinstance(mod, qtbs.TBSBlend):
        return D.TBSBlend(mod.alpha, mod.timesteps)
    return None


# --- the pass -------------------------------------------------------------------------------
@register_fact("deployed")
def _check_deployed(gm) -> str | None:
    bad = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, (_Quantized, qtbs.TBSBlend)):
                bad.append(n.name)
    return f"training modules left in the deploy graph: {bad[:5]}" if bad else None


def _short(d: dict) -> str:
    if d["op"] == "IntMatmul":
        return f"IntMatmul {d['input']} x {d['input_b']}"
    w = {"binary": f"W1x{d['bases']}" if d["bases"] > 1 else "W1", "int": f"W{d['w_bits']}",
         "float": "W32"}[d["weight"]]
    return f"{d['op']} {w} input={d['input']}"


@register
class FoldDeploy(Pass):
    name = "fold_deploy"
    summary = "fold trained quantizers into the inference form (packed bits, integer codes)"
    requires = ("annotated",)
    ensures = ("annotated", "deployed")

    def run(self, gm, ctx):
        changed = False
        if not hasattr(gm, "deploy"):
            gm.add_module("deploy", nn.Module())
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            old = gm.get_submodule(node.target)
            new = fold_module(old, node.name)
            if new is None:
                continue
            if isinstance(new, D.TBSBlend):  # same place, buffer-only twin
                owner, _, attr = node.target.rpartition(".")
                setattr(gm.get_submodule(owner), attr, new)
                ir.info(node)["deploy"] = new.describe()
            else:
                local = node.target.split(".", 1)[-1].replace(".", "_")
                gm.deploy.add_module(local, new)
                node.target = f"deploy.{local}"
                d = new.describe()
                ir.info(node)["deploy"] = d
                ctx.explain(self.name, node, _short(d), f"folded {type(old).__name__}")
            changed = True
        if hasattr(gm, "quant") and not any(n.op == "call_module" and str(n.target).startswith("quant.")
                                           for n in gm.graph.nodes):
            delattr(gm, "quant")
        meta = ir.graph_meta(gm)
        meta["deploy"] = {"layout_version": D.LAYOUT_VERSION}
        return PassResult(gm, changed)
