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
5. write the bundle: ``model.so`` (x86, arm: cross-compiled) or ``model.so`` + ``model.cu``
   (cuda), ``manifest.json`` and ``run.py`` (a copy of :mod:`bqc.run`).

The output folder is a self-contained bundle (docs/deploy.md): it loads with the TVM runtime and
numpy only (:func:`bqc.backends.runtime.load_compiled` here; ``python3 run.py`` on a board), and
its manifest holds no host paths: the source artifact is recorded by folder name and content
hashes (:func:`_source_record`), next to everything sampling needs (the diffusion schedule with
its betas, the sampler defaults, the TBS state signature). The tools a backend needs are checked
before any work (:func:`check_tools`), and the bundle is written in a staging folder that is
moved into place at the end (:func:`staged_output`): a failed run leaves nothing behind.

``bench(dir, threads=None, teacher=None) -> dict`` times the compiled step against PyTorch FP32
eager of the FP teacher (``teacher``, else resolved from the manifest) at the same batch and
thread count.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bqc.errors import BqcError
from bqc.backends.runtime import drop_native_log_lines
from bqc.console import quiet, staged

__all__ = ["BACKENDS", "DEFAULT_BATCH", "lower", "bench", "build_relax", "lowered_module"]

BACKENDS = ("tvm-x86", "tvm-arm", "tvm-cuda", "onnx")
DEFAULT_BATCH = 16
MANIFEST_FORMAT = "bqc-tvm"
#: what :func:`lower` reports to its ``progress(stage)`` callback, in order (onnx: load, export)
STAGES = ("load", "fold", "export", "import", "compile", "build", "write")


def _target(backend: str, threads: int | None, cpu: str | None = None, target=None):
    """The backend's TVM target. CPU backends: ``cpu`` (``--cpu``: a preset name, an LLVM CPU
    name or ``host``) or ``target`` (``--target``: a TVM target dict / JSON), default the host
    for tvm-x86 (:func:`.target.resolve_target`). A resolved Target is returned as it is; onnx: None."""
    if backend == "onnx" and cpu is None and target is None:
        return None
    from tvm.target import Target

    if isinstance(target, Target):
        return target
    if backend in ("tvm-x86", "tvm-arm"):
        from .target import resolve_target

        return resolve_target(backend, cpu, target, threads)
    if cpu is not None or target is not None:
        raise BqcError(f"--cpu / --target choose the CPU of tvm-x86 and tvm-arm builds, not of {backend}")
    if backend == "tvm-cuda":
        from .cuda import cuda_target

        return cuda_target()
    raise BqcError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")


def _deploy_graph(src, calibrate, info: dict | None = None):
    from bqc.backends.onnx.export import resolve_deploy_graph

    return resolve_deploy_graph(src, calibrate=calibrate, info=info)


