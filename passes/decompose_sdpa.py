"""``decompose_sdpa``: split ``scaled_dot_product_attention`` into matmul / softmax / matmul.

diffusers attention calls SDPA, which hides the two attention matmuls that BinaryDM
quantizes (q, k, softmax output, v). After this pass the graph holds
``softmax(matmul(q, k^T) * scale) @ v`` with the matmuls annotated as ``kind=matmul``.
Numerically equal to SDPA up to float rounding (1e-6). Masks, dropout and causal attention are
left alone (explained as skipped).
"""
from __future__ import annotations

import math

import torch

from bqc import ir
from bqc.pipeline import Pass, PassResult, register

aten = torch.ops.aten


def _new(gm, node, target, args, kind, val=None):
    n = gm.graph.call_function(target, args)
    ir.node_like(n, node, kind=kind, params=0, macs=0, role=ir.info(node)["role"] if kind == "matmul" else "")
    if val is not None:
        n.meta["val"] = val
    return n


@register
class DecomposeSdpa(Pass):
    name = "decompose_sdpa"
    summary = "expose attention matmuls hidden in scaled_dot_product_attention"
    requires = ("annotated",)
    ensures = ("annotated",)

    def run(self, gm, ctx):
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
                continue
            q, k, v = node.args[:3]
            extra = dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:6]), **node.kwargs)
            if extra.get("attn_mask") is not None or extra.get("dropout_p", 0.0) or extra.get("is_causal", False):
                ctx.explain(self.name, node, "skipped", "attention with a mask, dropout or causal flag")
                continue
            qv, kv = q.meta.get("val"), k.meta.get("val")
            scale = extra.get("scale") or 1.0 / math.sqrt(int(qv.shape[-1]))
            with gm.graph.inserting_before(node):
                kt = _new(gm, node, aten.transpose.int, (k, -2, -1), "other",
                          kv.transpose(-2, -1) if kv is not None else None)
                s = _new(gm, node, aten.matmul.default, (q, kt), "matmul",
                         qv @ kv.transpose(-2, -1) if qv is not None else None)
                s2 = _new(gm, node, aten.mul.Tensor, (s, scale), "elementwise", s.meta.get("val"))
                p = _new(gm, node, aten._softmax.default, (s2, -1, False), "softmax", s.meta.get("val"))
                o = _new(gm, node, aten.matmul.default, (p, v), "matmul", node.meta.get("val"))
            half = ir.info(node)["macs"] // 2
            ir.info(s)["macs"] = ir.info(o)["macs"] = half
            node.replace_all_uses_with(o)
            gm.graph.erase_node(node)
            ctx.explain(self.name, o, "decomposed", "SDPA -> matmul, softmax, matmul")
            changed = True
        return PassResult(gm, changed)
