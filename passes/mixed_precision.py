"""``mixed_precision``: per-layer overrides of the plan (``--keep-fp GLOB``, ``--bits GLOB=W/A``).

Globs match a layer's node name or its module path (``fnmatch``). ``@encoder``, ``@middle`` and
``@decoder`` select a UNet section on any model family (openaimodel ``output_blocks.*`` and
diffusers ``up_blocks.*`` are both ``@decoder``); ``@res-proj``, ``@head``, ... select a role
(``bqc inspect`` shows both). ``--keep-fp`` makes the
layer float; ``--bits NAME=8/8`` gives it uniform 8-bit weights and activations, ``=1/4``
keeps the recipe's binary weight quantizer with ``a_bits=4``, and so on. The overrides come
from the recipe's ``settings`` (``bqc transform`` records the CLI flags there, so artifacts
replay them). A glob that matches nothing is an error: a typo must not pass silently.

``--keep-fp`` wins where the two overlap: ``--bits 'output_blocks.*=1/4' --keep-fp
'*skip_connection'`` gives the decoder 4-bit activations and keeps its residual projections float.
A ``--bits`` glob does reach layers the recipe keeps float (a ``=1/4`` glob over a BiDM decoder
binarizes its residual projections too): ``--explain`` lists each such decision, and the
transform warns (``PassContext.warnings``) naming the layers and the ``--keep-fp`` that would
protect them.
"""
from __future__ import annotations

import difflib
import fnmatch

from bqc import ir
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassResult, register

from .plan_quant import spec_bits


#: ``@NAME`` selectors: the UNet section a layer sits in (any model family: openaimodel's
#: ``output_blocks`` and diffusers' ``up_blocks`` are both the decoder), or its role
SECTIONS = {"encoder": "input", "middle": "middle", "decoder": "output"}
ROLES = ("input", "output", "time-embed", "emb-proj", "res-proj", "cross-kv", "head", "body", "tail")


def _check_selector(pattern: str, flag: str) -> None:
    if pattern.startswith("@") and pattern[1:] not in SECTIONS and pattern[1:] not in ROLES:
        close = difflib.get_close_matches(pattern[1:], [*SECTIONS, *ROLES], n=1)
        raise BqcError(f"{flag} {pattern!r}: unknown selector" + (f" (did you mean '@{close[0]}'?)" if close else ""),
                       hint=f"sections: {', '.join('@' + k for k in SECTIONS)}; roles: {', '.join('@' + r for r in ROLES)}; "
                            "anything else is a glob of layer or module names")


def _matches(node, pattern: str) -> bool:
    """``pattern``: a glob of the node's name or module path, or an ``@`` selector (a section:
    ``@encoder`` / ``@middle`` / ``@decoder``; or a role: ``@res-proj``, ``@head``, ...)."""
    ni = ir.info(node)
    if pattern.startswith("@"):
        key = pattern[1:]
        return ni.get("section") == SECTIONS[key] if key in SECTIONS else ni.get("role") == key
    return fnmatch.fnmatchcase(node.name, pattern) or fnmatch.fnmatchcase(ni.get("module", ""), pattern)


def parse_bits(item: str) -> tuple[str, int, int]:
    try:
        pattern, wa = item.split("=")
        w, a = (int(v) for v in wa.split("/"))
    except ValueError:
        raise BqcError(f"--bits {item!r} is not of the form NAME_GLOB=W/A (e.g. 'out*=8/8')") from None
    from bqc.pipeline import SUPPORTED_BITS

    for kind, v in (("w", w), ("a", a)):  # 0/0 was taken as W1A32
        if v not in SUPPORTED_BITS[kind]:
            raise BqcError(f"--bits {item!r}: unsupported {'weight' if kind == 'w' else 'activation'} bits {v}",
                           hint=f"supported: {', '.join(map(str, SUPPORTED_BITS[kind]))}")
    return pattern, w, a


