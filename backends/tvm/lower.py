"""Lower a bqc artifact to a compiled TVM library (tvm-x86 / tvm-arm / tvm-cuda) or to ONNX.

``lower(artifact_dir, backend, out_dir, *, batch=16, calibrate=None, threads=None) -> Path``

1. load the artifact and fold it (:func:`backends.onnx.export.resolve_deploy_graph`: a QAT graph
   whose activation quantizers were never run is refused unless ``calibrate`` names a data set
   to calibrate them on, or ``"random"`` for speed measurements; recorded as ``calibration``);
2. ``bqc.deploy.export_program`` with a **static** batch (``batch``; recorded in the manifest;
   :mod:`bqc.backends.runtime` pads / splits other batch sizes);
3. ``from_exported_program(ep, keep_params_as_input=True, custom_convert_map=Converter(...))``:
   each ``bqc.*`` op becomes ``call_tir`` of our scheduled kernels (see :mod:`.convert`);
4. CPU: :func:`relax_import.compile_relax` (the float pipeline: fuse + schedule the float
   PrimFuncs, the opaque kernels untouched); CUDA: legalize + fuse + ``dlight`` GPU schedules
   (build only);
5. write ``model.so`` (x86, arm: cross-compiled) or ``model.so`` + ``model.cu`` (cuda) and
   ``manifest.json``.

The output directory loads with the TVM runtime and numpy only
(:func:`bqc.backends.runtime.load_compiled`).

``bench(dir, threads=None) -> dict`` times the compiled step against PyTorch FP32 eager of the
artifact's teacher at the same batch and thread count.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from bqc.errors import BqcError
from bqc.backends.runtime import drop_native_log_lines

__all__ = ["BACKENDS", "DEFAULT_BATCH", "lower", "bench", "build_relax", "lowered_module"]

BACKENDS = ("tvm-x86", "tvm-arm", "tvm-cuda", "onnx")
DEFAULT_BATCH = 16
MANIFEST_FORMAT = "bqc-tvm"


def _target(backend: str, threads: int | None):
    if backend == "tvm-x86":
        from .target import x86_target

        return x86_target(num_cores=threads or os.cpu_count() or 1)
    if backend == "tvm-arm":
        from .arm import arm_target

        return arm_target(num_cores=threads or 4)
    if backend == "tvm-cuda":
        from .cuda import cuda_target

        return cuda_target()
    raise BqcError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")


def _deploy_graph(src, calibrate, info: dict | None = None):
    from bqc.backends.onnx.export import resolve_deploy_graph

    return resolve_deploy_graph(src, calibrate=calibrate, info=info)


def lowered_module(dg, batch: int, target):
    """Deploy graph -> (Relax IRModule with call_tir kernels, params, Converter)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from bqc import deploy as D

    from .convert import Converter

    args = D.example_inputs(dg, batch=batch, seed=0)
    ep = D.export_program(dg, args, dynamic_batch=False)
    conv = Converter(ep, target)
    mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=conv.convert_map())
    mod, params = relax.frontend.detach_params(mod)
    return mod, params, conv


def _build_cuda(mod, params, target):
    import tvm
    from tvm import relax

    from .relax_import import bind_params

    mod = bind_params(mod, params)
    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ])
    from tvm.s_tir import dlight as dl

    with target:
        mod = seq(mod)
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        return tvm.compile(mod, target)


def build_relax(dg, backend: str, batch: int, threads: int | None = None):
    """Deploy graph -> (executable, Converter); CPU targets through the float pipeline."""
    target = _target(backend, threads)
    mod, params, conv = lowered_module(dg, batch, target)
    if backend == "tvm-cuda":
        return _build_cuda(mod, params, target), conv
    if backend == "tvm-x86":
        from .relax_import import compile_relax

        return compile_relax(mod, params, target).ex, conv
    # cross targets: compile_relax's CompiledRelax opens a VM on this machine, which an
    # aarch64 module cannot; same steps without the VM
    import tvm

    from .relax_import import _vm_lowering, bind_params, float_pipeline

    mod = float_pipeline(target)(bind_params(mod, params))
    with target:
        return tvm.compile(mod, target, relax_pipeline=_vm_lowering(target)), conv


def _signature(dg) -> dict:
    from bqc import ir

    meta = ir.graph_meta(dg)
    inputs = [n.name for n in dg.graph.nodes if n.op == "placeholder"]
    return {
        "inputs": inputs,
        "outputs": ["eps"] + [s["name"] for s in meta.get("state_outputs", [])],
        "input_shape": list(meta.get("input_shape")),
        "conditional": bool(meta.get("conditional")),
        "state_inputs": [dict(s) for s in meta.get("state_inputs", [])],
        "state_outputs": [dict(s) for s in meta.get("state_outputs", [])],
        "state_flag": meta.get("state_flag"),
    }


def _sizes(dg) -> dict:
    from bqc import deploy as D

    s = D.deploy_summary(dg)
    return {"total_bytes": s["total_bytes"], "layer_bytes": s["layer_bytes"], "float_bytes": s["float_bytes"],
            "nominal_bytes": s["nominal_bytes"]}


