"""Floating-point UNet step: bqc's TVM float path vs torch eager FP32, same thread count.

For each model (random weights; the zero-initialised output convs are re-randomised so the
output is not trivially zero) the UNet is exported with a dynamic batch, imported to Relax and
compiled once by :func:`bqc.backends.tvm.relax_import.compile_relax` (rule-based schedules, no
tuning; the schedules do not depend on the thread count). The library is exported, and for
each thread count a worker process (``TVM_NUM_THREADS`` = ``OMP_NUM_THREADS`` = threads,
``torch.set_num_threads(threads)``) times torch eager and TVM *interleaved* (one torch call,
one TVM call, repeated) so that both see the same machine load, checks numerics, and at one
thread profiles the TVM step per fused function (:func:`bqc.backends.tvm.profile.profile_vm`).

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/float_path``) with the
command line that produced them.

    python benchmarks/float_path.py                       # mnist16 + ddim-cifar10, b 1/4, t 1/2
    python benchmarks/float_path.py --models mnist16 --threads 1 --repeat 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_model  # benchmarks/machine.py (this directory is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def _model(name: str, seed: int = 0):
    import torch

    from bqc.models.zoo import build_model

    torch.manual_seed(seed)
    m = build_model(name).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and float(p.abs().sum()) == 0.0:
                p.normal_(0.0, 0.05)
    return m


def _inputs(m, batch: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed + batch)
    s = m.image_size
    return torch.randn(batch, m.in_channels, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:  # pragma: no cover
        return []


# ----------------------------------------------------------------------------- worker


def worker(args) -> None:
    """One (model, threads) configuration; prints one JSON object."""
    import torch
    import tvm
    from tvm import relax

    from bqc.backends.tvm.profile import group_profile, profile_vm_detailed

    torch.set_num_threads(args.threads)
    m = _model(args.model)
    lib = tvm.runtime.load_module(args.lib)
    vm = relax.VirtualMachine(lib, tvm.cpu(0))
    f = vm["main"]
    res = {"model": args.model, "threads": args.threads, "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
           "batches": {}, "load_before": _loadavg()}
    for b in args.batches:
        x, t = _inputs(m, b)
        xs = [tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(t.numpy())]
        with torch.no_grad():
            ref = m(x, t).numpy()
        out = f(*xs)
        out = (out[0] if not isinstance(out, tvm.runtime.Tensor) else out).numpy()
        rel = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-12))
        # warm-up, then interleave: torch, tvm, torch, tvm, ... within a time budget
        with torch.no_grad():
            m(x, t)
        f(*xs)
        tt, tv = [], []
        start = time.perf_counter()
        for i in range(args.repeat):
            with torch.no_grad():
                t0 = time.perf_counter()
                m(x, t)
                tt.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            f(*xs)
            tv.append((time.perf_counter() - t0) * 1e3)
            if i >= 2 and time.perf_counter() - start > args.budget_s:
                break
        entry = {
            "rel_err": rel,
            "runs": len(tt),
            "torch_ms": {"median": statistics.median(tt), "min": min(tt)},
            "tvm_ms": {"median": statistics.median(tv), "min": min(tv)},
        }
        entry["ratio_median"] = entry["tvm_ms"]["median"] / entry["torch_ms"]["median"]
        entry["ratio_min"] = entry["tvm_ms"]["min"] / entry["torch_ms"]["min"]
        if args.profile:
            prof = profile_vm_detailed(lib, xs, repeat=5)
            # the overhead row uses the least-disturbed end-to-end time seen
            plain = min(prof["plain_ms"], entry["tvm_ms"]["min"])
            rows = [(n, ms) for n, ms, _ in prof["functions"][:-1]]
            rows.append(("(vm overhead)", max(0.0, plain - prof["kernel_ms"])))
            prof["functions"][-1] = ("(vm overhead)", rows[-1][1], 0)
            entry["profile"] = {
                "kernel_ms": prof["kernel_ms"],
                "replay_ms": prof["replay_ms"],
                "plain_ms": plain,
                "by_kind": group_profile(rows),
                "top": [(n, ms, c) for n, ms, c in prof["functions"][: args.top]],
            }
        res["batches"][str(b)] = entry
    res["load_after"] = _loadavg()
    print("RESULT " + json.dumps(res))


# ----------------------------------------------------------------------------- driver


def compile_model(name: str, lib_path: str, max_batch: int) -> dict:
    import torch  # noqa: F401

    from bqc.backends.tvm.schedules.float_cpu import rules_used
    from bqc.backends.tvm.relax_import import compile_relax, import_exported
    from bqc.backends.tvm.target import x86_target

    m = _model(name)
    x, t = _inputs(m, 2)
    t0 = time.perf_counter()
    mod, params = import_exported(m, (x, t), dynamic_batch=True, max_batch=max_batch)
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = compile_relax(mod, params, x86_target(num_cores=2))
    t_compile = time.perf_counter() - t0
    c.export_library(lib_path)
    rules: dict[str, int] = {}
    for r in rules_used(c.mod).values():
        rules[r] = rules.get(r, 0) + 1
    return {"import_s": t_import, "compile_s": t_compile, "primfuncs_by_rule": rules,
            "target": str(c.target)}


def run_worker(model: str, lib: str, threads: int, batches, repeat: int, budget_s: float,
               profile: bool, top: int) -> dict:
    env = dict(os.environ)
    env["TVM_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--lib", lib, "--threads", str(threads),
           "--repeat", str(repeat), "--budget-s", str(budget_s), "--top", str(top),
           "--batches", *[str(b) for b in batches]]
    if profile:
        cmd.append("--profile")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed ({model}, {threads} threads):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def write_md(data: dict, path: Path) -> None:
    L = []
    L.append("# Float path: TVM (bqc rule-based schedules) vs torch eager FP32\n")
    L.append(f"Command: `{data['command']}`  ")
    L.append(f"Machine: {data['machine']}; load average before/after: {data['load_start']} / {data['load_end']}  ")
    L.append(f"Versions: torch {data['versions']['torch']}, tvm {data['versions']['tvm']}  ")
    L.append("One compiled library per model (dynamic batch, target "
             f"`{next(iter(data['compile'].values()))['target']}`), shared by both thread counts. "
             "Interleaved runs (torch, TVM, torch, ...); ratio = TVM / torch (< 1: TVM faster). "
             "This 2-core machine is shared with other jobs, so medians are noisy and the min "
             "is the better estimate of the uncontended time; at 2 threads both runtimes "
             "spin-wait on a busy core, so 2-thread numbers mostly measure the load.\n")
    L.append("## End-to-end UNet step\n")
    L.append("| model | batch | threads | torch median ms | TVM median ms | ratio (median) | torch min ms | TVM min ms | ratio (min) | runs | max rel err |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["runs"]:
        for b, e in r["batches"].items():
            L.append(f"| {r['model']} | {b} | {r['threads']} | {e['torch_ms']['median']:.2f} | {e['tvm_ms']['median']:.2f} | "
                     f"{e['ratio_median']:.2f} | {e['torch_ms']['min']:.2f} | {e['tvm_ms']['min']:.2f} | {e['ratio_min']:.2f} | "
                     f"{e['runs']} | {e['rel_err']:.1e} |")
    L.append("\n## Compile\n")
    L.append("| model | import s | compile s | PrimFuncs by schedule rule |")
    L.append("|---|---|---|---|")
    for name, c in data["compile"].items():
        L.append(f"| {name} | {c['import_s']:.1f} | {c['compile_s']:.1f} | {c['primfuncs_by_rule']} |")
    L.append("\n## Per-op profile (1 thread; each kernel timed alone, min of repeats)\n")
    L.append("Kinds: conv = packed float convs with their fused epilogues (bias, time-embedding "
             "add, residual add); groupnorm(+silu) = GroupNorm with the SiLU fused; matmul = "
             "attention bmm and the time-embedding/ResBlock dense layers; layout = concat/split/"
             "transpose/reshape; runtime = `(vm overhead)` = end-to-end min minus the kernels "
             "(VM bookkeeping + colder caches inside a real forward + load noise).\n")
    for r in data["runs"]:
        for b, e in r["batches"].items():
            if "profile" not in e:
                continue
            p = e["profile"]
            L.append(f"### {r['model']}, batch {b}, {r['threads']} thread(s): kernels alone {p['kernel_ms']:.2f} ms, "
                     f"kernel sequence replayed without the VM {p['replay_ms']:.2f} ms, "
                     f"end-to-end min {p['plain_ms']:.2f} ms\n")
            tot = p["plain_ms"] or 1.0
            L.append("| kind | ms | % of end-to-end |")
            L.append("|---|---|---|")
            for k, ms in p["by_kind"]:
                L.append(f"| {k} | {ms:.3f} | {100 * ms / tot:.1f} |")
            L.append("")
            L.append("| function | ms | calls | % |")
            L.append("|---|---|---|---|")
            for n, ms, c in p["top"]:
                L.append(f"| `{n}` | {ms:.3f} | {c} | {100 * ms / tot:.1f} |")
            L.append("")
    path.write_text("\n".join(L) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist16", "ddim-cifar10"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=15, help="interleaved runs per config (at most)")
    ap.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a config after this long")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "float_path"))
    ap.add_argument("--no-profile", action="store_true")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return

    import torch
    import tvm

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    data = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
            "versions": {"torch": torch.__version__, "tvm": tvm.__version__},
            "load_start": _loadavg(), "compile": {}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            lib = os.path.join(tmp, f"{name}.so")
            print(f"[float_path] compiling {name} ...", flush=True)
            data["compile"][name] = compile_model(name, lib, args.max_batch)
            print(f"[float_path]   {data['compile'][name]}", flush=True)
            for th in args.threads:
                print(f"[float_path] {name}: {th} thread(s)", flush=True)
                r = run_worker(name, lib, th, args.batches, args.repeat, args.budget_s,
                               profile=(th == min(args.threads) and not args.no_profile), top=args.top)
                for b, e in r["batches"].items():
                    print(f"[float_path]   batch {b}: torch {e['torch_ms']['median']:.2f} ms, "
                          f"tvm {e['tvm_ms']['median']:.2f} ms (ratio {e['ratio_median']:.2f}, "
                          f"min-ratio {e['ratio_min']:.2f}), rel err {e['rel_err']:.1e}", flush=True)
                data["runs"].append(r)
    data["load_end"] = _loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    write_md(data, out.with_suffix(".md"))
    print(f"[float_path] wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
