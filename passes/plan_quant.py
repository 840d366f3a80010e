"""``plan_quant``: decide, per layer, how it is quantized (nothing is inserted yet).

Deciding is separate from inserting (as torch.ao's PT2E ``Quantizer.annotate``): this pass
writes a *layer spec* into each conv/linear/matmul annotation (``node.meta["bqc"]["plan"]``)
from the layer's role; ``insert_quantizers`` builds the modules from the specs. Recipes differ
only in the specs they give here.

A layer spec is a table of names from ``bqc.quant`` (``weight``, ``act``, ``kmap``,
``shortcut``, ``post``, ``out_scale``, ``keep_bias``, ``weight_opts``, ``act_opts``) plus
optional ``w_bits``/``a_bits`` (default: the recipe's / ``--wbits``/``--abits``). ``"fp"``
keeps the layer in float. Options, by role:

* ``body``: every layer inside the UNet's blocks;
* ``head_tail``: layers of the first/last N blocks (N from ``annotate``'s
  ``head_tail_blocks``); default: same as body (BinaryDM puts EBB here);
* ``io``: the first and last conv (default: 8-bit uniform weights and activations);
* ``time_embed``: the global time-embedding MLP (default fp);
* ``emb_proj``: each block's projection of the time embedding (default: same as body; the
  papers' sizes only add up with these binarized: 11.7M of LDM-4's 274M parameters);
* ``res_proj``: residual projections (the 1x1 conv on a ResBlock's residual path when channels
  change: openaimodel ``skip_connection``, diffusers ``conv_shortcut``, LDM ``nin_shortcut``);
  default (``"place"``): the spec of the layer's place (head/body/tail), as BinaryDM's code does; BiDM's code
  keeps them full precision (``res_proj = "fp"``), which keeps a real-valued residual highway
  through every decoder block;
* ``matmul``: attention matmul operands (default fp; BinaryDM: LSQ at the activation bits);
* ``cross_kv``: the cross-attention key/value projections of a text-conditioned UNet (role
  ``cross-kv``: they read only the text embedding, never the image, so their output is the same
  at every sampling step of a prompt and carries all of the prompt into the image path);
  default ``"fp"`` (bqc's choice: binarizing them puts the prompt through a 1-bit bottleneck,
  and they could be computed once per prompt); ``"place"`` quantizes them like their block.

Transformer blocks (self-attention q/k/v/out, cross-attention q/out, GEGLU feed-forward,
proj_in/proj_out: ``NodeInfo.part``) otherwise follow their place (head/body/tail), as a
ResBlock's convs do.
"""
from __future__ import annotations

from bqc import ir
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassResult, register, register_fact

SPEC_KEYS = {"weight", "act", "w_bits", "a_bits", "kmap", "shortcut", "post", "out_scale",
             "keep_bias", "weight_opts", "act_opts"}
FP = {"weight": "fp", "act": "fp"}
IO8 = {"weight": "uniform", "act": "uniform", "w_bits": 8, "a_bits": 8}


def normalise_spec(spec, where: str) -> dict:
    if spec in ("fp", None):
        return dict(FP)
    if not isinstance(spec, dict):
        raise BqcError(f"{where}: a layer spec must be a table or \"fp\", got {spec!r}")
    bad = set(spec) - SPEC_KEYS
    if bad:
        raise BqcError(f"{where}: unknown layer-spec key {sorted(bad)[0]!r}", hint=f"valid keys: {', '.join(sorted(SPEC_KEYS))}")
    return {"weight": "fp", "act": "fp", **spec}


def spec_bits(spec: dict, ctx) -> tuple[int, int]:
    """(w_bits, a_bits) a spec means in this context (32 for float parts)."""
    w = 32 if spec["weight"] == "fp" else int(spec.get("w_bits", ctx.wbits))
    a = 32 if spec["act"] == "fp" else int(spec.get("a_bits", ctx.abits))
    return w, a  # the quantizer registry rejects bits a quantizer cannot do


@register_fact("planned")
def _check_planned(gm) -> str | None:
    """Every conv/linear/matmul has a plan whose quantizers agree with its bits (32 exactly when float)."""
    bad = []
    for n in gm.graph.nodes:
        ni = ir.info(n)
        if ni.get("kind") not in ir.QUANTIZABLE_KINDS:
            continue
        plan = ni.get("plan")
        if not isinstance(plan, dict) or "weight" not in plan or "act" not in plan:
            bad.append(f"{n.name} (no plan)")
        elif (plan["weight"] == "fp") != (ni.get("w_bits") == 32) and ni["kind"] != "matmul":
            bad.append(f"{n.name} (weight {plan['weight']} at {ni.get('w_bits')} bits)")
        elif (plan["act"] == "fp") != (ni.get("a_bits") == 32):
            bad.append(f"{n.name} (act {plan['act']} at {ni.get('a_bits')} bits)")
    return f"layers without a consistent plan: {bad[:5]}" if bad else None