def lowered_module(dg, batch: int, target, progress=None):
    """Deploy graph -> (Relax IRModule with call_tir kernels, params, Converter); ``progress``:
    an optional stage callback (:data:`STAGES`)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from bqc import deploy as D

    from .convert import Converter

    staged(progress, "export")
    args = D.example_inputs(dg, batch=batch, seed=0)
    ep = D.export_program(dg, args, dynamic_batch=False)
    staged(progress, "import")
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


def build_relax(dg, backend: str, batch: int, threads: int | None = None, target=None, progress=None):
    """Deploy graph -> (executable, Converter); CPU targets through the float pipeline.
    ``target``: a resolved Target (default: the backend's default, :func:`_target`)."""
    target = _target(backend, threads, target=target)
    mod, params, conv = lowered_module(dg, batch, target, progress)
    staged(progress, "compile")
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


def _cpu_entry(backend: str, target, cpu: str | None) -> dict:
    """The manifest's ``cpu`` entry of a CPU build (:func:`.target.target_record`: mcpu, mtriple,
    mattr, the ISA features the library needs, kernel routes), which the runtime checks against
    the host before loading the library; ``{}`` for other backends."""
    if backend not in ("tvm-x86", "tvm-arm"):
        return {}
    from .target import target_record

    return {"cpu": target_record(target, name=cpu or ("host" if backend == "tvm-x86" else None))}


def _sizes(dg) -> dict:
    from bqc import deploy as D

    s = D.deploy_summary(dg)
    return {"total_bytes": s["total_bytes"], "layer_bytes": s["layer_bytes"], "float_bytes": s["float_bytes"],
            "nominal_bytes": s["nominal_bytes"]}


# ------------------------------------------------------------------------------------ the bundle
_HOST_CC = ("g++", "gcc", "clang++", "clang", "c++", "cc")  # what tvm.support.cc.get_cc() looks for


def check_tools(backend: str) -> None:
    """Raise :class:`BqcError` (exit 2) naming what to install when a tool ``backend`` needs
    at the end of lowering is missing: checked first, so a missing compiler costs no build time.
    tvm-arm: the aarch64 cross compiler; tvm-x86 / tvm-cuda: a host C compiler to link the
    library (tvm-cuda needs no nvcc to build: the library compiles its CUDA source on load);
    onnx: the ``onnx`` package."""
    if backend == "tvm-arm":
        from .arm import check_arm_env

        check_arm_env(need_run=False)
    elif backend in ("tvm-x86", "tvm-cuda"):
        if not (os.environ.get("CXX") or os.environ.get("CC") or any(shutil.which(c) for c in _HOST_CC)):
            raise BqcError(f"{backend} links its library with a C compiler, and none was found ({', '.join(_HOST_CC[:4])}, "
                           "or $CXX / $CC)", hint="install one, e.g. `sudo apt-get install g++`")
    elif backend == "onnx":
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            raise BqcError("--backend onnx needs the onnx package, which is not installed",
                           hint="pip install onnx onnxruntime")


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextlib.contextmanager
def staged_output(out_dir):
    """Yield a fresh hidden staging folder for a lowered bundle; on success move its files into
    ``out_dir`` (the whole folder when ``out_dir`` is new; else file by file, manifest last,
    replacing only the files this run wrote), on any failure (Ctrl-C included) delete it. So a
    failed run leaves no empty or partial folder, and never touches files bqc did not write in
    this run. ``out_dir`` must already have passed :func:`bqc.outputs.check_output`."""
    final = Path(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.bqc-partial-", dir=_nearest_existing(final)))
    try:
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the bundle's mode
        yield stage
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage, final)
            return
        for f in sorted(stage.iterdir(), key=lambda f: f.name == "manifest.json"):
            os.replace(f, final / f.name)
        stage.rmdir()
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _copy_runner(out: Path) -> str:
    """Copy :mod:`bqc.run` (stdlib + numpy + TVM runtime only) into the bundle as ``run.py``."""
    import bqc.run

    shutil.copyfile(bqc.run.__file__, out / "run.py")
    return "run.py"


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_record(art) -> dict | None:
    """The artifact a bundle was lowered from, without its host path: the folder name, the
    content hashes of its weights (``sha256``) and of its FP teacher program
    (``teacher_sha256``: ``bqc bench --teacher`` checks it), its model (``model``: a zoo name
    resolves the teacher by name) and what ``bqc eval`` reads of its training record (data,
    resize, the sampling steps it was trained for). None for an in-memory graph."""
    path = getattr(art, "path", None)
    if path is None:
        return None
    path, man = Path(path), art.manifest
    src = man.get("source") or {}
    rec = {"name": path.name, "sha256": _sha256(path / "model.safetensors"),
           "teacher_sha256": _sha256(path / "base.pt2"),
           "model": {k: src.get(k) for k in ("kind", "name", "description") if src.get(k) is not None}}
    train = man.get("train") or {}
    if train:
        opts = train.get("options") or {}
        rec["train"] = {"data": train.get("data"), "steps": train.get("steps"),
                        "options": {k: opts.get(k) for k in ("resize", "sample_steps") if k in opts}}
    return rec


def _sampling_entries(art) -> dict:
    """``diffusion`` (the schedule spec and prediction type, as in an artifact manifest: what
    ``bqc sample`` / ``bqc eval`` read) and ``sampler`` (the betas and the defaults the bundle's
    ``run.py`` samples with: DDIM, the step count the model was trained for, eta 0)."""
    from bqc.diffusion.schedule import NoiseSchedule

    man = getattr(art, "manifest", None) or {}
    if man.get("diffusion"):
        entry, sched = man["diffusion"], NoiseSchedule.from_manifest(man)
    else:
        sched = NoiseSchedule()
        entry = sched.manifest_entry("default (no diffusion process recorded: DDPM linear, eps)")
    steps = ((man.get("train") or {}).get("options") or {}).get("sample_steps") or 50
    return {"diffusion": entry,
            "sampler": {"kind": "ddim", "defaults": {"steps": min(int(steps), sched.T), "eta": 0.0},
                        "betas": [float(b) for b in sched.betas]}}


def _runtime_requirements() -> dict:
    """What a machine needs to run the bundle: the apache-tvm wheel of the version that built it
    (its runtime library loads the VM executable) and numpy."""
    from importlib import metadata

    try:
        tvm_version = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        import tvm

        tvm_version = tvm.__version__
    return {"apache-tvm": tvm_version, "numpy": ">=1.22", "python": ">=3.9"}


_ABS_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"(),;]+/)*[^\s/'\"(),;]*")


