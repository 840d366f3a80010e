"""Sample from a bqc bundle with the TVM runtime and numpy only: ``python -m bqc.run DIR``.

A bundle is the output folder of ``bqc lower --backend tvm-arm`` (or ``tvm-x86``): ``model.so``
(the compiled UNet step, a Relax VM executable), ``manifest.json`` (its signature, compiled batch,
BiDM's TBS state, the diffusion schedule and the sampler defaults; no host paths) and ``run.py``,
a verbatim copy of this file, so that a board needs no bqc install::

    python3 run.py -n 16 --steps 50 --eta 0 --seed 0 -o samples.png     # inside the bundle
    python3 -m bqc.run DIR -n 16 --steps 50 --eta 0 --seed 0 -o samples.png
    python3 run.py -n 4 --context prompt.npy --uncond empty.npy --guidance 7.5 -o latents.npy  # text

A text-conditioned model (the manifest's ``context`` is its ``[L, D]``) takes the prompt
embeddings with ``--context FILE.npy`` (float32 ``(L, D)`` for every sample, or ``(N, L, D)``:
sample i takes row i mod N; refused without it); ``--guidance S`` with ``--uncond FILE.npy`` (the
empty prompt, ``(L, D)`` or ``(1, L, D)``) runs classifier-free guidance,
``eps_u + S (eps_c - eps_u)`` on the raw predictions, each branch with its own TBS state
(:func:`guided`, ``bqc.diffusion.samplers.guided_call``'s rule). A model whose samples have
other than 1 or 3 channels makes latents, which this runner cannot decode (it has no VAE): they
are written as ``.npy`` (``-o samples.npy``), and a ``.png`` output is refused with that hint.

This file must stay importable with the Python standard library, numpy and the TVM runtime
alone: ``tvm_ffi`` (apache-tvm-ffi) and ``tvm/lib/libtvm_runtime.so`` of the apache-tvm wheel,
loaded without importing ``tvm`` (whose compiler library a board does not need); no torch, no
PIL, no bqc imports. It is the one home of what the host side (:mod:`bqc.backends.runtime`)
shares with a board: the bundle manifest check, the library architecture check, the native log
filter and the numpy step model (:class:`StepModel`: the model inputs in the manifest's order
(``x, t[, context][, y]``), static-batch padding/splitting and the TBS state threading: zero
caches and flag 0 on the first step, the returned state and flag 1 after).

The sampler is DDIM (:func:`ddim`), written to match ``bqc.diffusion.samplers.ddim_sample``
operation for operation: the same timesteps (the schedule's spacing), the same (eps, x0) split
for eps / v / x0 models, eta, the last step to the clean end. Only the random numbers differ:
the runner draws its starting noise and eta noise from numpy (``default_rng(seed)``), so its
images are not ``bqc sample``'s for the same seed; given the same noise they agree to float
rounding (tests/test_bundle.py). Images are written as a PNG grid (zlib + struct) laid out like
``bqc sample``'s and marked as bqc's, so bqc (and this runner) may replace it later.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import importlib.util
import json
import math
import os
import platform
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "RunError", "read_manifest", "library_arch_problem", "drop_native_log_lines", "StepModel", "load",
    "load_vm", "Schedule", "guided", "ddim", "sample", "grid", "write_png", "is_bqc_png", "main",
]

MANIFEST = "manifest.json"
FORMAT = "bqc-tvm"
PNG_TEXT = (b"Software", b"bqc")  # bqc.outputs.PNG_MARK: the tEXt chunk of every PNG bqc writes
_ALIGN = 64  # TVM's kernels assume 64-byte aligned tensors (kAllocAlignment)


class RunError(Exception):
    """A user-facing error of the runner: one paragraph and a hint; exit code 2."""

    def __init__(self, message: str, hint: str | None = None):
        self.message, self.hint = message, hint
        super().__init__(message)


def thread_cap() -> int:
    """The most ``--threads`` a command accepts: 4 per logical CPU (more is a typo, and OpenMP
    segfaulted at 99999); shared by bqc's commands and this runner."""
    return 4 * (os.cpu_count() or 1)


def threads_problem(threads) -> tuple[str, str] | None:
    """``(message, hint)`` when ``--threads`` exceeds :func:`thread_cap`, else None."""
    if threads is None or threads <= thread_cap():
        return None
    return (f"--threads {threads}: this machine has {os.cpu_count()} logical CPUs; at most {thread_cap()} are "
            "allowed (4 per CPU)", f"use --threads {os.cpu_count()} or fewer (1 is fastest on a busy machine)")