@register
class MixedPrecision(Pass):
    name = "mixed_precision"
    summary = "apply --keep-fp / --bits per-layer overrides to the plan"
    options = {"keep_fp": [], "bits": []}
    requires = ("planned",)
    ensures = ("planned",)

    def run(self, gm, ctx):
        keep = list(self.opts["keep_fp"]) + list(ctx.settings.get("keep_fp", []))
        bits = list(self.opts["bits"]) + list(ctx.settings.get("bits", []))
        layers = [n for n in gm.graph.nodes if "plan" in ir.info(n)]
        recipe_float = {n.name for n in layers if ir.info(n)["plan"].get("weight") == "fp"}
        reached: dict[str, list] = {}  # --bits item -> layers the recipe kept float that it quantizes
        for item in bits:
            pattern, w, a = parse_bits(item)
            _check_selector(pattern, "--bits")
            hits = [n for n in layers if _matches(n, pattern)]
            if not hits:
                raise BqcError(f"--bits {item!r} matches no layer", hint="see `bqc inspect MODEL` for layer and module names")
            if w != 32:
                reached[item] = [n for n in hits if n.name in recipe_float]
            for n in hits:
                plan = dict(ir.info(n)["plan"])
                if w == 32:
                    plan["weight"] = "fp"
                elif w > 1 or plan["weight"] == "fp":
                    plan["weight"], plan["w_bits"] = ("uniform", w) if w > 1 else ("sign_scale", 1)
                if a == 32:
                    plan["act"] = "fp"
                elif a > 1 and plan["act"] in ("fp", "sign", "rsign", "bidm", "reste"):
                    plan["act"], plan["a_bits"] = "uniform" if a == 8 else "lsq", a
                elif a > 1:
                    plan["a_bits"] = a
                elif a == 1 and plan["act"] not in ("sign", "rsign", "bidm", "reste"):
                    plan["act"] = "sign"
                for k in ("kmap", "shortcut") if a != 1 else ():
                    plan.pop(k, None)
                ir.info(n)["plan"] = plan
                ir.info(n)["w_bits"], ir.info(n)["a_bits"] = spec_bits(plan, ctx)
                ctx.explain(self.name, n, f"W{ir.info(n)['w_bits']}A{ir.info(n)['a_bits']}", f"--bits {item}")
        for pattern in keep:
            _check_selector(pattern, "--keep-fp")
            hits = [n for n in layers if _matches(n, pattern)]
            if not hits:
                raise BqcError(f"--keep-fp {pattern!r} matches no layer", hint="see `bqc inspect MODEL` for layer and module names")
            for n in hits:
                ir.info(n)["plan"] = {"weight": "fp", "act": "fp"}
                ir.info(n)["w_bits"] = ir.info(n)["a_bits"] = 32
                ctx.explain(self.name, n, "kept fp", f"--keep-fp {pattern}")
        for item, nodes in reached.items():
            nodes = [n for n in nodes if not any(_matches(n, p) for p in keep)]
            if nodes:
                ctx.warnings.append(_reached_warning(item, nodes, ctx.recipe))
        return PassResult(gm, changed=False)


def _reached_warning(item: str, nodes: list, recipe: str) -> str:
    """One paragraph: ``--bits ITEM`` quantized layers the recipe keeps full precision."""
    modules = list(dict.fromkeys(ir.info(n).get("module") or n.name for n in nodes))  # attention: 2 matmuls, 1 module
    shown = ", ".join(modules[:4]) + (", ..." if len(modules) > 4 else "")
    roles = sorted({str(ir.info(n).get("role", "?")) for n in nodes})
    return (f"--bits {item!r} also quantizes {len(nodes)} layer(s) the recipe {recipe!r} keeps full precision "
            f"({'/'.join(roles)}: {shown}). If that is not meant, add --keep-fp for them "
            f"(e.g. --keep-fp '*{(ir.info(nodes[0]).get('module') or nodes[0].name).rsplit('.', 1)[-1]}'); "
            f"`--explain` lists every decision.")
