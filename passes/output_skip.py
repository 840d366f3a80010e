"""``output_skip``: a real-valued path from the noisy input to the eps output.

    before:  output = output((conv2d_49, ...))
    after:   output_skip = call_module output_skip:OutputSkip(conv2d_49, x, t)
             output = output((output_skip, ...))

``OutputSkip`` computes ``eps = sqrt(1 - abar_t) * x + sqrt(abar_t) * F``: the network ``F``
now predicts ``sqrt(abar_t) * v`` (scaled v-prediction) while the graph still outputs eps, so
samplers, losses, teachers and backends are unchanged. At high noise (``abar_t -> 0``) eps comes
from the input itself, per-image mean included: the part a W1A1 body gets wrong
(``../shared/QUALITY_NOTES.md``: a per-image eps offset at t >= 600 that the sampler integrates
into all-black or all-white samples). At low noise (``abar_t -> 1``) ``F`` is eps, as for the FP
teacher the student starts from. The two tables come from the model's diffusion schedule (fixed
float32 buffers, saved with the weights; no parameters). Not in either paper: bqc's own lever,
measured in benchmarks/results/quality_w1a1.md. eps-prediction models only.
"""
from __future__ import annotations

from bqc import ir
from bqc.deploy.modules import OutputSkip
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassResult, register


@register
class OutputSkipPass(Pass):
    name = "output_skip"
    summary = "eps = sqrt(1-abar_t) x + sqrt(abar_t) F: a real-valued input-to-output path (F predicts scaled v)"
    options = {}
    requires = ("annotated",)
    ensures = ("annotated",)

    def run(self, gm, ctx):
        sched = ctx.schedule
        if sched is None:
            raise BqcError("pass output_skip needs the model's diffusion schedule",
                           hint="run it through `bqc transform`, which reads the schedule from the source")
        if sched.prediction != "eps":
            raise BqcError(f"pass output_skip is for eps-prediction models; this one predicts {sched.prediction}",
                           hint="drop output_skip from the recipe")
        if hasattr(gm, "output_skip"):
            raise BqcError("pass output_skip ran twice on this graph")
        graph = gm.graph
        x_node, t_node = [n for n in graph.nodes if n.op == "placeholder"][:2]
        out = graph.output_node()
        outs = list(out.args[0])
        f = outs[0]
        mod = OutputSkip.from_alphas_cumprod(sched.alphas_cumprod)
        gm.add_module("output_skip", mod)
        with graph.inserting_before(out):
            node = graph.call_module("output_skip", (f, x_node, t_node))
        ir.node_like(node, f, val=True, kind="output_skip", params=2 * mod.c_in.numel(), macs=0, role="")
        out.args = (tuple([node] + outs[1:]),)
        ctx.explain(self.name, f, "output skip", f"eps = sqrt(1-abar_t) x + sqrt(abar_t) {f.name} ({sched.T} steps)")
        return PassResult(gm, changed=True)
