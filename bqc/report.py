"""Cost accounting as the papers do it (METHODS.md §9).

* Size: ``w_bits`` bits per quantized weight (times the number of bases kept at inference:
  2 for LMB, 1 for EBB whose second basis is dropped in stage 2), and 32 bits for every other
  parameter: biases, norms, float layers, and every quantizer's own state (scales, steps,
  thresholds, K maps, shortcuts, TBS coefficients), including per-channel scales that are
  recomputed from W during training but must be stored for inference. Sizes in MiB (2^20 B).
* OPs = BOPs/64 + FLOPs, with BOPs = MACs * b_w * b_a for every quantized conv/linear/matmul
  and FLOPs = MACs for the float ones (attention matmuls included; norms and elementwise ops
  are not counted, as in the papers). Per sample (batch 1).
* EBB's stage is read from each quantizer's ``stage2`` buffer (the one truth; the trainer switches
  it): a QAT graph still in stage 1 is counted at one basis as above, and the report says how many
  layers hold two bases now and what folding them now would add (``ebb_stage1``).
* A deploy graph (``bqc fold``) is counted as stored: each folded layer's packed bits (times the
  bases its buffers really hold: an EBB layer folded in stage 1 keeps two), its codes, and 32
  bits per other stored value, from :func:`bqc.deploy.summary.layer_row`.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from bqc import ir

MIB = 8 * 2**20  # bits per MiB


def precision_counts(layers) -> Counter:
    """How many quantized layers have each ``(w_bits, a_bits)`` (``layers``: rows with ``w_bits`` and
    ``a_bits``, as a transform result's or a deploy manifest's; float layers are left out)."""
    return Counter((r["w_bits"], r["a_bits"]) for r in layers if r["w_bits"] < 32 or r["a_bits"] < 32)


def precision_mix(layers) -> str:
    """:func:`precision_counts` as text, most common first: ``"W1A1 57, W1A4 12, W8A8 2"``."""
    mix = {f"W{w}A{a}": n for (w, a), n in precision_counts(layers).items()}
    return ", ".join(f"{k} {n}" for k, n in sorted(mix.items(), key=lambda kv: (-kv[1], kv[0])))


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _ebb_stage(mod) -> int | None:
    """1 or 2 for a layer whose weight quantizer is EBB (from its ``stage2`` buffer), else None."""
    from bqc.quant.binary import EBB

    wq = getattr(mod, "wq", None)
    return (1 if wq.two_bases_active() else 2) if isinstance(wq, EBB) else None


def _quant_layer_bits(mod) -> tuple[int, int, int, int]:
    """(w_bits, a_bits, bases, extra 32-bit values) of a quantized layer module."""
    from bqc.quant.binary import EBB, SignScale

    d = mod.describe()
    wq = getattr(mod, "wq", None)
    bases = 1 if isinstance(wq, EBB) else max(int(d.get("w_bases", 1)), 1)
    extra = 0
    for name, p in mod.named_parameters():
        if name in ("weight",) or (isinstance(wq, EBB) and name == "wq.s2"):
            continue
        extra += p.numel()
    if isinstance(wq, SignScale) and not any(n.startswith("wq.") for n, _ in mod.named_parameters()):
        extra += mod.weight.shape[0] if getattr(wq, "per_channel", True) else 1  # stored scale
    return int(d["w_bits"]), int(d["a_bits"]), bases, extra


def _deploy_layer_bits(node: fx.Node, mod) -> tuple[int, int, int, int, int]:
    """(w_bits, a_bits, bases, params, size bits) of a folded layer, as stored: 1 bit per binary
    weight per basis its packed buffers hold (two for EBB stage 1 and LMB layers), ``w_bits`` per
    integer code, 32 per other stored value (:func:`bqc.deploy.summary.layer_row`)."""
    from bqc.deploy.summary import layer_row

    r = layer_row(node, mod)
    bias = mod.bias.numel() if getattr(mod, "bias", None) is not None else 0
    return int(r["w_bits"]), int(r["a_bits"]), max(int(r["bases"]), 1), r["weights"] + bias, r["nominal_bits"]


def layer_costs(gm: fx.GraphModule) -> list[dict]:
    from bqc.deploy import DEPLOY_LAYERS

    rows = []
    for n in gm.graph.nodes:
        ni = ir.info(n)
        if ni.get("kind") not in ir.QUANTIZABLE_KINDS + ("attention",):
            continue
        mod = _module(gm, n)
        params = ni["params"]
        ebb_stage = None
        if isinstance(mod, DEPLOY_LAYERS):
            w_bits, a_bits, bases, params, size_bits = _deploy_layer_bits(n, mod)
        elif mod is not None and hasattr(mod, "describe"):
            w_bits, a_bits, bases, extra = _quant_layer_bits(mod)
            ebb_stage = _ebb_stage(mod)
            weight = mod.weight.numel() if hasattr(mod, "weight") else 0
            bias = mod.bias.numel() if getattr(mod, "bias", None) is not None else 0
            size_bits = weight * w_bits * bases + 32 * (bias + extra)
            params = weight + bias
        else:
            w_bits = a_bits = 32
            bases = 1
            size_bits = 32 * params
        macs = ni["macs"]
        quantized = w_bits < 32 or a_bits < 32
        bops = macs * w_bits * a_bits * bases if quantized else 0
        flops = 0 if quantized else macs
        rows.append({
            "name": n.name, "module": ni["module"], "kind": ni["kind"], "role": ni["role"],
            "w_bits": w_bits, "a_bits": a_bits, "bases": bases, "params": params, "macs": macs,
            "size_mb": size_bits / MIB, "ops": bops / 64 + flops,
            **({"ebb_stage": ebb_stage} if ebb_stage else {}),
            # stage 1 holds a second basis: its sign bits and its per-channel scale s2
            **({"ebb_stage1_extra_mb": (weight * w_bits + 32 * mod.wq.s2.numel()) / MIB} if ebb_stage == 1 else {}),
        })
    return rows


def _stored_values(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The parameters; for a deploy graph, whose folded state is buffers (TBS coefficients
    included), its float buffers too."""
    from bqc.deploy import is_deployed

    if not is_deployed(gm):
        return list(gm.parameters())
    return list(gm.parameters()) + [b for b in gm.buffers() if b.is_floating_point()]


