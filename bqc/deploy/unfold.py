"""Unfolding: a deploy artifact -> a QAT artifact that trains on from it (``bqc unfold``).

    deploy artifact ──unfold──▶ artifact ──train──▶ ...

A deploy artifact keeps what inference needs (sign bits, scales, thresholds, integer steps) and
drops the latent float weights QAT trains. Unfolding rebuilds the QAT graph (the recipe the
artifact names, applied to the FP model it came from) and sets every training module so that
its forward is the deploy module's: a binary weight's latent value is ``scale * sign`` (the same
signs; the mean |W| BiDM/XNOR recompute is that scale; two-basis binarizers get a second
component that gives the second basis' signs), integer weights are ``codes * step``, and
thresholds, step sizes, K maps, shortcut scales, RPReLU and TBS coefficients are copied. Every
other parameter (norms, float layers, embeddings) is copied by name. The result is checked node by
node: on seeded inputs, each node of the unfolded QAT graph given the deploy graph's values of its
inputs computes the deploy graph's value, or it is an error (:func:`check_equivalent`).

What is lost is the latent weights' magnitudes (every weight of a channel starts at the same
distance from its sign flip), and the optimizer state and EMA of the run that made the model:
training from an unfolded model is a warm start, not a resume.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from bqc import packing
from bqc.errors import BqcError

from . import modules as M


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def deploy_signs(layer: nn.Module, shape) -> list[torch.Tensor]:
    """The ±1 signs per basis of a binary deploy layer, in the QAT weight's ``shape``."""
    words = packing.words_numpy(layer.w_packed)
    out = []
    for b in range(words.shape[0]):
        if len(shape) == 4:  # [OC, KH, KW, CW] -> [OC, C, KH, KW]
            s = packing.unpack_bits(words[b], int(shape[1]), axis=-1).transpose(0, 3, 1, 2)
        else:  # [N, KW] -> [N, K]
            s = packing.unpack_bits(words[b], int(shape[1]), axis=-1)
        out.append(torch.from_numpy(np.ascontiguousarray(s)).float())
    return out


