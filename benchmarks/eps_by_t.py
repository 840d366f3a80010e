"""Noise-prediction error by timestep: where a quantized model loses accuracy.

For each artifact, the same 256 mnist16 test digits are noised to x_t at each timestep t (same
noise for every model) and the model's eps prediction is compared with the noise: mean squared
error, and the error of the mean (a bias that a deterministic sampler accumulates). Used by the
replication study's discussion (docs/RESULTS.md) to show at which noise levels the W1A1 models
fail.

    python benchmarks/eps_by_t.py RUNS/fp/seed0/artifact RUNS/baseline-w1a4/seed0/trained ...
    python benchmarks/eps_by_t.py --md benchmarks/results/eps_by_t.md ART [ART ...]
    python benchmarks/eps_by_t.py RUNS/fp/seed0/artifact mnist16-bidm mnist16-binarydm   # shipped models too
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

TIMESTEPS = (5, 20, 50, 100, 200, 400, 600, 800, 950)


def eps_errors(art_dir: str, n: int = 256, timesteps=TIMESTEPS, seed: int = 0) -> list[tuple[int, float, float]]:
    """[(t, MSE(eps_hat, eps), mean(eps_hat) - mean(eps))] for one artifact (first sampling step: no TBS cache)."""
    import torch

    from bqc.data import load_dataset
    from bqc.diffusion.schedule import NoiseSchedule, q_sample

    x0 = load_dataset("mnist16", "test").images[:n]
    sched = NoiseSchedule()
    model = _load_model(art_dir)
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            eps, _ = model(q_sample(sched, x0, tt, noise), tt, None, None)
            out.append((int(t), float(((eps - noise) ** 2).mean()), float(eps.mean() - noise.mean())))
    return out


def _load_model(path: str):
    """A QAT artifact folder, or a deploy artifact (``bqc fold``'s folder or a shipped name such
    as ``mnist16-bidm``), as a model called ``model(x_t, t, y, state)``."""
    from bqc import artifact
    from bqc import deploy
    from bqc.graph import BqcModel

    if artifact.is_artifact(path):
        return BqcModel(artifact.load_artifact(path).gm).eval()
    return deploy.load(path).model.eval()


def _label(p: str) -> str:
    parts = Path(p).resolve().parts
    return "/".join(parts[-4:-1]) if parts[-1] in ("artifact", "trained") else parts[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md", default=None, help="also write the table (and the command) to this markdown file")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    head = "| model | " + " | ".join(f"t={t}" for t in TIMESTEPS) + " |"
    lines = [head, "|" + "---|" * (len(TIMESTEPS) + 1)]
    for p in a.artifacts:
        row = eps_errors(p, a.n)
        lines.append(f"| `{_label(p)}` | " + " | ".join(f"{m:.4f} ({b:+.3f})" for _, m, b in row) + " |")
        print(lines[-1], flush=True)
    if a.md:
        cmd = "python " + shlex.join(["benchmarks/eps_by_t.py", *(argv if argv is not None else sys.argv[1:])])
        Path(a.md).write_text("# Noise-prediction error by timestep\n\n"
                              f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M')} UTC)\n\n"
                              f"Each cell: MSE(eps_hat, eps) over {a.n} noised mnist16 test digits (same noise for "
                              "every model), and in brackets mean(eps_hat) - mean(eps). First sampling step "
                              "(no TBS cache).\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
