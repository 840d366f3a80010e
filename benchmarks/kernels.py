"""Per-layer kernel timings: bqc W1A1 / W1A4 TVM kernels vs torch FP32 (oneDNN) and torch int8.

Usage::

    python benchmarks/kernels.py                    # all shapes, T = 1 and 2 threads
    python benchmarks/kernels.py --models ddim-cifar10 --threads 1 --rounds 5
    python benchmarks/kernels.py --routes --threads 1   # CPU targets / kernel routes side by side

Layers: the 3x3 stride-1 pad-1 convs of the ``ddim-cifar10`` UNet (128 ch at 32x32, 256 ch at
16x16 / 8x8 / 4x4) and of ``ldm4-bedrooms`` (224 / 448 / 672 / 896 ch at 64 / 32 / 16 / 8),
batch 1. For every thread count ``T`` a worker process runs with ``torch.set_num_threads(T)``
and ``TVM_NUM_THREADS=T`` and TVM kernels built for
``Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": T})``. Implementations:

* ``torch_fp32``: ``torch.conv2d`` float32 (oneDNN), the baseline of every ratio.
* ``torch_int8``: ``torch.ao.nn.quantized.Conv2d`` (x86/fbgemm engine), when available.
* ``w1a1``: bqc XNOR-popcount conv (Harley-Seal micro-kernel), packed input -> int32 NHWC.
* ``w1a1_simple``: the same with the plain popcount schedule (the first simple schedule).
* ``w1a4``: bqc int8-route conv (AVX-512 VNNI ``vpdpbusd``) with 4-bit codes, +-1 weights.
* ``bitpack``: the fused float NCHW -> packed bits kernel for the layer's input (the cost of
  binarizing the activation, to add to ``w1a1`` when the producer is a float op).
* ``w1a1_vpopcnt`` (informational, only if the host CPU has AVX-512 VPOPCNTDQ): the W1A1 conv
  built for ``mcpu=icelake-server`` (``microkernel="auto"`` picks the plain ``vpopcntd``
  schedule there). Not the Cascade Lake target; shows what a newer x86 target gets.

Timing: ``--rounds`` interleaved rounds; in each round every implementation runs about
``--round-ms`` of back-to-back calls (after a warm-up call), each call timed on its own, wall
clock and process CPU time. We report per-call wall-clock minimum and median and CPU-time
median, and ratios ``torch_fp32 / impl`` for each. The machine is shared (2 cores, other
jobs), so the load average is recorded too: the wall-clock minimum and the CPU time (for
T=1) are the undisturbed estimates; medians include time the process was descheduled.
Every bqc kernel output is checked against the numpy reference once per layer.

Writes ``benchmarks/results/kernels.json`` and ``kernels.md`` (with the command line).

``--routes`` compares the kernel routes of several x86 targets (``--cpus``, default
x86-64-v3 / x86-64-v4 / cascadelake / znver4: Harley-Seal vs native ``vpopcntd``, AVX2 vs
AVX-512 BW vs VNNI for W1A4) in one run on this machine, 1 thread, against torch FP32 with
oneDNN's full ISA and capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, a second worker); writes
``kernel_routes.json`` / ``kernel_routes.md``. Targets whose features this CPU lacks are listed,
not run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this directory is on sys.path when run as a script)

MODELS = {
    "ddim-cifar10": [(128, 32), (256, 16), (256, 8), (256, 4)],
    "ldm4-bedrooms": [(224, 64), (448, 32), (672, 16), (896, 8)],
}
IMPLS = ["torch_fp32", "torch_int8", "w1a1", "w1a1_simple", "w1a4", "bitpack", "w1a1_vpopcnt"]
ROUTE_CPUS = ["x86-64-v3", "x86-64-v4", "cascadelake", "znver4"]  # --routes: one target per x86 route


def _host_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:  # pragma: no cover
        return False
RESULTS = Path(__file__).resolve().parent / "results"


def _loadavg() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:  # pragma: no cover
        return float("nan")


def time_calls(fns: dict, args) -> dict:
    """Time every ``fns[name]()`` in ``args.rounds`` interleaved rounds of about ``args.round_ms``
    of calls each, every call timed on its own (wall clock and process CPU time), so a call that
    was descheduled by another job only spoils its own sample. Returns ``ms`` (median),
    ``ms_min``, ``cpu_ms`` (median) per name, the ratios ``torch_fp32 / name`` of each
    (``speedup``, ``speedup_min``, ``speedup_cpu``; when ``torch_fp32`` is timed) and the load
    average before / after."""
    import numpy as np

    number = {}
    for name, f in fns.items():
        for _ in range(2):
            f()
        t = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t, 1e-6)
        number[name] = int(min(max(args.round_ms / 1e3 / dt, 2), 100))
    samples = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    load0 = _loadavg()
    for _ in range(args.rounds):
        for name, f in fns.items():
            f()
            for _ in range(number[name]):
                c0 = time.process_time()
                t = time.perf_counter()
                f()
                samples[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c0)
    row = {"loadavg": [load0, _loadavg()], "ms": {}, "ms_min": {}, "cpu_ms": {}}
    for name, v in samples.items():
        row["ms"][name] = float(np.median(v) * 1e3)
        row["ms_min"][name] = float(np.min(v) * 1e3)
        row["cpu_ms"][name] = float(np.median(cpu[name]) * 1e3)
    if "torch_fp32" in fns:
        for key, sp in (("ms", "speedup"), ("ms_min", "speedup_min"), ("cpu_ms", "speedup_cpu")):
            base = row[key]["torch_fp32"]
            row[sp] = {nm: base / v for nm, v in row[key].items() if nm != "torch_fp32"}
    return row


def worker(args) -> dict:
    """Run in a subprocess with TVM_NUM_THREADS set: time every layer at one thread count."""
    import numpy as np
    import torch

    from bqc import packing as P
    from bqc.backends.tvm import kernels as K
    from bqc.backends.hostcpu import missing_features
    from bqc.backends.tvm.target import required_features, x86_target

    T = args.threads[0]
    torch.set_num_threads(T)
    target = x86_target(T)
    rng = np.random.default_rng(0)
    out = []
    for model in args.models:
        for (c, hw) in MODELS[model]:
            if args.max_channels and c > args.max_channels:
                continue
            n, oc, k, s, p = 1, c, 3, 1, 1
            x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
            w = rng.standard_normal((oc, c, k, k)).astype(np.float32)
            xb, wb = P.pack_activations(x), P.pack_conv_weights(w)
            b_args = (xb, P.block_oc(wb), P.conv_base_table(wb, c, hw, hw, s, p))
            q = rng.integers(-8, 8, (n, c, hw, hw))
            ws = P.sign(w)
            q_args = (P.pack_codes(q), P.block_oc_int8(ws), P.int8_bias(ws))
            tau = np.zeros(c, np.float32)

            t0 = time.time()
            kb = K.build_binary_conv2d(n, c, oc, hw, hw, k, s, p, target=target)
            kb_simple = K.build_binary_conv2d(n, c, oc, hw, hw, k, s, p, target=target, microkernel="popcount")
            kq = K.build_w1ak_conv2d(n, c, oc, hw, hw, k, s, p, target=target)
            kp = K.build_bitpack(n, c, hw, hw, target=target)
            kv = None
            if not missing_features(required_features(x86_target(T, mcpu="icelake-server"))):
                kv = K.build_binary_conv2d(n, c, oc, hw, hw, k, s, p, target=x86_target(T, mcpu="icelake-server"))
            build_s = time.time() - t0
            # correctness, once per layer
            ref_b = P.ref_binary_conv2d(xb, wb, c, s, p)
            ok = bool(np.array_equal(kb(*b_args), ref_b) and np.array_equal(kb_simple(*b_args), ref_b)
                      and np.array_equal(kq(*q_args), P.ref_w1ak_conv2d(q, w, s, p))
                      and np.array_equal(kp(x, tau), xb)
                      and (kv is None or np.array_equal(kv(*b_args), ref_b)))

            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            fns = {}

            def torch_fp32():
                with torch.no_grad():
                    torch.conv2d(xt, wt, stride=s, padding=p)
            fns["torch_fp32"] = torch_fp32
            try:
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    xq = torch.quantize_per_tensor(xt, 0.05, 128, torch.quint8)
                    qconv = torch.ao.nn.quantized.Conv2d(c, oc, k, stride=s, padding=p)
                    qconv.set_weight_bias(torch.quantize_per_tensor(wt, 0.02, 0, torch.qint8), None)
                    qconv(xq)

                def torch_int8():
                    qconv(xq)
                fns["torch_int8"] = torch_int8
            except Exception:  # pragma: no cover - torch built without quantized engines
                pass

            def tvm_fn(kern, kargs):
                ka, ko = kern._args(kargs)
                f = kern._fn
                return lambda: f(*ka, ko)
            fns["w1a1"] = tvm_fn(kb, b_args)
            fns["w1a1_simple"] = tvm_fn(kb_simple, b_args)
            fns["w1a4"] = tvm_fn(kq, q_args)
            fns["bitpack"] = tvm_fn(kp, (x, tau))
            if kv is not None:
                fns["w1a1_vpopcnt"] = tvm_fn(kv, b_args)

            row = {"model": model, "layer": f"conv3x3 {c}->{oc} @{hw}x{hw}", "channels": c, "hw": hw,
                   "threads": T, "exact": ok, "build_s": round(build_s, 2), **time_calls(fns, args)}
            out.append(row)
            print(f"[T={T}] {model:14s} {row['layer']:28s} exact={ok} fp32 {row['ms']['torch_fp32']:8.3f} ms | "
                  + " ".join(f"{nm} x{row['speedup'][nm]:.2f}/{row['speedup_min'][nm]:.2f}"
                             f"/{row['speedup_cpu'][nm]:.2f}" for nm in row["speedup"]),
                  file=sys.stderr, flush=True)
    return {"threads": T, "rows": out}


def _layers(args):
    for model in args.models:
        for (c, hw) in MODELS[model]:
            if not (args.max_channels and c > args.max_channels):
                yield model, c, hw


def routes_worker(args) -> dict:
    """``--routes``: per layer, torch FP32 and bqc's W1A1 / W1A4 conv built for each ``--cpus``
    target with that target's kernel routes (:data:`bqc.backends.tvm.target.KERNEL_ROUTES`), and
    on VPOPCNTDQ targets also the Harley-Seal network (``w1a1_hs``) for a side-by-side
    comparison. Targets this CPU cannot run are listed, not timed. One thread."""
    import numpy as np
    import torch

    from bqc import packing as P
    from bqc.backends.hostcpu import missing_features
    from bqc.backends.tvm import kernels as K
    from bqc.backends.tvm.target import kernel_routes, required_features, x86_target

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    targets, skipped = {}, {}
    for cpu in args.cpus:
        t = x86_target(1, mcpu=cpu)
        lacking = missing_features(required_features(t))
        if lacking:
            skipped[cpu] = lacking
        else:
            targets[cpu] = t
    rows = []
    for model, c, hw in _layers(args):
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
        xb, wb = P.pack_activations(x), P.pack_conv_weights(w)
        b_args = (xb, P.block_oc(wb), P.conv_base_table(wb, c, hw, hw, 1, 1))
        q = rng.integers(-8, 8, (1, c, hw, hw))
        ws = P.sign(w)
        q_args = (P.pack_codes(q), P.block_oc_int8(ws), P.int8_bias(ws))
        ref_b, ref_q = P.ref_binary_conv2d(xb, wb, c, 1, 1), P.ref_w1ak_conv2d(q, w, 1, 1)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)

        def torch_fp32():
            with torch.no_grad():
                torch.conv2d(xt, wt, padding=1)
        fns, exact, routes = {"torch_fp32": torch_fp32}, {}, {}

        def tvm_fn(kern, kargs):
            ka, ko = kern._args(kargs)
            return lambda: kern._fn(*ka, ko)
        for cpu, t in targets.items():
            routes[cpu] = kernel_routes(t)
            kerns = {"w1a1": (K.build_binary_conv2d(1, c, c, hw, hw, 3, 1, 1, target=t), b_args, ref_b),
                     "w1a4": (K.build_w1ak_conv2d(1, c, c, hw, hw, 3, 1, 1, target=t), q_args, ref_q)}
            if routes[cpu]["w1a1"] == "vpopcnt":
                kerns["w1a1_hs"] = (K.build_binary_conv2d(1, c, c, hw, hw, 3, 1, 1, target=t,
                                                          microkernel="harley-seal"), b_args, ref_b)
            for impl, (kern, kargs, ref) in kerns.items():
                exact[f"{cpu}/{impl}"] = bool(np.array_equal(kern(*kargs), ref))
                fns[f"{cpu}/{impl}"] = tvm_fn(kern, kargs)
        row = {"model": model, "layer": f"conv3x3 {c}->{c} @{hw}x{hw}", "routes": routes, "exact": exact,
               **time_calls(fns, args)}
        rows.append(row)
        print(f"[routes] {model:14s} {row['layer']:28s} fp32 {row['ms_min']['torch_fp32']:.3f} ms | "
              + " ".join(f"{nm} {row['ms_min'][nm]:.3f}" for nm in fns if nm != "torch_fp32"),
              file=sys.stderr, flush=True)
    return {"rows": rows, "skipped": skipped, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def routes_markdown(result: dict) -> str:
    """kernel_routes.md: one row per (layer, target): routes, ms, speedups over torch FP32 with
    oneDNN's full ISA and capped at AVX2 (the baseline an AVX2-only machine would have)."""
    avx2 = {r["layer"]: r for r in result["torch_avx2"]["rows"]}
    lines = [
        "# bqc kernels per CPU target and kernel route (per-layer conv3x3, batch 1, 1 thread)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; host ISA: {', '.join(result['host_isa'])}; torch {result['torch']}, "
        f"TVM {result['tvm']}; {result['date']}. Load average during the run: {result['loadavg'][0]:.1f} -> "
        f"{result['loadavg'][1]:.1f} on {result['cpus']} cores (shared with training jobs: read the CPU-time "
        "column; wall-clock minimum in the JSON).",
        "",
        "Every kernel is built for the named target (`x86_target(1, NAME)`) and run on this machine, "
        "so all targets are compared on the same cores; the routes are what "
        "`bqc.backends.tvm.target.KERNEL_ROUTES` picks for that target. `w1a1`: packed bits -> "
        "int32 (route `vpopcnt` = one `vpopcntd` per 16 lanes, `harley-seal` = carry-save network); "
        "`w1a1 HS` on VPOPCNTDQ targets: the Harley-Seal network forced, for comparison. `w1a4`: "
        "4-bit codes x +-1 weights (route `vnni` = `vpdpbusd`, `avx512bw` / `avx2` = "
        "`vpmaddubsw` + `vpmaddwd`). torch FP32 is oneDNN with its full ISA (AVX-512 here) and, "
        "in a second process, with `ONEDNN_MAX_CPU_ISA=AVX2` (what an AVX2-only machine runs). "
        "Times: process CPU time, median ms per call; speedup = torch / kernel.",
        "",
    ]
    if result["skipped"]:
        lines += ["Not run (this CPU lacks their features): " + "; ".join(
            f"{cpu} ({', '.join(f)})" for cpu, f in result["skipped"].items()), ""]
    lines += ["| layer | target | torch fp32 | torch fp32 AVX2 | w1a1 route | w1a1 | speedup (fp32 / AVX2) | "
              "w1a1 HS | w1a4 route | w1a4 | speedup (fp32 / AVX2) | exact |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        fp = row["cpu_ms"]["torch_fp32"]
        fa = avx2[row["layer"]]["cpu_ms"]["torch_fp32"] if row["layer"] in avx2 else float("nan")
        for cpu, routes in row["routes"].items():
            ms = {impl: row["cpu_ms"].get(f"{cpu}/{impl}") for impl in ("w1a1", "w1a1_hs", "w1a4")}
            ok = all(v for k, v in row["exact"].items() if k.startswith(cpu + "/"))
            hs = f"{ms['w1a1_hs']:.3f}" if ms["w1a1_hs"] else "-"
            lines.append(
                f"| {row['layer']} | {cpu} | {fp:.3f} | {fa:.3f} | {routes['w1a1']} | {ms['w1a1']:.3f} | "
                f"{fp / ms['w1a1']:.1f}x / {fa / ms['w1a1']:.1f}x | {hs} | {routes['w1ak']} | {ms['w1a4']:.3f} | "
                f"{fp / ms['w1a4']:.1f}x / {fa / ms['w1a4']:.1f}x | {'yes' if ok else 'NO'} |")
    lines.append("")
    return "\n".join(lines)


def run_routes(args, command: str) -> int:
    """``--routes``: the routes worker (1 thread), then torch alone with oneDNN capped at AVX2;
    writes ``kernel_routes.json`` / ``.md``."""
    import platform as _pf

    env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    base = [sys.executable, str(Path(__file__).resolve()), "--routes-worker", "--rounds", str(args.rounds),
            "--round-ms", str(args.round_ms), "--max-channels", str(args.max_channels), "--models", *args.models]
    load0 = _loadavg()
    parts = []
    for cpus, extra in ((args.cpus, {}), ([], {"ONEDNN_MAX_CPU_ISA": "AVX2"})):
        proc = subprocess.run(base + ["--cpus", *cpus], env=dict(env, **extra), stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"routes worker failed with code {proc.returncode}")
        parts.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import torch
    import tvm

    result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": f"{_pf.machine()} {cpu_model()}, {os.cpu_count()} cpus", "cpus": os.cpu_count(),
              "host_isa": _host_isa(), "torch": torch.__version__, "tvm": tvm.__version__,
              "loadavg": [load0, _loadavg()], "rows": parts[0]["rows"], "skipped": parts[0]["skipped"],
              "torch_avx2": parts[1]}
    return _write_result(args.out, "kernel_routes", result, routes_markdown(result))


