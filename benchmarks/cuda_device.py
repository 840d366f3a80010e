"""bqc's CUDA target on a real GPU (issue 15, item 5): kernel numerics, lowered-model numerics
and the UNet step against torch FP16 (cuDNN) and FP32 of the same model.

Two halves, because the GPU machine need not have TVM's compiler (the apache-tvm wheel's
``libtvm_compiler.so`` is 260 MB; a lowered bundle needs only ``libtvm_runtime*.so``, the
``tvm_ffi`` package and, to JIT-compile the bundle's CUDA source when it loads, ``nvcc``)::

    python benchmarks/cuda_device.py prepare DIR     # any machine with bqc (full TVM; no GPU, no nvcc)
    python benchmarks/cuda_device.py run DIR         # the GPU machine: bqc, torch, TVM runtime, nvcc
    python benchmarks/cuda_device.py report DIR/result.json   # -> benchmarks/results/cuda_device.{json,md}
    python benchmarks/cuda_device.py explain DIR BUNDLE OUTPUTS.npz   # a miss: forced flips in the reference

``prepare`` writes into DIR:

* ``kernels/k{i}.so`` + ``k{i}.npz``: every CUDA-scheduled kernel case that
  ``tests/test_cuda_build.py`` emulates on the CPU (binary conv/dense, W1A4 int8 conv/dense, the
  int8 matmul with K > 1024, bit-packing, 4-bit quantize, the b1 ``mma.sync`` dense in the form of
  ``--arch``), built for ``--arch`` and exported, with its inputs and numpy reference;
* ``bundles/NAME``: ``bqc lower --backend tvm-cuda`` of the shipped mnist16 models (batch 16,
  and the W1A1 one at ``--big-batch`` too) and of freshly transformed ddim-cifar10 bidm / binarydm
  models (batch 4, activation quantizers calibrated on random inputs: speed and numerics only),
  each with ``reference.npz``: two UNet steps (the second with the first's TBS state) computed on
  the CPU by the deploy artifact's PyTorch reference executor (``BqcModel(deploy graph)``, the
  contract every backend is checked against).

``run`` loads each kernel and bundle on ``cuda:0`` (exact equality for the kernels; relative
error <= 1e-4 for the bundles, the x86 bound, per step and per TBS state tensor), then times one
UNet step at the compiled batch: bqc (the Relax VM's ``main`` on device-resident inputs, then a
device sync) interleaved with the FP teacher (the zoo model the bundle records, eager) in torch FP32 and FP16 (``.half()``, ``cudnn.benchmark``), eager, ``inference_mode``,
``--rounds`` calls each after warm-up, each call synchronised. It writes ``DIR/result.json``
(``$OUT/result.json`` too when ``OUT`` is set), one section at a time, so a run cut short keeps
what it measured. Nothing is asserted: the JSON records passes, failures and their messages.
A bundle whose numerics miss the bound also leaves its first step's outputs
(``BUNDLE-outputs.npz``); ``explain`` then tells, on the CPU machine, whether a few forced
sign / code flips at near-boundary inputs of the reference account for the difference
(:mod:`bqc.deploy.flips`) or not.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOL = 1e-4  # the deploy contract's relative error (tests/test_lower.py)

#: (bundle name, source, batch, reference rows): a shipped model (by name) or a zoo model + recipe
#: to transform; ddim-cifar10's TBS state is 3.5 MB a sample, so its reference holds one sample
BUNDLES = [
    ("mnist16-bidm-b16", "mnist16-bidm", 16, 4),
    ("mnist16-binarydm-b16", "mnist16-binarydm", 16, 4),
    ("ddim-cifar10-bidm-b4", ("ddim-cifar10", "bidm"), 4, 1),
    ("ddim-cifar10-binarydm-b4", ("ddim-cifar10", "binarydm"), 4, 1),
]
STATE2_MAX_BYTES = 2 << 20  # the second step's TBS state is kept in the reference below this size


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# ------------------------------------------------------------------------------------ prepare
def _emu_cases():
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_cuda_build import EMU_CASES, _emu_case  # the cases the CPU emulation checks

    return EMU_CASES, _emu_case


def prepare_kernels(out: Path, arch: str) -> list[dict]:
    import tvm

    from bqc.backends.tvm import cuda
    from bqc.backends.tvm.schedules import cuda as S

    cases, emu_case = _emu_cases()
    form = S.mma_form(arch)
    kdir = out / "kernels"
    kdir.mkdir(parents=True, exist_ok=True)
    done = []
    for i, (kind, case) in enumerate(cases):
        if kind.startswith("mma_") and kind[4:] != form:
            continue  # the other b1 mma form does not exist on this arch
        done.append({"id": f"k{i}", "kind": kind, "case": case})
        if (kdir / f"k{i}.npz").exists():
            continue
        func, inputs, ref = emu_case(kind, case, seed=len(kind) + sum(case.values()))
        ex = cuda.build_cuda(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), arch)
        cuda.export_cuda_library(ex, kdir / f"k{i}.so")
        np.savez(kdir / f"k{i}.npz", *[np.asarray(a) for a in inputs], ref=ref)
        print(f"kernel k{i} {kind} {case}", flush=True)
    return done


def _random_model(name: str, out: Path) -> Path:
    """The zoo model ``name`` at its (seeded) random init, with the layers openaimodel
    zero-initialises (each ResBlock's last conv, attention's ``proj_out``, the output conv) given
    small random weights too, saved as a bqc model folder: a model without shipped weights whose
    outputs are not identically zero, so the numerics check means something."""
    import torch

    from bqc.models import zoo

    if (out / zoo.CONFIG_FILE).exists():
        return out
    torch.manual_seed(0)
    m = zoo.build_model(name).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if p.dim() >= 3 and ("out_layers.3" in pname or "proj_out" in pname or pname.startswith("out.2")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    zoo.save_model(m, name, out)
    return out


def _deploy_for(name: str, source, work: Path):
    """The deploy artifact (folder or shipped name) the bundle is lowered from."""
    if isinstance(source, str):
        return source
    model, recipe = source
    art, dep = work / f"{name}-art", work / f"{name}-deploy"
    if not (dep / "deploy.json").exists():
        sys.path.insert(0, str(HERE))
        from unet_step import _as_trained

        src = _random_model(model, work / f"{model}-random")
        subprocess.run([sys.executable, "-m", "bqc", "transform", str(src), "--recipe", recipe, "-o", str(art)],
                       check=True)
        _as_trained(art)  # EBB layers in the stage training ends in, as unet_step.py times them
        subprocess.run([sys.executable, "-m", "bqc", "fold", str(art), "--calibrate", "random", "-o", str(dep)],
                       check=True)
    return str(dep)


def reference_steps(deploy, rows: int, seed: int = 0) -> dict:
    """Two UNet steps of ``rows`` samples by the deploy artifact's reference executor on the CPU
    (the second with the first's TBS state, when the model has one), with their inputs. (The
    rows of a UNet step are independent: the bundle pads them to its batch.)"""
    import torch

    from bqc.deploy import as_deploy_artifact
    from bqc.graph import BqcModel

    dart = as_deploy_artifact(deploy)
    model = BqcModel(dart.gm).eval()
    shape = model.input_shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, *shape), generator=g)
    x2 = torch.randn((rows, *shape), generator=g)
    t = torch.randint(1, 1000, (rows,), generator=g)
    with torch.no_grad():
        e1, s1 = model(x, t)
        e2, s2 = model(x2, t - 1, state=s1)
    ref = {"x": x.numpy(), "t": t.numpy(), "x2": x2.numpy(), "e1": e1.numpy(), "e2": e2.numpy()}
    for k, s in enumerate(s1 or []):
        ref[f"s1_{k}"] = s.numpy()
    if sum(s.numel() * 4 for s in s2 or []) <= STATE2_MAX_BYTES:  # else only step 2's output is checked
        for k, s in enumerate(s2 or []):
            ref[f"s2_{k}"] = s.numpy()
    return ref


def prepare_bundles(out: Path, big_batch: int, only: set[str] | None) -> list[dict]:
    from bqc.backends.tvm.lower import lower

    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    bundles = list(BUNDLES) + ([(f"mnist16-bidm-b{big_batch}", "mnist16-bidm", big_batch, 4)] if big_batch else [])
    done = []
    for name, source, batch, rows in bundles:
        if only and name not in only:
            continue
        d = out / "bundles" / name
        dep = _deploy_for(name, source, work)
        if not (d / "manifest.json").exists():
            t0 = time.perf_counter()
            lower(dep, "tvm-cuda", d, batch=batch)
            print(f"lowered {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        (d / "model.cu").unlink(missing_ok=True)  # the library carries the same source
        np.savez(d / "reference.npz", **reference_steps(dep, rows))
        model = json.loads((d / "manifest.json").read_text()).get("model") or {}
        zoo = model["name"] if model.get("kind") == "zoo" else source[0]  # a shipped model records its teacher
        deploy = dep if isinstance(source, str) else str(Path(dep).relative_to(out))
        (d / "source.json").write_text(json.dumps({"zoo": zoo, "deploy": deploy}) + "\n")
        done.append({"name": name, "source": source if isinstance(source, str) else "/".join(source), "batch": batch})
    return done


# ------------------------------------------------------------------------------------ run (GPU)
class Result:
    def __init__(self, paths):
        self.paths, self.data = paths, {"sections": {}}

    def put(self, key, value):
        self.data["sections"][key] = value
        self.save()

    def save(self):
        for p in self.paths:
            Path(p).write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def _sh(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001 (a missing tool is recorded, not fatal)
        return f"({e})"


def machine_info() -> dict:
    import torch
    import tvm

    info = {
        "gpu": _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader"]),
        "nvcc": _sh(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else None,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "tvm": getattr(tvm, "__version__", "?"),
        "tvm_runtime_only": bool(getattr(__import__("tvm.base").base, "_RUNTIME_ONLY", False)),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    return info


def run_kernels(d: Path) -> list[dict]:
    import tvm

    from bqc.backends.tvm.cuda import ensure_cuda_runtime, load_cuda_library

    ensure_cuda_runtime()
    dev = tvm.cuda(0)
    rows = []
    for so in sorted((d / "kernels").glob("k*.so"), key=lambda p: int(p.stem[1:])):
        row = {"id": so.stem}
        try:
            z = np.load(so.with_suffix(".npz"))
            inputs = [z[f"arr_{i}"] for i in range(len(z.files) - 1)]
            ref = z["ref"]
            t0 = time.perf_counter()
            lib = load_cuda_library(so)
            row["load_s"] = round(time.perf_counter() - t0, 2)
            args = [tvm.runtime.tensor(a, dev) for a in inputs] + [tvm.runtime.tensor(np.zeros(ref.shape, ref.dtype), dev)]
            lib["k"](*args)
            dev.sync()
            got = args[-1].numpy()
            row["equal"] = bool(np.array_equal(got, ref))
            row["mismatches"] = int(np.sum(got != ref))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        rows.append(row)
        print("kernel", row, flush=True)
    return rows


def _median_ms(samples) -> float:
    return float(np.median(samples) * 1e3)


def eager_teacher(d: Path):
    """The bundle's FP model as the eager ``nn.Module``: the zoo model ``prepare`` recorded in
    ``source.json``, with its shipped weights when there are some (else its random init: the
    timing does not depend on the weights)."""
    from bqc import frontend

    return frontend._load_zoo(json.loads((d / "source.json").read_text())["zoo"]).module.eval()


def fp16_teacher(model):
    """The FP teacher in FP16 the way openaimodel runs it (``convert_to_fp16``): convolution and
    linear weights in FP16, GroupNorm (which computes in FP32) and softmax in FP32; the float32
    sinusoidal timestep embedding is cast to FP16 where it enters ``time_embed``."""
    import torch

    model = model.eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            m.half()
    model.time_embed.register_forward_pre_hook(lambda _m, args: (args[0].half(), *args[1:]))
    return model


def fp16_graph(half, xh, t):
    """A replay of ``half(xh, t)`` captured as one CUDA graph (``torch.cuda.CUDAGraph``), as
    a launch-overhead-free torch baseline; the error text if capture fails."""
    import torch

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                half(xh, t)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), torch.inference_mode():
            half(xh, t)
    except Exception as e:  # noqa: BLE001 (recorded, the other columns still run)
        return f"{type(e).__name__}: {e}"[:500]

    def replay():
        g.replay()
        torch.cuda.synchronize()

    return replay


def run_bundle(d: Path, rounds: int, warmup: int) -> dict:
    import torch
    import tvm

    from bqc.backends.runtime import load_compiled

    row = {"name": d.name}
    man = json.loads((d / "manifest.json").read_text())
    t0 = time.perf_counter()
    model = load_compiled(d)  # JIT-compiles the bundle's CUDA source for this GPU
    row["load_s"] = round(time.perf_counter() - t0, 1)
    row["batch"] = model.batch
    z = np.load(d / "reference.npz")
    e1, s1 = model(z["x"], z["t"])
    row["rel_step1"] = rel(e1, z["e1"])
    ns = sum(k.startswith("s1_") for k in z.files)
    if ns:
        row["rel_state1_max"] = max(rel(a, z[f"s1_{k}"]) for k, a in enumerate(s1))
        ref_s1 = [z[f"s1_{k}"] for k in range(ns)]
        e2, s2 = model(z["x2"], z["t"] - 1, state=ref_s1)
        row["rel_step2"] = rel(e2, z["e2"])
        if "s2_0" in z.files:
            row["rel_state2_max"] = max(rel(a, z[f"s2_{k}"]) for k, a in enumerate(s2))
    rels = [v for k, v in row.items() if k.startswith("rel_")]
    row["numerics_ok"] = bool(all(np.isfinite(r) and r <= TOL for r in rels))
    row["tolerance"] = TOL
    if not row["numerics_ok"]:  # kept for `explain` (forced flips in the reference, on the CPU machine)
        outs = {"e1": np.asarray(e1), **{f"s1_{k}": np.asarray(a) for k, a in enumerate(s1 or [])}}
        for p in [d / "outputs.npz"] + ([Path(os.environ["OUT"]) / f"{d.name}-outputs.npz"] if os.environ.get("OUT") else []):
            np.savez(p, **outs)

    # timing: the compiled step on device-resident inputs vs the FP teacher in torch FP32 / FP16
    dev = model.dev
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((model.batch, *model.input_shape)).astype(np.float32)
    tb = rng.integers(1, 1000, model.batch)
    args = model.raw_inputs(xb, tb)
    main = model.vm["main"]
    cpu_teacher = eager_teacher(d)
    half = fp16_teacher(copy.deepcopy(cpu_teacher)).cuda()
    teacher = cpu_teacher.cuda()
    x = torch.from_numpy(xb).cuda()
    t = torch.from_numpy(tb).cuda()
    torch.backends.cudnn.benchmark = True
    xh = x.half()

    def bqc_step():
        main(*args)
        dev.sync()

    def torch32():
        with torch.inference_mode():
            teacher(x, t)
        torch.cuda.synchronize()

    def torch16():
        with torch.inference_mode():
            half(xh, t)
        torch.cuda.synchronize()

    fns = {"bqc": bqc_step, "torch_fp32": torch32, "torch_fp16": torch16}
    graphed = fp16_graph(half, xh, t)  # torch FP16 without launch overhead (CUDA graph replay)
    if callable(graphed):
        fns["torch_fp16_graph"] = graphed
    else:
        row["torch_fp16_graph_error"] = graphed
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        row[f"{k}_ms_median"] = round(_median_ms(v), 4)
        row[f"{k}_ms_min"] = round(float(np.min(v) * 1e3), 4)
    row["speedup_vs_fp16"] = row["torch_fp16_ms_median"] / row["bqc_ms_median"]
    if "torch_fp16_graph_ms_median" in row:
        row["speedup_vs_fp16_graph"] = row["torch_fp16_graph_ms_median"] / row["bqc_ms_median"]
    row["speedup_vs_fp32"] = row["torch_fp32_ms_median"] / row["bqc_ms_median"]
    row["rounds"], row["warmup"] = rounds, warmup
    row["bqc_mib"] = man["sizes"]["total_bytes"] / 2**20
    row["fp16_mib"] = 2 * sum(p.numel() for p in teacher.parameters()) / 2**20
    with torch.inference_mode():  # how far FP16 itself is from FP32 (for scale)
        row["fp16_vs_fp32_rel"] = rel(half(xh, t).float().cpu().numpy(), teacher(x, t).cpu().numpy())
    return row


def run(d: Path, rounds: int, warmup: int, only: set[str] | None) -> Result:
    paths = [d / "result.json"] + ([Path(os.environ["OUT"]) / "result.json"] if os.environ.get("OUT") else [])
    res = Result(paths)
    res.data["command"] = "python benchmarks/cuda_device.py " + " ".join(sys.argv[1:])
    res.data["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res.put("machine", machine_info())
    print(res.data["sections"]["machine"], flush=True)
    try:
        res.put("kernels", run_kernels(d))
    except Exception:  # noqa: BLE001
        res.put("kernels", {"error": traceback.format_exc()[-3000:]})
    rows = []
    for b in sorted((d / "bundles").iterdir()):
        if b.name.startswith(".") or (only and b.name not in only):
            continue
        try:
            row = run_bundle(b, rounds, warmup)
        except Exception:  # noqa: BLE001
            row = {"name": b.name, "error": traceback.format_exc()[-3000:]}
        rows.append(row)
        print("bundle", row, flush=True)
        res.put("bundles", rows)
    return res


# ------------------------------------------------------------------------------------ explain
def explain_outputs(d: Path, name: str, outputs: Path) -> dict:
    """Step 1 of bundle ``name`` as the GPU computed it (``outputs``, saved by ``run`` when its
    numerics missed the bound) explained by forced flips in the reference
    (:func:`bqc.deploy.flips.explain`)."""
    import torch

    from bqc.deploy import as_deploy_artifact
    from bqc.deploy.flips import explain
    from bqc.graph import BqcModel

    deploy = json.loads((d / "bundles" / name / "source.json").read_text())["deploy"]
    dart = as_deploy_artifact(str(d / deploy) if (d / deploy).exists() else deploy)  # a folder under DIR, or a shipped name
    z, o = np.load(d / "bundles" / name / "reference.npz"), np.load(outputs)
    ns = sum(k.startswith("s1_") for k in o.files)
    target = (torch.from_numpy(o["e1"]), [torch.from_numpy(o[f"s1_{k}"]) for k in range(ns)] or None)
    r = explain(BqcModel(dart.gm).eval(), dart.gm, target, torch.from_numpy(z["x"]), torch.from_numpy(z["t"]))
    r["flips"] = [vars(f) for f in r["flips"]]
    print(json.dumps(r, indent=1))
    return r


# ------------------------------------------------------------------------------------ report
def report(result: Path) -> None:
    data = json.loads(result.read_text())
    sec = data["sections"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cuda_device.json").write_text(json.dumps(data, indent=1) + "\n")
    m = sec.get("machine", {})
    lines = ["# bqc tvm-cuda on a GPU: numerics and UNet step vs torch FP16 / FP32", "",
             "Commands: `python benchmarks/cuda_device.py prepare DIR` on the CPU machine (full TVM), then "
             f"`{data.get('command')}` on the GPU machine ({data.get('when')}), then "
             "`python benchmarks/cuda_device.py report DIR/result.json`.", "",
             f"GPU: {m.get('gpu')} (compute capability {m.get('capability')}, {m.get('sms')} SMs); torch "
             f"{m.get('torch')} (CUDA {m.get('torch_cuda')}, cuDNN {m.get('cudnn')}); TVM {m.get('tvm')} "
             f"runtime only: {m.get('tvm_runtime_only')}; nvcc {' '.join(m.get('nvcc') or [])}.", ""]
    k = sec.get("kernels")
    if isinstance(k, list):
        ok = sum(bool(r.get("equal")) for r in k)
        lines += ["## Kernels (every CPU-emulated case of tests/test_cuda_build.py, run on the GPU)", "",
                  f"{ok} of {len(k)} equal to bqc.packing's numpy reference bit for bit.", "",
                  "| case | equal | mismatches | load s | error |", "|---|---|---|---|---|"]
        for r in k:
            lines.append(f"| {r['id']} | {r.get('equal')} | {r.get('mismatches', '')} | {r.get('load_s', '')} | "
                         f"{(r.get('error') or '')[:120]} |")
        lines.append("")
    elif k:
        lines += ["## Kernels: the run failed", "", "```", str(k.get("error"))[-1500:], "```", ""]
    lines += ["## Lowered models (`bqc lower --backend tvm-cuda`)", "",
              f"Numerics: relative error against the deploy artifact's PyTorch reference on the CPU, bound {TOL}. "
              "Step: one UNet call at the compiled batch, median over the rounds, each call synchronised; "
              "torch eager under `inference_mode`, FP16 = `.half()` with `cudnn.benchmark`.", "",
              "| bundle | batch | rel err (step 1 / step 2 / state max) | ok | bqc ms | torch FP16 ms | torch FP32 ms "
              "| torch FP16 CUDA graph ms | vs FP16 | vs FP32 | vs FP16 graph | bqc MiB | FP16 MiB | load s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sec.get("bundles", []):
        if "error" in r:
            lines.append(f"| {r['name']} | | error: {r['error'].strip().splitlines()[-1][:150]} | | | | | | | | | | | |")
            continue
        errs = " / ".join(f"{r[k]:.1e}" for k in ("rel_step1", "rel_step2") if k in r)
        if "rel_state1_max" in r:
            errs += f" / {max(r['rel_state1_max'], r.get('rel_state2_max', 0.0)):.1e}"
        graph = f"{r['torch_fp16_graph_ms_median']:.3f}" if "torch_fp16_graph_ms_median" in r else "not run"
        vs_graph = f"{r['speedup_vs_fp16_graph']:.2f}x" if "speedup_vs_fp16_graph" in r else "-"
        lines.append(f"| {r['name']} | {r['batch']} | {errs} | {r['numerics_ok']} | {r['bqc_ms_median']:.3f} | "
                     f"{r['torch_fp16_ms_median']:.3f} | {r['torch_fp32_ms_median']:.3f} | {graph} | "
                     f"{r['speedup_vs_fp16']:.2f}x | {r['speedup_vs_fp32']:.2f}x | {vs_graph} | {r['bqc_mib']:.2f} | "
                     f"{r['fp16_mib']:.2f} | {r['load_s']} |")
    lines.append("")
    (RESULTS / "cuda_device.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["prepare", "run", "report", "explain"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("explain_args", nargs="*", help="explain: BUNDLE_NAME OUTPUTS.npz")
    ap.add_argument("--arch", default="sm_90", help="prepare: the kernels' CUDA arch (sm_90: H100/H200)")
    ap.add_argument("--big-batch", type=int, default=256, help="prepare: also lower mnist16-bidm at this batch (0: no)")
    ap.add_argument("--only", default="", help="comma-separated bundle names")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args(argv)
    only = set(filter(None, a.only.split(","))) or None
    if a.mode == "prepare":
        a.dir.mkdir(parents=True, exist_ok=True)
        info = {"arch": a.arch, "kernels": [] if a.no_kernels else prepare_kernels(a.dir, a.arch),
                "bundles": prepare_bundles(a.dir, a.big_batch, only)}
        (a.dir / "prepared.json").write_text(json.dumps(info, indent=1) + "\n")
    elif a.mode == "run":
        run(a.dir, a.rounds, a.warmup, only)
    elif a.mode == "explain":
        explain_outputs(a.dir, *a.explain_args)
    else:
        report(a.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
