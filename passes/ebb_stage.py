"""``ebb_stage``: switch every EBB weight quantizer to stage 2 (single basis, pure 1-bit).

BinaryDM trains EBB with two bases (s1 sign W + s2 sign(W - s1 sign W)) and drops s2 at the
transition step; the trainer calls this pass's ``switch`` at that step, and a recipe can run
the pass to get the inference form. The stage is a buffer of each quantizer, so it is saved
with the weights. The graph is unchanged.
"""
from __future__ import annotations

from bqc.pipeline import Pass, PassResult, register
from bqc.quant.binary import EBB


def switch(gm) -> int:
    """Put every EBB quantizer in stage 2; returns how many were switched."""
    n = 0
    for name, mod in gm.named_modules():
        if isinstance(mod, EBB) and not mod.stage2:
            mod.switch_to_stage2()
            n += 1
    return n


@register
class EbbStage(Pass):
    name = "ebb_stage"
    summary = "switch EBB quantizers to stage 2 (drop the second basis)"
    requires = ("quantized",)

    def run(self, gm, ctx):
        n = switch(gm)
        ctx.explain(self.name, "graph", f"{n} EBB layers -> stage 2", "single-basis inference form")
        return PassResult(gm, changed=False)
