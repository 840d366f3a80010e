"""Replication study on mnist16: the papers' comparisons and ablations, at this machine's scale.

Every run trains from the same pretrained FP ``mnist16`` teacher with the same step budget,
seed(s), batch and learning rate, and is evaluated the same way (same N samples, same DDIM
steps, same classifier features, real-vs-real floor). Resumable: each run lives in
``OUT/<run>/seed<k>/`` with its artifact, training checkpoints/log, ``eval.json``, sample grid
and a ``done.json`` marker; finished runs are skipped on rerun, unfinished ones resume from
their checkpoint.

    python benchmarks/replicate.py --steps 1000 --n 1000                 # everything
    python benchmarks/replicate.py --only table-a --steps 1000           # one table
    python benchmarks/replicate.py --smoke --out /tmp/rep                # CI: 2 recipes, 2 steps
    python benchmarks/replicate.py --report                              # tables -> docs/RESULTS.md
    python benchmarks/replicate.py --report --out DIR --doc /tmp/R.md    # another study / page

Every training invocation appends its command line to ``OUT/commands.txt`` (and stores it in each
``done.json`` it writes). ``--report`` trains nothing: it aggregates the finished runs into
``OUT/summary.json`` and writes the results page (``--doc``, images in ``img/`` beside it) with
``benchmarks/replicate_report.py``. Rows whose difference is within the seed spread are
reported as ties, not wins.

``--keep DIR`` makes a study outlive its machine: every finished run's small files (``done.json``,
the eval JSONs, sample grids, ``trained/train.json`` and ``metrics.csv``; never checkpoints or
weights) are copied to ``DIR/<run>/seed<k>/`` as soon as the run finishes, with ``commands.txt``;
a run that is finished in DIR but not in OUT is restored from DIR instead of trained again. DIR
lives in the repository (``benchmarks/results/study_4k``), so committing it keeps the results when
OUT is lost; ``--report --out DIR`` reads it directly.

    python benchmarks/replicate.py --only table-a --steps 4000 --out /work/runs/study-4k \
        --keep benchmarks/results/study_4k                                # train, keep results
    python benchmarks/replicate.py --report --out /work/runs/study-4k --keep benchmarks/results/study_4k
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    name: str
    table: str  # table-a | table-b | table-c | ablation
    recipe: str
    wbits: int | None = None
    abits: int | None = None
    overrides: str = ""  # TOML appended to `extends = recipe` (options, or a full pass list)
    distill: bool = True
    main: bool = True  # main rows run with every seed; ablations with the first only
    train: bool = True


def _toml(v) -> str:
    """A pass option as TOML (strings, numbers, booleans and inline tables of them: what recipes hold)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for pass option {v!r}")


def without_pass(recipe: str, dropped: str) -> str:
    """Overrides that run ``recipe``'s own pass list, options included, minus the pass ``dropped``:
    an ablation changes that one thing (a hand-written list drifts from the recipe)."""
    from bqc.pipeline import load_recipe

    passes = load_recipe(recipe).passes
    if dropped not in [n for n, _ in passes]:
        raise ValueError(f"recipe {recipe!r} has no pass {dropped!r}")
    lines = []
    for name, opts in passes:
        if name != dropped:
            lines += ["[[passes]]", f'name = "{name}"'] + [f"{k} = {_toml(v)}" for k, v in opts.items()]
    return "\n" + "\n".join(lines) + "\n"


# bqc's output skip with the float layers frozen and a cosine lr, as bidm-skip trains (dorefa-skip: session 16)
_SKIP_FROZEN = '[[append]]\nname = "output_skip"\n\n[train]\nlr = 2e-4\nlr_schedule = "cosine"\nfloat_lr_scale = 0.0\n'
_BIDM01_BODY = '[options.plan_quant]\nbody = {{ weight = "bidm", act = "dorefa"{} }}\n'

