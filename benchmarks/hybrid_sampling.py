"""Where along the trajectory does a binary student break the samples? Sample with the FP
teacher above a timestep and the student below it (and the reverse), same noise, and score each.

    python benchmarks/hybrid_sampling.py RUN --out DIR [-n 500] [--steps 100] [--eta 1] [--switch 600,300]

RUN is a trained artifact (its teacher is the FP model it was transformed from), or a deploy
artifact (``bqc fold``'s folder, or a shipped name such as ``mnist16-bidm``; its teacher: the zoo
model it was trained from, or ``--teacher``). Writes
``DIR/hybrid.json`` (FID, classifier-confident, precision, recall per split), a 64-sample grid
per split and ``DIR/command.txt``. The student's TBS cache is threaded across its own steps; its
first step after the teacher's runs without a cache, as the first sampling step always does.
``--other MODEL`` puts a second binary model in the teacher's place (two timestep experts: e.g.
one trained with ``bqc train --t-range 0 300`` below 300, RUN above); each model gets back only
its own TBS cache.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("-n", type=int, default=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--switch", default="600,300", help="timesteps where the model changes (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher", default=None, help="the FP model (default: the run's own teacher)")
    p.add_argument("--other", default=None, help=(
        "a second binary model (artifact, deploy artifact or shipped name, e.g. a timestep expert trained with "
        "`bqc train --t-range`) in the teacher's place: the 'teacher' splits use it instead"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from bqc import artifact
    from bqc.data import load_dataset
    from bqc.diffusion.grid import save_grid
    from bqc.diffusion.samplers import generate, timestep_experts
    from bqc.graph import BqcModel
    from bqc.metrics import evaluate

    from bqc import deploy
    from bqc.teacher import load_teacher

    if artifact.is_artifact(a.run):
        art = artifact.load_artifact(a.run)
        student, teacher = BqcModel(art.gm).eval(), BqcModel(art.teacher().gm).eval()
    else:
        dart = deploy.load(a.run)
        student = dart.model.eval()
        teacher = load_teacher(a.teacher or (dart.manifest.get("source") or {}).get("name"))[0].eval()
    if a.teacher and artifact.is_artifact(a.run):
        teacher = load_teacher(a.teacher)[0].eval()
    other = None
    if a.other:
        other = (BqcModel(artifact.load_artifact(a.other).gm) if artifact.is_artifact(a.other)
                 else deploy.load(a.other).model).eval()
    real = load_dataset("mnist16", "test").images
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("python " + shlex.join(["benchmarks/hybrid_sampling.py", *(argv or sys.argv[1:])]) + "\n")
    res = {}
    splits = [("student", None), ("teacher", None)] + [(f"{hi}_above_{sw}", (hi, int(sw)))
                                                        for sw in a.switch.split(",") for hi in ("teacher", "student")]
    models = {"student": student, "teacher": other if other is not None else teacher}
    for tag, how in splits:
        if how is None:  # one model everywhere
            step = timestep_experts([models[tag]], [])
        else:  # `hi` above the switch, the other one below; each gets back only its own TBS cache
            hi, switch = how
            step = timestep_experts([models[hi], models["student" if hi == "teacher" else "teacher"]], [switch])
        t0 = time.time()
        with torch.no_grad():
            x = generate(step, a.n, tuple(student.input_shape), steps=a.steps, eta=a.eta, seed=a.seed, batch=250)
        save_grid(x[:64], out / f"{tag}.png", nrow=8, scale=4)
        m = evaluate(x, real, n=a.n, seed=a.seed)
        res[tag] = {k: round(float(m[k]), 4) for k in ("fid", "fid_floor", "confident", "precision", "recall")}
        res[tag]["seconds"] = round(time.time() - t0, 1)
        print(tag, res[tag], flush=True)
    (out / "hybrid.json").write_text(json.dumps({"run": str(a.run), "n": a.n, "steps": a.steps, "eta": a.eta,
                                                 "splits": res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
