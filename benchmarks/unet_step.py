"""Whole-UNet step: compiled bqc (``--backend tvm-x86``) vs PyTorch FP32 eager.

Usage::

    python benchmarks/unet_step.py --threads 1            # mnist16 + ddim-cifar10, bidm + binarydm
    python benchmarks/unet_step.py --threads 2            # same, 2 threads (separate worker processes)
    python benchmarks/unet_step.py --models mnist16 --recipes bidm --threads 1,2

For every (model, recipe): ``bqc transform MODEL --recipe RECIPE`` (a freshly transformed
artifact: the compiled code path, hence the speed, does not depend on training; the lowering
calibrates its activation quantizers on one random batch), ``bqc lower --backend tvm-x86
--batch B --calibrate random`` (B = 16 for mnist16, 4 for ddim-cifar10 unless ``--batch MODEL=B``), then, for every
thread count ``T``, a fresh worker process (TVM fixes its thread pool size when it starts) with
``TVM_NUM_THREADS=T``, ``OMP_NUM_THREADS=T`` and ``torch.set_num_threads(T)`` times one UNet
step (``eps = model(x, t)`` at the compiled batch) of

* ``bqc``: the compiled library through the Relax VM (``load_compiled(dir).vm["main"]``), and
* ``torch``: the artifact's FP32 teacher (``Artifact.teacher()``), eager, ``torch.no_grad``,

interleaved (``--rounds`` rounds; in each, ``--block`` consecutive calls of one side, then of the
other, all but the first of each block timed: a sampler calls the step back to back, and the
first call after a switch pays for the other runtime's still-spinning worker threads and its
weights in L2), each call timed by wall clock and by process CPU time. Reported: wall-clock median and minimum, CPU-time median, and the
ratios ``torch / bqc`` of each. The machine may be shared: the 1-minute load average is recorded
before and after each worker; at T = 1 the CPU-time ratio is the undisturbed comparison (both
sides run on the calling thread), at T > 1 only a quiet machine gives meaningful numbers.
Each worker also records the per-op profile of the compiled step
(:func:`bqc.backends.tvm.profile.profile_vm_detailed`, grouped by :func:`op_kind`).

Artifacts and libraries are cached under ``--work`` (rebuilt with ``--rebuild``). Results are
merged into ``benchmarks/results/unet_step.json`` (keyed by model/recipe/threads, so the T = 1
and T = 2 runs can be separate invocations) and ``unet_step.md`` is regenerated from it, with
the command lines that produced the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_BATCH = {"mnist16": 16, "ddim-cifar10": 4}
#: consecutive calls of one side per round (the first untimed)
BLOCK = 3


# ------------------------------------------------------------------------------------ worker
def _worker(lib_dir: str, threads: int, rounds: int, warmup: int, profile: bool, block: int = BLOCK) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import tvm

    from bqc.backends.runtime import load_compiled
    from bqc.backends.tvm.lower import step_inputs
    from bqc.teacher import resolve_teacher

    model = load_compiled(lib_dir)
    man = json.loads((Path(lib_dir) / "manifest.json").read_text())
    b = model.batch
    x, t, y, args = step_inputs(model)
    vm_main = model.vm["main"]
    teacher = resolve_teacher(man)[0].eval()  # the zoo model, by the name the bundle records
    for p in teacher.parameters():
        p.requires_grad_(False)

    def run_bqc():
        vm_main(*args)

    def run_torch():
        with torch.no_grad():
            teacher(x, t, y)

    fns = {"bqc": run_bqc, "torch": run_torch}
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    # each round runs `block` steps of one side, then of the other, and times all but the
    # first: a sampler calls the model step after step, and the first call after a switch
    # pays for the other runtime (its worker threads still spinning on the other core,
    # torch's weights having evicted bqc's from L2 and the reverse)
    for _ in range(rounds):
        for k, f in fns.items():
            for i in range(block):
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                if i:
                    wall[k].append((time.perf_counter() - t0) * 1e3)
                    cpu[k].append((time.process_time() - c0) * 1e3)
    res = {"threads": threads, "tvm_threads": int(tvm.get_global_func("runtime.NumThreads")()),
           "torch_threads": torch.get_num_threads(), "batch": b, "rounds": rounds, "block": block}
    for k in fns:
        res[f"{k}_wall_median_ms"] = float(np.median(wall[k]))
        res[f"{k}_wall_min_ms"] = float(np.min(wall[k]))
        res[f"{k}_cpu_median_ms"] = float(np.median(cpu[k]))
    for m in ("wall_median", "wall_min", "cpu_median"):
        res[f"speedup_{m}"] = res[f"torch_{m}_ms"] / res[f"bqc_{m}_ms"]
    n_fp = sum(p.numel() for p in teacher.parameters())
    res["fp32_size_mb"] = 4 * n_fp / 2**20
    res["bqc_size_mb"] = man["sizes"]["total_bytes"] / 2**20
    if profile:
        from bqc.backends.tvm.profile import OVERHEAD, op_kind, profile_vm_detailed

        d = profile_vm_detailed(model.lib, args, repeat=3)
        rows = d["functions"]
        kinds: dict[str, float] = {}
        for n, ms, _c in rows:
            kinds[op_kind(n) if n != OVERHEAD else "(vm overhead)"] = kinds.get(
                op_kind(n) if n != OVERHEAD else "(vm overhead)", 0.0) + ms
        res["profile"] = {
            "plain_ms": d["plain_ms"], "kernel_ms": d["kernel_ms"], "replay_ms": d["replay_ms"],
            "by_kind": sorted(([k, round(v, 3)] for k, v in kinds.items()), key=lambda r: -r[1]),
            "top": [[n, round(ms, 3), c] for n, ms, c in rows[:30]],
            "calls": sum(c for _n, _ms, c in rows),
        }
    return res


# ------------------------------------------------------------------------------------ driver
def _run(cmd: list[str], log) -> None:
    log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def _bqc() -> list[str]:
    return [sys.executable, "-m", "bqc.cli"] if not _which("bqc") else ["bqc"]


def _which(name: str) -> bool:
    from shutil import which

    return which(name) is not None


def _as_trained(art: Path) -> None:
    """Put a fresh artifact's EBB layers in the stage training ends in (s2 dropped, one basis),
    so recipes with an EBB stage switch are timed as they deploy, not with stage 1's two bases."""
    from bqc import artifact
    from bqc.pipeline import ebb_switch_at
    from bqc.quant.training import ebb_modules, switch_ebb_to_stage2

    a = artifact.load_artifact(art)
    if ebb_switch_at(a.recipe.train) is None or not ebb_modules(a.gm):
        return
    switch_ebb_to_stage2(a.gm)
    artifact.save_artifact(art, base_ep=a.base_ep, gm=a.gm, recipe=a.recipe, wbits=a.manifest["wbits"],
                           abits=a.manifest["abits"], source=a.manifest["source"])