RUNS: list[Run] = [
    # Table A: binary weights, 4-bit and 32-bit activations
    Run("fp", "table-a", "fp", train=False),
    Run("lsq-w2a4", "table-a", "lsq"),
    Run("baseline-w1a4", "table-a", "baseline"),
    Run("binarydm-w1a4", "table-a", "binarydm"),
    Run("binarydm-lmb-w1a4", "table-a", "binarydm-lmb"),
    Run("binarydm-skip-w1a4", "table-a", "binarydm-skip"),  # bqc's output skip (not in the papers)
    Run("baseline-w1a32", "table-a", "baseline", abits=32),
    Run("binarydm-w1a32", "table-a", "binarydm", abits=32),
    # Table B: fully binary
    Run("xnor", "table-b", "xnor"),
    Run("dorefa", "table-b", "dorefa"),
    Run("reactnet", "table-b", "reactnet"),
    Run("reste", "table-b", "reste"),
    Run("bidm", "table-b", "bidm"),
    Run("bidm-skip", "table-b", "bidm-skip"),  # bqc's output skip (not in the papers)
    # Table C: W1A1 with DoReFa's {0, 1} activation code and bqc's output skip (not in the papers;
    # benchmarks/results/quality_w1a1.md, sessions 16-17): the code that made W1A1 digits, and BiDM on it
    Run("dorefa-skip", "table-c", "dorefa", overrides=_SKIP_FROZEN),
    Run("bidm01-skip", "table-c", "bidm01-skip"),
    # Ablations
    Run("binarydm-no-ebb", "ablation", "binarydm", overrides='[options.plan_quant]\nhead_tail = { weight = "sign_scale", act = "lsq" }\n', main=False),
    Run("binarydm-no-lrm", "ablation", "binarydm", distill=False, main=False),
    Run("binarydm-lrm-k2", "ablation", "binarydm", overrides="[options.distill_taps]\nk = 2\n", main=False),
    Run("binarydm-lrm-k8", "ablation", "binarydm", overrides="[options.distill_taps]\nk = 8\n", main=False),
    Run("binarydm-ebb-3", "ablation", "binarydm", overrides="[options.annotate]\nhead_tail_blocks = 3\n", main=False),
    Run("bidm-no-tbs", "ablation", "bidm", overrides=without_pass("bidm", "tbs_edges"), main=False),
    Run("bidm-no-spd", "ablation", "bidm", distill=False, main=False),
    Run("bidm-tbs-1", "ablation", "bidm", overrides="[options.tbs_edges]\nconnections = 1\n", main=False),
    # Fidelity options (METHODS §11: what the released reference code does, against bqc's default)
    Run("bidm-res-proj-binary", "ablation", "bidm", overrides='[options.plan_quant]\nres_proj = "place"\n', main=False),
    Run("bidm-shortcut-conv", "ablation", "bidm", overrides=(
        '[options.plan_quant]\nbody = { weight = "bidm", act = "bidm", kmap = "learned", shortcut = "scaled-conv" }\n'), main=False),
    Run("bidm-spd-code", "ablation", "bidm", overrides='[options.distill_taps]\nform = "code"\n', main=False),
    Run("binarydm-lrm-code", "ablation", "binarydm", overrides='[options.distill_taps]\nform = "code"\n', main=False),
    Run("binarydm-res-proj-fp", "ablation", "binarydm", overrides='[options.plan_quant]\nres_proj = "fp"\n', main=False),
    Run("binarydm-ebb-switch-0.1", "ablation", "binarydm", overrides="[train]\nebb_switch = 0.1\n", main=False),
    # which of BiDM's parts help on top of the {0, 1} code (dorefa-skip, without any of them, beat bidm01-skip)
    Run("bidm01-no-tbs", "ablation", "bidm01-skip", overrides=without_pass("bidm01-skip", "tbs_edges"), main=False),
    Run("bidm01-no-spd", "ablation", "bidm01-skip", distill=False, main=False),
    Run("bidm01-no-kmap", "ablation", "bidm01-skip", overrides=_BIDM01_BODY.format(', shortcut = "scaled"'), main=False),
    Run("bidm01-no-shortcut", "ablation", "bidm01-skip", overrides=_BIDM01_BODY.format(', kmap = "learned"'), main=False),
]
SMOKE = ["baseline-w1a4", "bidm"]


@dataclass(frozen=True)
class EvalVariant:
    """A second way of sampling every model, scored the same way as the main one (DDIM, eta 0):
    its metrics go to ``done.json["metrics_<tag>"]``, its grid to ``samples-<tag>.png``."""
    tag: str
    eta: float = 0.0
    clip_x0: float | None = None
    steps: int | None = None  # None: the study's sampling steps

    def describe(self) -> dict:
        return {"eta": self.eta, "clip_x0": self.clip_x0}


def variants_from_args(clip_x0: float | None, eta: float | None) -> tuple[EvalVariant, ...]:
    out = []
    if clip_x0:
        out.append(EvalVariant("clip", clip_x0=clip_x0))
    if eta is not None:
        out.append(EvalVariant(f"eta{eta:g}", eta=eta))
    return tuple(out)


