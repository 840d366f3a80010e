"""``annotate``: run the graph analysis once and store it as node annotations.

Writes, for every node, ``node.meta["bqc"]`` (op kind, module path, resolution level,
timestep-embedded block and section, params, MACs, distance from input/output) and the roles
of the weighted layers (input/output conv, time-embed, head/body/tail). Later passes read
these; they never recompute them.
"""
from __future__ import annotations

from bqc import ir
from bqc.pipeline import Pass, PassResult, register


@register
class Annotate(Pass):
    name = "annotate"
    summary = "analyse the UNet (kinds, levels, blocks, roles) and store node annotations"
    options = {"head_tail_blocks": ir.HEAD_TAIL_BLOCKS}
    ensures = ("annotated", "roles")

    def run(self, gm, ctx):
        n = int(self.opts["head_tail_blocks"])
        ir.annotate(gm, head_tail_blocks=n)
        for node in gm.graph.nodes:
            if ir.info(node)["kind"] in ir.QUANTIZABLE_KINDS and ir.info(node)["role"] in ("input", "output", "time-embed"):
                ctx.explain(self.name, node, f"role={ir.info(node)['role']}", "found by graph analysis")
        return PassResult(gm, changed=False)
