"""``bqc demo``: the whole flow on the embedded default model, in one command.

The headline is what bqc ships: the FP teacher ``mnist16`` and the binary models trained from it
(``mnist16-bidm`` W1A1, ``mnist16-binarydm`` W1A4, deploy artifacts under
``models/checkpoints/``). Each is sampled (DDIM, the study's sampler by default), scored against
the real data and costed; the first W1A1 model is lowered to tvm-x86 and its compiled UNet step
benchmarked against torch FP32. ``qat`` adds, per recipe, a short QAT run from the teacher
(transform -> train -> the same sampling and scoring): the flow a user runs on their own model,
at a length that shows the mechanics, not the quality. Ends with a summary table and the paths
of everything written.

Every stage shows its progress on stderr (:class:`bqc.console.Progress`; off with
``progress=False``) and third-party warnings are hidden (:func:`bqc.console.quiet`). The summary
is rendered by :func:`print_summary` alone, at the console's width (80 columns when piped).
A smoke-sized run that still goes through every stage, lowering and QAT included:
``bqc demo -n 16 --sample-steps 2 --qat bidm --steps 2``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from bqc import artifact, deploy, frontend, transform as tf
from bqc.console import Column, Progress, show_table
from bqc.data import load_dataset
from bqc.errors import BqcError
from bqc.diffusion.grid import save_grid
from bqc.diffusion.samplers import generate
from bqc.graph import BqcModel
from bqc.metrics import evaluate
from bqc.report import cost_report
from bqc.runtime import idle_cores
from bqc.train.qat import QATOptions, train_artifact

SHIPPED = ("mnist16-bidm", "mnist16-binarydm")


@dataclass
class DemoOptions:
    models: tuple[str, ...] = SHIPPED  # deploy artifacts (zoo names or folders) to show next to the teacher
    qat: tuple[str, ...] = ()  # recipes to run a short QAT with, from the teacher
    steps: int = 60  # QAT steps per recipe
    batch: int = 64
    lr: float | None = None  # QAT peak lr (None: the recipe's [train] lr)
    n: int = 256
    sample_steps: int = 100
    eta: float = 1.0
    seed: int = 0
    out: Path = Path("runs/demo")
    lower: bool = True  # lower + bench the first W1A1 model
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
        x = generate(model, opts.n, tuple(model.input_shape), schedule=getattr(model, "schedule", None),
                     steps=opts.sample_steps, eta=opts.eta, seed=opts.seed, batch=256, progress=opts.progress)
    save_grid(x[:64], grid, nrow=8, scale=4)
    return evaluate(x, real, n=opts.n, seed=opts.seed)


def model_paths(names) -> list[Path]:
    """The deploy artifact folders ``names`` name (without loading them); a name that resolves to
    none is refused."""
    paths = []
    for name in names:
        path = deploy.find_deploy_artifact(name)
        if path is None:
            raise BqcError(f"{name} is not a deploy artifact (a `bqc fold` folder or a shipped model's name)",
                           hint=f"shipped: {', '.join(SHIPPED)}; make one with `bqc fold RUN -o DIR`")
        paths.append(path)
    return paths


def run_demo(opts: DemoOptions, console: Console | None = None) -> list[DemoRow]:
    console = console or Console()
    models = [(name, deploy.DeployArtifact.load(p))  # a bad name is refused before any work
              for name, p in zip(opts.models, model_paths(opts.models))]
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
    console.rule("[bold]mnist16 (FP teacher)")
    teacher = BqcModel(fp.gm).eval()
    teacher.schedule = frontend.diffusion_of(src)[0]
    m = _eval(teacher, opts, real, out / "fp_samples.png")
    rows.append(DemoRow("fp", "W32A32", m, cost_report(fp.gm), {"samples": str(out / "fp_samples.png")}, time.time() - t0))

    lowered = not opts.lower
    for name, dart in models:
        console.rule(f"[bold]{name} ({dart.title()})")
        t0 = time.time()
        folder = out / Path(name).name
        folder.mkdir(parents=True, exist_ok=True)
        grid = folder / "samples.png"
        bits = dart.bits()
        row = DemoRow(Path(name).name, bits, _eval(dart.model.eval(), opts, real, grid), cost_report(dart.gm),
                      {"model": str(dart.path), "samples": str(grid)}, time.time() - t0)
        if not lowered and bits.startswith("W1A1"):  # one lowering keeps the demo inside 10 minutes
            lowered = True
            row.bench = _lower_and_bench(dart, folder / "tvm-x86", console, opts)
            if row.bench:
                row.paths["compiled"] = str(folder / "tvm-x86")
        rows.append(row)

    for recipe in opts.qat:
        console.rule(f"[bold]{recipe}: {opts.steps}-step QAT from the teacher")
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
        rows.append(DemoRow(f"{recipe} ({opts.steps} st)", f"W{trained.manifest['wbits']}A{trained.manifest['abits']}",
                            metrics, cost_report(trained.gm),
                            {"artifact": str(art), "trained": str(run), "samples": str(grid)}, time.time() - t0))

    summary = [{"name": r.name, "bits": r.bits, "seconds": round(r.seconds, 1), "bench": r.bench,
                **{k: r.metrics.get(k) for k in ("fid", "fid_floor", "kid", "precision", "recall", "is", "confident")},
                **{k: r.report[k] for k in ("size_mb", "fp32_size_mb", "size_saving", "ops", "ops_saving")},
                "paths": r.paths} for r in rows]
    (out / "summary.json").write_text(json.dumps({"options": {k: str(v) for k, v in vars(opts).items()},
                                                  "sampler": _sampler(opts),
                                                  "wall_s": round(time.time() - t_all, 1), "rows": summary},
                                                 indent=2, default=float) + "\n")
    print_summary(rows, console, time.time() - t_all, out, _sampler(opts))
    return rows


def _sampler(opts: DemoOptions) -> str:
    return f"DDIM-{opts.sample_steps} eta={opts.eta:g}, n={opts.n}"


def bench_threads(threads: int | None) -> int:
    """The demo's benchmark threads: ``threads`` when given, else one per core that is idle now
    (at least one): torch and TVM both slow down many times over when a thread waits for a busy
    core, which would make the ratio measure the other job, not the kernels."""
    if threads:
        return int(threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cores()
    return cores if idle is None else max(1, min(cores, int(idle + 0.5)))


def _lower_and_bench(dart: deploy.DeployArtifact, dest: Path, console: Console, opts: DemoOptions) -> dict | None:
    """Lower a deploy artifact to tvm-x86 and time one UNet step, when the TVM backend is available."""
    try:
        from bqc.backends.tvm import lower as tvm_lower
    except ImportError:
        return None
    try:
        from bqc.teacher import bundle_teacher

        from bqc.backends import check

        with Progress("lower tvm-x86", stages=tvm_lower.STAGES, enabled=opts.progress) as bar:
            tvm_lower.lower(dart, "tvm-x86", dest, threads=opts.threads, progress=bar.stage)
        checked = check.check_and_record(dart, dest)  # as `bqc lower` does (this machine built it: it runs here)
        if not isinstance(checked, str):
            console.print(("" if checked.ok else "[bold red]error:[/] ") + escape(f"tvm-x86 {checked.summary()}"))
        with Progress("bench", enabled=opts.progress) as bar:
            bar.stage("time the compiled step and torch FP32")
            return tvm_lower.bench(dest, threads=bench_threads(opts.threads), teacher=bundle_teacher(dest))
    except BqcError as e:  # a reported backend limitation; anything else is a bug and propagates
        console.print(f"[yellow]lowering skipped:[/] {e}")
        return None


def print_summary(rows: list[DemoRow], console: Console, wall: float, out: Path, sampler: str = "") -> None:
    """The demo's closing table, its notes and the paths written; readable at 80 columns."""
    cols = [Column("model"), Column("bits")] + [Column(c, numeric=True, optional=c in ("prec", "recall")) for c in (
        "FID", "prec", "recall", "readable", "MiB", "size ÷", "OPs ÷", "TVM ×")]
    table = []
    for r in rows:
        m, rep = r.metrics, r.report
        table.append((r.name, r.bits, f"{m['fid']:.2f}", f"{m['precision']:.2f}", f"{m['recall']:.2f}",
                      f"{m.get('confident', float('nan')):.2f}", f"{rep['size_mb']:.3f}", f"{rep['size_saving']:.1f}x",
                      f"{rep['ops_saving']:.1f}x", f"{r.bench['speedup']:.2f}x" if r.bench else "-"))
    show_table(console, f"bqc demo: mnist16 ({wall / 60:.1f} min)", cols, table)
    floors = sorted({f"{r.metrics['fid_floor']:.2f}" for r in rows if "fid_floor" in r.metrics})
    console.print(f"Sampler {sampler or '?'}. FID (floor: {' / '.join(floors) or '-'}, real vs real at the same N), precision (prec) and recall "
                  "on the features of the shipped MNIST classifier; 'readable': the fraction of samples the "
                  "classifier labels with > 90% confidence. MiB: model size; size ÷ / OPs ÷: how many times smaller "
                  "/ fewer than FP32; TVM ×: speedup of the compiled UNet step.", highlight=False)
    benched = [r.bench for r in rows if r.bench]
    if benched:
        b = benched[0]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        console.print(f"TVM speedup: compiled UNet step {b['bqc_ms']:.1f} ms vs torch FP32 eager {b['torch_fp32_ms']:.1f} ms, "
                      f"{b['threads']} threads (one per idle core unless --threads), batch {b['batch']} (load average {load:.1f}). "
                      "A thread that waits for a busy core slows torch and TVM many times over; `bqc bench DIR "
                      "--threads 1` gives the single-core ratio.", highlight=False)
    console.print(f"wrote {out}/summary.json and:", highlight=False)
    for r in rows:
        for k, v in r.paths.items():
            console.print(f"  {r.name:16s} {k:9s} {_shown(v)}", highlight=False)


def _shown(path) -> str:
    """``path`` relative to the current directory when it lies inside it (shorter lines), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)