def _portable(v):
    """``v`` (a manifest) with every absolute path, alone or inside a description, replaced by
    its last component: a bundle moves to other machines and must not carry this one's paths."""
    if isinstance(v, dict):
        return {k: _portable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_portable(x) for x in v]
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if isinstance(v, str):
        return _ABS_PATH.sub(lambda m: Path(m.group(0)).name or ".", v)
    return v


def lower(artifact_dir, backend: str, out_dir, *, batch: int = DEFAULT_BATCH, calibrate: bool | str | None = None,
          threads: int | None = None, cpu: str | None = None, target=None, progress=None) -> Path:
    """Compile an artifact (dir, :class:`Artifact` or QAT/deploy graph) for ``backend``; see the
    module docstring. ``cpu`` / ``target``: the CPU to build for (:func:`_target`). Returns
    ``out_dir``."""
    if backend not in BACKENDS:
        raise BqcError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    staged(progress, "load")  # TVM itself, the target, then the artifact
    check_tools(backend)  # a missing compiler fails here, in well under a second, not after the build
    tgt = _target(backend, threads, cpu, target)  # a bad --cpu / --target fails before any work
    with staged_output(out_dir) as out, quiet():  # TVM's/torch's noise hidden (bqc --debug shows it)
        _lower_into(out, artifact_dir, backend, tgt, batch=batch, calibrate=calibrate, threads=threads, cpu=cpu,
                    progress=progress)
    return Path(out_dir)


def _lower_into(out: Path, artifact_dir, backend: str, tgt, *, batch: int, calibrate, threads, cpu,
                progress=None) -> None:
    """:func:`lower`'s work, written into the (staging) folder ``out``; ``progress(stage)`` is
    told each of :data:`STAGES` as it starts."""
    if backend == "onnx":
        staged(progress, "export")
        from bqc.backends.onnx.export import export_onnx

        export_onnx(artifact_dir, out, batch=min(batch, 2), calibrate=calibrate)
        return
    from bqc import artifact as A
    from bqc import deploy as D

    art = A.load_artifact(artifact_dir) if isinstance(artifact_dir, (str, Path)) else artifact_dir
    cal: dict = {}
    staged(progress, "fold")
    dg = _deploy_graph(art, calibrate, cal)
    t0 = time.perf_counter()
    ex, conv = build_relax(dg, backend, batch, threads, target=tgt, progress=progress)
    build_s = time.perf_counter() - t0
    staged(progress, "build")
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
    files["runner"] = _copy_runner(out)
    staged(progress, "write")
    manifest = art.manifest if isinstance(getattr(art, "manifest", None), dict) else {}
    recipe = getattr(art, "recipe", None)
    man = {
        "format": MANIFEST_FORMAT,
        "backend": backend,
        "target": str(tgt),
        **_cpu_entry(backend, tgt, cpu),
        "layout_version": D.LAYOUT_VERSION,
        "batch": int(batch),
        "model": manifest.get("model") or manifest.get("source"),
        "recipe": getattr(recipe, "name", None) or manifest.get("recipe"),
        "source": _source_record(art),
        "calibration": cal.get("calibration"),
        "runtime": _runtime_requirements(),
        **_signature(dg),
        "files": files,
        "sizes": _sizes(dg),
        "kernels": dict(conv.counts),
        "fallbacks": [list(f) for f in conv.fallbacks],
        "kernel_failures": [[f[0], list(f[1]), f[2]] for f in conv.failures],
        "build_seconds": round(build_s, 1),
        **_sampling_entries(art),  # last: the betas are long
    }
    (out / "manifest.json").write_text(json.dumps(_portable(man), indent=2, default=str))


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


