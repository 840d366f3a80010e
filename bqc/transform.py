"""``bqc transform``: source model -> captured program -> recipe passes -> artifact."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bqc import artifact, frontend, ir
from bqc.pipeline import PassContext, Recipe, load_recipe


@dataclass
class TransformResult:
    source: frontend.ModelSource
    base_ep: object
    gm: object
    recipe: Recipe
    ctx: PassContext
    schedule: object = None  # the model's diffusion process (NoiseSchedule), recorded in the manifest
    schedule_from: str = ""

    @property
    def layers(self) -> list[dict]:
        return ir.layers(self.gm)


def resolve_recipe(recipe: str | Recipe, keep_fp=(), bits=()) -> Recipe:
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if keep_fp or bits:  # per-layer overrides are recorded in the recipe so artifacts replay them
        r = Recipe.from_dict(r.to_dict())
        r.settings["keep_fp"] = list(keep_fp)
        r.settings["bits"] = list(bits)
    return r


def transform(src: frontend.ModelSource, recipe: str | Recipe, *, wbits=None, abits=None,
              keep_fp=(), bits=(), dump_dir=None, schedule: str | None = None,
              prediction: str | None = None) -> TransformResult:
    """``schedule``/``prediction``: ``--schedule``/``--prediction`` overrides of the diffusion
    process read from the source (:func:`bqc.frontend.diffusion_of`)."""
    sched, where = frontend.diffusion_of(src, schedule, prediction)  # refuses unknown values before any work
    r = resolve_recipe(recipe, keep_fp, bits)
    ep = frontend.capture(src)
    ctx = r.context(wbits, abits)
    r = Recipe.from_dict({**r.to_dict(), "wbits": ctx.wbits, "abits": ctx.abits})
    gm, ctx = artifact.build_graph(ep, r, ctx.wbits, ctx.abits, dump_dir=dump_dir, schedule=sched)
    return TransformResult(src, ep, gm, r, ctx, sched, where)


def save(res: TransformResult, out: str | Path, extra: dict | None = None) -> Path:
    """Write the artifact; ``extra``: more manifest (bqc.json) entries (``bqc unfold``'s provenance)."""
    sched, where = (res.schedule, res.schedule_from) if res.schedule is not None else frontend.diffusion_of(res.source)
    src = {"kind": res.source.kind, "description": res.source.description,
           **{k: v for k, v in res.source.info.items() if k != "params"}}
    return artifact.save_artifact(out, base_ep=res.base_ep, gm=res.gm, recipe=res.recipe,
                                  wbits=res.ctx.wbits, abits=res.ctx.abits, source=src,
                                  extra={"diffusion": sched.manifest_entry(where), **(extra or {})})