def _cv(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def _set(p, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.reshape(p.shape).to(p.dtype))


def _binary_latent(wq, signs: list[torch.Tensor], scales: torch.Tensor, where: str) -> torch.Tensor:
    """Set ``wq``'s parameters from the deploy bases and return the latent weight."""
    from bqc.quant import binary

    nd = signs[0].dim()
    if isinstance(wq, binary.TwoBasis):
        s1 = scales[0]
        _set(wq.s1, s1)
        w = _cv(s1.abs(), nd) * signs[0]
        if len(signs) > 1:
            _set(wq.s2, scales[1])
            # sign(w) must stay signs[0] and sign(w - s1 sign(w)) must be signs[1]: a second
            # component smaller than |s1| pointing along signs[1] gives both
            delta = torch.minimum(scales[1].abs(), s1.abs() / 2).clamp_min(1e-8)
            w = _cv(s1, nd) * signs[0] + _cv(delta, nd) * signs[1]
        if isinstance(wq, binary.EBB):
            wq.stage2.fill_(len(signs) == 1)
            if len(signs) == 1:
                with torch.no_grad():
                    wq.s2.zero_()
        elif len(signs) != wq.num_bases():
            raise BqcError(f"{where}: the deploy layer has {len(signs)} bases, its recipe's binarizer {wq.num_bases()}")
        return w
    if isinstance(wq, binary.SignScale):
        if len(signs) != 1:
            raise BqcError(f"{where}: a one-basis binarizer ({wq.kind}) for a {len(signs)}-basis deploy layer")
        if wq.learnable:
            _set(wq.alpha, scales[0] if wq.per_channel else scales[0][:1])
        # not learnable: the scale is mean |W| (per channel, or of the layer), which scale * sign has
        return _cv(scales[0].abs(), nd) * signs[0]
    raise BqcError(f"{where}: unfolding a {type(wq).__name__} weight binarizer is not supported")


def _int_latent(wq, layer, where: str) -> torch.Tensor:
    from bqc.quant import uniform

    codes, step = layer.w_codes.float(), layer.w_scale.float()
    if isinstance(wq, uniform.LSQWeight):
        _set(wq.scale, step)
    elif not isinstance(wq, uniform.UniformWeight):  # UniformWeight: step = max |W_o| / Qp, which codes * step has
        raise BqcError(f"{where}: unfolding a {type(wq).__name__} weight quantizer is not supported")
    return _cv(step, codes.dim()) * codes


# ---------------------------------------------------------------------------------------------
# activation quantizers and epilogue parts
# ---------------------------------------------------------------------------------------------
def _unfold_act(aq, act, where: str) -> None:
    from bqc.quant import binact, uniform

    if aq is None and act is None:
        return
    if aq is None or act is None:
        raise BqcError(f"{where}: the deploy layer and its recipe's layer disagree on the input quantizer")
    if isinstance(aq, binact.SignAct) and isinstance(act, M.SignBinarize):
        if (aq.tau is None) != (act.tau is None):
            raise BqcError(f"{where}: the deploy layer and its recipe's layer disagree on the sign threshold")
        if aq.tau is not None:
            _set(aq.tau, act.tau)
        return
    if isinstance(act, M.QuantizeCodes):
        step = act.step.double()
        if isinstance(aq, uniform.LSQ):
            _set(aq.scale, step.float())
        elif isinstance(aq, uniform.UniformAct):
            _set(aq.amax, (step * aq.qp).float())
        elif not isinstance(aq, uniform.DoReFaAct):
            raise BqcError(f"{where}: unfolding a {type(aq).__name__} activation quantizer is not supported")
        if hasattr(aq, "initialised"):
            aq.initialised.fill_(True)
        return
    raise BqcError(f"{where}: a {type(act).__name__} input cannot come from a {type(aq).__name__} quantizer")


def _copy_params(dst: nn.Module | None, src: nn.Module | None, names, where: str) -> None:
    if dst is None and src is None:
        return
    if dst is None or src is None:
        raise BqcError(f"{where}: the deploy layer and its recipe's layer disagree on a {names[0]} part")
    for n in names:
        _set(getattr(dst, n), getattr(src, n))


def _unfold_shortcut(sc, dsc, where: str) -> None:
    if sc is None and dsc is None:
        return
    if sc is None or dsc is None:
        raise BqcError(f"{where}: the deploy layer and its recipe's layer disagree on the shortcut")
    _set(sc.s, dsc.scale)  # the forward uses |s|; the deploy scale is |s| already
    if (sc.proj is None) != (dsc.proj is None):
        raise BqcError(f"{where}: the shortcut's channel mapping differs (recipe: {sc.channels}, deploy: {dsc.channels})")
    if sc.proj is not None:
        _set(sc.proj.weight, dsc.proj)


def _unfold_layer(q, d, where: str) -> None:
    """Set a QAT layer (QConv2d / QLinear / QMatmul) from its deploy module."""
    from bqc.quant import layers

    if isinstance(q, layers.QMatmul):
        if not isinstance(d, M.IntMatmul):
            raise BqcError(f"{where}: a {type(d).__name__} deploy module for a quantized matmul")
        _unfold_act(q.aq_a, d.act_a, where)
        _unfold_act(q.aq_b, d.act_b, where)
        return
    if (d.weight_kind == "float") != (not bool(q.quant_active)):
        raise BqcError(f"{where}: the deploy layer is {d.weight_kind}, its recipe's layer is "
                       f"{'quantized' if bool(q.quant_active) else 'float'}")
    if d.weight_kind == "float":
        _set(q.weight, d.weight)
    elif d.weight_kind == "binary":
        if q.wq is None or q.wq.kind in ("uniform", "lsq"):
            raise BqcError(f"{where}: a binary deploy layer for a non-binary recipe layer")
        _set(q.weight, _binary_latent(q.wq, deploy_signs(d, q.weight.shape), d.w_scale, where))
    else:
        _set(q.weight, _int_latent(q.wq, d, where))
    if (q.bias is None) != (d.bias is None):
        raise BqcError(f"{where}: the deploy layer and its recipe's layer disagree on the bias")
    if q.bias is not None:
        _set(q.bias, d.bias)
    if bool(q.quant_active):
        _unfold_act(q.aq, d.act, where)
    _copy_params(getattr(q, "kmap", None), getattr(d, "kmap", None), ("weight",), where)
    _copy_params(getattr(q, "out_scale", None), getattr(d, "out_scale", None), ("alpha", "beta", "gamma"), where)
    _unfold_shortcut(getattr(q, "shortcut", None), getattr(d, "shortcut", None), where)
    _copy_params(q.post, d.post, ("gamma", "slope", "zeta"), where)


@functools.cache
def _training_classes():
    from bqc.quant import layers, tbs

    return layers._Quantized, tbs.TBSBlend


# ---------------------------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------------------------
def unfold_into(qgm, dgm) -> dict:
    """Set the QAT graph ``qgm`` (the recipe freshly applied to the FP model) from the deploy
    graph ``dgm``, in place. Returns counts of what was set."""
    quantized, blend = _training_classes()
    dmods = {n.name: dgm.get_submodule(n.target) for n in dgm.graph.nodes if n.op == "call_module"}
    counts = {"layers": 0, "tbs": 0, "copied": 0}
    covered: set[str] = set()
    for node in qgm.graph.nodes:
        if node.op != "call_module":
            continue
        q = qgm.get_submodule(node.target)
        if not isinstance(q, (quantized, blend)):
            continue
        d = dmods.get(node.name)
        if d is None:
            raise BqcError(f"{node.name}: the recipe's graph has a quantized layer the deploy artifact lacks",
                           hint="pass the recipe the model was trained with (--recipe)")
        if isinstance(q, blend):
            if not isinstance(d, M.TBSBlend) or d.alpha.numel() != q.alpha.numel():
                raise BqcError(f"{node.name}: the deploy artifact's TBS blend does not match the recipe's")
            _set(q.alpha, d.alpha)
            counts["tbs"] += 1
        else:
            if not isinstance(d, (M._DeployLayer, M.IntMatmul)):
                raise BqcError(f"{node.name}: a {type(d).__name__} deploy module for a quantized layer")
            _unfold_layer(q, d, node.name)
            counts["layers"] += 1
        covered.add(node.target)
    qnames = {m.name for m in qgm.graph.nodes}
    extra = [n.name for n in dgm.graph.nodes if n.op == "call_module" and str(n.target).startswith("deploy.")
             and n.name not in qnames]
    if extra:
        raise BqcError(f"the deploy artifact has layers the recipe's graph does not ({extra[:3]})",
                       hint="pass the recipe the model was trained with (--recipe)")
    # everything else (norms, float layers, embeddings, buffers such as the output skip's) by name
    dsd = dgm.state_dict()
    owned = tuple(f"{t}." for t in covered)
    for k, v in qgm.state_dict().items():
        if k.startswith(owned) or k.startswith("quant."):
            continue
        if k not in dsd:
            raise BqcError(f"{k}: in the recipe's graph but not in the deploy artifact")
        if tuple(dsd[k].shape) != tuple(v.shape):
            raise BqcError(f"{k}: shape {tuple(dsd[k].shape)} in the deploy artifact, {tuple(v.shape)} in the recipe's graph")
        with torch.no_grad():
            v.copy_(dsd[k].to(v.dtype))
        counts["copied"] += 1
    return counts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def _node_values(gm, args) -> dict:
    """Every node's value in one run of ``gm`` (eval mode, no grad), by node name."""
    from torch import fx

    vals = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            vals[n.name] = super().run_node(n)
            return vals[n.name]

    with torch.no_grad():
        Recorder(gm).run(*args)
    return vals


def _comparable(a, b) -> bool:
    return torch.is_tensor(a) and torch.is_tensor(b) and a.is_floating_point() and a.shape == b.shape


def check_equivalent(qgm, dgm, *, batch: int = 4, seed: int = 0, tol: float = 1e-4) -> float:
    """Node by node on seeded inputs (eval mode): each node of the QAT graph ``qgm``, given the
    deploy graph's values of its inputs, computes the deploy graph's value of that node (nodes
    keep their names when folded); returns the max relative difference, an error above ``tol``.

    Not end to end: a binary model's two executors differ by float rounding (an integer
    accumulator against a float conv of the same codes, 1e-7), and an activation that rounding
    moves across a binarization threshold flips its code, which the next layers amplify. So a
    whole-model comparison measures where thresholds happen to fall, not whether the weights were
    set right; each node fed the same inputs does ({0, 1}-activation models flip often enough that
    the end-to-end difference, :func:`end_to_end_difference`, reaches 1e-2 - 1e-1)."""
    from torch import fx

    from bqc.deploy.export import step_inputs

    args = step_inputs(dgm, batch=batch, seed=seed)
    ref = _node_values(dgm.eval(), args)
    worst = {"diff": 0.0, "node": None}

    class Forced(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            want = ref.get(n.name)
            if n.op in ("placeholder", "output") or not _comparable(out, want):
                return out
            d = _rel(out, want)
            if d > worst["diff"]:
                worst.update(diff=d, node=n.name)
            return want  # the next nodes see the deploy graph's values

    was_training = qgm.training
    with torch.no_grad():
        Forced(qgm.eval()).run(*args)
    qgm.train(was_training)
    if worst["diff"] > tol:
        raise BqcError(f"the unfolded model does not match the deploy artifact at node {worst['node']} "
                       f"(max relative difference {worst['diff']:.2e})",
                       hint="pass the recipe the model was trained with (--recipe); report it if it was")
    return worst["diff"]


def end_to_end_difference(qgm, dgm, *, batch: int = 4, seed: int = 0) -> float:
    """Max |QAT - deploy| / max |deploy| over the outputs of whole runs on seeded inputs (eval
    mode): information, not a check (see :func:`check_equivalent`)."""
    from bqc.deploy.export import step_inputs

    args = step_inputs(dgm, batch=batch, seed=seed)
    was_training = qgm.training
    with torch.no_grad():
        a, b = qgm.eval()(*args), dgm.eval()(*args)
    qgm.train(was_training)
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max((_rel(x, y) for x, y in zip(a, b) if x is not None and y is not None), default=0.0)


def unfold(src, *, recipe=None, model=None):
    """A deploy artifact (folder, shipped name or :class:`DeployArtifact`) -> ``(TransformResult,
    info)``: the recipe applied to the FP model it came from, set from the deploy artifact.
    ``recipe`` (name or TOML path) overrides the recipe the artifact names; ``model`` the FP model
    (default: the zoo model it records)."""
    from bqc import frontend
    from bqc import transform as tf

    from .artifact import DeployArtifact, find_deploy_artifact, load

    if not isinstance(src, DeployArtifact):
        found = find_deploy_artifact(src)
        if found is None:
            raise BqcError(f"{src} is not a deploy artifact (no deploy.json)",
                           hint="pass the output folder of `bqc fold`, or a shipped deploy model's name")
        src = load(found)
    man = src.manifest
    source = man.get("source") or {}
    if model is None:
        if source.get("kind") != "zoo" or not source.get("name"):
            raise BqcError("the deploy artifact does not name a zoo model it came from",
                           hint="pass the FP model it was trained from: --model MODEL")
        model = source["name"]
    recipe = recipe or man.get("recipe")
    if not recipe:
        raise BqcError("the deploy artifact does not name its recipe", hint="pass it: --recipe NAME_OR_TOML")
    res = tf.transform(frontend.load_source(model), recipe, wbits=man.get("wbits"), abits=man.get("abits"))
    counts = unfold_into(res.gm, src.gm)
    err = check_equivalent(res.gm, src.gm)
    info = {"deploy": str(src.path) if src.path is not None else None, "model": model,
            "recipe": recipe if isinstance(recipe, str) else getattr(recipe, "name", None),
            "train": man.get("train"), "max_rel_diff": err,
            "end_to_end_rel_diff": end_to_end_difference(res.gm, src.gm), **counts}
    return res, info
