"""Cost accounting as the papers do it (METHODS.md §9).

* Size: ``w_bits`` bits per quantized weight (times the number of bases kept at inference:
  2 for LMB, 1 for EBB whose second basis is dropped in stage 2), and 32 bits for every other
  parameter: biases, norms, float layers, and every quantizer's own state (scales, steps,
  thresholds, K maps, shortcuts, TBS coefficients), including per-channel scales that are
  recomputed from W during training but must be stored for inference. Sizes in MiB (2^20 B).
* OPs = BOPs/64 + FLOPs, with BOPs = MACs * b_w * b_a for every quantized conv/linear/matmul
  and FLOPs = MACs for the float ones (attention matmuls included; norms and elementwise ops
  are not counted, as in the papers). Per sample (batch 1).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from bqc import ir

MIB = 8 * 2**20  # bits per MiB


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


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


def layer_costs(gm: fx.GraphModule) -> list[dict]:
    rows = []
    for n in gm.graph.nodes:
        ni = ir.info(n)
        if ni.get("kind") not in ir.QUANTIZABLE_KINDS + ("attention",):
            continue
        mod = _module(gm, n)
        params = ni["params"]
        if mod is not None and hasattr(mod, "describe"):
            w_bits, a_bits, bases, extra = _quant_layer_bits(mod)
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
        })
    return rows


def cost_report(gm: fx.GraphModule) -> dict:
    rows = layer_costs(gm)
    layer_param_ids = set()
    for n in gm.graph.nodes:
        mod = _module(gm, n)
        if mod is not None and ir.info(n).get("kind") in ir.QUANTIZABLE_KINDS:
            layer_param_ids |= {id(p) for p in mod.parameters()}
        elif ir.info(n).get("kind") in ir.WEIGHTED_KINDS:
            for a in n.args[1:3]:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    layer_param_ids.add(id(ir.getattr_path(gm, a.target)))
    other = sum(p.numel() for p in gm.parameters() if id(p) not in layer_param_ids)  # norms, TBS, ...
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
    return {
        "params": params, "size_mb": size, "fp32_size_mb": fp_size, "ops": ops, "fp32_ops": fp_ops,
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
