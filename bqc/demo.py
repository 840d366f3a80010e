"""``bqc demo``: the whole flow on the embedded default model, in one command.

For each recipe (default: bidm W1A1 and binarydm W1A4) on the shipped pretrained ``mnist16``:
transform -> short QAT with the FP teacher -> DDIM sample grid -> eval against the real data
-> cost report; the FP model is evaluated the same way for reference; where a TVM backend is
available the trained artifact is lowered and benchmarked. Ends with a summary table and the
paths of everything written.

Every stage shows its progress on stderr (:class:`bqc.console.Progress`; off with
``progress=False``) and third-party warnings are hidden (:func:`bqc.console.quiet`). The summary
is rendered by :func:`print_summary` alone, at the console's width (80 columns when piped).
A smoke-sized run that still goes through every stage, lowering included:
``bqc demo --recipes bidm --steps 2 -n 16 --sample-steps 2``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from bqc import artifact, frontend, transform as tf
from bqc.console import Column, Progress, show_table
from bqc.data import load_dataset
from bqc.errors import BqcError
from bqc.diffusion.grid import save_grid
from bqc.diffusion.samplers import generate
from bqc.graph import BqcModel
from bqc.metrics import evaluate
from bqc.report import cost_report
from bqc.train.qat import QATOptions, train_artifact


@dataclass
class DemoOptions:
    recipes: tuple[str, ...] = ("bidm", "binarydm")
    steps: int = 60
    batch: int = 64
    lr: float = 5e-4
    n: int = 256
    sample_steps: int = 25
    seed: int = 0
    out: Path = Path("runs/demo")
    lower: bool = True
    threads: int | None = None  # lowering and benchmark threads (None: all cores)
    progress: bool = True  # progress of every stage on stderr


@dataclass
class DemoRow:
    name: str
    bits: str
    metrics: dict
    report: dict
    paths: dict = field(default_factory=dict)
    seconds: float = 0.0
    bench: dict | None = None


def _eval(model, opts: DemoOptions, real, grid: Path) -> dict:
    with torch.no_grad():
        x = generate(model, opts.n, tuple(model.input_shape), steps=opts.sample_steps, seed=opts.seed, batch=256,
                     progress=opts.progress)
    save_grid(x[:64], grid, nrow=8, scale=4)
    return evaluate(x, real, n=opts.n, seed=opts.seed)


def run_demo(opts: DemoOptions, console: Console | None = None) -> list[DemoRow]:
    console = console or Console()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    src = frontend.load_source("mnist16")
    if not src.info.get("pretrained"):
        console.print("[yellow]warning:[/] no shipped mnist16 weights found; the demo runs on a random-init model")
    src.exported = frontend.capture(src)
    real = load_dataset("mnist16", "test").images
    rows: list[DemoRow] = []

    t0 = time.time()
    fp = tf.transform(src, "fp")
    console.rule("[bold]fp (teacher)")
    m = _eval(BqcModel(fp.gm).eval(), opts, real, out / "fp_samples.png")
    rows.append(DemoRow("fp", "W32A32", m, cost_report(fp.gm), {"samples": str(out / "fp_samples.png")}, time.time() - t0))

    for recipe in opts.recipes:
        console.rule(f"[bold]{recipe}")
        t0 = time.time()
        res = tf.transform(src, recipe)
        art = tf.save(res, out / recipe / "artifact")
        run = out / recipe / "trained"
        train_artifact(art, "mnist16", run, QATOptions(steps=opts.steps, batch=opts.batch, lr=opts.lr, seed=opts.seed,
                                                      warmup=min(20, opts.steps), sample_steps=opts.sample_steps,
                                                      checkpoint_every=max(opts.steps, 1), progress=opts.progress),
                       resume="auto")
        trained = artifact.load_artifact(run)
        grid = out / recipe / "samples.png"
        metrics = _eval(trained.model.eval(), opts, real, grid)
        row = DemoRow(recipe, f"W{trained.manifest['wbits']}A{trained.manifest['abits']}", metrics,
                      cost_report(trained.gm), {"artifact": str(art), "trained": str(run), "samples": str(grid)},
                      time.time() - t0)
        if opts.lower and recipe == opts.recipes[0]:  # one lowering keeps the demo inside 10 minutes
            row.bench = _lower_and_bench(run, out / recipe / "tvm-x86", console, opts)
            if row.bench:
                row.paths["compiled"] = str(out / recipe / "tvm-x86")
        rows.append(row)

    summary = [{"name": r.name, "bits": r.bits, "seconds": round(r.seconds, 1), "bench": r.bench,
                **{k: r.metrics.get(k) for k in ("fid", "fid_floor", "kid", "precision", "recall", "is", "confident")},
                **{k: r.report[k] for k in ("size_mb", "fp32_size_mb", "size_saving", "ops", "ops_saving")},
                "paths": r.paths} for r in rows]
    (out / "summary.json").write_text(json.dumps({"options": {k: str(v) for k, v in vars(opts).items()},
                                                  "wall_s": round(time.time() - t_all, 1), "rows": summary},
                                                 indent=2, default=float) + "\n")
    print_summary(rows, console, time.time() - t_all, out)
    return rows


def _lower_and_bench(run: Path, dest: Path, console: Console, opts: DemoOptions) -> dict | None:
    """Lower to tvm-x86 and time one UNet step, when the TVM backend is available."""
    try:
        from bqc.backends.tvm import lower as tvm_lower
    except ImportError:
        return None
    try:
        from bqc import deploy
        from bqc.teacher import bundle_teacher

        with Progress("lower tvm-x86", stages=("fold",) + tvm_lower.STAGES, enabled=opts.progress) as bar:
            bar.stage("fold")
            tvm_lower.lower(deploy.fold(run, verb="lower"), "tvm-x86", dest, threads=opts.threads, progress=bar.stage)
        with Progress("bench", enabled=opts.progress) as bar:
            bar.stage("time the compiled step and torch FP32")
            return tvm_lower.bench(dest, threads=opts.threads, teacher=bundle_teacher(dest))
    except BqcError as e:  # a reported backend limitation; anything else is a bug and propagates
        console.print(f"[yellow]lowering skipped:[/] {e}")
        return None


def print_summary(rows: list[DemoRow], console: Console, wall: float, out: Path) -> None:
    """The demo's closing table, its notes and the paths written; readable at 80 columns."""
    cols = [Column("model"), Column("bits")] + [Column(c, numeric=True) for c in (
        "FID", "prec", "recall", "readable", "MiB", "size ÷", "OPs ÷", "TVM ×")]
    table = []
    for r in rows:
        m, rep = r.metrics, r.report
        table.append((r.name, r.bits, f"{m['fid']:.2f}", f"{m['precision']:.2f}", f"{m['recall']:.2f}",
                      f"{m.get('confident', float('nan')):.2f}", f"{rep['size_mb']:.3f}", f"{rep['size_saving']:.1f}x",
                      f"{rep['ops_saving']:.1f}x", f"{r.bench['speedup']:.2f}x" if r.bench else "-"))
    show_table(console, f"bqc demo: mnist16 ({wall / 60:.1f} min)", cols, table)
    floors = sorted({f"{r.metrics['fid_floor']:.2f}" for r in rows if "fid_floor" in r.metrics})
    console.print(f"FID (floor: {' / '.join(floors) or '-'}, real vs real at the same N), precision (prec) and recall "
                  "on the features of the shipped MNIST classifier; 'readable': the fraction of samples the "
                  "classifier labels with > 90% confidence. MiB: model size; size ÷ / OPs ÷: how many times smaller "
                  "/ fewer than FP32; TVM ×: speedup of the compiled UNet step.", highlight=False)
    benched = [r.bench for r in rows if r.bench]
    if benched:
        b = benched[0]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        console.print(f"TVM speedup: compiled UNet step {b['bqc_ms']:.1f} ms vs torch FP32 eager {b['torch_fp32_ms']:.1f} ms, "
                      f"{b['threads']} threads, batch {b['batch']} (load average {load:.1f}). On a busy machine multi-thread "
                      "torch waits for cores; `bqc bench DIR --threads 1` gives the single-core ratio.", highlight=False)
    console.print(f"wrote {out}/summary.json and:", highlight=False)
    for r in rows:
        for k, v in r.paths.items():
            console.print(f"  {r.name:9s} {k:9s} {v}", highlight=False)
