"""Which binary layers cost a W1A1/W1A4 model the most accuracy? Put one quantized layer at a time
back to full precision (the FP teacher's weights, no quantizers) and measure how much the noise
prediction error falls.

    python benchmarks/layer_sensitivity.py mnist16-bidm [--t 20,100,400] [-n 256] [--top 15] [--md FILE]

The model is a deploy artifact (``bqc fold``'s folder or a shipped name): it is unfolded into
its QAT graph (``bqc unfold``: computes what the deploy artifact computes), and the teacher's
weights come from the same recipe applied to the FP model. For each quantized layer L, the error
MSE(eps_hat, eps) over ``-n`` noised test digits (same noise for every variant, first sampling
step, no TBS cache) at each timestep of ``--t`` is compared with the all-binary model's:
``gain`` = (error with L in FP) / (error all binary), averaged over the timesteps (lower: L
matters more). Prints a table (and writes it to ``--md``) with the command.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--t", default="20,100,400", help="timesteps (comma-separated)")
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from bqc import frontend
    from bqc import transform as tf
    from bqc.data import load_dataset
    from bqc.deploy.unfold import unfold
    from bqc.diffusion.schedule import NoiseSchedule, q_sample
    from bqc.graph import BqcModel
    from bqc.quant.layers import _Quantized

    res, info = unfold(a.model)
    fp = tf.transform(frontend.load_source(info["model"]), info["recipe"]).gm  # the teacher's weights, same graph
    gm = res.gm.eval()
    model = BqcModel(gm).eval()
    fp_weights = {n: m.weight.detach().clone() for n, m in fp.named_modules() if isinstance(m, _Quantized) and hasattr(m, "weight")}
    layers = [(n, m) for n, m in gm.named_modules() if isinstance(m, _Quantized) and bool(m.quant_active) and n in fp_weights]
    ts = [int(v) for v in a.t.split(",")]
    x0 = load_dataset("mnist16", "test").images[:a.n]
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    batches = []
    for t in ts:
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        batches.append((q_sample(sched, x0, tt, noise), tt, noise))

    def errors() -> list[float]:
        with torch.no_grad():
            return [float(((model(x, tt, None, None)[0] - nz) ** 2).mean()) for x, tt, nz in batches]

    t0 = time.time()
    base = errors()
    rows = []
    for name, m in layers:
        w = m.weight.detach().clone()
        with torch.no_grad():
            m.weight.copy_(fp_weights[name])
        m.quant_active.fill_(False)
        e = errors()
        m.quant_active.fill_(True)
        with torch.no_grad():
            m.weight.copy_(w)
        gain = sum(x / b for x, b in zip(e, base)) / len(base)
        rows.append((gain, name, e))
    rows.sort()
    cmd = "python " + shlex.join(["benchmarks/layer_sensitivity.py", *(argv if argv is not None else sys.argv[1:])])
    head = "| layer | error with it in FP / all quantized | " + " | ".join(f"MSE t={t}" for t in ts) + " |"
    lines = [f"Command: `{cmd}` ({len(layers)} quantized layers, {time.time() - t0:.0f} s)", "",
             f"All quantized: " + ", ".join(f"t={t} {b:.4f}" for t, b in zip(ts, base)), "", head,
             "|---|---|" + "---|" * len(ts)]
    for gain, name, e in rows[:a.top]:
        lines.append(f"| `{name}` | {gain:.3f} | " + " | ".join(f"{x:.4f}" for x in e) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        from pathlib import Path

        Path(a.md).write_text(f"# Layer sensitivity of {a.model}\n\n" + text)


if __name__ == "__main__":
    main()
