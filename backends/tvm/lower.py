"""Lower a deploy artifact to a compiled TVM library (tvm-x86 / tvm-arm / tvm-cuda) or to ONNX.

``lower(deploy, backend, out_dir, *, batch=16, threads=None) -> Path``

1. take the deploy artifact (:func:`bqc.deploy.as_deploy_artifact`: a
   :class:`~bqc.deploy.DeployArtifact`, its folder or a shipped model's zoo name). A backend
   never loads a training artifact, calibrates or folds: ``bqc lower`` folds a trained artifact
   first (:func:`bqc.deploy.fold`, with ``--calibrate`` for untrained ones) and hands over the
   result; its calibration is recorded from the deploy artifact's provenance;
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
its manifest holds no host paths: the source is recorded by folder name and content hashes
(:func:`_source_record`, from the deploy artifact's manifest), next to everything sampling needs (the diffusion schedule with
its betas, the sampler defaults, the TBS state signature, a text-conditioned model's ``context``
``[L, D]``: the step takes ``context`` as its third input, seeded Gaussian at export). The tools a backend needs are checked
before any work (:func:`check_tools`), and the bundle is written in a staging folder that is
moved into place at the end (:func:`staged_output`): a failed run leaves nothing behind.

``bench(dir, threads=None, teacher=None) -> dict`` times the compiled step against PyTorch FP32
eager of the FP teacher at the same batch and thread count (both on the same seeded inputs,
``context`` included); the caller resolves the teacher
(``bqc bench``: :func:`bqc.teacher.resolve_teacher`, by the zoo name the bundle records or
``--teacher``), the backend loads no artifact.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bqc.errors import BqcError
from bqc.backends import BACKENDS
from bqc.backends.runtime import drop_native_log_lines
from bqc.console import quiet, staged
from bqc.signature import Signature

__all__ = ["BACKENDS", "DEFAULT_BATCH", "lower", "preflight", "bench", "build_relax", "lowered_module"]

DEFAULT_BATCH = 16
MANIFEST_FORMAT = "bqc-tvm"
#: what :func:`lower` reports to its ``progress(stage)`` callback, in order (onnx: load, export)
STAGES = ("load", "export", "import", "compile", "build", "write")


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
    raise BqcError(f"unknown backend {backend!r}", hint=f"valid backends: {', '.join(BACKENDS)}")


def lowered_module(dg, batch: int, target, progress=None):
    """Deploy graph -> (Relax IRModule with call_tir kernels, params, Converter); ``progress``:
    an optional stage callback (:data:`STAGES`)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from bqc import deploy as D

    from .convert import Converter

    staged(progress, "export")
    args = D.step_inputs(dg, batch=batch, seed=0)
    ep = D.export_program(dg, args, dynamic_batch=False)
    staged(progress, "import")
    conv = Converter(ep, target)
    mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=conv.convert_map())
    mod, params = relax.frontend.detach_params(mod)
    return mod, params, conv


def _build_cuda(mod, params, target):
    import tvm
    from tvm import relax

    from .relax_import import MarkViewsOpaque, bind_params

    mod = bind_params(mod, params)
    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        MarkViewsOpaque(),
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

        check_arm_env()
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


def _source_record(dart) -> dict | None:
    """What a bundle was lowered from, without host paths, all read from the deploy artifact
    (:class:`~bqc.deploy.DeployArtifact`, its manifest holding the provenance): the folder name
    (the deploy artifact's, else the trained artifact it was folded from), the content hash of
    the weights it holds (``sha256``: ``deploy.safetensors``), that of the FP teacher program of
    the trained artifact (``teacher_sha256``: ``bqc bench --teacher`` checks it), its model
    (``model``: a zoo name resolves the teacher by name) and what ``bqc eval`` reads of its
    training record (data, resize, the sampling steps it was trained for). None for a deploy
    graph that came from no folder."""
    man = dart.manifest
    folded_from = man.get("artifact") or {}
    path = getattr(dart, "path", None)
    if path is None and not folded_from:
        return None
    src = man.get("source") or {}
    rec = {"name": Path(path).name if path is not None else folded_from.get("name"),
           "sha256": dart.tensors_sha256(), "teacher_sha256": folded_from.get("teacher_sha256"),
           "model": {k: src.get(k) for k in ("kind", "name", "description") if src.get(k) is not None}}
    train = man.get("train") or {}
    if train:
        opts = train.get("options") or {}
        rec["train"] = {"data": train.get("data"), "steps": train.get("steps"),
                        "options": {k: opts.get(k) for k in ("resize", "sample_steps") if k in opts}}
    return rec


