"""``distill_taps``: mark the features the trainer distils from the FP teacher.

Taps are the outputs of every timestep-embedded block (input, middle and output blocks),
recorded in ``gm.meta["bqc"]["taps"]`` as ``{"block", "node"}``. With TBS edges the student's
tap is the *blended* block output (BiDM distils what the next block sees). The trainer reads
taps through ``bqc.ir.with_outputs`` (a view of the same graph and parameters with the taps
as extra outputs): no hooks. The loss and its settings (``lrm``: PCA rank ``ceil(c/k)``,
lambda; ``spd``: p x p patches, lambda; ``form``: "paper" or the reference code's "code") are
recorded with the taps.
"""
from __future__ import annotations

from bqc import ir
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassResult, register, register_fact


LOSSES = {"lrm": {"k": 4, "weight": 1e-4}, "spd": {"patches": 4, "weight": 1e-2}}


@register_fact("taps")
def _check_taps(gm) -> str | None:
    names = {n.name for n in gm.graph.nodes}
    missing = [t["node"] for t in ir.graph_meta(gm).get("taps", []) if t["node"] not in names]
    return f"tap nodes missing: {missing[:5]}" if missing else None


@register
class DistillTaps(Pass):
    name = "distill_taps"
    summary = "record block-output taps and the distillation loss (LRM or SPD)"
    options = {"loss": "lrm", "k": None, "patches": None, "weight": None, "form": "paper"}
    requires = ("annotated",)
    ensures = ("taps",)

    def run(self, gm, ctx):
        loss = self.opts["loss"]
        if loss not in LOSSES:
            raise BqcError(f"distill_taps: unknown loss {loss!r}", hint=f"valid: {', '.join(LOSSES)}")
        settings = {k: (self.opts[k] if self.opts.get(k) is not None else v) for k, v in LOSSES[loss].items()}
        if self.opts["form"] not in ("paper", "code"):
            raise BqcError(f"distill_taps: unknown form {self.opts['form']!r}",
                           hint="'paper' (the papers' equations) or 'code' (the released reference code, METHODS §11)")
        if self.opts["form"] != "paper":
            settings["form"] = self.opts["form"]
        taps = []
        for b in ir.graph_meta(gm).get("blocks", []):
            node = ir.block_output(gm, b["id"])
            blended = [u for u in node.users if ir.info(u).get("kind") == "tbs"]
            node = blended[0] if blended else node
            taps.append({"block": b["id"], "node": node.name})
            ctx.explain(self.name, node, f"{loss} tap", f"output of block {b['id']} ({b['name']})")
        ir.graph_meta(gm)["taps"] = taps
        ir.graph_meta(gm)["distill"] = {"loss": loss, **settings}
        return PassResult(gm, changed=False)
