"""What a deploy graph is and stores: per layer kind, bits, bases and bytes, and the totals.

``deploy_summary(gm)`` is the stored-size account (what a backend keeps in memory);
``bqc report`` on a deploy graph (:mod:`bqc.report`) and the layer table of a deploy artifact
(``deploy.json``) read the same rows (:func:`layer_row`), so the packed bits a graph really
holds are counted once.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from bqc import ir

from .modules import (DEPLOY_LAYERS, BinaryConv2d, BinaryLinear, FloatConv2d, FloatLinear, IntConv2d,
                      IntLinear)
from .ops import LAYOUT_VERSION


def is_deployed(gm: fx.GraphModule) -> bool:
    """True for a deploy graph (the ``deployed`` fact that folding establishes)."""
    return "deployed" in ir.graph_meta(gm).get("facts", set())


def deploy_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module]]:
    """(node, deploy module) for every deploy layer (conv/linear/matmul) in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, DEPLOY_LAYERS):
                out.append((n, mod))
    return out


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _weight_bits(mod: nn.Module) -> tuple[int, int]:
    """(weight elements, nominal weight bits): 1 bit per binary weight per basis held in
    ``w_packed``, ``w_bits`` per integer code, 32 per float weight."""
    if isinstance(mod, (BinaryConv2d, BinaryLinear)):
        w_elems = mod.w_packed.shape[1] * int(np.prod(mod.w_packed.shape[2:-1], dtype=np.int64)) * (
            mod.in_channels // mod.groups if isinstance(mod, BinaryConv2d) else mod.in_features)
        return int(w_elems), int(w_elems) * mod.bases
    if isinstance(mod, (IntConv2d, IntLinear)):
        return mod.w_codes.numel(), mod.w_codes.numel() * mod.w_bits
    if isinstance(mod, (FloatConv2d, FloatLinear)):
        return mod.weight.numel(), mod.weight.numel() * 32
    return 0, 0


def layer_row(node: fx.Node, mod: nn.Module) -> dict:
    """One deploy layer's row: :meth:`describe` plus ``weights`` (elements), ``weight_bytes``
    (packed bits / int8 codes / float32 weights as stored), ``scale_bytes`` (w_scale, act step),
    ``other_bytes`` (bias, thresholds, K map, shortcut projection, RPReLU, XNOR++ scale) and
    ``nominal_bits`` (the METHODS §9 count: 1 bit per binary weight per basis, b bits per b-bit
    weight, 32 per other value)."""
    scale_b = _tensor_bytes(getattr(mod, "w_scale", None))
    other = 0
    for name, t in mod.named_buffers():
        if name in ("w_packed", "w_codes", "weight", "w_scale"):
            continue
        if name.endswith("step"):
            scale_b += 4  # stored as float64 for exact casts; a backend needs float32
            continue
        other += _tensor_bytes(t)
    w_elems, nbits = _weight_bits(mod)
    return {"name": node.name, "module": ir.info(node).get("module", ""), **mod.describe(), "weights": int(w_elems),
            "weight_bytes": int(mod.weight_bytes()), "scale_bytes": int(scale_b), "other_bytes": int(other),
            "nominal_bits": int(nbits + 8 * (scale_b + other))}


def deploy_summary(gm: fx.GraphModule) -> dict:
    """Per layer (:func:`layer_row`) and totals for the whole graph.

    Totals add the float parameters outside the layers (norms, time embedding, TBS
    coefficients): ``total_bytes`` is what a backend stores, ``nominal_bytes`` the paper-style
    size.
    """
    rows = []
    seen: set[int] = set()
    layer_bytes = nominal_bits = 0
    for n, mod in deploy_layers(gm):
        row = layer_row(n, mod)
        seen.update(id(t) for t in mod.buffers())
        rows.append(row)
        layer_bytes += row["weight_bytes"] + row["scale_bytes"] + row["other_bytes"]
        nominal_bits += row["nominal_bits"]
    float_bytes = 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        float_bytes += t.numel() * 4
    total = layer_bytes + float_bytes
    return {
        "layers": rows,
        "layout_version": LAYOUT_VERSION,
        "layer_bytes": int(layer_bytes),
        "float_bytes": int(float_bytes),
        "total_bytes": int(total),
        "nominal_bytes": int((nominal_bits + 8 * float_bytes + 7) // 8),
    }


def format_summary(summary: dict) -> str:
    """A fixed-width text table of :func:`deploy_summary`."""
    lines = [f"{'layer':<22} {'op':<13} {'w':>3} {'B':>2} {'input':>6} {'a':>3} {'weights':>9} {'w_bytes':>9} {'other':>7}"]
    for r in summary["layers"]:
        lines.append(f"{r['name']:<22} {r['op']:<13} {r['w_bits']:>3} {r['bases']:>2} {r['input']:>6} "
                     f"{r['a_bits']:>3} {r['weights']:>9} {r['weight_bytes']:>9} {r['scale_bytes'] + r['other_bytes']:>7}")
    lines.append(f"# layers {summary['layer_bytes']} B + float {summary['float_bytes']} B = "
                 f"{summary['total_bytes']} B (nominal {summary['nominal_bytes']} B), layout v{summary['layout_version']}")
    return "\n".join(lines) + "\n"
