"""Load a lowered (compiled) bqc model: the TVM runtime and numpy only, no training code.

``load_compiled(dir) -> CompiledModel``: a sampler step model
``model(x, t, y=None, state=None) -> (eps, new_state)`` (torch tensors in and out when given
torch tensors, numpy otherwise), with ``.input_shape``, ``.conditional``, ``.batch``,
``.num_state``. Like :class:`bqc.graph.BqcModel`, the first step (``state=None``) feeds zero
caches and flag 0; later steps pass the returned state back. The library is compiled for a
static batch (``manifest["batch"]``): smaller batches are zero-padded, larger ones split.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["CompiledModel", "load_compiled", "read_compiled_manifest", "drop_native_log_lines"]


def _np(a, dtype=None):
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return np.array(a if dtype is None else a.astype(dtype, copy=False), order="C")  # keeps 0-d


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


_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm"}


def read_compiled_manifest(path) -> dict:
    """``manifest.json`` of a ``bqc lower`` TVM output folder; BqcError (exit 2) for anything else."""
    from bqc.errors import BqcError

    d = Path(path)
    man = d / "manifest.json"
    if not man.is_file():
        if (d / "export.json").is_file():
            raise BqcError(f"{d} is an ONNX export (bqc lower --backend onnx), not a compiled TVM library",
                           hint="run the ONNX model with onnxruntime, or lower with --backend tvm-x86 to run it here")
        raise BqcError(f"{d} is not a compiled folder from `bqc lower` (no manifest.json)",
                       hint="pass the -o folder of `bqc lower --backend tvm-x86`")
    try:
        m = json.loads(man.read_text())
    except (OSError, ValueError) as e:
        raise BqcError(f"{man} is unreadable or corrupt: {e}") from None
    if not isinstance(m, dict) or m.get("format") != "bqc-tvm" or not isinstance(m.get("files"), dict) \
            or "library" not in m["files"]:
        raise BqcError(f"{d}: not a bqc TVM library (manifest format {m.get('format') if isinstance(m, dict) else m!r})",
                       hint="pass the -o folder of `bqc lower --backend tvm-x86`")
    lib = d / m["files"]["library"]
    if not lib.is_file():
        raise BqcError(f"{d}: the library {lib.name} named in manifest.json is missing", hint="lower the artifact again")
    return m


def _check_library_arch(lib: Path, backend) -> None:
    """A library for another CPU fails in dlopen with a misleading "No such file": say what it is."""
    import platform

    from bqc.errors import BqcError

    try:
        with open(lib, "rb") as f:
            head = f.read(20)
    except OSError:
        return
    if head[:4] != b"\x7fELF" or len(head) < 20:
        return
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    built = _ELF_MACHINES.get(machine)
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if built and here in _ELF_MACHINES.values() and built != here:
        other = "tvm-arm" if here == "aarch64" else "tvm-x86"
        raise BqcError(f"{lib} was built for {built} ({backend or 'unknown backend'}); this machine is {here}",
                       hint=f"run it on an {built} machine, or lower the artifact with --backend {other} to run it here")


class CompiledModel:
    def __init__(self, path):
        import tvm
        from tvm import relax

        self.path = Path(path)
        self.manifest = m = read_compiled_manifest(self.path)
        _check_library_arch(self.path / m["files"]["library"], m.get("backend"))
        if m["backend"] == "tvm-cuda":
            from .tvm.cuda import load_cuda_library

            lib = load_cuda_library(self.path / m["files"]["library"])
            self.dev = tvm.cuda(0)
        else:
            with drop_native_log_lines("Scope Loaded:"):
                lib = tvm.runtime.load_module(str(self.path / m["files"]["library"]))
            self.dev = tvm.cpu(0)
        self.lib = lib
        with drop_native_log_lines("Scope Loaded:"):
            self.vm = relax.VirtualMachine(lib, self.dev)
        self._main = self.vm["main"]
        self.batch = int(m["batch"])
        self.input_shape = tuple(m["input_shape"])
        self.conditional = bool(m["conditional"])
        self.state_specs = m.get("state_inputs", [])
        self.num_state = len(m.get("state_outputs", []))

    def eval(self):  # sampler convenience, like nn.Module
        return self

    def raw_inputs(self, x, t, y=None, state=None) -> list:
        """TVM tensors for ``main`` for exactly ``self.batch`` rows (numpy/torch inputs)."""
        import tvm

        b = self.batch
        x = _np(x, np.float32)
        t = _np(t, np.int64)
        if t.ndim == 0:
            t = np.full((b,), t, np.int64)
        args = [x, t]
        if self.conditional:
            if y is None:
                raise ValueError("this model is class-conditional: pass class labels y")
            y = _np(y, np.int64)
            args.append(np.full((b,), y, np.int64) if y.ndim == 0 else y)
        if self.state_specs:
            if state is None:
                args += [np.zeros((b, *s["shape"]), np.float32) for s in self.state_specs]
                args.append(np.zeros((), np.float32))
            else:
                args += [_np(s, np.float32) for s in state]
                args.append(np.ones((), np.float32))
        return [tvm.runtime.tensor(np.array(a, order="C"), self.dev) for a in args]

    def _run(self, x, t, y, state):
        out = self._main(*self.raw_inputs(x, t, y, state))
        outs = [out] if hasattr(out, "numpy") else list(out)
        return [o.numpy() for o in outs]

    def __call__(self, x, t, y=None, state=None):
        torch_in = hasattr(x, "detach")
        xn = _np(x, np.float32)
        n = xn.shape[0]
        if tuple(xn.shape[1:]) != self.input_shape:
            raise ValueError(f"input of shape {xn.shape} does not fit this model, which takes "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        tn = _np(t, np.int64)
        tn = np.full((n,), tn, np.int64) if tn.ndim == 0 else tn
        yn = None
        if self.conditional:
            if y is None:
                raise ValueError("this model is class-conditional: pass class labels y")
            yn = _np(y, np.int64)
            yn = np.full((n,), yn, np.int64) if yn.ndim == 0 else yn
        sn = None if state is None else [_np(s, np.float32) for s in state]
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

            outs = self._run(cut(xn), cut(tn), None if yn is None else cut(yn),
                             None if sn is None else [cut(s) for s in sn])
            eps_parts.append(outs[0][: j - i])
            state_parts.append([o[: j - i] for o in outs[1:]])
        eps = np.concatenate(eps_parts, axis=0)
        new_state = [np.concatenate([p[k] for p in state_parts], axis=0) for k in range(self.num_state)]
        if torch_in:
            import torch

            eps = torch.from_numpy(eps)
            new_state = [torch.from_numpy(s) for s in new_state]
        return eps, (new_state if new_state else None)


def load_compiled(dir) -> CompiledModel:
    """A sampler-ready step model from a ``bqc lower`` output directory."""
    return CompiledModel(dir)