def _write_result(out: Path, stem: str, result: dict, md: str) -> int:
    """Write ``OUT/STEM.json`` and ``OUT/STEM.md`` and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


def markdown(result: dict) -> str:
    lines = [
        "# bqc kernel benchmark (per-layer, batch 1)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; TVM target `{result['target']}`; torch {result['torch']}, "
        f"TVM {result['tvm']}; {result['date']}. Load average during the run: "
        f"{result['loadavg'][0]:.1f} -> {result['loadavg'][1]:.1f} on 2 cores (shared with other "
        "jobs, so wall-clock medians are disturbed). torch workers ran with "
        f"OMP_WAIT_POLICY={result.get('omp_wait_policy', 'default')}. A T>1 row whose torch FP32 "
        "time is worse than at T=1 is marked disturbed and left out of the means: its threads "
        "were waiting for cores held by other jobs.",
        "",
        "Times: wall-clock ms per call, **minimum** over all timed calls (median in the JSON). "
        "Speedup = torch FP32 / kernel, three ways: wall-clock min / wall-clock median / "
        "process CPU time (median; immune to being descheduled, meaningful for T=1). "
        "`w1a1`: packed bits in -> exact int32 out (Harley-Seal popcount micro-kernel); "
        "`w1a1 simple`: plain popcount schedule; `w1a4`: uint8 4-bit codes x +-1 in -> int32 out "
        "(AVX-512 VNNI); `bitpack`: float NCHW -> packed bits of the layer input (add it to "
        "`w1a1` when the producer is a float op). `exact`: every bqc output equals the numpy "
        "reference.",
        "",
    ]
    isa = result.get("host_isa") or _host_isa()
    lines += [f"Host ISA: {', '.join(isa)}. The bqc kernels are compiled for `mcpu=cascadelake` "
              "(AVX-512BW + VNNI; no VPOPCNTDQ, no AMX) whatever the host. torch FP32 runs oneDNN's "
              "AVX-512 FMA kernels; torch int8 runs oneDNN too, which on a host with `amx_int8` "
              "dispatches to AMX tile instructions (a Cascade Lake has none), so `torch int8` is "
              "not a same-ISA comparison here.", ""]
    if max(result["loadavg"]) >= int(result.get("cpus") or os.cpu_count() or 1):
        lines += ["**The machine was overloaded during this run**: read the T=1 CPU-time speedups "
                  "(third number) as the kernel comparison; T=1 wall-clock times of the long "
                  "(ldm) torch calls include preemption, and T=2 rows are not meaningful.", ""]
    lines += [
        "| model | layer | T | torch fp32 | torch int8 | w1a1 | w1a1 simple | w1a4 | bitpack | "
        "W1A1 speedup | W1A4 speedup | exact | w1a1 icelake-server (info) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, nm):
        return f"{row['ms_min'][nm]:.3f}" if nm in row["ms_min"] else "n/a"

    def sp(row, nm):
        if nm not in row["speedup"]:
            return "n/a"
        return (f"{row['speedup_min'][nm]:.1f}x / {row['speedup'][nm]:.1f}x / "
                f"{row['speedup_cpu'][nm]:.1f}x")

    for part in result["runs"]:
        for row in part["rows"]:
            lines.append(
                f"| {row['model']} | {row['layer']} | {row['threads']} | {cell(row, 'torch_fp32')} | "
                f"{cell(row, 'torch_int8')} | {cell(row, 'w1a1')} | {cell(row, 'w1a1_simple')} | "
                f"{cell(row, 'w1a4')} | {cell(row, 'bitpack')} | {sp(row, 'w1a1')} | {sp(row, 'w1a4')} | "
                f"{'yes' if row['exact'] else 'NO'}{' (torch T>1 disturbed)' if row.get('disturbed') else ''} | "
                + (f"{cell(row, 'w1a1_vpopcnt')} ms, {sp(row, 'w1a1_vpopcnt')} |"
                   if "w1a1_vpopcnt" in row["ms"] else "n/a |"))
    lines.append("")
    import statistics
    ncpu = int(result.get("cpus") or os.cpu_count() or 1)
    overloaded = max(result["loadavg"]) >= ncpu
    for part in result["runs"]:
        rows = [r for r in part["rows"] if not r.get("disturbed")]
        if part["threads"] > 1 and overloaded:
            lines.append(f"- T={part['threads']}: no summary: the load average ({max(result['loadavg']):.1f}) "
                         f"was at or above the {ncpu} cores, so {part['threads']}-thread runs of both torch and "
                         "bqc mostly waited for cores (the per-row numbers are kept for the record only).")
            continue
        if not rows:
            lines.append(f"- T={part['threads']}: every row disturbed, no mean.")
            continue

        def g(key, nm):
            return statistics.geometric_mean([r[key][nm] for r in rows])
        lines.append(
            f"- T={part['threads']}: geometric-mean speedup over torch FP32 over {len(rows)} undisturbed "
            "layers (wall min / wall median / cpu): "
            f"W1A1 {g('speedup_min', 'w1a1'):.1f}x / {g('speedup', 'w1a1'):.1f}x / {g('speedup_cpu', 'w1a1'):.1f}x; "
            f"W1A4 {g('speedup_min', 'w1a4'):.1f}x / {g('speedup', 'w1a4'):.1f}x / {g('speedup_cpu', 'w1a4'):.1f}x.")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--round-ms", type=float, default=30.0, help="work per implementation per round")
    ap.add_argument("--max-channels", type=int, default=0, help="skip layers wider than this (0: none)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                    help="OMP_WAIT_POLICY of the torch workers (PASSIVE: on a shared, loaded machine the "
                         "default spin-then-sleep policy makes 2-thread torch convs 20-40x slower)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--routes", action="store_true",
                    help="compare kernel routes across CPU targets (--cpus) in one run on this machine, 1 thread; "
                         "writes kernel_routes.json/.md")
    ap.add_argument("--cpus", nargs="*", default=ROUTE_CPUS, help="--routes: the x86 targets to compare")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--routes-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite kernels.md from an existing kernels.json (no measurement)")
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.routes_worker:
        print(json.dumps(routes_worker(args)))
        return 0
    if args.markdown_only:
        result = json.loads((args.out / "kernels.json").read_text())
        (args.out / "kernels.md").write_text(markdown(result))
        return 0

    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.routes:
        return run_routes(args, command.strip())
    runs = []
    load0 = _loadavg()
    for T in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(T), OMP_NUM_THREADS=str(T), MKL_NUM_THREADS=str(T))
        if args.omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(T),
               "--rounds", str(args.rounds), "--round-ms", str(args.round_ms),
               "--max-channels", str(args.max_channels), "--models", *args.models]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker for T={T} failed with code {proc.returncode}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # A multi-thread torch baseline slower than the 1-thread one means the run was disturbed
    # (threads waiting for a core held by another job): flag it, keep it out of the means.
    t1 = {r["layer"] + r["model"]: r for run in runs if run["threads"] == 1 for r in run["rows"]}
    for run in runs:
        for r in run["rows"]:
            base = t1.get(r["layer"] + r["model"])
            r["disturbed"] = bool(run["threads"] > 1 and base is not None
                                  and r["ms_min"]["torch_fp32"] > base["ms_min"]["torch_fp32"])

    import torch
    import tvm

    from bqc.packing import LAYOUT_VERSION
    result = {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cpus",
        "target": '{"kind": "llvm", "mcpu": "cascadelake", "num-cores": T}',
        "torch": torch.__version__, "tvm": tvm.__version__, "layout_version": LAYOUT_VERSION,
        "loadavg": [load0, _loadavg()],
        "cpus": os.cpu_count(),
        "host_isa": _host_isa(),
        "omp_wait_policy": args.omp_wait_policy,
        "runs": runs,
    }
    return _write_result(args.out, "kernels", result, markdown(result))


def _host_isa() -> list:
    """The host ISA extensions that matter for these comparisons."""
    return [f for f in ("avx512f", "avx512bw", "avx512_vnni", "avx512_vpopcntdq", "amx_int8", "amx_bf16")
            if _host_has(f)]


if __name__ == "__main__":
    sys.exit(main())
