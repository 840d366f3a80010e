"""Training step time: FP vs baseline W1A4 vs binarydm W1A4 vs bidm W1A1 on mnist16.

One process, same batch, threads and data; the configurations take turns, one optimizer step
each per round (``--warmup`` untimed rounds, then ``--steps`` timed ones), so a change in
machine load hits all of them alike. Each step is the real QAT loss (``bqc.train.qat.make_loss``:
teacher forward, distillation, BiDM's extra no-grad forward at t+d). Reports the median step
time and the ratio to the FP step, and writes ``benchmarks/results/train_speed.{json,md}``
with the command line that produced them. ``--before OLD.json`` (an earlier run's json, e.g.
from a checkout before a speed change) adds its numbers to the table as before/after columns.

    python benchmarks/train_speed.py --threads 2 --batch 64 --steps 20
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from machine import code_version
from bqc import frontend, ir, transform as tf
from bqc.data import load_dataset
from bqc.diffusion.schedule import NoiseSchedule
from bqc.pipeline import load_recipe
from bqc.runtime import tune_allocator
from bqc.train.losses import LRMProjections
from bqc.train.loop import LoopConfig, make_optimizer, trainable_groups
from bqc.train.qat import QATModel, QATOptions, _tap_views, make_loss, param_groups, resolved_hparams

RECIPES = ["fp", "baseline", "binarydm", "bidm", "binarydm-skip", "bidm-skip", "bidm01-skip"]  # binarydm-skip and bidm01-skip: the shipped models' recipes


def make_stepper(src, recipe: str, data, args):
    """One optimizer step of ``recipe``'s real QAT loss, as a closure ``step(i)``."""
    res = tf.transform(src, recipe)
    student = res.gm.train()
    teacher = tf.transform(src, "fp").gm.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    meta = ir.graph_meta(student)
    s_view, _, taps = _tap_views(student, teacher)
    lrm = None
    if meta.get("distill", {}).get("loss") == "lrm":
        nodes = {n.name: n for n in student.graph.nodes}
        lrm = LRMProjections([int(nodes[tp["node"]].meta["val"].shape[1]) for tp in taps])
    model = QATModel(student, lrm, s_view)
    opts = QATOptions(steps=args.steps, batch=args.batch, progress=False)
    if recipe == "fp":  # plain DDPM loss on the FP graph: the baseline the ratios refer to
        opts.distill = False
    train = dict(load_recipe(recipe).train)
    parts: dict[str, float] = {}

    @contextlib.contextmanager
    def timer(part: str):
        t = time.perf_counter()
        yield
        parts[part] = parts.get(part, 0.0) + time.perf_counter() - t

    loss_fn = make_loss(student, teacher, train, opts, NoiseSchedule(), args.steps, timer=timer)
    # the trainer's AdamW and parameter groups (a recipe that freezes its float layers trains fewer weights)
    groups = param_groups(model, student, resolved_hparams(train, opts).get("float_lr_scale", 1.0), 1e-4)
    opt = make_optimizer(groups or trainable_groups(model),
                         LoopConfig(steps=args.steps, batch_size=args.batch, lr=1e-4))
    g = torch.Generator().manual_seed(0)

    def step(i: int) -> dict[str, float]:
        """Seconds: the whole step ("step") and its parts (loss parts, backward, optimizer, other)."""
        idx = torch.randint(0, len(data), (args.batch,), generator=g)
        parts.clear()
        t0 = time.perf_counter()
        loss, _ = loss_fn(model, (data[idx], None), i)
        opt.zero_grad(set_to_none=True)
        with timer("backward"):
            loss.backward()
        with timer("optimizer"):
            opt.step()
        total = time.perf_counter() - t0
        return {**parts, "other": total - sum(parts.values()), "step": total}

    return step


PARTS = ["cache pass", "student", "teacher", "distill", "backward", "optimizer", "other"]


