"""Load a lowered (compiled) bqc model: the TVM runtime and numpy only, no training code.

``load_compiled(dir) -> CompiledModel``: a sampler step model
``model(x, t, y=None, state=None, context=None) -> (eps, new_state)`` (torch tensors in and out
when given torch tensors, numpy otherwise), with ``.input_shape``, ``.conditional``,
``.context`` (``(L, D)`` of a text-conditioned model's embedding, else None), ``.batch``,
``.num_state``. Like :class:`bqc.graph.BqcModel`, the first step (``state=None``) feeds zero
caches and flag 0; later steps pass the returned state back. The library is compiled for a
static batch (``manifest["batch"]``): smaller batches are zero-padded, larger ones split.

The numpy side of that (padding, splitting, the TBS state), the manifest check, the library
architecture check and the native log filter live in :mod:`bqc.run`, the stdlib + numpy + TVM
runtime module that ``bqc lower`` copies into every bundle as ``run.py``, so a board runs the same
code; this module adds torch tensors in and out, TVM's full runtime API (``.vm``, ``.lib`` for
``bqc bench``'s profile), CUDA libraries and the host CPU check.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bqc import run as R
from bqc.run import drop_native_log_lines

__all__ = ["CompiledModel", "load_compiled", "read_compiled_manifest", "drop_native_log_lines", "check_host_cpu"]


def _np(a, dtype=None):
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return np.array(a if dtype is None else a.astype(dtype, copy=False), order="C")  # keeps 0-d


def read_compiled_manifest(path) -> dict:
    """``manifest.json`` of a ``bqc lower`` TVM output folder; BqcError (exit 2) for anything else
    (:func:`bqc.run.read_manifest`, the runner's check)."""
    from bqc.errors import BqcError

    try:
        return R.read_manifest(path)
    except R.RunError as e:
        raise BqcError(e.message, hint=e.hint) from None


def _check_library_arch(lib: Path, backend) -> None:
    """A library for another CPU fails in dlopen with a misleading "No such file": say what it is."""
    from bqc.errors import BqcError

    problem = R.library_arch_problem(lib, backend)
    if problem:
        raise BqcError(problem[0], hint=problem[1])


def check_host_cpu(manifest: dict, path) -> None:
    """Refuse (BqcError, exit 2) a library built for ISA features this machine's CPU lacks: the
    manifest's ``cpu.required_features`` (written by ``bqc lower``) against
    :func:`bqc.backends.hostcpu.host_features` (what the CPU really executes, also under an
    emulator or in a VM). Running it would die with an illegal instruction instead. Manifests
    without the entry (older ones) and libraries for another architecture (see
    :func:`_check_library_arch`) pass."""
    from bqc.errors import BqcError

    from bqc.backends.hostcpu import best_x86_level, machine, missing_features

    cpu = manifest.get("cpu")
    if not isinstance(cpu, dict) or cpu.get("arch", "x86_64") != machine():
        return
    missing = missing_features(cpu.get("required_features") or [])
    if not missing:
        return
    backend = manifest.get("backend") or ("tvm-arm" if machine() == "aarch64" else "tvm-x86")
    portable = f" or a portable one with --cpu {best_x86_level()}" if machine() == "x86_64" else ""
    raise BqcError(
        f"{path} was built for the CPU {cpu.get('name') or cpu.get('mcpu')!r} (LLVM mcpu {cpu.get('mcpu')}) and "
        f"uses {', '.join(missing)}, which this machine's CPU lacks: running it would crash with an "
        "illegal instruction",
        hint=f"lower the artifact again on this machine (`bqc lower ART --backend {backend} -o DIR` builds for "
             f"the host by default){portable}")


class CompiledModel:
    def __init__(self, path):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: a runtime-only TVM has no compiler

        self.path = Path(path)
        self.manifest = m = read_compiled_manifest(self.path)
        _check_library_arch(self.path / m["files"]["library"], m.get("backend"))
        check_host_cpu(m, self.path)
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
            self.vm = VirtualMachine(lib, self.dev)
        self._main = self.vm["main"]
        self.step = R.StepModel(m, self._call)  # padding/splitting and the TBS state: bqc.run's
        self.batch, self.input_shape, self.conditional = self.step.batch, self.step.input_shape, self.step.conditional
        self.context = self.step.context
        self.state_specs, self.num_state = self.step.state_specs, self.step.num_state

    def eval(self):  # sampler convenience, like nn.Module
        return self

    def raw_inputs(self, x, t, y=None, state=None, context=None) -> list:
        """TVM tensors for ``main`` for exactly ``self.batch`` rows (numpy/torch inputs)."""
        import tvm

        args = self.step.inputs(_np(x), _np(t), None if y is None else _np(y),
                                None if state is None else [_np(s) for s in state],
                                None if context is None else _np(context))
        return [tvm.runtime.tensor(a, self.dev) for a in args]

    def _call(self, arrays) -> list:
        """``main`` on numpy arguments (copied into TVM tensors on the library's device)."""
        import tvm

        out = self._main(*[tvm.runtime.tensor(a, self.dev) for a in arrays])
        outs = [out] if hasattr(out, "numpy") else list(out)
        return [o.numpy() for o in outs]

    def __call__(self, x, t, y=None, state=None, context=None):
        torch_in = hasattr(x, "detach")
        eps, new_state = self.step(_np(x), _np(t), None if y is None else _np(y),
                                   None if state is None else [_np(s) for s in state],
                                   None if context is None else _np(context))
        if torch_in:
            import torch

            eps = torch.from_numpy(eps)
            new_state = None if new_state is None else [torch.from_numpy(s) for s in new_state]
        return eps, new_state


def load_compiled(dir) -> CompiledModel:
    """A sampler-ready step model from a ``bqc lower`` output directory."""
    return CompiledModel(dir)