def _teacher_from(spec: str):
    """(FP model, description, content hash of its program or None) for ``--teacher``: an
    artifact or training run (its FP teacher), or any model ``bqc transform`` reads."""
    from bqc import artifact as A

    if A.is_artifact(spec):
        return A.load_artifact(spec).teacher(), f"the FP teacher of {spec}", _sha256(Path(spec) / "base.pt2")
    from bqc import frontend
    from bqc import transform as tf
    from bqc.graph import BqcModel

    src = frontend.load_source(spec)
    return BqcModel(tf.transform(src, "fp").gm), src.description, None


def resolve_teacher(man: dict, teacher: str | None = None):
    """The FP32 model ``bench`` times against: ``(model, description, note)``, or
    ``(None, None, reason)``. ``teacher`` (``--teacher``) first; else the bundle's source model
    when it is a zoo model (resolved by name); else none (the compiled step is timed alone). A
    ``--teacher`` artifact whose FP program differs from the one the bundle was lowered from
    (``source.teacher_sha256``) is used, with a note saying so."""
    src = man.get("source") or {}
    if teacher:
        model, desc, digest = _teacher_from(teacher)
        want = src.get("teacher_sha256")
        note = None
        if digest and want and digest != want:
            note = f"{teacher}'s FP program is not the one this library was lowered from (content hash differs)"
        return model, desc, note
    from bqc import frontend

    name = (src.get("model") or {}).get("name") or (man.get("model") or {}).get("name")
    kind = (src.get("model") or {}).get("kind") or (man.get("model") or {}).get("kind")
    if kind == "zoo" and name and frontend._is_zoo_name(name):
        model, desc, _ = _teacher_from(name)
        return model, f"{desc} (the bundle's source model, by name)", None
    from bqc import artifact as A

    legacy = man.get("artifact")  # libraries lowered before bundles recorded the artifact's host path
    if isinstance(legacy, str) and A.is_artifact(legacy):
        return _teacher_from(legacy)[:2] + (None,)
    what = f"artifact {src['name']!r}" if src.get("name") else "an in-memory graph"
    return None, None, (f"no FP32 teacher: this library was lowered from {what} whose model bqc cannot find "
                        "by name; the compiled step is timed alone (pass --teacher MODEL: the artifact, or its "
                        "source model)")


def bench(dir, threads: int | None = None, *, teacher: str | None = None, repeat: int = 10,
          profile: bool = True) -> dict:
    """Compiled UNet step vs PyTorch FP32 eager of the FP teacher (same batch/threads); the
    teacher is ``teacher`` or :func:`resolve_teacher`'s (no training artifact path needed).

    Returns ``{"backend", "threads", "batch", "bqc_ms", "torch_fp32_ms", "speedup", "size_mb",
    "fp32_size_mb", "teacher", "note", "profile"}`` (``profile``: ``[(function, ms)]``, slowest
    first; ``torch_fp32_ms`` / ``speedup`` / ``fp32_size_mb`` are None without a teacher, and
    ``note`` says why).
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
    fp, desc, note = resolve_teacher(man, teacher)  # a bad --teacher fails before any timing
    if fp is not None and tuple(getattr(fp, "input_shape", man["input_shape"])) != tuple(man["input_shape"]):
        raise BqcError(f"--teacher {teacher} takes inputs of shape {tuple(fp.input_shape)}; {d} was compiled "
                       f"for {tuple(man['input_shape'])}", hint="pass the model this library was lowered from")
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
    res.update(teacher=desc, note=note, torch_fp32_ms=None, speedup=None, fp32_size_mb=None)
    if fp is not None:
        fp = fp.eval()
        for p in fp.parameters():
            p.requires_grad_(False)
        n_fp = sum(p.numel() for p in fp.parameters())
        with torch.no_grad():
            fp_ms = _time(lambda: fp(x, t, y), repeat)
        res.update(torch_fp32_ms=fp_ms, speedup=fp_ms / bqc_ms, fp32_size_mb=4 * n_fp / 2**20)
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