def time_recipes(src, recipes: list[str], data, args) -> dict[str, dict[str, float]]:
    """Median seconds per recipe of the step and of each part, the recipes' steps interleaved
    (fp, baseline, ..., fp, ...) so that a change in machine load hits every recipe alike and the
    ratios stay fair."""
    steppers = {r: make_stepper(src, r, data, args) for r in recipes}
    times = {r: [] for r in recipes}
    for i in range(args.warmup + args.steps):
        for r, step in steppers.items():
            dt = step(i)
            if i >= args.warmup:
                times[r].append(dt)
    return {r: {k: statistics.median(t.get(k, 0.0) for t in v) for k in ["step", *PARTS]} for r, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, fp first (the ratios' reference)")
    p.add_argument("--before", default=None, help="an earlier run's train_speed.json: shown as before/after")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="tuned: glibc malloc as bqc's commands set it (bqc.runtime.tune_allocator); default: untouched")
    args = p.parse_args(argv)
    tuned = args.allocator == "tuned" and tune_allocator()
    torch.set_num_threads(args.threads)
    src = frontend.load_source("mnist16")
    src.exported = frontend.capture(src)
    data = load_dataset("mnist16", "train").images[:4096]
    rows = []
    recipes = args.recipes.split(",")
    if recipes[0] != "fp":
        p.error("--recipes must start with fp (the ratios are to the FP step)")
    medians = time_recipes(src, recipes, data, args)
    for recipe in recipes:
        ms = {k: round(1000 * v, 1) for k, v in medians[recipe].items()}
        r = load_recipe(recipe)
        rows.append({"recipe": recipe, "bits": f"W{r.wbits}A{r.abits}", "step_ms": ms["step"],
                     "parts_ms": {k: ms[k] for k in PARTS}})
        print(f"{recipe:14s} {ms['step']:8.1f} ms/step  " + "  ".join(f"{k} {ms[k]:.1f}" for k in PARTS), flush=True)
    fp = rows[0]["step_ms"]
    for r in rows:
        r["ratio_vs_fp"] = round(r["step_ms"] / fp, 2)
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": cmd, "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "threads": args.threads, "batch": args.batch, "timed_steps": args.steps,
              "model": "mnist16", "torch": torch.__version__, "bqc": code_version(),
              "allocator": "tuned" if tuned else "default", "rows": rows}
    before = json.loads(Path(args.before).read_text()) if args.before else None
    if before:
        result["before"] = before
    (out / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"Command: `{cmd}` (bqc {result['bqc']}, {result['allocator']} malloc; median of {args.steps} interleaved steps, batch {args.batch},"
          f" {args.threads} threads; 1-minute load average {os.getloadavg()[0]:.2f} at the end)", ""]
    if before:
        old = {r["recipe"]: r for r in before["rows"]}
        md += [f"Before: `{before['command']}` (bqc {before.get('bqc', '?')}, {before.get('allocator', 'default')} malloc; 1-minute load average "
               f"{before.get('load_avg_1m_at_end', '?')} at the end)", "",
               "| recipe | bits | before (ms) | before vs FP | after (ms) | after vs FP |", "|---|---|---|---|---|---|"]
        md += [f"| {r['recipe']} | {r['bits']} | {old.get(r['recipe'], {}).get('step_ms', '-')} | "
               f"{old.get(r['recipe'], {}).get('ratio_vs_fp', '-')}x | {r['step_ms']} | {r['ratio_vs_fp']}x |" for r in rows]
    else:
        md += ["| recipe | bits | step (ms) | vs FP |", "|---|---|---|---|"]
        md += [f"| {r['recipe']} | {r['bits']} | {r['step_ms']} | {r['ratio_vs_fp']}x |" for r in rows]
    md += ["", "Where each step goes (ms, medians of each part over the same steps, so they need not sum to the step's "
           "median; cache pass: BiDM's no-grad TBS forward at t + d; student/teacher: forward passes; distill: the "
           "LRM / SPD loss; other: noise draw, L_simple, zero_grad):", "",
           "| recipe | " + " | ".join(PARTS) + " | step |", "|---|" + "---|" * (len(PARTS) + 1)]
    md += [f"| {r['recipe']} | " + " | ".join(f"{r['parts_ms'][k]:.1f}" for k in PARTS) + f" | {r['step_ms']} |" for r in rows]
    (out / "train_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
