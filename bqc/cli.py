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
from typing import Optional

import typer
from rich.console import Console
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
ConfigOpt = typer.Option(None, "--config", help="instantiate-from-config YAML (target: pkg.Class, params: ...)")
WeightsOpt = typer.Option(None, "--weights", help="weights for --config (safetensors or weights-only torch checkpoint)")
TrustOpt = typer.Option(False, "--trust-pickle", help="allow unpickling a whole pickled model (runs code from the file)")


def _source(model, model_opt, config, weights, trust_pickle):
    from bqc import frontend

    return frontend.load_source(model or model_opt, config=config, weights=weights, trust_pickle=trust_pickle)


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
):
    """Apply a recipe (a pipeline of passes) and write a transformed-model artifact."""
    from bqc import frontend, transform as tf

    src = _source(model, model_opt, config, weights, trust_pickle)
    res = tf.transform(src, recipe, wbits=wbits, abits=abits, keep_fp=keep_fp, bits=bits, dump_dir=dump_dir)
    path = tf.save(res, out)
    if explain:
        _print_explain(res)
    n_q = sum(1 for r in res.layers if r["w_bits"] < 32 or r["a_bits"] < 32)
    console.print(f"[bold]wrote[/] {path}  recipe {res.recipe.name} W{res.ctx.wbits}A{res.ctx.abits}: "
                  f"{n_q}/{len(res.layers)} layers quantized")
    del frontend


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


def main() -> None:
    """Console entry point: BqcError -> one paragraph on stderr, exit 2."""
    try:
        app(standalone_mode=False)
    except BqcError as e:
        if _STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {e.message}")
        if e.hint:
            err_console.print(f"[bold]hint:[/] {e.hint}")
        if not _STATE["debug"]:
            err_console.print("(run with --debug for the traceback)", style="dim")
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":  # python -m bqc.cli
    main()
