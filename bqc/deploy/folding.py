"""Folding, the stage between training and the backends: a trained QAT graph -> a deploy graph.

    artifact ──fold──▶ deploy artifact ──lower──▶ compiled

* :func:`fold` (``bqc fold``): a trained (or calibrated) artifact -> :class:`DeployArtifact`,
  which saves without the recipe, the base program or the float weights
  (:mod:`bqc.deploy.artifact`);
* :func:`to_deploy`: a QAT graph -> its deploy graph, on a copy;
* :func:`deploy_graph`: whatever a backend is given (QAT or deploy graph, artifact or deploy
  artifact, their folders, a shipped deploy model's zoo name) -> a deploy graph, refusing an
  uncalibrated QAT graph unless told how to calibrate it;
* :func:`fold_graph`: the rewrite itself, in place; the ``fold_deploy`` pass
  (``passes/fold_deploy.py``) is a thin wrapper around it.

The QAT -> deploy mapping is :func:`rules`, one table from each training module class (layers,
weight and activation quantizers, epilogue parts, the TBS blend) to the function that builds
its inference form. Weight quantizers keep their ``deploy_form`` (the bases or codes evaluated
with the hard sign: the same code as their training forward, so both cannot diverge); the table
says what each form becomes; a binary-weight layer's {0, 1} input codes (DoReFa's 1-bit
activation) become packed bits for the popcount kernels (:func:`_binary_input`). Everything is
read from the trained modules' state; the training
modules themselves are dropped (the ``quant`` container disappears). An activation quantizer
that was never calibrated is an error, not a silent step 1.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from bqc import ir, packing
from bqc.errors import BqcError

from . import modules as M
from .export import calibrate as calibrate_graph
from .export import uncalibrated
from .ops import LAYOUT_VERSION
from .summary import is_deployed


# ---------------------------------------------------------------------------------------------
# the QAT -> deploy table
# ---------------------------------------------------------------------------------------------
@functools.cache
def rules() -> dict[type, object]:
    """QAT module class -> ``fold(module, where)`` building its inference form. Looked up along
    the class's MRO (a subclass without its own entry folds like its base); imported here, not
    at module level, so that loading a saved deploy artifact never imports the training code."""
    from bqc.quant import binact, binary, layers, parts, tbs, uniform

    return {
        # layers: the weight and input quantizers and the epilogue fold through this table too
        layers.QConv2d: _fold_conv,
        layers.QLinear: _fold_linear,
        layers.QMatmul: lambda q, where: (M.IntMatmul(_fold(q.aq_a, where), _fold(q.aq_b, where))
                                          if bool(q.quant_active) else M.IntMatmul(None, None)),
        tbs.TBSBlend: lambda b, where: M.TBSBlend(b.alpha, b.timesteps),
        # activation quantizers -> bits (sign with threshold) or integer codes with a float64 step
        binact.SignAct: lambda aq, where: M.SignBinarize(aq.tau, aq.ch_axis),
        uniform.LSQ: lambda aq, where: _codes(_calibrated(aq, where), aq.scale.detach().double()),
        uniform.UniformAct: lambda aq, where: _codes(_calibrated(aq, where), aq.amax.detach().double() / aq.qp),
        uniform.DoReFaAct: lambda aq, where: _codes(aq, torch.tensor(1.0 / aq.qp, dtype=torch.float64)),
        # weight quantizers -> ("binary", (packed words per basis, scales [B, OC])) or ("int", (codes, scale, bits))
        binary.BinaryWeight: _binary_weights,
        uniform.UniformWeight: _int_weights,
        uniform.LSQWeight: _int_weights,
        # real-valued epilogue parts -> buffer-only copies
        parts.KMap: lambda k, where: M.KMap(k.weight, k.stride, k.padding, k.dilation),
        parts.FactorisedScale: lambda o, where: M.OutScale(o.alpha, o.beta, o.gamma),
        parts.Shortcut: _fold_shortcut,
        binact.RPReLU: lambda p, where: M.RPReLU(p.gamma, p.slope, p.zeta, p.ch_axis),
    }


def _rule(mod: nn.Module):
    table = rules()
    return next((table[c] for c in type(mod).__mro__ if c in table), None)


def _fold(mod, where: str, *args):
    """The inference form of one training module (None stays None)."""
    if mod is None:
        return None
    fn = _rule(mod)
    if fn is None:
        raise BqcError(f"{where}: no inference form for {type(mod).__name__}")
    return fn(mod, where, *args)


def _calibrated(aq, where: str):
    """``aq`` if a forward pass has set its step (LSQ / uniform activations), else an error."""
    if not bool(aq.initialised):
        raise BqcError(f"{where}: activation quantizer {aq.kind!r} was never calibrated (its step is unset)",
                       hint="train the model, or run one batch through the QAT graph before folding")
    return aq


def _codes(aq, step: torch.Tensor) -> M.QuantizeCodes:
    return M.QuantizeCodes(step, aq.qn, aq.qp, aq.bits)


def _binary_input(act, ch_axis: int):
    """The input quantizer of a binary-weight layer: {0, 1} codes (DoReFa's 1-bit activation)
    become packed bits for the popcount kernels (:class:`~bqc.deploy.modules.UnsignedBinarize`,
    input kind ``"bits01"``); anything else stays as folded."""
    if type(act) is M.QuantizeCodes and (act.qmin, act.qmax) == (0, 1):
        return M.UnsignedBinarize(act.step, ch_axis)
    return act


def _act(q, form: str, where: str, ch_axis: int):
    act = _fold(q.aq, where)
    return _binary_input(act, ch_axis) if form == "binary" else act


def _binary_weights(wq, where: str, w: torch.Tensor):
    form = wq.deploy_form(w)
    pack = packing.pack_conv_weights if w.dim() == 4 else packing.pack_dense_weights
    words = torch.from_numpy(np.ascontiguousarray(np.stack([pack(s) for s in form["signs"]])))
    return "binary", (words, torch.stack(form["scales"]))


def _int_weights(wq, where: str, w: torch.Tensor):
    form = wq.deploy_form(w)
    return "int", (form["codes"], form["scale"], form["bits"])


def _fold_shortcut(s, where: str) -> M.Shortcut:
    proj = getattr(s, "proj", None)
    channels = "conv" if proj is not None else getattr(s, "channels", "same")
    return M.Shortcut(s.s.detach().abs(), s.stride, channels, getattr(s, "out_channels", 0),
                      None if proj is None else proj.weight)


#: weight form -> (conv class, linear class)
_LAYER_CLASSES = {"binary": (M.BinaryConv2d, M.BinaryLinear), "int": (M.IntConv2d, M.IntLinear),
                  "float": (M.FloatConv2d, M.FloatLinear)}


def _weights(q, where: str):
    """(form, constructor tensors) of a quantized layer's weight; float when it has no quantizer."""
    if q.wq is None:
        return "float", (q.weight.detach().clone(),)
    return _fold(q.wq, where, q.weight)


def _fold_conv(q, where: str) -> nn.Module:
    w = q.weight.detach()
    oc, cin_g, kh, kw = w.shape
    geom = (cin_g * q.groups, oc, (kh, kw), q.stride, q.padding, q.dilation, q.groups)
    if not bool(q.quant_active):
        return M.FloatConv2d(w, *geom, bias=q.bias)
    form, tensors = _weights(q, where)
    return _LAYER_CLASSES[form][0](*tensors, *geom, act=_act(q, form, where, 1), bias=q.bias,
                                   kmap=_fold(q.kmap, where), out_scale=_fold(q.out_scale, where),
                                   shortcut=_fold(q.shortcut, where), post=_fold(q.post, where))


def _fold_linear(q, where: str) -> nn.Module:
    w = q.weight.detach()
    n, k = w.shape
    if not bool(q.quant_active):
        return M.FloatLinear(w, k, n, bias=q.bias)
    form, tensors = _weights(q, where)
    return _LAYER_CLASSES[form][1](*tensors, k, n, act=_act(q, form, where, -1), bias=q.bias,
                                   post=_fold(q.post, where))


def fold_module(mod: nn.Module, where: str) -> nn.Module | None:
    """The deploy module for a QAT layer or TBS blend, or None when ``mod`` is neither."""
    from bqc.quant import layers, tbs

    if not isinstance(mod, (layers._Quantized, tbs.TBSBlend)):
        return None
    return _fold(mod, where)


# ---------------------------------------------------------------------------------------------
# the graph rewrite
# ---------------------------------------------------------------------------------------------
def training_modules_left(gm: fx.GraphModule) -> str | None:
    """What keeps ``gm`` from being a deploy graph (the ``deployed`` fact's check), or None."""
    from bqc.quant import layers, tbs

    bad = [n.name for n in gm.graph.nodes
           if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (layers._Quantized, tbs.TBSBlend))]
    return f"training modules left in the deploy graph: {bad[:5]}" if bad else None


