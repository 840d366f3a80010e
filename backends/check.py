"""Check a lowered bundle against the deploy graph's reference executor: what ``bqc lower`` runs
after each TVM build on a machine that can run the library.

The compiled step and :class:`~bqc.graph.BqcModel` of the deploy graph take the same seeded
inputs: a first sampling step without TBS state and, for a graph with state, a second step fed
the reference's state (so each step is checked on its own). The deploy contract is a relative
error (max |a - b| / max |b| over eps and the state) of at most :data:`TOL` per row. A row over
it is handed to :func:`bqc.deploy.flips.explain`: when forcing a few of the reference's
quantizer decisions that lie within float rounding of their boundary removes the difference,
the row differs by rounding flips (the library's float parts round in another order), not by a
wrong kernel. The reference is itself run on the row alone first: torch's batched and
single-row convs round differently too, so the batched reference can flip a decision of its own;
a row that matches the reference run on it alone is explained that way (``alone``). Anything
else fails the check.
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
    them (module, margin relative to the tensor's range); ``alone``: ``(step, row)`` of the rows
    that match the reference run on that row alone (the batched reference flipped a decision:
    torch rounds a batched conv differently); ``unexplained``: the rows neither explains, with the
    relative error left after forcing the flips."""

    rows: int
    steps: int
    max_rel_err: float
    tol: float = TOL
    rows_over_tol: list = field(default_factory=list)
    flips: list = field(default_factory=list)
    alone: list = field(default_factory=list)
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
            why = []
            if self.flips:
                worst = max(f["margin"] for f in self.flips)
                why.append(f"{len(self.flips)} quantizer decision{'s' if len(self.flips) > 1 else ''} within {worst:.1e} "
                           "of the tensor's range from the boundary; forced in the reference, the rows match")
            if self.alone:
                k = len(self.alone)
                why.append(f"{k} row{'s' if k > 1 else ''} match{'' if k > 1 else 'es'} the reference run on "
                           f"{'them' if k > 1 else 'it'} alone: the batched reference flipped a decision of its own")
            return (f"{head}: {n} row{'s' if n > 1 else ''} (per step) over {self.tol:.0e}, all explained by rounding flips "
                    f"({'; '.join(why)})")
        return (f"{head}: {len(self.unexplained)} of the {n} rows (per step) over {self.tol:.0e} are not explained by rounding "
                f"flips (relative error left: {max(u['error_after'] for u in self.unexplained):.1e})")


def why_not_here(manifest: dict, path) -> str | None:
    """None when this machine can run the bundle at ``path``; else why not: the reasons
    :class:`~bqc.backends.runtime.CompiledModel` would refuse it with (another CPU architecture,
    missing ISA features), or no CUDA GPU."""
    from pathlib import Path

    from bqc.backends import runtime
    from bqc.errors import BqcError

    if manifest.get("backend") == "tvm-cuda":
        try:
            import tvm

            return None if tvm.cuda(0).exist else "no CUDA GPU on this machine"
        except Exception as e:  # noqa: BLE001 - a TVM without CUDA support
            return f"TVM cannot reach a CUDA GPU here ({type(e).__name__})"
    try:
        runtime._check_library_arch(Path(path) / manifest["files"]["library"], manifest.get("backend"))
        runtime.check_host_cpu(manifest, path)
    except BqcError as e:
        return e.message
    return None


def _rows(out, i: int) -> tuple:
    eps, state = out
    return eps[i:i + 1], None if state is None else [s[i:i + 1] for s in state]


def _rel(a, b) -> float:
    """The deploy contract's measure: max |a - b| / max |b| over eps and the state."""
    from bqc.deploy.flips import flat

    a, b = flat(a), flat(b)
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
    res = CheckResult(rows=rows, steps=1, max_rel_err=0.0, tol=tol)

    def step(k: int, xs, ts, state):
        """One sampling step of every row; a row over ``tol`` goes to :func:`flips.explain`."""
        got, want = model(xs, ts, state=state, **kw), ref(xs, ts, state=state, **kw)
        for i in range(rows):
            err = _rel(_rows(got, i), _rows(want, i))
            res.max_rel_err = max(res.max_rel_err, err)
            if err <= tol:
                continue
            res.rows_over_tol.append((k, i))
            row = {n: v[i:i + 1] for n, v in kw.items()}
            row["state"] = None if state is None else [s[i:i + 1] for s in state]
            args = (xs[i:i + 1], ts[i:i + 1])
            found = flips.explain(ref, gm, _rows(got, i), *args, tol=tol, **row)["flips"]
            with flips.forced(gm, found):  # judged again in the contract's own measure
                after = _rel(_rows(got, i), ref(*args, **row))
            res.flips += [{"module": f.module, "margin": f.margin} for f in found]
            if after > tol:
                res.unexplained.append({"step": k, "row": i, "error_after": after})
            elif not found:  # no flip needed: the reference on this row alone already agrees
                res.alone.append((k, i))
        return want

    with torch.no_grad():
        _, state = step(0, x, t, None)
        if state is not None:  # a second step, fed the reference's state
            res.steps = 2
            step(1, torch.randn(x.shape, generator=g), (t - 20).clamp(min=0), state)
    return res


def check_and_record(dart, path) -> CheckResult | str:
    """:func:`check_lowered` with the defaults, recorded as the bundle manifest's ``verify``; or,
    when this machine cannot run the bundle, why not (:func:`why_not_here`)."""
    import json
    from pathlib import Path

    from bqc.checkpoint import atomic_write_text

    man_path = Path(path) / "manifest.json"
    manifest = json.loads(man_path.read_text())
    why = why_not_here(manifest, path)
    if why:
        return why
    res = check_lowered(dart, path)
    manifest["verify"] = res.to_json()
    atomic_write_text(man_path, json.dumps(manifest, indent=2))
    return res