def cost_report(gm: fx.GraphModule) -> dict:
    """Size and OPs of a QAT graph (the papers' count, EBB at one basis) or of a deploy graph
    (what its buffers hold)."""
    rows = layer_costs(gm)
    layer_param_ids = set()
    for n in gm.graph.nodes:
        mod = _module(gm, n)
        if mod is not None and ir.info(n).get("kind") in ir.QUANTIZABLE_KINDS:
            layer_param_ids |= {id(p) for p in (*mod.parameters(), *mod.buffers())}
        elif ir.info(n).get("kind") in ir.WEIGHTED_KINDS:
            for a in n.args[1:3]:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    layer_param_ids.add(id(ir.getattr_path(gm, a.target)))
    other = sum(p.numel() for p in _stored_values(gm) if id(p) not in layer_param_ids)  # norms, TBS, ...
    params = sum(r["params"] for r in rows) + other
    size = sum(r["size_mb"] for r in rows) + 32 * other / MIB
    fp_size = 32 * params / MIB
    ops = sum(r["ops"] for r in rows)
    fp_ops = float(sum(r["macs"] for r in rows))
    by_role: dict[str, dict] = {}
    for r in rows:
        agg = by_role.setdefault(r["role"] or "-", {"layers": 0, "params": 0, "size_mb": 0.0, "ops": 0.0})
        agg["layers"] += 1
        agg["params"] += r["params"]
        agg["size_mb"] += r["size_mb"]
        agg["ops"] += r["ops"]
    stage1 = [r for r in rows if r.get("ebb_stage") == 1]
    return {
        "params": params, "size_mb": size, "fp32_size_mb": fp_size, "ops": ops, "fp32_ops": fp_ops,
        "ebb_stage1": {"layers": len(stage1), "extra_size_mb": sum(r["ebb_stage1_extra_mb"] for r in stage1),
                       "extra_ops": sum(r["ops"] for r in stage1)},
        "size_saving": fp_size / size if size else 0.0, "ops_saving": fp_ops / ops if ops else 0.0,
        "other_params": other, "by_role": by_role, "layers": rows,
    }


def plot_report(rep: dict, path: str, title: str = "") -> None:
    """Per-layer size and OPs, coloured by role (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["layers"]
    roles = sorted({r["role"] for r in rows})
    colors = {role: plt.cm.tab10(i % 10) for i, role in enumerate(roles)}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.08), 6), sharex=True)
    xs = range(len(rows))
    for ax, key, label in ((axes[0], "size_mb", "size (MiB)"), (axes[1], "ops", "OPs")):
        ax.bar(xs, [r[key] for r in rows], color=[colors[r["role"]] for r in rows], width=1.0)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in roles]
    axes[0].legend(handles, roles, ncol=len(roles), fontsize=7, loc="upper right")
    axes[1].set_xlabel("layer (execution order)")
    fig.suptitle(title or f"size {rep['size_mb']:.2f} MiB ({rep['size_saving']:.1f}x), OPs {rep['ops']:.3g} ({rep['ops_saving']:.1f}x)")
    fig.tight_layout()
    from bqc.outputs import PNG_MARK

    fig.savefig(path, dpi=110, metadata={PNG_MARK[0]: PNG_MARK[1]})  # marked: a later --plot may replace it
    plt.close(fig)


def print_report(rep: dict, title: str, console, *, layers: bool = False) -> None:
    """``bqc report``'s tables (per role; per layer with ``layers``) and its one-line summary,
    readable at the console's width (:func:`bqc.console.show_table`)."""
    from bqc.console import Column, show_table

    if layers:
        show_table(console, "layers",
                   [Column(c, numeric=c in ("params", "MACs", "size MiB", "OPs"), optional=c == "module")
                    for c in ("layer", "module", "role", "W/A", "params", "MACs", "size MiB", "OPs")],
                   [(r["name"], r["module"], r["role"], f"{r['w_bits']}/{r['a_bits']}", f"{r['params']:,}",
                     f"{r['macs']:,}", f"{r['size_mb']:.4f}", f"{r['ops']:.3g}") for r in rep["layers"]])
    show_table(console, f"cost report: {title}",
               [Column(c, numeric=c != "role") for c in ("role", "layers", "params", "size MiB", "OPs")],
               [(role, str(agg["layers"]), f"{agg['params']:,}", f"{agg['size_mb']:.3f}", f"{agg['ops']:.3g}")
                for role, agg in sorted(rep["by_role"].items())])
    console.print(
        f"params {rep['params']:,} · size {rep['size_mb']:.2f} MiB (fp32 {rep['fp32_size_mb']:.2f}, "
        f"{rep['size_saving']:.1f}x smaller) · OPs {rep['ops']:.3g} (fp32 {rep['fp32_ops']:.3g}, {rep['ops_saving']:.1f}x fewer)",
        highlight=False)
    s1 = rep.get("ebb_stage1") or {}
    if s1.get("layers"):
        console.print(
            f"{s1['layers']} EBB layers are in stage 1 (two bases): counted at one basis, as after the stage switch "
            f"training makes; folded now they would keep both (+{s1['extra_size_mb']:.3f} MiB, +{s1['extra_ops']:.3g} OPs)",
            highlight=False)