def _short(d: dict) -> str:
    if d["op"] == "IntMatmul":
        return f"IntMatmul {d['input']} x {d['input_b']}"
    w = {"binary": f"W1x{d['bases']}" if d["bases"] > 1 else "W1", "int": f"W{d['w_bits']}",
         "float": "W32"}[d["weight"]]
    return f"{d['op']} {w} input={d['input']}"


def fold_graph(gm: fx.GraphModule, explain=None) -> bool:
    """Replace, in place, every quantized module of ``gm`` by its deploy module (``deploy.<name>``)
    and every TBS blend by its buffer-only twin (same place); node names and annotations stay,
    ``node.meta["bqc"]["deploy"]`` adds the layer's inference form. ``explain(node, action,
    reason)`` hears about every folded layer. Returns whether anything changed (the caller
    recompiles)."""
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
        if isinstance(new, M.TBSBlend):  # same place, buffer-only twin
            owner, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(owner), attr, new)
            ir.info(node)["deploy"] = new.describe()
        else:
            local = node.target.split(".", 1)[-1].replace(".", "_")
            gm.deploy.add_module(local, new)
            node.target = f"deploy.{local}"
            d = new.describe()
            ir.info(node)["deploy"] = d
            if explain is not None:
                explain(node, _short(d), f"folded {type(old).__name__}")
        changed = True
    if hasattr(gm, "quant") and not any(n.op == "call_module" and str(n.target).startswith("quant.")
                                       for n in gm.graph.nodes):
        delattr(gm, "quant")
    ir.graph_meta(gm)["deploy"] = {"layout_version": LAYOUT_VERSION}
    return changed


