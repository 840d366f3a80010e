"""``insert_quantizers``: replace planned conv/linear/matmul nodes by quantized modules.

Generic: it reads each node's ``plan`` (written by ``plan_quant`` / ``mixed_precision``) and
builds ``QConv2d`` / ``QLinear`` / ``QMatmul`` through the ``bqc.quant`` registry. The weight
(and bias) move from the graph's parameters into the new module, registered under
``quant.<node name>``; the annotation of the node is carried over. Float plans leave the node
untouched. Graph before/after: ``aten.conv2d(x, w, b, ...)`` becomes
``call_module quant.conv2d_3(x)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bqc import ir
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassResult, register, register_fact
from bqc.quant.layers import QMatmul
from bqc.quant.registry import make_act_quantizer, make_qconv2d, make_qlinear

aten = torch.ops.aten
_CONV = (aten.conv2d.default,)
_LINEAR = (aten.linear.default,)
_MATMUL = (aten.matmul.default, aten.bmm.default)


def _tensor(gm, node):
    if node is None:
        return None
    if node.op != "get_attr":
        raise BqcError(f"weight {node.name} is computed in the graph, not a parameter; cannot quantize it")
    return ir.getattr_path(gm, node.target)


def _drop_unused_attr(gm, node) -> None:
    if node is None or node.users:
        return
    owner, _, attr = node.target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if hasattr(mod, attr):
        delattr(mod, attr)
    gm.graph.erase_node(node)


def _quant_container(gm) -> nn.Module:
    if not hasattr(gm, "quant"):
        gm.add_module("quant", nn.Module())
    return gm.quant


def _spec_kwargs(plan: dict, w_bits: int, a_bits: int) -> dict:
    return dict(
        weight_q=plan["weight"], w_bits=w_bits, weight_opts=plan.get("weight_opts"),
        act_q=plan["act"], a_bits=None if plan["act"] == "fp" else a_bits, act_opts=plan.get("act_opts"),
        post=plan.get("post"), keep_bias=plan.get("keep_bias", True),
    )


def build_module(gm, node) -> nn.Module | None:
    ni = ir.info(node)
    plan = ni["plan"]
    if plan["weight"] == "fp" and plan["act"] == "fp":
        return None
    kw = _spec_kwargs(plan, ni["w_bits"], ni["a_bits"])
    if node.target in _CONV:
        x, w, b, stride, padding, dilation, groups = (list(node.args) + [None, [1], [0], [1], 1][len(node.args) - 2:])[:7]
        if isinstance(padding, str):
            raise BqcError(f"{node.name}: string padding {padding!r} is not supported")
        out_hw = tuple(int(d) for d in node.meta["val"].shape[-2:]) if plan.get("out_scale") else None
        return make_qconv2d(_tensor(gm, w), _tensor(gm, b), tuple(stride), tuple(padding), tuple(dilation), groups,
                            kmap=plan.get("kmap"), shortcut=plan.get("shortcut"), out_scale_hw=out_hw, **kw)
    if node.target in _LINEAR:
        w = node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        return make_qlinear(_tensor(gm, w), _tensor(gm, b), **kw)
    if node.target in _MATMUL:
        mk = lambda: make_act_quantizer(plan["act"], ni["a_bits"], **(plan.get("act_opts") or {}))  # noqa: E731
        return QMatmul(mk(), mk())
    raise BqcError(f"{node.name}: don't know how to quantize {node.target}")


@register_fact("quantized")
def _check_quantized(gm) -> str | None:
    bad = [n.name for n in gm.graph.nodes if "plan" in ir.info(n) and n.op == "call_function"
           and (ir.info(n)["w_bits"] < 32 or ir.info(n)["a_bits"] < 32)]
    return f"planned layers still float ops: {bad[:5]}" if bad else None


@register
class InsertQuantizers(Pass):
    name = "insert_quantizers"
    summary = "build QConv2d/QLinear/QMatmul modules from the plans and put them in the graph"
    requires = ("planned",)
    ensures = ("annotated", "quantized")

    def run(self, gm, ctx):
        changed = False
        container = _quant_container(gm)
        for node in list(gm.graph.nodes):
            if "plan" not in ir.info(node) or node.op != "call_function":
                continue
            mod = build_module(gm, node)
            if mod is None:
                ctx.explain(self.name, node, "kept float op", "its plan quantizes neither weight nor activation")
                continue
            ctx.explain(self.name, node, f"-> {type(mod).__name__}",
                        " ".join(f"{k}={v}" for k, v in mod.describe().items()))
            container.add_module(node.name, mod)
            if node.target in _MATMUL:
                args = tuple(node.args[:2])
                old_params = []
            else:
                args = (node.args[0],)
                old_params = [a for a in node.args[1:3] if isinstance(a, torch.fx.Node)]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(f"quant.{node.name}", args)
            ir.replace_node(node, new)
            for p in old_params:
                _drop_unused_attr(gm, p)
            changed = True
        return PassResult(gm, changed)