def available_memory() -> int | None:
    """Bytes of memory this machine can still give without swapping (``MemAvailable`` of
    /proc/meminfo), or None where that cannot be read: a command checks a request it can size
    up front (``-n`` samples) against it instead of dying in the allocator or the OOM killer;
    shared by bqc's commands (:func:`bqc.runtime.require_memory`) and this runner."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: errnos that name a problem with a path the user gave (exit 2, like any bad input); the others
#: (disk full, I/O error) are the machine's (exit 1)
PATH_ERRNOS = ("ENAMETOOLONG", "ENOENT", "ENOTDIR", "EISDIR", "EACCES", "EPERM", "ELOOP", "EROFS", "EEXIST", "EINVAL")


def os_error_paragraph(e: OSError) -> tuple[str, str, int]:
    """``(message, hint, exit code)`` for an OSError that escaped a command (the system refused a
    path, the disk filled): the system's reason and the path (a long one shortened), what to do,
    2 for a path the user gave and 1 for the machine's trouble (or a library's OSError without an
    errno); shared by bqc's commands and this runner."""
    if e.errno is None:  # a library's own OSError (PIL: "image file is truncated"): no errno to classify it by
        return (f"{type(e).__name__}: {e}", "an input file may be damaged or not what its name says (run with --debug "
                "to see where)", 1)
    name = str(e.filename) if e.filename is not None else ""
    shown = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"
    message = (e.strerror or str(e)) + (f": {shown}" if shown else "")
    if e.errno == errno.ENAMETOOLONG:
        limits = (os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")) if hasattr(os, "pathconf") \
            else (255, 4096)
        hint = f"shorten it: here each name in a path may have at most {limits[0]} bytes, and a whole path {limits[1]}"
    elif e.errno == errno.ENOSPC:
        hint = "free disk space (or choose an output on another disk) and run the command again"
    else:
        hint = "check the path and its permissions"
    return message, hint, 2 if errno.errorcode.get(e.errno) in PATH_ERRNOS else 1


@contextlib.contextmanager
def remembering_sigint():
    """Within it, Ctrl-C is remembered (the yielded list gets the signal number) and raised as
    Python's KeyboardInterrupt: TVM's FFI hands a KeyboardInterrupt raised inside its C++ calls (a
    compile, a VM call) back as a bare RuntimeError, and the list tells the command it was Ctrl-C.
    A SIGINT the shell ignores stays ignored; Python's handler is put back on the way out. Shared
    by bqc's commands and this runner."""
    import signal

    interrupted: list = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)


#: the most bytes a command reads whole from a text file it is given (a config, a manifest, a
#: recipe): real ones are kilobytes; /dev/zero or a 20 GB file named config.json would fill memory
MAX_TEXT_BYTES = 64 << 20


def require_regular_file(path) -> os.stat_result:
    """``os.stat(path)`` of a regular file; IsADirectoryError for a folder, ``ValueError`` for a
    device, a pipe or a socket (reading ``/dev/zero`` never ends, opening a FIFO blocks)."""
    import stat

    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a device, a pipe or a socket); give a file")
    return st


