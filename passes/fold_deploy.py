"""``fold_deploy``: fold each trained quantized module into its inference form (bqc.deploy).

    before:  conv2d_25 = call_module quant.conv2d_1:QConv2d(silu_1)
    after:   conv2d_25 = call_module deploy.conv2d_1:BinaryConv2d(silu_1)
             tbs_block_5 = call_module tbs.block_5:TBSBlend(...)   (bqc.deploy.TBSBlend, buffers)

The rewrite and the QAT -> deploy table live in :mod:`bqc.deploy.folding` (``fold_graph``,
``rules``): binary weights -> packed words per basis + ``w_scale [B, OC]``, uniform / LSQ
weights -> int8 codes + per-channel scale, LSQ / uniform / DoReFa activations -> integer codes
and a step, sign activations (with the BiDM/ReActNet threshold) -> bits, K map / XNOR++ scale /
shortcut / RPReLU / TBS blend -> buffer-only copies, a layer whose ``quant_active`` flag is off
-> its float op. This pass runs that rewrite under the pass manager (lint, facts, ``--explain``)
and registers the ``deployed`` fact's check.

The pass is meant for trained graphs, through ``bqc.deploy.to_deploy`` (on a copy) or
``bqc fold``; it is not a recipe step (a recipe replays on freshly initialised, uncalibrated
quantizers).
"""
from __future__ import annotations

from bqc.deploy.folding import fold_graph, training_modules_left
from bqc.pipeline import Pass, PassResult, register, register_fact

register_fact("deployed")(training_modules_left)


@register
class FoldDeploy(Pass):
    name = "fold_deploy"
    summary = "fold trained quantizers into the inference form (packed bits, integer codes)"
    requires = ("annotated",)
    ensures = ("annotated", "deployed")

    def run(self, gm, ctx):
        changed = fold_graph(gm, explain=lambda node, action, reason: ctx.explain(self.name, node, action, reason))
        return PassResult(gm, changed)
