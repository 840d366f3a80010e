"""Tell a flipped sign from a wrong kernel: explain a compiled model's output by forced flips.

A lowered library computes the float parts of a deploy graph in another order than torch (fused
and scheduled convs, other reductions, approximate SiLU). Wherever a binarizer's or an
activation quantizer's input lies within float rounding of its decision boundary, the two can
pick different signs or codes, and a binary network carries that difference on: one flipped
sign before an attention block changes every later position (docs/backends.md, "CUDA on a
GPU"). A relative-error bound alone cannot say whether a large difference is such a flip or a
wrong kernel. :func:`explain` can: it looks for the quantizer inputs of the reference run that
lie nearest their boundaries and forces them, one at a time, to the other side in the reference
(:func:`forced`); a difference that a few forced flips remove is a rounding flip, and the
reference with those flips must then match the compiled output to the usual bound.

Only the quantizer's decision is forced (its ``quantize`` / ``codes`` / fake-quant value); the
float tensor itself is left alone for everything else that reads it (K maps, shortcuts).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .modules import QuantizeCodes, SignBinarize

__all__ = ["Flip", "quantizers", "record_inputs", "near_boundary", "forced", "explain", "flat"]

_METHODS = ("quantize", "codes", "forward")


@dataclass(frozen=True)
class Flip:
    """One forced decision: quantizer ``module`` (its name in the graph), input element ``index``;
    ``margin``: the input's distance to the boundary relative to the tensor's largest |value|."""

    module: str
    index: tuple
    margin: float


def quantizers(gm: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every sign binarizer and code quantizer of a deploy graph, by module name."""
    return {n: m for n, m in gm.named_modules() if isinstance(m, (SignBinarize, QuantizeCodes))}


@contextlib.contextmanager
def _wrapped(mods: dict[str, torch.nn.Module], fn):
    """Route each quantizer's input through ``fn(name, x) -> x`` (instance-level wrappers that
    nest: an outer ``_wrapped`` sees the input before an inner one changes it). A quantizer
    method called from another of its own methods (``forward`` -> ``codes``) is passed through,
    so ``fn`` sees each input once."""
    key = object()
    saved = []
    for name, m in mods.items():
        busy = set()
        for meth in _METHODS:
            prev = getattr(m, meth)  # bound: the class's method, or an enclosing wrapper
            saved.append((m, meth, m.__dict__.get(meth)))

            def call(x, *a, _prev=prev, _name=name, _busy=busy, **k):
                if key in _busy:
                    return _prev(x, *a, **k)
                _busy.add(key)
                try:
                    return _prev(fn(_name, x), *a, **k)
                finally:
                    _busy.discard(key)

            setattr(m, meth, call)
    try:
        yield
    finally:
        for m, meth, prev in reversed(saved):
            if prev is None:
                m.__dict__.pop(meth, None)
            else:
                m.__dict__[meth] = prev


def record_inputs(model, gm, *args, **kwargs) -> tuple[object, dict[str, torch.Tensor]]:
    """``(model(*args), {quantizer name: its input})`` (the first call of each quantizer)."""
    seen: dict[str, torch.Tensor] = {}

    def rec(name, x):
        seen.setdefault(name, x.detach().clone())
        return x

    with _wrapped(quantizers(gm), rec), torch.no_grad():
        out = model(*args, **kwargs)
    return out, seen


def _margin(q, x: torch.Tensor) -> torch.Tensor:
    """Distance of each element of ``x`` to the quantizer's nearest decision boundary (inf where
    no boundary is in range)."""
    if isinstance(q, SignBinarize):
        return q.shifted(x).abs()
    u = x / q.step.to(x.dtype)
    lo = torch.floor(u)
    h = lo + 0.5
    inside = (lo >= q.qmin) & (lo + 1 <= q.qmax)
    d = (u - h).abs() * q.step.to(x.dtype)
    return torch.where(inside, d, torch.full_like(d, float("inf")))