@register
class PlanQuant(Pass):
    name = "plan_quant"
    summary = "decide each layer's quantizers from its role (writes annotations only)"
    options = {"body": "fp", "head_tail": None, "io": IO8, "time_embed": "fp", "emb_proj": None, "res_proj": None,
               "matmul": "fp", "cross_kv": "fp"}
    self_checked = tuple(options)  # a layer spec is a name or a table: specs() checks each
    requires = ("roles",)
    ensures = ("planned",)

    def __init__(self, **opts):
        super().__init__(**opts)
        self.specs()  # validate layer specs when the recipe is loaded, not when it runs

    def specs(self) -> dict[str, dict]:
        body = normalise_spec(self.opts["body"], "plan_quant.body")
        ht = body if self.opts["head_tail"] is None else normalise_spec(self.opts["head_tail"], "plan_quant.head_tail")
        io = normalise_spec(self.opts["io"], "plan_quant.io")
        return {"body": body, "head": ht, "tail": ht, "input": io, "output": io,
                "time-embed": normalise_spec(self.opts["time_embed"], "plan_quant.time_embed"),
                "emb-proj": body if self.opts["emb_proj"] is None else normalise_spec(self.opts["emb_proj"], "plan_quant.emb_proj"),
                "res-proj": None if self.opts["res_proj"] in (None, "place") else normalise_spec(self.opts["res_proj"], "plan_quant.res_proj"),
                "matmul": normalise_spec(self.opts["matmul"], "plan_quant.matmul"),
                "cross-kv": None if self.opts["cross_kv"] in (None, "place") else normalise_spec(self.opts["cross_kv"], "plan_quant.cross_kv")}

    def run(self, gm, ctx):
        specs = self.specs()
        weighted = [n for n in gm.graph.nodes if ir.info(n).get("kind") in ir.WEIGHTED_KINDS]
        if not weighted and specs["body"] != FP:
            raise BqcError("this model has no conv or linear layers to quantize",
                           hint="bqc quantizes conv/linear/matmul layers of diffusion UNets; check the model you passed")
        for node in gm.graph.nodes:
            ni = ir.info(node)
            if ni.get("kind") not in ir.QUANTIZABLE_KINDS:
                continue
            key = "matmul" if ni["kind"] == "matmul" else ni["role"]
            if specs.get(key) is None:  # res-proj without a spec of its own: its place decides
                key = ni.get("place") or "body"
            spec = dict(specs[key])
            if ni["kind"] == "matmul":
                spec["weight"] = "fp"  # operands only
            if ni["kind"] == "linear":  # spatial parts only exist for convs
                for k in ("kmap", "shortcut", "out_scale"):
                    spec.pop(k, None)
            ni["w_bits"], ni["a_bits"] = spec_bits(spec, ctx)
            if ni["w_bits"] == 32:  # e.g. --wbits 32: weights stay float
                spec["weight"] = "fp"
            if ni["a_bits"] == 32:  # e.g. W1A32: no activation quantizer
                spec["act"] = "fp"
                for k in ("kmap", "shortcut"):
                    spec.pop(k, None)
            ni["plan"] = spec
            what = "kept fp" if ni["w_bits"] == 32 and ni["a_bits"] == 32 else \
                f"W{ni['w_bits']}A{ni['a_bits']} weight={spec['weight']} act={spec['act']}"
            ctx.explain(self.name, node, what, _reason(ni, key))
        return PassResult(gm, changed=False)


#: why a role gets its own spec, for ``--explain``
_ROLE_REASONS = {
    "cross-kv": "reads only the text embedding (the same at every sampling step): plan_quant.cross_kv",
}


def _reason(ni: dict, key: str) -> str:
    """The ``--explain`` reason of a layer's plan: its role (and which option decided it), and
    its part inside a transformer block when it has one."""
    why = f"role {ni['role']}" + (" (attention matmul)" if key == "matmul" else "")
    if key in _ROLE_REASONS:
        why += f" ({_ROLE_REASONS[key]})"
    elif ni["role"] in _ROLE_REASONS:  # a role with its own option set to "place"
        why += f" (quantized like its {key} by plan_quant.{ni['role'].replace('-', '_')} = \"place\")"
    return why + (f", {ni['part']} of a transformer block" if ni.get("part") else "")
