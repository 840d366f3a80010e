"""``conv1d_to_conv2d``: rewrite ``conv1d(x, w, b)`` as ``conv2d`` on an unsqueezed input.

openaimodel's attention uses 1x1 ``conv1d`` for qkv and proj_out. Quantizers and kernels only
handle 2-D convolutions, so the graph is canonicalised first:
``squeeze(conv2d(unsqueeze(x, -1), unsqueeze(w, -1), b, (s, 1), (p, 0), (d, 1), g), -1)``.
Numerically identical.
"""
from __future__ import annotations

import torch

from bqc import ir
from bqc.pipeline import Pass, PassResult, register

aten = torch.ops.aten


def _pair(v, fill):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [v[0], fill]


@register
class Conv1dToConv2d(Pass):
    name = "conv1d_to_conv2d"
    summary = "canonicalise conv1d as conv2d (so one quantized conv covers both)"
    requires = ("annotated",)
    ensures = ("annotated",)

    def run(self, gm, ctx):
        changed = False
        params = dict(gm.named_parameters())
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.conv1d.default:
                continue
            x, w, *rest = node.args
            b = rest[0] if rest else None
            stride, padding, dilation, groups = (rest + [None] * 5)[1:5]
            wt = params[w.target]
            # store the weight 4-D in place (same parameter object, new shape view is not
            # allowed for Parameters: replace the parameter)
            new_w = torch.nn.Parameter(wt.detach().unsqueeze(-1).clone(), requires_grad=wt.requires_grad)
            owner, _, attr = w.target.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, attr, new_w)
            if "val" in w.meta:
                w.meta["val"] = w.meta["val"].unsqueeze(-1)
            with gm.graph.inserting_before(node):
                xu = gm.graph.call_function(aten.unsqueeze.default, (x, -1))
                conv = gm.graph.call_function(aten.conv2d.default, (
                    xu, w, b, _pair(stride or [1], 1), _pair(padding or [0], 0), _pair(dilation or [1], 1), groups or 1))
                out = gm.graph.call_function(aten.squeeze.dim, (conv, -1))
            ir.node_like(conv, node)
            for new in (xu, out):
                ir.node_like(new, node, kind="other", params=0, macs=0, role="")
            if "val" in x.meta:
                xu.meta["val"] = x.meta["val"].unsqueeze(-1)
                conv.meta["val"] = node.meta["val"].unsqueeze(-1)
                out.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            ctx.explain(self.name, conv, "rewritten", "conv1d -> conv2d (1-wide)")
            changed = True
        return PassResult(gm, changed)