def near_boundary(gm, inputs: dict[str, torch.Tensor], rel_eps: float = 1e-5, limit: int = 32) -> list[Flip]:
    """The quantizer inputs within ``rel_eps`` (relative to each tensor's largest |value|) of a
    decision boundary, nearest first, at most ``limit``."""
    mods = quantizers(gm)
    found = []
    for name, x in inputs.items():
        scale = float(x.abs().max()) or 1.0
        m = _margin(mods[name], x) / scale
        idx = torch.nonzero(m < rel_eps)
        found += [Flip(name, tuple(int(v) for v in i), float(m[tuple(i)])) for i in idx[:limit]]
    return sorted(found, key=lambda f: f.margin)[:limit]


def _pushed(q, x: torch.Tensor, index: tuple) -> torch.Tensor:
    """``x`` with element ``index`` moved to the other side of its nearest boundary."""
    x = x.clone()
    if isinstance(q, SignBinarize):
        tau = 0.0 if q.tau is None else float(q.tau[index[q.ch_axis]])
        s = float(x[index]) + tau
        delta = 1e-3 * max(1.0, abs(tau), float(x.abs().max()))
        x[index] = -tau - delta if s >= 0 else -tau + delta
        return x
    step = float(q.step)
    u = float(x[index]) / step
    h = math.floor(u) + 0.5
    code = round(min(max(u, q.qmin), q.qmax))  # the decision as made: half to even, like torch.round
    x[index] = (h + 0.5 if code < h else h - 0.5) * step  # the centre of the code on h's other side
    return x


@contextlib.contextmanager
def forced(gm, flips: list[Flip]):
    """Run the deploy graph with each flip's quantizer decision forced to the other side."""
    mods = quantizers(gm)
    by_mod: dict[str, list[Flip]] = {}
    for f in flips:
        by_mod.setdefault(f.module, []).append(f)

    def push(name, x):
        for f in by_mod.get(name, ()):
            x = _pushed(mods[name], x, f.index)
        return x

    with _wrapped({n: mods[n] for n in by_mod}, push):
        yield


def flat(out) -> torch.Tensor:
    """A step's ``(eps, state)`` as one float64 vector (what the errors here are measured on)."""
    eps, state = out
    parts = [eps.reshape(-1)] + [s.reshape(-1) for s in (state or [])]
    return torch.cat([p.double() for p in parts])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def explain(model, gm, target, *args, tol: float = 1e-4, rel_eps: float = 1e-5, max_flips: int = 8,
            **kwargs) -> dict:
    """Explain ``target`` (the compiled model's ``(eps, state)`` for the same call) by forced
    flips in the reference ``model`` (a :class:`~bqc.graph.BqcModel` of the deploy graph ``gm``).

    Greedy: among the quantizer inputs nearest a boundary (:func:`near_boundary`), force the
    first whose flip at least halves the relative error (eps and TBS state together), record it,
    look again from the new run, until the error is within ``tol`` or nothing helps. Returns
    ``{"error": before, "error_after": after, "flips": [Flip...], "explained": after <= tol,
    "tried": flips tried}``: ``explained`` with flips means the difference was rounding at
    boundaries (the flips' margins say how close); not explained means a real discrepancy.
    """
    want = flat(target)
    flips: list[Flip] = []
    out, inputs = record_inputs(model, gm, *args, **kwargs)
    err0 = err = _rel(flat(out), want)
    tried = 0
    while err > tol and len(flips) < max_flips:
        for c in (c for c in near_boundary(gm, inputs, rel_eps) if c not in flips):
            tried += 1
            with forced(gm, flips + [c]):  # the inputs recorded are the next search's
                out, seen = record_inputs(model, gm, *args, **kwargs)
            e = _rel(flat(out), want)
            if e <= 0.5 * err:
                flips, err, inputs = flips + [c], e, seen
                break
        else:
            break
    return {"error": err0, "error_after": err, "flips": flips, "explained": err <= tol, "tried": tried}