def read_small_file(path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of ``path``, read whole; ``ValueError`` (its message one sentence naming the path)
    for a folder, a device or a pipe (``/dev/zero`` filled memory, a FIFO blocked forever) or a file
    over ``limit`` bytes. A missing or unreadable file is the system's OSError, as ``open`` raises it.
    Shared by bqc's commands (:func:`bqc.errors.read_text_file`) and this runner."""
    st = require_regular_file(path)
    with open(path, "rb") as f:
        data = f.read(limit + 1)  # (bounded: a file may grow, /proc reports size 0)
    if max(st.st_size, len(data)) > limit:
        raise ValueError(f"{path} has {max(st.st_size, len(data)) / 2**20:.1f} MiB; a config, manifest or recipe "
                         f"this reads whole is at most {limit / 2**20:g} MiB (is it the right file?)")
    return data


# ------------------------------------------------------------------------------ the bundle
def read_manifest(path) -> dict:
    """``manifest.json`` of a ``bqc lower`` TVM output folder; :class:`RunError` for anything else."""
    d = Path(path)
    man = d / MANIFEST
    if not man.is_file():
        if (d / "export.json").is_file():
            raise RunError(f"{d} is an ONNX export (bqc lower --backend onnx), not a compiled TVM library",
                           hint="run the ONNX model with onnxruntime, or lower with --backend tvm-x86 to run it here")
        raise RunError(f"{d} is not a compiled folder from `bqc lower` (no manifest.json)",
                       hint="pass the -o folder of `bqc lower --backend tvm-x86`")
    try:
        m = json.loads(read_small_file(man))
    except (OSError, ValueError, RecursionError) as e:
        raise RunError(f"{man} is unreadable or corrupt: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict) \
            or "library" not in m["files"]:
        raise RunError(f"{d}: not a bqc TVM library (manifest format {m.get('format') if isinstance(m, dict) else m!r})",
                       hint="pass the -o folder of `bqc lower --backend tvm-x86`")
    name = m["files"]["library"]
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name:
        # a manifest naming ../../x.so or /usr/lib/x.so would load a library from outside the bundle
        raise RunError(f"{man}: the library must be a file in the bundle folder, not {str(name)[:120]!r}",
                       hint="lower the artifact again")
    lib = d / name
    if not lib.is_file():
        raise RunError(f"{d}: the library {lib.name} named in manifest.json is missing", hint="lower the artifact again")
    return m


_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm"}


def _this_machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def library_arch_problem(lib, backend=None) -> tuple[str, str] | None:
    """``(message, hint)`` when ``lib`` is an ELF library for another CPU than this one (dlopen
    would fail with a misleading "No such file"), else None."""
    try:
        with open(lib, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if head[:4] != b"\x7fELF" or len(head) < 20:
        return None
    built = _ELF_MACHINES.get(int.from_bytes(head[18:20], "little" if head[5] == 1 else "big"))
    here = _this_machine()
    if built and here in _ELF_MACHINES.values() and built != here:
        other = "tvm-arm" if here == "aarch64" else "tvm-x86"
        return (f"{lib} was built for {built} ({backend or 'unknown backend'}); this machine is {here}",
                f"run it on an {built} machine, or lower the artifact with --backend {other} to run it here")
    return None


@contextlib.contextmanager
def drop_native_log_lines(marker: str):
    """Run a block with the process's native stderr (fd 2) captured; afterwards re-emit every
    line except those containing ``marker``. TVM 0.27 logs one WARNING per memory scope
    whenever a VM executable is exported ("Scope Saving:") or loaded ("Scope Loaded:"); it
    carries no information."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real fd (e.g. captured): nothing to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True) if marker not in ln]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# ------------------------------------------------------------------------------ the step model
def _as(a, dtype) -> np.ndarray:
    """A C-contiguous numpy array of ``dtype`` (0-d stays 0-d, unlike np.ascontiguousarray)."""
    return np.array(np.asarray(a).astype(dtype, copy=False), order="C")


def _model_inputs(manifest: dict) -> list:
    """The model inputs of a bundle's step in ``main``'s order (``x, t[, context][, y]``): the
    manifest's ``inputs`` without the TBS caches and flag (``bqc.signature.Signature.from_json``'s
    reading; manifests without ``inputs``: ``x, t`` and ``y`` when class-conditional)."""
    names = list(manifest.get("inputs") or ["x", "t"] + (["y"] if manifest.get("conditional") else []))
    state = [s["name"] for s in manifest.get("state_inputs") or []]
    flag = (manifest.get("state_flag") or names[-1]) if state else None
    return [n for n in names if n not in state and n != flag]


class StepModel:
    """The compiled UNet step as a sampler calls it: ``model(x, t, y=None, state=None,
    context=None) -> (eps, new_state)`` on numpy arrays, for any number of rows.

    ``call(arrays) -> arrays`` runs the library's ``main`` on exactly ``batch`` rows (the
    static batch it was compiled for, ``manifest["batch"]``): fewer rows are zero-padded, more
    are split. ``state`` is what the previous call returned (``None`` on the first step: zero
    TBS caches and flag 0; later steps pass the caches back with flag 1); models without TBS
    return ``None`` as their state. ``context``: the text embedding of a text-conditioned model
    (``self.context`` is its per-row ``(L, D)``, None for other models), ``(N, L, D)`` or one
    ``(L, D)`` row for every sample; padded and split like ``x``.
    """

    def __init__(self, manifest: dict, call):
        self.manifest = manifest
        self._call = call
        self.batch = int(manifest["batch"])
        self.input_shape = tuple(manifest["input_shape"])
        self.conditional = bool(manifest["conditional"])
        self.model_inputs = _model_inputs(manifest)
        ctx = manifest.get("context")
        self.context = (int(ctx[0]), int(ctx[1])) if ctx and "context" in self.model_inputs else None
        self.state_specs = manifest.get("state_inputs", [])
        self.num_state = len(manifest.get("state_outputs", []))

    def _rows(self, name: str, v, n: int) -> np.ndarray:
        """Model input ``name`` for ``n`` rows (a scalar t / y, or one context row, broadcasts)."""
        if name in ("t", "y"):
            v = _as(v, np.int64)
            return np.full((n,), v, np.int64) if v.ndim == 0 else v
        v = _as(v, np.float32)
        if name == "context":
            if v.ndim == 2:
                v = np.broadcast_to(v, (n, *v.shape))
            if self.context is None or v.shape != (n, *self.context):
                raise ValueError(f"context of shape {v.shape} does not fit this model, which takes "
                                 f"(N, {', '.join(map(str, self.context or ()))}) for {n} rows")
            v = np.array(v, order="C")
        return v

    def _feed(self, x, t, y, context, n: int) -> dict:
        """The model inputs by name, each with ``n`` rows; ValueError for a missing one."""
        given = {"x": x, "t": t, "y": y, "context": context}
        feed = {}
        for name in self.model_inputs:
            if given.get(name) is None:
                raise ValueError("this model is class-conditional: pass class labels y" if name == "y"
                                 else f"this model takes the input {name!r}: pass it")
            feed[name] = self._rows(name, given[name], n)
        return feed

    def inputs(self, x, t, y=None, state=None, context=None) -> list:
        """The arguments of ``main`` (numpy) for exactly ``batch`` rows: the calling convention of
        ``bqc.signature.Signature.step_args``, read from the manifest's signature keys (written
        by ``Signature.to_json``; this runner imports no bqc module)."""
        return self._args(self._feed(x, t, y, context, self.batch), state)

    def _args(self, feed: dict, state) -> list:
        """``main``'s arguments from model inputs already shaped to ``batch`` rows (:meth:`_feed`)."""
        b = self.batch
        args = [feed[name] for name in self.model_inputs]
        if self.state_specs:
            if state is None:
                args += [np.zeros((b, *s["shape"]), np.float32) for s in self.state_specs]
                args.append(np.zeros((), np.float32))
            else:
                args += [_as(s, np.float32) for s in state]
                args.append(np.ones((), np.float32))
        return args

    def __call__(self, x, t, y=None, state=None, context=None):
        x = _as(x, np.float32)
        n = x.shape[0]
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input of shape {x.shape} does not fit this model, which takes "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        feed = self._feed(x, t, y, context, n)
        state = None if state is None else [_as(s, np.float32) for s in state]
        b = self.batch
        eps_parts, state_parts = [], []
        for i in range(0, n, b):
            j = min(i + b, n)
            pad = b - (j - i)

            def cut(a):
                a = a[i:j]
                if pad:
                    a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)], axis=0)
                return a

            outs = self._call(self._args({k: cut(v) for k, v in feed.items()},
                                         None if state is None else [cut(s) for s in state]))
            eps_parts.append(outs[0][: j - i])
            state_parts.append([o[: j - i] for o in outs[1:]])
        eps = np.concatenate(eps_parts, axis=0)
        new_state = [np.concatenate([p[k] for p in state_parts], axis=0) for k in range(self.num_state)]
        return eps, (new_state if new_state else None)