def build(model: str, recipe: str, batch: int, work: Path, rebuild: bool, log) -> tuple[Path, float | None]:
    art = work / "art" / f"{model}-{recipe}"
    lib = work / "lib" / f"{model}-{recipe}-b{batch}"
    if rebuild or not (art / "bqc.json").exists():
        _run(_bqc() + ["transform", model, "--recipe", recipe, "-o", str(art)], log)
        _as_trained(art)
    lower_s = None
    if rebuild or not (lib / "manifest.json").exists():
        t0 = time.perf_counter()
        _run(_bqc() + ["lower", str(art), "--backend", "tvm-x86", "-o", str(lib), "--batch", str(batch),
                      "--calibrate", "random"], log)
        lower_s = time.perf_counter() - t0
    return lib, lower_s


def measure(lib: Path, threads: int, rounds: int, warmup: int, profile: bool, block: int = BLOCK) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", str(lib), "--threads", str(threads), "--rounds", str(rounds),
           "--warmup", str(warmup), "--block", str(block)] + ([] if profile else ["--no-profile"])
    load0 = os.getloadavg()[0]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    load1 = os.getloadavg()[0]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["load_before"], res["load_after"] = round(load0, 2), round(load1, 2)
    return res


def _fmt_md(data: dict) -> str:
    lines = ["# Whole-UNet step: bqc tvm-x86 vs PyTorch FP32 eager", ""]
    cmds = sorted({e["command"] for e in data["entries"].values()})
    lines.append("Commands (column `cmd`):")
    lines.append("")
    for i, c in enumerate(cmds, 1):
        lines.append(f"{i}. `{c}`")
    lines.append("")
    lines.append(f"Machine: {data.get('machine', '?')}. Freshly transformed artifacts (random-batch "
                 "calibration; the compiled code path does not depend on training), EBB layers put in the stage "
                 "training ends in (one basis; binarydm rows before 2026-11-22 02:10 were timed in stage 1 and "
                 "were re-measured). One step = "
                 "`eps = model(x, t)` at the compiled batch; each side timed in the same worker "
                 "process, interleaved (rows with a `block` in the JSON, from 2026-12-05 04:30: blocks of "
                 "that many back-to-back calls per side, the first untimed; before: one call per side "
                 "in turn, which at T = 2 made each side pay for the other's spinning threads). Speedup = torch / bqc: wall-clock median / wall-clock min / "
                 "process CPU-time median (the undisturbed one at T = 1 on a shared machine).")
    lines.append("")
    lines.append("| model | recipe | batch | T | bqc ms (median / min / cpu) | torch FP32 ms (median / min / cpu) "
                 "| speedup | load avg (before -> after) | bqc MiB | FP32 MiB | lowering s | cmd | when |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted(data["entries"], key=lambda k: (data["entries"][k]["model"], data["entries"][k]["recipe"],
                                                   data["entries"][k]["threads"]))
    disturbed = []
    for k in keys:
        e = data["entries"][k]
        r = e["result"]
        one = data["entries"].get(f"{e['model']}/{e['recipe']}/t1")
        flag = ""
        if r["threads"] > 1 and one and r["torch_wall_median_ms"] > one["result"]["torch_wall_median_ms"]:
            flag = " (disturbed)"
            disturbed.append(k)
        lines.append(
            f"| {e['model']} | {e['recipe']} | {r['batch']} | {r['threads']}{flag} | "
            f"{r['bqc_wall_median_ms']:.2f} / {r['bqc_wall_min_ms']:.2f} / {r['bqc_cpu_median_ms']:.2f} | "
            f"{r['torch_wall_median_ms']:.2f} / {r['torch_wall_min_ms']:.2f} / {r['torch_cpu_median_ms']:.2f} | "
            f"**{r['speedup_wall_median']:.2f}x** / {r['speedup_wall_min']:.2f}x / {r['speedup_cpu_median']:.2f}x | "
            f"{r['load_before']} -> {r['load_after']} | {r['bqc_size_mb']:.2f} | {r['fp32_size_mb']:.2f} | "
            f"{e.get('lower_s') or '-'} | {cmds.index(e['command']) + 1} | {e.get('time', '')} |")
    lines.append("")
    if disturbed:
        lines.append("**(disturbed)**: torch FP32 at T > 1 was slower than at T = 1 in that run: its threads "
                     "waited for a core held by another job (the machine has 2 cores), so that row's "
                     "times and ratio say nothing about T-thread performance; re-run on a quiet machine.")
        lines.append("")
    lines.append("## Where the compiled step's time goes (per-op profile, ms per step)")
    lines.append("")
    lines.append("`profile_vm_detailed`: each distinct kernel call timed alone (hot caches, minimum of 3), "
                 "summed over its calls; `(vm overhead)` = end-to-end minimum minus the kernel sum "
                 "(VM bookkeeping plus the cold-cache cost of running inside a whole step).")
    lines.append("")
    for k in keys:
        e = data["entries"][k]
        p = e["result"].get("profile")
        if not p:
            continue
        kinds = ", ".join(f"{n} {ms:.1f}" for n, ms in p["by_kind"])
        lines.append(f"* **{e['model']} {e['recipe']} T={e['result']['threads']}**: end-to-end min "
                     f"{p['plain_ms']:.1f}, kernels {p['kernel_ms']:.1f} ({p['calls']} calls); by kind: {kinds}.")
        top = "; ".join(f"`{n}` {ms:.2f} (x{c})" for n, ms, c in p["top"][:8])
        lines.append(f"  Top: {top}.")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mnist16,ddim-cifar10")
    ap.add_argument("--recipes", default="bidm,binarydm")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts (one worker process each)")
    ap.add_argument("--batch", action="append", default=[], help="MODEL=B (default mnist16=16, ddim-cifar10=4)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block", type=int, default=BLOCK, help="consecutive calls of one side per round (first untimed)")
    ap.add_argument("--work", default="/tmp/bqc_unet_step")
    ap.add_argument("--out", default=str(RESULTS / "unet_step"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--md-only", action="store_true", help="only regenerate the .md from the .json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.md_only:
        out = Path(a.out)
        out.with_suffix(".md").write_text(_fmt_md(json.loads(out.with_suffix(".json").read_text())))
        return 0
    if a.worker:
        res = _worker(a.worker, int(a.threads), a.rounds, a.warmup, not a.no_profile, a.block)
        print(json.dumps(res))
        return 0
    batches = dict(DEFAULT_BATCH)
    for kv in a.batch:
        m, b = kv.split("=")
        batches[m] = int(b)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath = out.with_suffix(".json")
    data = json.loads(jpath.read_text()) if jpath.exists() else {"entries": {}}
    import torch
    import tvm

    data["machine"] = (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch "
                       f"{torch.__version__}, TVM {tvm.__version__}").replace("  ", " ")
    command = "python benchmarks/unet_step.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    log = open(work / "build.log", "a")
    for model in a.models.split(","):
        for recipe in a.recipes.split(","):
            lib, lower_s = build(model, recipe, batches.get(model, 4), work, a.rebuild, log)
            for th in [int(v) for v in a.threads.split(",")]:
                res = measure(lib, th, a.rounds, a.warmup, not a.no_profile, a.block)
                key = f"{model}/{recipe}/t{th}"
                prev = data["entries"].get(key, {})
                data["entries"][key] = {"model": model, "recipe": recipe, "threads": th, "command": command,
                                        "lower_s": round(lower_s, 1) if lower_s else prev.get("lower_s"),
                                        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "result": res}
                print(f"{key}: bqc {res['bqc_wall_median_ms']:.2f} ms, torch {res['torch_wall_median_ms']:.2f} ms, "
                      f"speedup {res['speedup_wall_median']:.2f}x (cpu {res['speedup_cpu_median']:.2f}x), "
                      f"load {res['load_before']} -> {res['load_after']}", flush=True)
                jpath.write_text(json.dumps(data, indent=1))
                out.with_suffix(".md").write_text(_fmt_md(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