@dataclass
class Settings:
    steps: int = 1000
    batch: int = 64
    lr: float | None = None  # None: each recipe's [train] lr (chosen by the lr sweep)
    n: int = 1000
    sample_steps: int = 100
    eta: float = 1.0  # the declared sampler: DDIM-100, eta 1 (LDM's sampling default)
    teacher: str = "mnist16"  # the FP model every run starts from (zoo name or model dir)
    seeds: tuple[int, ...] = (0, 1)
    out: Path = ROOT / "runs" / "replicate"
    ebb_switch: float | None = None  # override [train] ebb_switch of recipes that switch EBB stages
    variants: tuple[EvalVariant, ...] = ()  # extra ways to sample and score each model
    extra: dict = field(default_factory=dict)


def _recipe_file(run: Run, d: Path, s: Settings) -> str:
    """The recipe a run transforms with: its recipe, or a TOML extending it with the run's overrides."""
    from bqc.pipeline import ebb_switch_at, load_recipe

    overrides = run.overrides
    if s.ebb_switch is not None and ebb_switch_at(load_recipe(run.recipe).train) is not None:
        overrides += f"\n[train]\nebb_switch = {s.ebb_switch}\n"
    if not overrides:
        return run.recipe
    p = d / "recipe.toml"
    p.write_text(f'extends = "{run.recipe}"\nname = "{run.name}"\n{overrides}')
    return str(p)


METRIC_KEYS = ("fid", "fid_floor", "kid", "precision", "recall", "is", "confident")


def _sample_and_score(model, s: Settings, seed: int, grid: Path, v: EvalVariant | None = None) -> dict:
    import torch

    from bqc.diffusion.grid import save_grid
    from bqc.diffusion.samplers import generate
    from bqc.metrics import evaluate

    v = v or EvalVariant("main", eta=s.eta)
    with torch.no_grad():
        x = generate(model, s.n, tuple(model.input_shape), steps=v.steps or s.sample_steps, seed=seed, batch=250,
                     eta=v.eta, clip_x0=v.clip_x0)
    save_grid(x[:64], grid, nrow=8, scale=4)
    return evaluate(x, _test_images(), n=s.n, seed=seed)


@functools.lru_cache(maxsize=1)
def _test_images():
    """The real mnist16 test digits every evaluation compares with (read once per process)."""
    from bqc.data import load_dataset

    return load_dataset("mnist16", "test").images