def to_deploy(gm: fx.GraphModule) -> fx.GraphModule:
    """The deploy graph of a trained (calibrated) QAT graph, built on a copy.

    Raises :class:`BqcError` when an activation quantizer was never calibrated (no forward
    pass has initialised its scale: train, or run one batch through the QAT graph first).
    """
    new = ir.fresh_copy(gm)
    if is_deployed(new):
        return new
    facts = ir.graph_meta(new).setdefault("facts", set())
    if "annotated" not in facts:
        raise BqcError("folding needs an annotated bqc graph (a transformed or trained artifact's graph)",
                       hint="load it with bqc.artifact.load_artifact, or run the recipe's passes first")
    new.eval()
    if fold_graph(new):
        new.graph.lint()
        new.recompile()
    facts.add("deployed")
    problem = training_modules_left(new)
    if problem:  # pragma: no cover - a fold rule is missing
        raise AssertionError(f"after folding: invariant 'deployed' broken: {problem}")
    for p in new.parameters():  # an inference graph: the remaining float parameters are constants
        p.requires_grad_(False)
    return new


# ---------------------------------------------------------------------------------------------
# what the backends and `bqc fold` are given
# ---------------------------------------------------------------------------------------------
_ING = {"lower": "lowering", "fold": "folding"}


def _uncalibrated_error(missing: list[str], verb: str) -> BqcError:
    """The refusal of an untrained artifact by ``bqc lower`` / ``bqc fold`` (``verb``)."""
    return BqcError(f"this model's activation quantizers were never calibrated ({len(missing)}, e.g. {missing[0]}): "
                    f"it is an untrained artifact, and {_ING[verb]} it as it is would invent their step sizes",
                    hint=f"{verb} a trained artifact (`bqc train ART --data mnist16 --steps 500 -o RUN`, then {verb} "
                         f"RUN), or calibrate them on real data while {_ING[verb]}: "
                         f"`bqc {verb} ART --calibrate mnist16 -o DIR` (`--calibrate random` for speed measurements only)")


