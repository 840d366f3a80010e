"""``ebb_stage``: switch every EBB weight quantizer to stage 2 (single basis, pure 1-bit).

BinaryDM trains EBB with two bases (s1 sign W + s2 sign(W - s1 sign W)) and drops s2 at the
transition step; the trainer does it at that step with
:func:`bqc.quant.training.switch_ebb_to_stage2`, which this pass runs, so a recipe can ask for
the inference form. The stage is a buffer of each quantizer (the one truth: it is saved with the
weights, and ``bqc fold`` / ``bqc report`` read it). The graph is unchanged.
"""
from __future__ import annotations

from bqc.pipeline import Pass, PassResult, register
from bqc.quant.training import switch_ebb_to_stage2


@register
class EbbStage(Pass):
    name = "ebb_stage"
    summary = "switch EBB quantizers to stage 2 (drop the second basis)"
    requires = ("quantized",)

    def run(self, gm, ctx):
        n = switch_ebb_to_stage2(gm)
        ctx.explain(self.name, "graph", f"{n} EBB layers -> stage 2", "single-basis inference form")
        return PassResult(gm, changed=False)
