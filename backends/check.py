"""Check a lowered bundle against the deploy graph's reference executor: what ``bqc lower`` runs
after each TVM build on a machine that can run the library.

The compiled step and :class:`~bqc.graph.BqcModel` of the deploy graph take the same seeded
inputs: a first sampling step without TBS state and, for a graph with state, a second step fed
the reference's state (so each step is checked on its own). The deploy contract is a relative
error (max |a - b| / max |b| over eps and the state) of at most :data:`TOL` per row. A row over
it is handed to :func:`bqc.deploy.flips.explain`: when forcing a few of the reference's
quantizer decisions that lie within float rounding of their boundary removes the difference,
the row differs by rounding flips (the library's float parts round in another order), not by a
wrong kernel; otherwise the check fails.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

TOL = 1e-4
ROWS = 4


@dataclass
class CheckResult:
    """``max_rel_err``: the largest per-row relative error before any flip; ``rows_over_tol``:
    ``(step, row)`` of the rows above :data:`TOL`; ``flips``: the forced decisions that explain
    them (module, margin relative to the tensor's range); ``unexplained``: the rows they do not
    explain, with the relative error left after forcing them."""

    rows: int
    steps: int
    max_rel_err: float
    tol: float = TOL
    rows_over_tol: list = field(default_factory=list)
    flips: list = field(default_factory=list)
    unexplained: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unexplained

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        head = (f"checked against the deploy graph's reference executor: {self.rows} rows x {self.steps} "
                f"step{'s' if self.steps > 1 else ''}, max relative error {self.max_rel_err:.1e}")
        if not self.rows_over_tol:
            return head
        n = len(self.rows_over_tol)  # rows counted once per step
        if self.ok:
            worst = max(f["margin"] for f in self.flips)
            return (f"{head}: {n} row{'s' if n > 1 else ''} (per step) over {self.tol:.0e}, all explained by rounding flips "
                    f"({len(self.flips)} quantizer decision{'s' if len(self.flips) > 1 else ''} within "
                    f"{worst:.1e} of the tensor's range from the boundary; forced in the reference, the rows match)")
        return (f"{head}: {len(self.unexplained)} of the {n} rows (per step) over {self.tol:.0e} are not explained by rounding "
                f"flips (relative error left: {max(u['error_after'] for u in self.unexplained):.1e})")


def why_not_here(manifest: dict, path) -> str | None:
    """None when this machine can run the bundle at ``path``; else why not (another CPU
    architecture, missing ISA features, no CUDA GPU)."""
    from pathlib import Path

    from bqc import run as R
    from bqc.backends.hostcpu import machine, missing_features

    backend = manifest.get("backend")
    if backend == "tvm-cuda":
        try:
            import tvm

            return None if tvm.cuda(0).exist else "no CUDA GPU on this machine"
        except Exception as e:  # noqa: BLE001 - a TVM without CUDA support
            return f"TVM cannot reach a CUDA GPU here ({type(e).__name__})"
    problem = R.library_arch_problem(Path(path) / manifest["files"]["library"], backend)
    if problem:
        return problem[0]
    cpu = manifest.get("cpu")
    if isinstance(cpu, dict) and cpu.get("arch", "x86_64") == machine():
        missing = missing_features(cpu.get("required_features") or [])
        if missing:
            return f"this machine's CPU lacks {', '.join(missing)}"
    return None


def _rows(out, i: int) -> tuple:
    eps, state = out
    return eps[i:i + 1], None if state is None else [s[i:i + 1] for s in state]


def _rel(a, b) -> float:
    a = torch.cat([a[0].reshape(-1)] + [s.reshape(-1) for s in (a[1] or [])]).double()
    b = torch.cat([b[0].reshape(-1)] + [s.reshape(-1) for s in (b[1] or [])]).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_lowered(dart, path, *, rows: int = ROWS, seed: int = 0, tol: float = TOL) -> CheckResult:
    """Run the bundle at ``path`` and the reference of ``dart`` (the deploy artifact it was lowered
    from) on ``rows`` seeded rows; see the module docstring."""
    from bqc.backends.runtime import load_compiled
    from bqc.deploy import flips
    from bqc.deploy.export import model_feed
    from bqc.graph import BqcModel
    from bqc.signature import Signature

    gm = dart.gm
    sig = Signature.of(gm)
    model, ref = load_compiled(path), BqcModel(gm).eval()
    g = torch.Generator().manual_seed(seed)
    feed = model_feed(sig, rows, g)
    x, t = feed.pop("x"), feed.pop("t")
    kw = {k: v for k, v in feed.items() if k in sig.model_inputs}
    calls = [(x, t, None)]
    res = CheckResult(rows=rows, steps=1, max_rel_err=0.0, tol=tol)
    with torch.no_grad():
        step = 0
        while step < len(calls):
            xs, ts, state = calls[step]
            got, want = model(xs, ts, state=state, **kw), ref(xs, ts, state=state, **kw)
            if step == 0 and want[1] is not None:  # a second step, fed the reference's state
                calls.append((torch.randn(x.shape, generator=g), (t - 20).clamp(min=0), want[1]))
                res.steps = 2
            for i in range(rows):
                err = _rel(_rows(got, i), _rows(want, i))
                res.max_rel_err = max(res.max_rel_err, err)
                if err <= tol:
                    continue
                res.rows_over_tol.append((step, i))
                row_kw = {k: v[i:i + 1] for k, v in kw.items()}
                row_state = None if state is None else [s[i:i + 1] for s in state]
                args = (xs[i:i + 1], ts[i:i + 1])
                found = flips.explain(ref, gm, _rows(got, i), *args, state=row_state, tol=tol, **row_kw)["flips"]
                with flips.forced(gm, found):  # judged again in the contract's own measure
                    after = _rel(_rows(got, i), ref(*args, state=row_state, **row_kw))
                res.flips += [{"module": f.module, "margin": f.margin} for f in found]
                if not found or after > tol:
                    res.unexplained.append({"step": step, "row": i, "error_after": after})
            step += 1
    return res