def load_source(src):
    """A folder or zoo name -> the :class:`~bqc.artifact.Artifact` or
    :class:`~bqc.deploy.artifact.DeployArtifact` it holds; anything else is returned as is."""
    from bqc import artifact as A

    from .artifact import find_deploy_artifact, load

    if not isinstance(src, (str, Path)):
        return src
    if A.is_artifact(src):
        return A.load_artifact(src)
    found = find_deploy_artifact(src)
    if found is not None:
        return load(found)
    raise BqcError(f"{src} is not a bqc artifact directory (no bqc.json) nor a deploy artifact (no deploy.json)",
                   hint="pass the output directory of `bqc transform` / `bqc train` / `bqc fold`, or a shipped "
                        "deploy model's name")


def deploy_graph(src, *, calibrate: bool | str | None = False, info: dict | None = None,
                 verb: str = "lower") -> fx.GraphModule:
    """A deploy graph from a deploy graph, a QAT graph, an :class:`~bqc.artifact.Artifact`, a
    :class:`~bqc.deploy.artifact.DeployArtifact`, or a folder / zoo name holding one.

    A QAT graph whose activation quantizers were never initialised (an untrained artifact) is
    refused unless ``calibrate`` names how to set them (:func:`bqc.deploy.calibrate`): a data
    set (``"mnist16"``, an image folder: real images) or ``"random"`` (``True`` means
    ``"random"``: smoke tests and speed measurements only). ``info["calibration"]`` says what
    was done; ``verb`` names the command (``lower`` / ``fold``) in the refusal.
    """
    from bqc import artifact as A

    from .artifact import DeployArtifact

    info = {} if info is None else info
    manifest = None
    src = load_source(src)
    if isinstance(src, DeployArtifact):
        info["calibration"] = src.provenance.get("calibration") or "deploy artifact"
        return src.gm
    if isinstance(src, A.Artifact):
        manifest = src.manifest
        src = src.gm
    if not isinstance(src, fx.GraphModule):
        raise BqcError(f"cannot export a {type(src).__name__}: give a deploy/QAT graph or an artifact")
    if is_deployed(src):
        info["calibration"] = "deploy graph"
        return src
    missing = uncalibrated(src)
    if not missing:
        info["calibration"] = "trained" if manifest is not None and "train" in manifest else "already calibrated"
    elif not calibrate:
        raise _uncalibrated_error(missing, verb)
    else:
        info["calibration"] = calibrate_graph(src, "random" if calibrate is True else str(calibrate), manifest=manifest)
    return to_deploy(src)


def fold(src, *, calibrate: bool | str | None = None, verb: str = "fold"):
    """``bqc fold``: a trained artifact (folder or :class:`~bqc.artifact.Artifact`) or a QAT graph
    -> its :class:`~bqc.deploy.artifact.DeployArtifact` (save it with ``.save(dir)``); what
    ``bqc lower`` hands a backend.

    Untrained artifacts follow :func:`deploy_graph`'s rule: refused unless ``calibrate`` names
    the data to calibrate their activation quantizers on. A deploy artifact (or deploy graph) is
    returned as one, as is. ``verb`` names the command (``fold`` / ``lower``) in the refusal.
    """
    from bqc import artifact as A

    from .artifact import DeployArtifact, as_deploy_artifact

    src = load_source(src)
    if isinstance(src, DeployArtifact) or (isinstance(src, fx.GraphModule) and is_deployed(src)):
        return as_deploy_artifact(src)
    if not isinstance(src, (A.Artifact, fx.GraphModule)):
        raise BqcError(f"bqc fold takes a bqc artifact (the output of `bqc transform` / `bqc train`), "
                       f"not a {type(src).__name__}")
    from bqc.quant.binary import EBB

    qat = src if isinstance(src, fx.GraphModule) else src.gm
    stage1 = sum(1 for m in qat.modules() if isinstance(m, EBB) and m.two_bases_active())  # the buffers are the truth
    info: dict = {}
    gm = deploy_graph(src, calibrate=calibrate, info=info, verb=verb)
    if isinstance(src, fx.GraphModule):
        return DeployArtifact.from_graph(gm, calibration=info["calibration"], ebb_stage1_layers=stage1)
    return DeployArtifact.from_graph(gm, src.manifest, calibration=info["calibration"],
                                     source_path=getattr(src, "path", None), ebb_stage1_layers=stage1)
