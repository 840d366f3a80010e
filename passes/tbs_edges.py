"""``tbs_edges``: BiDM's cross-timestep connections as explicit graph inputs and outputs.

For each of the last ``connections`` output blocks (default 8) the block's output ``F`` is
blended with the same block's output from the previous sampling step:

    before:  h = <block k output>;  ... uses of h
    after:   h2 = call_module tbs.block_k(h, tbs_cache_k, t, tbs_flag);  ... uses of h2
             graph inputs  += tbs_cache_k (per block), tbs_flag (0 on the first step)
             graph outputs += h (the raw block output: the next step's cache)

The raw (un-blended) feature is cached: it is what the trainer's "no cache" pass at t+d
produces, so training and sampling see the same kind of cache. The sampler threads the
state; ``BqcModel`` passes zeros and flag 0 on the first step.
"""
from __future__ import annotations

import torch.nn as nn

from bqc import ir
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassResult, register, register_fact
from bqc.quant.tbs import TBSBlend


@register_fact("tbs")
def _check_tbs(gm) -> str | None:
    meta = ir.graph_meta(gm)
    phs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [s["name"] for s in meta.get("state_inputs", []) if s["name"] not in phs]
    outs = gm.graph.output_node().args[0]
    if len(outs) != 1 + len(meta.get("state_outputs", [])):
        return f"graph has {len(outs)} outputs, expected 1 + {len(meta.get('state_outputs', []))} state outputs"
    return f"state inputs missing from the graph: {missing}" if missing else None


@register
class TbsEdges(Pass):
    name = "tbs_edges"
    summary = "BiDM cross-timestep connections: cache inputs, blend modules, feature outputs"
    options = {"connections": 8, "groups": 100, "timesteps": 1000, "init": 0.3}
    requires = ("annotated",)
    ensures = ("annotated", "tbs")

    def run(self, gm, ctx):
        meta = ir.graph_meta(gm)
        if meta.get("state_inputs"):
            raise BqcError("tbs_edges ran twice on this graph")
        outs = [b["id"] for b in meta.get("blocks", []) if b["section"] == "output"]
        if not outs:
            raise BqcError("tbs_edges found no output blocks in this UNet (is it a UNet with skip connections?)")
        chosen = outs[-int(self.opts["connections"]):]
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        t_node = placeholders[1]
        if not hasattr(gm, "tbs"):
            gm.add_module("tbs", nn.Module())
        last_ph = placeholders[-1]
        state_in, state_out, caches = [], [], []
        for b in chosen:
            with graph.inserting_after(last_ph):
                cache = graph.placeholder(f"tbs_cache_{b}")
            last_ph = cache
            caches.append((b, cache))
        with graph.inserting_after(last_ph):
            flag = graph.placeholder("tbs_flag")
        for node in (flag, *[c for _, c in caches]):
            node.meta["bqc"] = {"kind": "placeholder", "block": -1, "role": "", "level": 0}
        flag.meta["val"] = None
        for b, cache in caches:
            feat = ir.block_output(gm, b)
            val = feat.meta.get("val")
            cache.meta["val"] = val
            gm.tbs.add_module(f"block_{b}", TBSBlend(self.opts["groups"], self.opts["timesteps"], self.opts["init"]))
            users = list(feat.users)
            with graph.inserting_after(feat):
                blend = graph.call_module(f"tbs.block_{b}", (feat, cache, t_node, flag))
            ir.node_like(blend, feat, val=True, kind="tbs", params=self.opts["groups"], macs=0, role="")
            for u in users:
                u.replace_input_with(feat, blend)
            state_in.append({"name": cache.name, "block": b, "shape": [int(d) for d in val.shape[1:]]})
            state_out.append({"name": f"tbs_feat_{b}", "node": feat.name, "block": b})
            ctx.explain(self.name, feat, "cross-timestep edge", f"output block {b}: cache input {cache.name}")
        out = graph.output_node()
        feats = [ {n.name: n for n in graph.nodes}[s["node"]] for s in state_out]
        out.args = (tuple(out.args[0]) + tuple(feats),)
        meta["state_inputs"] = state_in
        meta["state_outputs"] = state_out
        meta["state_flag"] = flag.name
        meta["inputs"] = [n.name for n in graph.nodes if n.op == "placeholder"]
        return PassResult(gm, changed=True)