def do_run(run: Run, seed: int, s: Settings, src) -> dict:
    from bqc import artifact, transform as tf
    from bqc.graph import BqcModel
    from bqc.report import cost_report
    from bqc.train.qat import QATOptions, divergence, train_artifact

    d = s.out / run.name / f"seed{seed}"
    done = d / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    art_dir = d / "artifact"
    if not artifact.is_artifact(art_dir):
        tf.save(tf.transform(src, _recipe_file(run, d, s), wbits=run.wbits, abits=run.abits), art_dir)
    if run.train:
        trained = d / "trained"
        train_artifact(art_dir, "mnist16", trained,
                       QATOptions(steps=s.steps, batch=s.batch, lr=s.lr, seed=seed, warmup=min(50, s.steps),
                                  sample_steps=s.sample_steps, distill=run.distill, checkpoint_every=max(100, s.steps // 10)),
                       resume="auto")
        model_dir = trained
    else:
        model_dir = art_dir
    art = artifact.load_artifact(model_dir)
    model = BqcModel(art.gm).eval()
    m = _sample_and_score(model, s, seed, d / "samples.png")
    rep = cost_report(art.gm)
    result = {"run": run.name, "table": run.table, "seed": seed, "recipe": art.recipe.name,
              "bits": f"W{art.manifest['wbits']}A{art.manifest['abits']}", "steps": s.steps if run.train else 0,
              "n": s.n, "sample_steps": s.sample_steps, "eta": s.eta, "teacher": s.teacher,
              "wall_s": round(time.time() - t0, 1),
              **({"command": s.extra["command"]} if s.extra.get("command") else {}),
              "metrics": {k: m[k] for k in METRIC_KEYS},
              "size_mb": rep["size_mb"], "ops": rep["ops"], "size_saving": rep["size_saving"], "ops_saving": rep["ops_saving"]}
    if run.train:  # a run whose loss blew up is flagged, so no table shows it without saying so
        result["divergence"] = divergence(d / "trained" / "train" / "metrics.csv")
        result["lr"] = (_read_json(d / "trained" / "train.json") or {}).get("hparams", {}).get("lr")
    (d / "eval.json").write_text(json.dumps(m, indent=2, default=float) + "\n")
    _score_variants(model, s, seed, d, result)
    _write_json(done, result)
    return result


# What --keep copies of a finished run (relative to OUT/<run>/seed<k>/): results, never weights.
KEEP_FILES = ("done.json", "eval.json", "eval-*.json", "samples.png", "samples-*.png", "recipe.toml",
              "trained/train.json", "trained/train/metrics.csv")
KEEP_LOGS = ("commands.txt", "rescore.txt")


def _finished_runs(root: Path) -> list[Path]:
    """``root/<run>/seed<k>`` folders holding a ``done.json``."""
    return sorted(f.parent for f in Path(root).glob("*/seed*/done.json") if f.is_file())


def _copy_results(src: Path, dst: Path) -> None:
    """Copy one finished run's KEEP_FILES from ``src`` to ``dst`` (same relative paths)."""
    from bqc.artifact import atomic_write_bytes

    for pat in KEEP_FILES:
        for f in sorted(src.glob(pat)):
            if f.is_file() and not f.is_symlink():
                t = dst / f.relative_to(src)
                t.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(t, f.read_bytes())


def _merge_logs(src: Path, dst: Path) -> None:
    """Append the lines of ``src``'s command logs that ``dst``'s lack."""
    for name in KEEP_LOGS:
        f = Path(src) / name
        if f.is_file():
            for line in f.read_text().splitlines():
                if line.strip():
                    _append_line(Path(dst) / name, line)


def keep_results(out: Path, keep: Path) -> list[str]:
    """Copy every finished run in ``out`` to ``keep`` (see --keep); returns ``run/seedK`` names."""
    done = []
    for d in _finished_runs(out):
        rel = d.relative_to(out)
        _copy_results(d, Path(keep) / rel)
        done.append(str(rel))
    _merge_logs(out, keep)
    return done


def restore_results(keep: Path, out: Path) -> list[str]:
    """Copy runs finished in ``keep`` but not in ``out`` back into ``out``; returns their names.
    A partial run in ``out`` (checkpoints, no done.json) is left as it is: the kept result wins."""
    restored = []
    for d in _finished_runs(keep):
        rel = d.relative_to(keep)
        if not (Path(out) / rel / "done.json").is_file():
            _copy_results(d, Path(out) / rel)
            restored.append(str(rel))
    _merge_logs(keep, out)
    return restored


def _score_variants(model, s: Settings, seed: int, d: Path, result: dict) -> None:
    """Add the metrics of every variant ``result`` lacks (same noise, same N)."""
    for v in s.variants:
        if f"metrics_{v.tag}" in result:
            continue
        mv = _sample_and_score(model, s, seed, d / f"samples-{v.tag}.png", v)
        (d / f"eval-{v.tag}.json").write_text(json.dumps(mv, indent=2, default=float) + "\n")
        result[f"metrics_{v.tag}"] = {k: mv[k] for k in METRIC_KEYS}
        result.setdefault("evals", {})[v.tag] = v.describe()
        if v.tag == "clip":
            result["clip_x0"] = v.clip_x0


def rescore(run: Run, seed: int, s: Settings) -> dict | None:
    """Score a finished run with the variants it lacks (no training); None if it is not finished."""
    from bqc import artifact
    from bqc.graph import BqcModel

    d = s.out / run.name / f"seed{seed}"
    result = _read_json(d / "done.json")
    if result is None or all(f"metrics_{v.tag}" in result for v in s.variants):
        return result
    if result.get("n") != s.n or result.get("sample_steps") != s.sample_steps:
        raise SystemExit(f"{d}: scored with n={result.get('n')}, {result.get('sample_steps')} steps; "
                         f"rescore with the same -n and --sample-steps")
    model_dir = d / ("trained" if run.train else "artifact")
    if not artifact.is_artifact(model_dir):
        raise SystemExit(f"{d}: its model is not on this machine (a result restored from --keep holds no weights); "
                         f"rescoring it needs the run trained again")
    art = artifact.load_artifact(model_dir)
    model = BqcModel(art.gm).eval()
    t0 = time.time()
    _score_variants(model, s, seed, d, result)
    result["rescore_s"] = round(result.get("rescore_s", 0.0) + time.time() - t0, 1)
    _write_json(d / "done.json", result)
    return result


def _write_json(p: Path, obj) -> None:
    from bqc.artifact import atomic_write_bytes

    atomic_write_bytes(p, (json.dumps(obj, indent=2, default=float) + "\n").encode())


def summarise(results: list[dict]) -> dict[str, dict]:
    """Per run: mean and spread (max - min over seeds) of each metric."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["run"], []).append(r)
    out = {}
    for name, rs in by.items():
        row = {"run": name, "table": rs[0]["table"], "bits": rs[0]["bits"], "seeds": len(rs),
               "diverged": any((r.get("divergence") or {}).get("diverged") for r in rs),
               "size_mb": rs[0]["size_mb"], "size_saving": rs[0]["size_saving"], "ops_saving": rs[0]["ops_saving"]}
        groups = [("metrics", "")] + [(g, g.removeprefix("metrics_") + "_") for g in sorted(rs[0])
                                      if g.startswith("metrics_")]
        for group, prefix in groups:
            if not all(group in r for r in rs):
                continue
            for k in rs[0][group]:
                vals = [r[group][k] for r in rs]
                row[prefix + k] = statistics.mean(vals)
                row[prefix + k + "_spread"] = max(vals) - min(vals)
        out[name] = row
    return out


def compare(a: dict, b: dict, key: str = "fid") -> str:
    """'a' / 'b' wins (lower FID), or 'tie' when the gap is within the larger seed spread."""
    spread = max(a.get(key + "_spread", 0.0), b.get(key + "_spread", 0.0))
    if a["seeds"] < 2 or b["seeds"] < 2:
        spread = max(spread, 0.0)
    gap = a[key] - b[key]
    if abs(gap) <= spread:
        return "tie"
    return a["run"] if gap < 0 else b["run"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="learning rate of every run (default: each recipe's [train] lr)")
    p.add_argument("-n", "--n", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=100, help="DDIM steps of the declared sampler")
    p.add_argument("--main-eta", type=float, default=1.0, help="DDIM eta of the declared sampler (1: LDM's default)")
    p.add_argument("--teacher", default="mnist16", help="the FP model every run starts from (zoo name or model dir)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--only", default="", help="table-a, table-b, table-c, ablation, or run names (comma-separated)")
    p.add_argument("--out", default=str(ROOT / "runs" / "replicate"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ebb-switch", type=float, default=None,
                   help="fraction of training at which EBB drops s2 (overrides the recipes' [train] ebb_switch; paper: 0.5)")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="also sample and score with the predicted x0 clipped to [-C, C] (metrics_clip)")
    p.add_argument("--eta", type=float, default=None,
                   help="also sample and score with DDIM of this eta (e.g. 0: metrics_eta0, the deterministic sampler)")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: add the --clip-x0 / --eta metrics to finished runs that lack them")
    p.add_argument("--smoke", action="store_true", help="CI smoke: two recipes, 2 steps, tiny eval")
    p.add_argument("--report", action="store_true",
                   help="train nothing: aggregate finished runs into OUT/summary.json and write the results page")
    p.add_argument("--doc", default=str(ROOT / "docs" / "RESULTS.md"),
                   help="with --report: the page to write (images go to img/ next to it)")
    p.add_argument("--keep", default=None,
                   help="a folder in the repository that keeps every finished run's results (no weights) and "
                        "restores them into OUT: the study survives the loss of OUT")
    p.add_argument("--long", default=None,
                   help="with --report: OUT directory of a longer-budget study, reported in its own section")
    args = p.parse_args(argv)
    import torch

    from bqc.diffusion.samplers import check_eta
    from bqc.errors import BqcError
    from bqc.runtime import tune_allocator

    try:  # before hours of training, not at the first sampling
        for opt, v in (("--main-eta", args.main_eta), ("--eta", args.eta)):
            if v is not None:
                check_eta(v, opt)
    except BqcError as e:
        p.error(str(e))

    tune_allocator()  # as bqc's commands do: the runs train and sample in this process
    torch.set_num_threads(args.threads)
    cmd = _command_line(argv if argv is not None else sys.argv[1:])
    s = Settings(steps=args.steps, batch=args.batch, lr=args.lr, n=args.n, sample_steps=args.sample_steps,
                 eta=args.main_eta, teacher=args.teacher,
                 seeds=tuple(int(x) for x in args.seeds.split(",")), out=Path(args.out),
                 ebb_switch=args.ebb_switch, variants=variants_from_args(args.clip_x0, args.eta))
    runs = RUNS
    if args.smoke:
        s.steps, s.batch, s.n, s.sample_steps, s.seeds = 2, 8, 16, 4, (0,)
        runs = [r for r in RUNS if r.name in SMOKE]
    elif args.only:
        keys = set(args.only.split(","))
        runs = [r for r in RUNS if r.table in keys or r.name in keys]
    out = Path(s.out)
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.resolve() != out.resolve():
        restored = restore_results(keep, out)
        if restored:
            print(f"restored {len(restored)} finished runs from {_show(keep)}", flush=True)
    prev = _read_json(out / "summary.json") or {}
    results = []
    if args.rescore:
        if not s.variants:
            raise SystemExit("--rescore needs --clip-x0 and/or --eta")
        _append_line(out / "rescore.txt", cmd)
        for i, seed in enumerate(s.seeds):
            for run in runs:
                if run.main or i == 0:
                    print(f"== rescore {run.name} seed {seed}", flush=True)
                    r = rescore(run, seed, s)
                    if r is not None:
                        results.append(r)
    elif not args.report:
        s.extra["command"] = cmd
        out.mkdir(parents=True, exist_ok=True)
        _append_line(out / "commands.txt", cmd)
        from bqc import frontend

        src = frontend.load_source(s.teacher)
        src.exported = frontend.capture(src)
        # seed-major: every row's first seed finishes before any row's second seed starts
        for i, seed in enumerate(s.seeds):
            for run in runs:
                if run.main or i == 0:
                    print(f"== {run.name} seed {seed}", flush=True)
                    results.append(do_run(run, seed, s, src))
                    if keep is not None:
                        keep_results(out, keep)
    else:
        results = [json.loads(f.read_text()) for f in sorted(Path(s.out).glob("*/seed*/done.json"))]
    if keep is not None and keep.resolve() != out.resolve():
        keep_results(out, keep)
    summary = summarise(results)
    report = _report_module()
    settings = {k: str(v) for k, v in vars(s).items()}
    if (args.report or args.rescore) and prev.get("settings"):
        settings = prev["settings"]  # the training invocation's settings, not this one's defaults
    if args.rescore:
        cmd = prev.get("command", "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"command": cmd, "train_commands": report.train_commands(out, prev, results),
                                                  "settings": settings, "rows": summary}, indent=2, default=float) + "\n")
    for name, row in summary.items():
        print(f"{name:22s} {row['bits']:7s} FID {row['fid']:8.2f} ±{row['fid_spread']:.2f}  "
              f"prec {row['precision']:.2f} rec {row['recall']:.2f}  size {row['size_mb']:.3f} MiB")
    if args.report:
        extra = (["--keep", _show(keep)] if keep is not None else []) + (["--long", _show(Path(args.long))] if args.long else [])
        report_cmd = _command_line(["--report", "--out", _show(out), "--doc", _show(Path(args.doc)), *extra])
        doc = report.write_report(out, Path(args.doc), RUNS, summarise, compare, report_cmd=report_cmd,
                                  long_out=Path(args.long) if args.long else None)
        print(f"wrote {doc}")


def _append_line(f: Path, line: str) -> None:
    """Append ``line`` to ``f`` unless it is there already."""
    f.parent.mkdir(parents=True, exist_ok=True)
    if line not in (f.read_text().splitlines() if f.exists() else []):
        with open(f, "a") as fh:
            fh.write(line + "\n")


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _show(p: Path) -> str:
    """A path as the page shows it: relative to the repository when inside it."""
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def _command_line(args) -> str:
    return "python " + shlex.join(["benchmarks/replicate.py", *map(str, args)])


def _report_module():
    """``benchmarks/replicate_report.py`` (this directory is not a package)."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("replicate_report")


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM stop the study between any two statements (KeyboardInterrupt): a study
    started with ``nohup ... &`` inherits SIGINT *ignored*, so before this only the training phase
    (``bqc train`` installs its own handler) could be stopped, not sampling or scoring; the
    training loop still defers a signal to its next step boundary and saves a checkpoint."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)


if __name__ == "__main__":
    _stop_on_signals()
    try:
        main()
    except KeyboardInterrupt as e:  # Ctrl-C / SIGINT; a TrainingInterrupted says which checkpoint it saved
        msg = getattr(e, "message", "") or "interrupted"
        print(f"\nstopped: {msg}\nrerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)