# ------------------------------------------------------------------------------ the TVM runtime
def _tvm_ffi():
    """``tvm_ffi`` with TVM's runtime library loaded (the VM, the thread pool), without
    importing ``tvm``: the runtime-only install of a board has no compiler library."""
    try:
        import tvm_ffi
    except ImportError:
        raise RunError("the TVM runtime is not installed here (no module tvm_ffi)",
                       hint="pip install apache-tvm numpy (the apache-tvm version in manifest.json's "
                            "\"runtime\" entry; docs/deploy.md)") from None
    spec = importlib.util.find_spec("tvm")
    lib = Path(spec.origin).parent / "lib" / "libtvm_runtime.so" if spec and spec.origin else None
    if lib is None or not lib.is_file():
        raise RunError("TVM's runtime library (tvm/lib/libtvm_runtime.so of the apache-tvm wheel) was not found",
                       hint="pip install apache-tvm (the version in manifest.json's \"runtime\" entry)")
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # registers the VM; a no-op when tvm is imported
    return tvm_ffi


def _aligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` in 64-byte aligned memory: TVM's kernels use aligned vector loads (numpy
    aligns to 16 bytes only; an unaligned input crashes the x86 library)."""
    buf = np.empty(a.nbytes + _ALIGN, np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    out = buf[off: off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _flat(o) -> list:
    if hasattr(o, "__dlpack__"):
        return [o]
    return [t for x in o for t in _flat(x)]


def load_vm(lib_path, func: str = "main"):
    """``call(arrays) -> arrays``: function ``func`` of an exported CPU Relax VM library run by
    TVM's runtime (numpy in, numpy out; tuple outputs flattened, copied out of the VM's pool)."""
    ffi = _tvm_ffi()
    with drop_native_log_lines("Scope Loaded:"):
        vm = ffi.load_module(str(lib_path))["vm_load_executable"]()
        vm["vm_initialization"](1, 0, 2)  # kDLCPU, device 0, pooled allocator
    fn = vm[func]

    def call(arrays):
        out = fn(*[ffi.from_dlpack(_aligned(np.asarray(a))) for a in arrays])
        return [np.from_dlpack(o).copy() for o in _flat(out)]

    return call


def load(path, threads: int | None = None) -> StepModel:
    """The step model of a bundle (CPU backends: tvm-arm, tvm-x86). ``threads`` sets
    ``TVM_NUM_THREADS`` (read when TVM's thread pool starts, so before the first load)."""
    d = Path(path)
    m = read_manifest(d)
    if m.get("backend") == "tvm-cuda":
        raise RunError(f"{d} is a tvm-cuda library: this runner runs CPU libraries (tvm-arm, tvm-x86)",
                       hint="sample it with `bqc sample DIR` on a GPU machine with bqc installed")
    lib = d / m["files"]["library"]
    problem = library_arch_problem(lib, m.get("backend"))
    if problem:
        raise RunError(*problem)
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    return StepModel(m, load_vm(lib))


# ------------------------------------------------------------------------------ the sampler
def ddim_timesteps(T: int, steps: int, spacing: str = "uniform", steps_offset: int = 0) -> list:
    """The timesteps a ``steps``-step DDIM sampler visits, descending (the one definition:
    :meth:`bqc.diffusion.schedule.NoiseSchedule.timesteps` calls this too).

    ``uniform`` (bqc's default): ``i * T // steps``; ``leading``: ``i * (T // steps)``; both plus
    ``steps_offset``. ``trailing``: ``round(T - i T / steps) - 1``; ``linspace``:
    ``round(linspace(0, T - 1, steps))`` -- diffusers' ``DDIMScheduler.set_timesteps``."""
    if int(steps) != steps or not (1 <= steps <= T):
        raise RunError(f"steps must be an integer in [1, {T}], got {steps!r}")
    steps = int(steps)
    if spacing == "uniform":
        ts = [i * T // steps + steps_offset for i in range(steps)][::-1]
    elif spacing == "leading":
        ts = [i * (T // steps) + steps_offset for i in range(steps)][::-1]
    elif spacing == "trailing":
        ts = [int(v) - 1 for v in np.round(np.arange(T, 0, -T / steps))][:steps]
    else:
        ts = [int(v) for v in np.linspace(0, T - 1, steps).round()[::-1]]
    if max(ts) > T - 1:
        raise RunError(f"{steps} steps with steps_offset {steps_offset} would visit t = {max(ts)} >= T = {T}",
                       hint="use fewer sampling steps")
    return ts


class Schedule:
    """The diffusion process of a bundle: ``abar`` (float64, from the manifest's betas), the
    prediction type and the timestep spacing (``bqc.diffusion.schedule.NoiseSchedule``'s)."""

    SPACINGS = ("uniform", "leading", "trailing", "linspace")

    def __init__(self, betas, prediction: str = "eps", spacing: str = "uniform", steps_offset: int = 0):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.abar = np.cumprod(1.0 - self.betas)
        self.T = len(self.betas)
        self.prediction, self.spacing, self.steps_offset = prediction, spacing, int(steps_offset)
        if prediction not in ("eps", "v", "x0") or spacing not in self.SPACINGS:
            raise RunError(f"this runner does not know prediction {prediction!r} / spacing {spacing!r}",
                           hint="use the run.py that `bqc lower` wrote into this bundle")

    @classmethod
    def from_manifest(cls, m: dict) -> "Schedule":
        diff, smp = m.get("diffusion") or {}, m.get("sampler") or {}
        if not smp.get("betas"):
            raise RunError("manifest.json records no diffusion schedule (sampler.betas): this bundle was "
                           "written by an older bqc", hint="lower the artifact again with this bqc")
        sched = diff.get("schedule") or {}
        return cls(smp["betas"], diff.get("prediction", "eps"), sched.get("spacing", "uniform"),
                   sched.get("steps_offset", 0))

    def timesteps(self, steps: int) -> list:
        """The timesteps a ``steps``-step DDIM sampler visits, descending."""
        return ddim_timesteps(self.T, steps, self.spacing, self.steps_offset)

    def split(self, out, x_t, t: int):
        """``(eps, x0)`` implied by the network output under this schedule's prediction type."""
        a = float(self.abar[t]) if t >= 0 else 1.0
        sa, s1a = math.sqrt(a), math.sqrt(1 - a)
        if self.prediction == "eps":
            return out, (x_t - s1a * out) / sa
        if self.prediction == "x0":
            return (x_t - sa * out) / s1a, out
        return s1a * x_t + sa * out, sa * x_t - s1a * out


def guided(model, x, t, y, state, context=None, uncond=None, guidance: float = 1.0):
    """One model evaluation of a sampler step (``bqc.diffusion.samplers.guided_call``'s rule):
    with ``uncond`` (the empty prompt's embedding) and ``guidance`` S != 1, classifier-free
    guidance ``out_u + S (out_c - out_u)`` on the raw predictions, the state being the pair
    ``(state_c, state_u)`` (each branch its own TBS caches, separate calls); else one call with
    ``context`` (passed only when given)."""
    def call(s, c):
        return model(x, t, y, s) if c is None else model(x, t, y, s, context=c)

    if uncond is None or guidance == 1.0:
        return call(state, context)
    s_c, s_u = state if state is not None else (None, None)
    out_c, s_c = call(s_c, context)
    out_u, s_u = call(s_u, uncond)
    return out_u + np.float32(guidance) * (out_c - out_u), (s_c, s_u)


def ddim(model, x_T, schedule: Schedule, steps: int, *, eta: float = 0.0, noise=None, y=None,
         clip_x0: float | None = None, callback=None, context=None, uncond=None, guidance: float = 1.0) -> np.ndarray:
    """DDIM from ``x_T`` (float32 ``(N, C, H, W)``) in ``steps`` steps, threading the model's
    state from each step to the next (``bqc.diffusion.samplers.ddim_sample``'s arithmetic).
    ``noise(shape)`` draws the eta noise (float32); ``callback(i, t)`` after each step;
    ``context`` / ``uncond`` / ``guidance``: text conditioning and classifier-free guidance
    (:func:`guided`)."""
    ts = schedule.timesteps(steps)
    x = np.asarray(x_T, dtype=np.float32)
    state = None
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = float(schedule.abar[t])
        a_prev = float(schedule.abar[t_prev]) if t_prev >= 0 else 1.0
        out, state = guided(model, x, np.full((x.shape[0],), t, np.int64), y, state, context, uncond, guidance)
        if out.shape != x.shape:
            raise RunError(f"the model returned a prediction of shape {out.shape} for input {x.shape}")
        eps, x0 = schedule.split(out, x, t)
        if clip_x0 is not None:
            x0 = np.clip(x0, -clip_x0, clip_x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * np.asarray(noise(x.shape), dtype=np.float32)
        if callback is not None:
            callback(i, t)
    return x


def _per_sample(a, n: int):
    """``(L, D)`` -> every sample; ``(M, L, D)`` -> sample i takes row ``i mod M`` (as ``bqc sample
    --data`` gives a latents file's rows)."""
    if a is None:
        return None
    a = np.asarray(a, dtype=np.float32)
    return a if a.ndim == 2 else a[np.arange(n) % a.shape[0]]


def sample(model: StepModel, schedule: Schedule, n: int, *, steps: int, eta: float = 0.0, seed: int = 0,
           callback=None, context=None, uncond=None, guidance: float = 1.0) -> np.ndarray:
    """``n`` samples ``(n, C, H, W)`` in [-1, 1]-ish (latents for a latent model): starting noise
    and eta noise from ``numpy.random.default_rng(seed)`` (the same numbers on every machine);
    class-conditional models get labels ``0..9`` in turn, as ``bqc sample`` gives them.
    ``context``: ``(L, D)`` (every sample) or ``(M, L, D)`` (sample i takes row i mod M); with
    ``uncond`` (``(L, D)`` or ``(1, L, D)``) and ``guidance`` != 1, classifier-free guidance."""
    rng = np.random.default_rng(int(seed))
    x_T = rng.standard_normal((int(n), *model.input_shape), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % 10 if model.conditional else None
    return ddim(model, x_T, schedule, steps, eta=eta, y=y, callback=callback,
                noise=lambda shape: rng.standard_normal(shape, dtype=np.float32),
                context=_per_sample(context, n), uncond=_per_sample(uncond, n), guidance=guidance)


# ------------------------------------------------------------------------------ PNG
def grid(x, nrow: int, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] (C 1 or 3) into a uint8 grid with white 1-pixel
    gaps (``bqc.diffusion.grid.make_grid``'s layout): ``(rows, cols)`` or ``(rows, cols, 3)``."""
    x = np.clip((np.asarray(x, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise RunError(f"cannot write {c}-channel samples as an image (1 or 3 channels)")
    nrow = max(1, min(int(nrow), n))
    rows = (n + nrow - 1) // nrow
    g = np.ones((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        g[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = (g * 255.0 + 0.5).astype(np.uint8)
    return arr[0] if c == 1 else arr.transpose(1, 2, 0)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path, arr: np.ndarray, scale: int = 1) -> Path:
    """Write a uint8 ``(H, W)`` (gray) or ``(H, W, 3)`` (RGB) array as a PNG, each pixel enlarged
    ``scale`` times, with bqc's ``Software: bqc`` text chunk."""
    a = np.asarray(arr, dtype=np.uint8)
    if scale > 1:
        a = a.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = a.shape[:2]
    color = 0 if a.ndim == 2 else 2
    rows = a.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 per scanline
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + _chunk(b"tEXt", PNG_TEXT[0] + b"\x00" + PNG_TEXT[1]) + _chunk(b"IDAT", zlib.compress(raw, 9))
           + _chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def is_bqc_png(path) -> bool:
    """True for a PNG with bqc's ``Software: bqc`` text chunk (written by bqc or this runner)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + length]
        if kind == b"tEXt" and body == PNG_TEXT[0] + b"\x00" + PNG_TEXT[1]:
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length
    return False


# ------------------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", description="Sample from a bqc bundle (the output of `bqc lower`) with the TVM runtime and numpy.")
    p.add_argument("dir", nargs="?", default=None,
                   help="the bundle folder (default: the folder this script is in, when it holds manifest.json)")
    p.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the bundle's sampler default)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta in [0, 1]: 0 deterministic, 1 stochastic (default: the bundle's sampler default)")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of the noise (default 0)")
    p.add_argument("-o", "--out", default=None, help=(
        "PNG grid to write (default samples.png); a latent model (samples of other than 1 or 3 channels): the "
        "latents as .npy (default samples.npy), since this runner has no VAE to decode them"))
    p.add_argument("--npy", default=None, help="also save the raw samples (N, C, H, W, float32 in [-1, 1]) as .npy")
    p.add_argument("--context", default=None, metavar="FILE.npy", help=(
        "text-conditioned models (required): the prompt embeddings, a float32 (L, D) array (every sample) or "
        "(N, L, D) (sample i takes row i mod N)"))
    p.add_argument("--uncond", default=None, metavar="FILE.npy",
                   help="the empty prompt's embedding, (L, D) or (1, L, D): the unconditional branch of --guidance")
    p.add_argument("--guidance", type=float, default=1.0, metavar="S", help=(
        "classifier-free guidance scale: eps_u + S (eps_c - eps_u), each branch its own TBS state; needs "
        "--uncond (default 1: the prompt branch only)"))
    p.add_argument("--threads", type=int, default=None, help="TVM threads (default: TVM_NUM_THREADS, else TVM's choice)")
    p.add_argument("--scale", type=int, default=4, help="pixel enlargement of the grid (default 4)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output that the runner did not write")
    return p


def _bundle_dir(arg) -> Path:
    if arg is not None:
        return Path(arg)
    here = Path(__file__).resolve().parent
    if (here / MANIFEST).is_file():
        return here
    raise RunError("no bundle folder given", hint="python3 -m bqc.run DIR ... (or run the run.py inside the bundle)")


def _check_out(path: Path, force: bool, what: str) -> None:
    """The house rule: never overwrite a file bqc did not write (unless --force)."""
    if path.is_symlink() and not (what == "-o" and path.is_file() and is_bqc_png(path)):
        raise RunError(f"{what} {path} is a symbolic link to {os.path.realpath(path)}, which bqc did not write; bqc does "
                       "not write through a link to another file (--force or not)", hint="remove the link, or choose another name")
    if path.is_dir():
        raise RunError(f"{what} {path} is a folder; this output is a file")
    if path.exists() and not force and not (what == "-o" and is_bqc_png(path)):
        raise RunError(f"{what} {path} already exists and was not written by bqc; refusing to overwrite it",
                       hint="choose another name, or pass --force to replace it")


def _embedding(path, what: str, shape, max_rows: int | None) -> np.ndarray:
    """A prompt embedding file (``--context`` / ``--uncond``): a float ``.npy`` of ``shape``
    ``(L, D)`` or ``(N, L, D)`` (``N <= max_rows`` when given), finite, as float32; RunError else."""
    want = f"(L, D) = {tuple(shape)} or (N, {', '.join(map(str, shape))})"
    try:
        require_regular_file(path)
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RunError(f"{what} {path}: not a readable .npy array ({str(e)[:200]})",
                       hint=f"save a float32 array of shape {want} with numpy.save") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.ndim not in (2, 3) or tuple(a.shape[-2:]) != tuple(shape) \
            or (a.ndim == 3 and not 1 <= a.shape[0] <= (max_rows or a.shape[0])) or a.size == 0:
        raise RunError(f"{what} {path} holds a {getattr(a, 'dtype', '?')} array of shape {getattr(a, 'shape', '?')}; "
                       f"this model takes text embeddings of shape {want}" + (f" with N <= {max_rows}" if max_rows else ""),
                       hint="encode the prompt with the text encoder the model was trained with (bqc encode --captions "
                            "... stores them) and save it with numpy.save")
    if not np.isfinite(a).all():
        raise RunError(f"{what} {path} holds NaN or inf values")
    return a.astype(np.float32)


def _conditioning(a, m: dict):
    """``(context, uncond)`` of the command line for the bundle's manifest ``m``; RunError for a
    text-conditioned model without ``--context``, or text options for a model that takes none."""
    model_inputs = _model_inputs(m)
    shape = m.get("context") if "context" in model_inputs else None
    if shape is None:
        if a.context or a.uncond or a.guidance != 1.0:
            raise RunError("--context / --uncond / --guidance are for text-conditioned models; this bundle's model "
                           "takes no text embedding", hint="leave them out")
        return None, None
    if a.context is None:
        raise RunError(f"this model is text-conditioned: pass the prompt embeddings with --context FILE.npy, a float32 "
                       f"array of shape (L, D) = {tuple(shape)} (every sample) or (N, {shape[0]}, {shape[1]}) "
                       "(sample i takes row i mod N)",
                       hint="encode the prompt with the text encoder the model was trained with (bqc encode --captions "
                            "... stores the embeddings) and save it with numpy.save")
    if not math.isfinite(a.guidance):
        raise RunError(f"--guidance must be a finite number, got {a.guidance}")
    if a.guidance != 1.0 and a.uncond is None:
        raise RunError(f"--guidance {a.guidance:g} needs --uncond FILE.npy (the empty prompt's embedding)",
                       hint="or use --guidance 1 (no guidance)")
    context = _embedding(a.context, "--context", shape, None)
    uncond = _embedding(a.uncond, "--uncond", shape, 1) if a.uncond else None
    return context, uncond


def _run(argv) -> int:
    a = _parser().parse_args(argv)
    d = _bundle_dir(a.dir)
    manifest = read_manifest(d)
    context, uncond = _conditioning(a, manifest)
    latent = len(manifest.get("input_shape") or ()) == 3 and manifest["input_shape"][0] not in (1, 3)
    defaults = (manifest.get("sampler") or {}).get("defaults") or {}
    a.steps = int(defaults.get("steps", 50)) if a.steps is None else a.steps
    a.eta = float(defaults.get("eta", 0.0)) if a.eta is None else a.eta
    for name, v in (("-n", a.n), ("--steps", a.steps), ("--scale", a.scale), ("--threads", a.threads)):
        if v is not None and v < 1:
            raise RunError(f"{name} must be at least 1, got {v}")
    if threads_problem(a.threads):
        raise RunError(*threads_problem(a.threads))
    if not 0 <= a.seed < 2**63:  # bqc's --seed range (numpy refuses negative seeds)
        raise RunError(f"--seed must be an integer in [0, 2**63 - 1], got {a.seed}")
    if not 0.0 <= a.eta <= 1.0:  # also NaN (bqc.diffusion.samplers.check_eta's rule)
        raise RunError(f"--eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {a.eta}")
    size = math.prod(manifest.get("input_shape") or (1,))
    need = 12 * a.n * size + (0 if latent else 5 * a.n * size * a.scale ** 2)  # noise + results, and the PNG grid
    have = available_memory()
    if have is not None and need > have:  # -n 10**9 was numpy's MemoryError traceback
        raise RunError(f"-n {a.n} at --scale {a.scale} needs about {need / 2**30:.1f} GiB; this machine has "
                       f"{have / 2**30:.1f} GiB available", hint="draw fewer samples (-n), or lower --scale")
    out = Path(a.out or ("samples.npy" if latent else "samples.png"))
    _check_out(out, a.force, "-o")  # first: a folder (`-o .`) has no name to suggest a suffix for
    if latent and out.suffix.lower() != ".npy":
        raise RunError(f"-o {out}: this model makes {manifest['input_shape'][0]}-channel latents, which this runner "
                       "cannot decode to an image (it has no VAE); it writes them as .npy",
                       hint=f"name it {out.with_suffix('.npy').name}, and decode the latents with the model's VAE "
                            "(bqc sample --vae decodes and writes a PNG)")
    if not latent and out.suffix.lower() != ".png":
        raise RunError(f"-o {out}: the sample grid is a PNG file", hint=f"name it {out.with_suffix('.png').name}")
    if a.npy:
        if not a.npy.endswith(".npy"):
            raise RunError(f"--npy {a.npy}: the raw samples are written as .npy")
        _check_out(Path(a.npy), a.force, "--npy")
    model = load(d, threads=a.threads)
    schedule = Schedule.from_manifest(model.manifest)
    schedule.timesteps(a.steps)  # refuse a bad --steps before any work
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()
    x = sample(model, schedule, a.n, steps=a.steps, eta=a.eta, seed=a.seed, context=context, uncond=uncond,
               guidance=a.guidance, callback=lambda i, t: tty and print(f"\rstep {i + 1}/{a.steps} (t={t})  ", end="", file=sys.stderr,
                                                   flush=True))
    if tty:
        print(file=sys.stderr)
    if not np.isfinite(x).all():
        raise RunError("sampling produced NaN/inf values", hint="the model may have diverged; lower an earlier checkpoint")
    if latent:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, x)
    else:
        write_png(out, grid(x, nrow=max(1, round(a.n ** 0.5))), scale=a.scale)
    if a.npy:
        Path(a.npy).parent.mkdir(parents=True, exist_ok=True)
        np.save(a.npy, x)
    m = model.manifest
    guide = f", guidance {a.guidance:g}" if uncond is not None and a.guidance != 1.0 else ""
    print(f"wrote {out}: {a.n} {'latents' if latent else 'samples'} of {m.get('recipe') or 'a bqc model'} "
          f"({m.get('backend')}), DDIM {a.steps} steps, eta {a.eta:g}{guide}, seed {a.seed}, "
          f"{time.perf_counter() - t0:.1f} s")
    if latent:
        print("the runner cannot decode latents: decode them with the model's VAE (z / scaling_factor, then the "
              "decoder)")
    return 0


def main(argv=None) -> int:
    """The command line; a :class:`RunError` is one paragraph on stderr and exit code 2."""
    with remembering_sigint() as interrupted:
        return _main(argv, interrupted)


def _main(argv, interrupted: list) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except RuntimeError:
        if not interrupted:
            raise
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    except RunError as e:
        print(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    except MemoryError:  # an allocation numpy or TVM still refuses mid-run
        print("error: out of memory: this machine could not allocate what the run needs\nhint: lower -n or --scale, "
              "or free memory", file=sys.stderr)
        return 1
    except OSError as e:  # the system refused a path (name too long, permission, disk full, ...): one paragraph
        message, hint, code = os_error_paragraph(e)
        print(f"error: {message}\nhint: {hint}", file=sys.stderr)
        return code

if __name__ == "__main__":
    sys.exit(main())