def _sampling_entries(dart) -> dict:
    """``diffusion`` (the schedule spec and prediction type, as in an artifact manifest: what
    ``bqc sample`` / ``bqc eval`` read) and ``sampler`` (the betas and the defaults the bundle's
    ``run.py`` samples with: DDIM, the step count the model was trained for, eta 0)."""
    from bqc.diffusion.schedule import NoiseSchedule

    man = dart.manifest
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


def preflight(backend: str, threads: int | None = None, cpu: str | None = None, target=None):
    """Check what ``backend`` needs before any work (a known backend, its tools: :func:`check_tools`,
    a valid ``--cpu`` / ``--target``) and return its resolved target (:func:`_target`): a
    missing compiler or a bad CPU name fails here, in well under a second, not after folding
    or the build."""
    if backend not in BACKENDS:
        raise BqcError(f"unknown backend {backend!r}", hint=f"valid backends: {', '.join(BACKENDS)}")
    check_tools(backend)
    return _target(backend, threads, cpu, target)


def lower(deploy, backend: str, out_dir, *, batch: int = DEFAULT_BATCH, threads: int | None = None,
          cpu: str | None = None, target=None, progress=None) -> Path:
    """Compile a deploy artifact (:class:`~bqc.deploy.DeployArtifact`, its folder or zoo name, or a
    deploy graph) for ``backend``; see the module docstring. ``cpu`` / ``target``: the CPU to
    build for (:func:`_target`; ``target`` may be :func:`preflight`'s). Returns ``out_dir``."""
    from bqc.deploy import as_deploy_artifact

    staged(progress, "load")  # TVM itself, the target, then the deploy artifact
    tgt = preflight(backend, threads, cpu, target)
    with staged_output(out_dir) as out, quiet():  # TVM's/torch's noise hidden (bqc --debug shows it)
        _lower_into(out, as_deploy_artifact(deploy), backend, tgt, batch=batch, threads=threads, cpu=cpu,
                    progress=progress)
    return Path(out_dir)