def lower(artifact_dir, backend: str, out_dir, *, batch: int = DEFAULT_BATCH, calibrate: bool | str | None = None,
          threads: int | None = None) -> Path:
    """Compile an artifact (dir, :class:`Artifact` or QAT/deploy graph) for ``backend``; see the
    module docstring. Returns ``out_dir``."""
    if backend not in BACKENDS:
        raise BqcError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if backend == "onnx":
        from bqc.backends.onnx.export import export_onnx

        export_onnx(artifact_dir, out, batch=min(batch, 2), calibrate=calibrate)
        return out
    from bqc import artifact as A
    from bqc import deploy as D

    art_path = str(Path(artifact_dir).resolve()) if isinstance(artifact_dir, (str, Path)) else None
    art = A.load_artifact(artifact_dir) if isinstance(artifact_dir, (str, Path)) else artifact_dir
    cal: dict = {}
    dg = _deploy_graph(art, calibrate, cal)
    t0 = time.perf_counter()
    ex, conv = build_relax(dg, backend, batch, threads)
    build_s = time.perf_counter() - t0
    files = {}
    if backend == "tvm-x86":
        with drop_native_log_lines("Scope Saving:"):
            ex.export_library(str(out / "model.so"))
        files["library"] = "model.so"
    elif backend == "tvm-arm":
        from .arm import export_arm_library

        export_arm_library(ex, out / "model.so")
        files["library"] = "model.so"
    else:
        from .cuda import cuda_source, export_cuda_library

        export_cuda_library(ex, out / "model.so")
        (out / "model.cu").write_text(cuda_source(ex))
        files["library"] = "model.so"
        files["cuda_source"] = "model.cu"
    manifest = art.manifest if isinstance(getattr(art, "manifest", None), dict) else {}
    recipe = getattr(art, "recipe", None)
    man = {
        "format": MANIFEST_FORMAT,
        "backend": backend,
        "target": str(_target(backend, threads)),
        "layout_version": D.LAYOUT_VERSION,
        "batch": int(batch),
        "model": manifest.get("model") or manifest.get("source"),
        "recipe": getattr(recipe, "name", None) or manifest.get("recipe"),
        "artifact": art_path,
        "calibration": cal.get("calibration"),
        **_signature(dg),
        "files": files,
        "sizes": _sizes(dg),
        "kernels": dict(conv.counts),
        "fallbacks": [list(f) for f in conv.fallbacks],
        "kernel_failures": [[f[0], list(f[1]), f[2]] for f in conv.failures],
        "build_seconds": round(build_s, 1),
    }
    (out / "manifest.json").write_text(json.dumps(man, indent=2, default=str))
    return out


# ------------------------------------------------------------------------------------ bench
def _time(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def step_inputs(model, seed: int = 0):
    """Seeded random (x, t, y) at a compiled model's batch, and the VM's raw argument list."""
    import torch

    b = model.batch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *model.input_shape, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.zeros(b, dtype=torch.long) if model.conditional else None
    return x, t, y, model.raw_inputs(x, t, y, state=None)


def bench(dir, threads: int | None = None, *, repeat: int = 10, profile: bool = True) -> dict:
    """Compiled UNet step vs PyTorch FP32 eager of the artifact's teacher (same batch/threads).

    Returns ``{"backend", "threads", "batch", "bqc_ms", "torch_fp32_ms", "speedup", "size_mb",
    "fp32_size_mb", "profile"}`` (``profile``: ``[(function, ms)]``, slowest first).
    TVM's thread pool size is fixed when it starts in a process (``TVM_NUM_THREADS``; TVM's
    default here is 1 thread, one per physical core): ``tvm_threads`` reports what TVM really
    used, so run each thread count in a fresh process (``bqc bench --threads N``).
    """
    import torch

    from bqc.backends.runtime import load_compiled

    from bqc.backends.runtime import read_compiled_manifest

    d = Path(dir)
    man = read_compiled_manifest(d)  # BqcError for an ONNX export or any other folder
    if man["backend"] != "tvm-x86":
        raise BqcError(f"bench runs tvm-x86 libraries on this machine; {d} is {man['backend']}")
    threads = int(threads or os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    import tvm

    tvm_threads = int(tvm.get_global_func("runtime.NumThreads")())
    torch.set_num_threads(threads)
    model = load_compiled(d)
    b = model.batch
    x, t, y, args = step_inputs(model)
    vm_main = model.vm["main"]
    bqc_ms = _time(lambda: vm_main(*args), repeat)
    res = {"backend": man["backend"], "threads": threads, "tvm_threads": tvm_threads,
           "torch_threads": torch.get_num_threads(), "batch": b, "bqc_ms": bqc_ms}
    if man.get("artifact"):
        from bqc import artifact as A

        teacher = A.load_artifact(man["artifact"]).teacher().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        n_fp = sum(p.numel() for p in teacher.parameters())
        with torch.no_grad():
            fp_ms = _time(lambda: teacher(x, t, y), repeat)
        res.update(torch_fp32_ms=fp_ms, speedup=fp_ms / bqc_ms, fp32_size_mb=4 * n_fp / 2**20)
    else:
        res.update(torch_fp32_ms=None, speedup=None, fp32_size_mb=None)
    res["size_mb"] = man["sizes"]["total_bytes"] / 2**20
    if profile:
        try:
            from .profile import group_profile, profile_vm

            rows = profile_vm(model.lib, args, repeat=3)
            res["profile"] = [(n, round(ms, 3)) for n, ms in rows[:25]]
            res["profile_by_kind"] = [(n, round(ms, 3)) for n, ms in group_profile(rows)]
        except Exception as e:  # noqa: BLE001 - profiling is best effort
            res["profile_error"] = f"{type(e).__name__}: {e}"
    return res
