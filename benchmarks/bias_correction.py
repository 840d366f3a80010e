"""Does a per-timestep output bias correction help a binary model? Measure the mean eps offset
of each DDIM timestep on training digits, subtract it while sampling, and score both ways.

    python benchmarks/bias_correction.py mnist16-bidm [-n 1000] [--steps 100] [--eta 1] [--calib 512]

For each of the sampler's timesteps t, ``offset(t) = mean(eps_hat - eps)`` over ``--calib``
noised training digits, the model's TBS cache taken from its own pass at ``t + 1000 / steps``
(the step before, as when sampling). Then the same DDIM run (noise, batches) as ``bqc eval -n N
--steps S --eta E --seed K``, once as the model is and once with ``eps_hat - offset(t)``, each
scored like ``bqc eval``. Prints one JSON object (metrics of both, the offsets, the command).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a deploy artifact (bqc fold's folder) or a shipped name")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", type=int, default=512, help="training digits per timestep for the offsets")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from bqc import deploy
    from bqc.data import load_dataset
    from bqc.diffusion.samplers import ddim_timesteps, generate
    from bqc.diffusion.schedule import q_sample
    from bqc.metrics import evaluate

    m = deploy.load(a.model).model.eval()
    sched = m.schedule
    x0 = load_dataset("mnist16", "train").images[:a.calib]
    real = load_dataset("mnist16", "test").images
    g = torch.Generator().manual_seed(123)
    gap = sched.T // a.steps
    offset = {}
    t0 = time.time()
    with torch.no_grad():
        for t in ddim_timesteps(sched.T, a.steps):
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((len(x0),), int(t))
            tt2 = (tt + gap).clamp(max=sched.T - 1)
            _, state = m(q_sample(sched, x0, tt2, noise), tt2, None, None)
            eps, _ = m(q_sample(sched, x0, tt, noise), tt, None, state)
            offset[int(t)] = float((eps - noise).mean())
    calib_s = time.time() - t0

    def corrected(x, t, y, state):
        eps, st = m(x, t, y, state)
        return eps - offset[int(t[0])], st

    corrected.module = m
    res = {"command": "python " + shlex.join(["benchmarks/bias_correction.py", *(argv if argv is not None else sys.argv[1:])]),
           "calibration_s": round(calib_s, 1), "offsets": offset}
    for tag, fn in (("plain", m), ("corrected", corrected)):
        with torch.no_grad():
            x = generate(fn, a.n, tuple(m.input_shape), schedule=sched, steps=a.steps, eta=a.eta, seed=a.seed, batch=256)
        r = evaluate(x, real, n=a.n, seed=a.seed)
        res[tag] = {k: round(float(r[k]), 4) for k in ("fid", "confident", "precision", "recall")}
        print(tag, res[tag], file=sys.stderr, flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