def _lower_into(out: Path, dart, backend: str, tgt, *, batch: int, threads, cpu, progress=None) -> None:
    """:func:`lower`'s work on the deploy artifact ``dart``, written into the (staging) folder
    ``out``; ``progress(stage)`` is told each of :data:`STAGES` as it starts."""
    if backend == "onnx":
        staged(progress, "export")
        from bqc.backends.onnx.export import export_onnx

        export_onnx(dart, out, batch=min(batch, 2))
        return
    from bqc import deploy as D

    dg = dart.gm
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
    prov = dart.manifest
    man = {
        "format": MANIFEST_FORMAT,
        "backend": backend,
        "target": str(tgt),
        **_cpu_entry(backend, tgt, cpu),
        "layout_version": D.LAYOUT_VERSION,
        "batch": int(batch),
        "model": prov.get("source"),
        "recipe": prov.get("recipe"),
        "source": _source_record(dart),
        "calibration": prov.get("calibration") or "deploy artifact",
        "runtime": _runtime_requirements(),
        **Signature.of(dg).to_json(),
        "files": files,
        "sizes": _sizes(dg),
        "kernels": dict(conv.counts),
        "fallbacks": [list(f) for f in conv.fallbacks],
        "kernel_failures": [[f[0], list(f[1]), f[2]] for f in conv.failures],
        "build_seconds": round(build_s, 1),
        **_sampling_entries(dart),  # last: the betas are long
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


def step_feed(model, seed: int = 0):
    """Seeded random model inputs at a compiled model's batch (``{"x", "t"[, "y"][, "context"]}``,
    torch tensors: what the FP teacher is called with too) and the VM's raw argument list."""
    import torch

    from bqc.deploy.export import model_feed

    sig = Signature.from_json(model.manifest)
    feed = model_feed(sig, model.batch, torch.Generator().manual_seed(seed))  # the deploy graph's example inputs
    feed = {k: v for k, v in feed.items() if k in sig.model_inputs}
    return feed, model.raw_inputs(**feed, state=None)


def step_inputs(model, seed: int = 0):
    """:func:`step_feed` as ``(x, t, y, raw args)`` (``y`` None for unconditional models; a
    text-conditioned model's context is in the raw args only: use :func:`step_feed`)."""
    feed, args = step_feed(model, seed)
    return feed["x"], feed["t"], feed.get("y"), args


#: ``bench``'s note when it is given no teacher
NO_TEACHER = ("no FP32 teacher given: the compiled step is timed alone (pass --teacher MODEL: the artifact, "
              "or its source model)")


def bench(dir, threads: int | None = None, *, teacher=None, repeat: int = 10, profile: bool = True) -> dict:
    """Compiled UNet step vs PyTorch FP32 eager of the FP teacher (same batch/threads).

    ``teacher``: ``(model, description, note)`` as :func:`bqc.teacher.resolve_teacher` returns it
    (``bqc bench`` resolves it: the zoo model the bundle records by name, or ``--teacher``), or
    None: the compiled step is timed alone. The backend loads no artifact.

    Returns ``{"backend", "threads", "batch", "bqc_ms", "torch_fp32_ms", "speedup", "size_mb",
    "fp32_size_mb", "teacher", "note", "profile"}`` (``profile``: ``[(function, ms)]``, slowest
    first; ``torch_fp32_ms`` / ``speedup`` / ``fp32_size_mb`` are None without a teacher, and
    ``note`` says why).
    TVM's thread pool size is fixed when it starts in a process (``TVM_NUM_THREADS``; TVM's
    default here is 1 thread, one per physical core): ``tvm_threads`` reports what TVM really
    used, so run each thread count in a fresh process (``bqc bench --threads N``).
    """
    import torch

    from bqc.backends.runtime import load_compiled, read_compiled_manifest

    d = Path(dir)
    man = read_compiled_manifest(d)  # BqcError for an ONNX export or any other folder
    if man["backend"] != "tvm-x86":
        raise BqcError(f"bench runs tvm-x86 libraries on this machine; {d} is {man['backend']}")
    fp, desc, note = teacher if teacher is not None else (None, None, NO_TEACHER)
    if fp is not None and tuple(getattr(fp, "input_shape", man["input_shape"])) != tuple(man["input_shape"]):
        raise BqcError(f"the teacher ({desc}) takes inputs of shape {tuple(fp.input_shape)}; {d} was compiled "
                       f"for {tuple(man['input_shape'])}", hint="pass the model this library was lowered from")
    want_ctx = Signature.from_json(man).context
    if fp is not None and getattr(fp, "context", want_ctx) != want_ctx:
        raise BqcError(f"the teacher ({desc}) takes text embeddings of shape {fp.context}; {d} was compiled for "
                       f"{want_ctx}", hint="pass the model this library was lowered from")
    threads = int(threads or os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    import tvm

    tvm_threads = int(tvm.get_global_func("runtime.NumThreads")())
    torch.set_num_threads(threads)
    model = load_compiled(d)
    b = model.batch
    feed, args = step_feed(model)
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
            fp_ms = _time(lambda: fp(**feed), repeat)
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
