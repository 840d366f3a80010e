"""Quantization-aware training of a transformed artifact, with the FP model as frozen teacher.

``loss = L_simple + w * L_distill + tau * L_EBB`` where the recipe decides the terms:

* L_simple: DDPM simple MSE to the model's own target (eps, v or x0: the artifact's
  recorded diffusion process, :meth:`NoiseSchedule.target`).
* L_distill: LRM (BinaryDM) or SPD (BiDM) between the student's and the teacher's block
  outputs, read from the graphs through ``ir.with_outputs`` (no hooks); LRM's PCA
  projections are initialised from the first batch and saved with the checkpoints.
* L_EBB: tau * mean over EBB layers of s2, until the stage switch (``ebb_switch`` of training),
  when s2 is dropped.
* BiDM TBS: two timesteps sharing the noise: the student runs at t+d without cache (no grad;
  the cache is stop-gradient anyway) to produce the cache, then at t with it. d defaults to
  the sampler's step gap (T / sampling steps).
* Text conditioning: a text-conditioned artifact (a ``context`` graph input) trains on a latents
  file with ``context`` (:mod:`bqc.data`); the student, its TBS cache pass and the teacher all get
  the batch's text embeddings. ``cond_drop`` p replaces each row's embedding with the file's
  ``uncond`` (the empty prompt) with probability p, as classifier-free-guidance training does
  (default 0: the teacher was trained with its own dropout, QAT only follows it).
* LMB: progressive warm-up: layers become binary block by block from the middle outwards
  over ``progressive_warmup`` of training.
* ReSTE: the estimator's exponent is annealed with progress.

The generic loop (``bqc.train.loop``) provides AdamW, warm-up, clipping, EMA, atomic
checkpoints, exact resume and the NaN stop. ``OUT/model.safetensors`` holds the **EMA**
weights of the student; ``OUT`` is an artifact that ``sample``/``eval``/``report``/``lower``
accept.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bqc import artifact, ir
from bqc.data import load_dataset
from bqc.diffusion.schedule import NoiseSchedule, q_sample
from bqc.diffusion.samplers import step_gap
from bqc.errors import BqcError
from bqc.signature import Signature
from bqc.pipeline import ebb_switch_at
from bqc.quant.layers import _Quantized
from bqc.quant.training import anneal, ebb_modules, ebb_regulariser, switch_ebb_to_stage2
from bqc.train.loop import DistContext, LoopConfig, train_loop, unwrap
from bqc.train.losses import LRMProjections, spd_loss


@dataclass
class QATOptions:
    steps: int
    batch: int = 64
    lr: float | None = None  # None: the recipe's [train] lr (else 1e-4)
    seed: int = 0
    warmup: int = 50
    ema_decay: float | None = 0.999
    # decay min(ema_decay, (1+k)/(10+k)) at the k-th update: without it a 500-step run's EMA
    # would still be 0.999^500 = 61% the weights after step 1 (the nearly untrained student)
    ema_warmup: bool = True
    grad_clip: float | None = None  # None: the recipe's [train] grad_clip (else 1.0)
    weight_decay: float | None = None  # None: the recipe's [train] weight_decay (else 0)
    lr_schedule: str | None = None  # None: the recipe's [train] lr_schedule (else "constant"); or "cosine"
    min_lr_ratio: float | None = None  # cosine: the final lr as a fraction of the peak (None: the recipe's, else 0)
    checkpoint_every: int = 500
    sample_steps: int = 50  # the sampler's step count: sets BiDM's training gap d = T / steps
    tbs_gap: int | None = None
    distill: bool = True
    progress: bool = True
    resize: tuple[int, int] | None = None  # image folders: resize to (h, w)
    cond_drop: float = 0.0  # text-conditioned models: P(a row's context becomes the empty prompt)
    target: str | None = None  # L_simple's target: None = the recipe's [train] target, else "true"; or "teacher"
    float_lr_scale: float | None = None  # lr multiplier of the float Conv/Linear layers (None: the recipe's, else 1)
    t_range: tuple[int, int] | None = None  # train on timesteps lo <= t < hi only (a timestep expert); None: all


def _args(meta: dict, x, t, y, state=None, context=None):
    """Positional graph inputs for (x, t, context, y, state) following the graph's signature
    (:meth:`bqc.signature.Signature.step_args`)."""
    b = x.shape[0]
    return Signature.from_meta(meta).step_args(
        {"x": x, "t": t, "y": y, "context": context}, state, error=BqcError,
        zeros=lambda shape: torch.zeros((b, *shape), dtype=x.dtype), flag=lambda v: torch.full((), v, dtype=x.dtype))


class QATModel(nn.Module):
    """What the loop trains: the student graph plus training-only state (LRM projections).

    ``student`` is the transformed graph itself, so its state dict keys are the artifact's
    with a ``student.`` prefix.
    """

    def __init__(self, student: torch.fx.GraphModule, lrm: LRMProjections | None, tap_view=None):
        super().__init__()
        self.student = student
        self.lrm = lrm
        object.__setattr__(self, "_tap_view", tap_view)  # shares the student's parameters: not a submodule

    def forward(self, *args, taps: bool = False):
        """Student outputs (and its distillation taps): the call DDP wraps."""
        return (self._tap_view if taps else self.student)(*args)


def float_layer_params(student: torch.fx.GraphModule) -> list[nn.Parameter]:
    """The trainable weights and biases of the layers the recipe left in full precision: the
    conv / linear nodes of the graph that are not quantized layer modules (residual projections
    kept FP, the time embedding, ``--keep-fp`` layers); not the quantized layers, norms, or
    quantizer, TBS and K-map parameters. They start from the teacher's values."""
    params = dict(student.named_parameters())  # get_attr targets that are parameters (not buffers)
    out: dict[int, nn.Parameter] = {}
    for n in student.graph.nodes:
        if n.op == "call_module" or ir.info(n).get("kind") not in ir.WEIGHTED_KINDS:
            continue
        for a in n.args:
            p = params.get(a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else None
            if p is not None and p.requires_grad:
                out.setdefault(id(p), p)
    return list(out.values())


def param_groups(model: nn.Module, student: nn.Module, float_lr_scale: float, lr: float) -> list[dict] | None:
    """AdamW groups: None (one group, the loop's default) unless ``float_lr_scale`` != 1, then
    the float layers' weights at ``lr * float_lr_scale`` and the rest at ``lr``. At 0 the float
    layers are frozen: left out, and their ``requires_grad`` turned off so that backward skips
    their weight gradients (the same updates: the gradient clip only sees the optimizer's
    parameters)."""
    if float_lr_scale == 1.0:
        return None
    floats = float_layer_params(student)
    fl = {id(p) for p in floats}
    if float_lr_scale == 0:
        for p in floats:
            p.requires_grad_(False)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in fl], "lr": lr}]
    if float_lr_scale > 0 and floats:
        groups.append({"params": floats, "lr": lr * float_lr_scale})
    return groups


def _tap_views(student, teacher):
    meta = ir.graph_meta(student)
    taps = meta.get("taps", [])
    if not taps:
        return None, None, []
    s_view = ir.with_outputs(student, [tp["node"] for tp in taps])
    t_names = [ir.block_output(teacher, tp["block"]).name for tp in taps]
    t_view = ir.with_outputs(teacher, t_names)
    return s_view, t_view, taps


def _warmup_order(gm) -> dict[str, float]:
    """LMB warm-up: each quantized layer's distance from the middle block, scaled to [0, 1]."""
    blocks = ir.graph_meta(gm).get("blocks", [])
    mid = next((b["id"] for b in blocks if b["section"] == "middle"), len(blocks) // 2)
    far = max((abs(b["id"] - mid) for b in blocks), default=1) or 1
    order = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _Quantized):
            b = ir.info(n).get("block", -1)
            order[n.target] = 1.0 if b < 0 else abs(b - mid) / far
    return order


def tbs_gap(recipe_train: dict, opts: QATOptions, schedule: NoiseSchedule) -> int:
    """BiDM's training gap d: ``--tbs-gap``, else the recipe's ``tbs_gap`` (an int, or
    ``"sampler"``), else the sampler's step gap T / sampling steps (METHODS §5)."""
    if opts.tbs_gap:
        return int(opts.tbs_gap)
    v = recipe_train.get("tbs_gap", "sampler")
    return step_gap(schedule.T, opts.sample_steps) if v == "sampler" else int(v)


def resolved_hparams(recipe_train: dict, opts: QATOptions) -> dict:
    """lr / weight decay / grad clip / lr schedule: the command line's value, else the recipe's
    [train] value (chosen per recipe by a sweep, see docs/RESULTS.md), else the defaults.
    The schedule and float-lr keys appear only when they are not the defaults (constant, 1), so
    runs started before they existed still resume."""
    pick = lambda v, key, default: float(v) if v is not None else float(recipe_train.get(key, default))
    hp = {"lr": pick(opts.lr, "lr", 1e-4), "weight_decay": pick(opts.weight_decay, "weight_decay", 0.0),
          "grad_clip": pick(opts.grad_clip, "grad_clip", 1.0)}
    sched = str(opts.lr_schedule if opts.lr_schedule is not None else recipe_train.get("lr_schedule", "constant"))
    if sched not in ("constant", "cosine"):
        raise BqcError(f"unknown lr schedule {sched!r}", hint="use 'constant' (the default) or 'cosine' (decays "
                       "to min_lr_ratio x lr at the run's last step)")
    scale = pick(opts.float_lr_scale, "float_lr_scale", 1.0)
    if not 0.0 <= scale <= 1e3:
        raise BqcError(f"float lr scale must be >= 0 (0 freezes the float layers), got {scale:g}")
    if scale != 1.0:
        hp["float_lr_scale"] = scale
    ratio = pick(opts.min_lr_ratio, "min_lr_ratio", 0.0)
    if not 0.0 <= ratio <= 1.0:
        raise BqcError(f"min lr ratio (--min-lr-ratio) must be in [0, 1], got {ratio:g}")
    if sched != "constant":
        hp.update(lr_schedule=sched, min_lr_ratio=ratio)
    elif opts.min_lr_ratio is not None:  # said on the command line and silently unused: tell the user
        raise BqcError(f"--min-lr-ratio {ratio:g} sets the cosine schedule's last lr, but this run's schedule is constant",
                       hint="add --lr-schedule cosine, or drop --min-lr-ratio")
    return hp


def _drop_context(c, uncond, p: float):
    """Classifier-free-guidance dropout: each row's text embedding becomes ``uncond`` with
    probability ``p`` (drawn from the global RNG, which the loop seeds per step)."""
    if c is None or p <= 0:
        return c
    drop = torch.rand(c.shape[0]) < p
    return torch.where(drop[:, None, None], uncond.to(c.dtype).expand_as(c), c)


TARGETS = ("true", "teacher")


def loss_target(recipe_train: dict, opts: QATOptions) -> str:
    """What L_simple regresses (``[train] target``, ``bqc train --loss-target``): ``"true"`` (the papers: the noise, v or x0 that made x_t) or
    ``"teacher"`` (the FP teacher's output at the same x_t, t: output distillation, a target
    without the noise of a single draw, and the best the student can do against its teacher)."""
    target = str(opts.target if opts.target is not None else recipe_train.get("target", "true"))
    if target not in TARGETS:
        raise BqcError(f"unknown L_simple target {target!r}", hint="use 'true' (the noise/v/x0 that made x_t, the "
                       "papers' loss) or 'teacher' (the FP teacher's prediction)")
    return target


def _untimed(part: str):
    return contextlib.nullcontext()


def timestep_range(opts: QATOptions, schedule: NoiseSchedule) -> tuple[int, int]:
    """``(lo, hi)``: the training timesteps ``lo <= t < hi`` (``--t-range``; default all ``T``)."""
    if opts.t_range is None:
        return 0, schedule.T
    lo, hi = (int(v) for v in opts.t_range)
    if not 0 <= lo < hi <= schedule.T:
        raise BqcError(f"--t-range {lo} {hi}: need 0 <= LO < HI <= {schedule.T} (the model's timesteps)")
    return lo, hi


def make_loss(student, teacher, recipe_train: dict, opts: QATOptions, schedule: NoiseSchedule, total_steps: int,
              uncond: torch.Tensor | None = None, timer=_untimed):
    """``uncond``: the empty-prompt embedding ``(1, L, D)`` for ``opts.cond_drop``. ``timer(part)``:
    a context manager around each part of the loss ("cache pass", "student", "teacher", "distill");
    ``benchmarks/train_speed.py --parts`` times them."""
    meta = ir.graph_meta(student)
    to_teacher = loss_target(recipe_train, opts) == "teacher"
    t_meta = ir.graph_meta(teacher)
    s_view, t_view, taps = _tap_views(student, teacher) if opts.distill else (None, None, [])
    distill = meta.get("distill") if taps else None
    has_tbs = bool(meta.get("state_inputs"))
    cache_view = ir.state_view(student) if has_tbs else None
    gap = tbs_gap(recipe_train, opts, schedule)
    tau = float(recipe_train.get("ebb_tau", 0.0))
    n_out = 1 + len(meta.get("state_outputs", []))
    ebb = ebb_modules(student)  # the same modules every step (the stage is a flag on each)
    t_lo, t_hi = timestep_range(opts, schedule)

    def loss_fn(model, batch, step):
        core = unwrap(model)  # model may be DDP(QATModel): grads flow through model(...)
        x0, y = batch[0], batch[1]
        c = batch[2] if len(batch) > 2 else None  # the text embeddings (text-conditioned graphs)
        y = y if meta.get("conditional") else None
        c = _drop_context(c, uncond, opts.cond_drop)
        b = x0.shape[0]
        t = torch.randint(t_lo, t_hi, (b,))
        noise = torch.randn_like(x0)
        x_t = q_sample(schedule, x0, t, noise)
        state = None
        if has_tbs:  # the cache: the student's block outputs one sampling step earlier (t + d)
            t2 = (t + gap).clamp(max=schedule.T - 1)
            x_t2 = q_sample(schedule, x0, t2, noise)
            with torch.no_grad(), timer("cache pass"):
                state = list(cache_view(*_args(meta, x_t2, t2, y, context=c)))
        args = _args(meta, x_t, t, y, state, context=c)
        terms = {}
        t_out = None  # the teacher's prediction at (x_t, t), when a loss needs it
        if distill:
            with timer("student"):
                outs = model(*args, taps=True)
            eps, s_feats = outs[0], list(outs[n_out:])
            with torch.no_grad(), timer("teacher"):
                t_outs = t_view(*_args(t_meta, x_t, t, y, context=c))
            t_out, t_feats = t_outs[0], list(t_outs[1:])
            with timer("distill"):
                if distill["loss"] == "lrm":
                    ld = core.lrm.loss(s_feats, t_feats)
                else:
                    ld = spd_loss(s_feats, t_feats, int(distill.get("patches", 4)), form=distill.get("form", "paper"))
            terms[distill["loss"]] = float(ld.detach())
        else:
            with timer("student"):
                eps = model(*args)[0]
            ld = torch.zeros(())
        if to_teacher and t_out is None:
            with torch.no_grad(), timer("teacher"):
                out = teacher(*_args(t_meta, x_t, t, y, context=c))
            t_out = out[0] if isinstance(out, (tuple, list)) else out
        # eps, v or x0 (the model's own parameterization), or the teacher's prediction of it
        l_simple = F.mse_loss(eps, t_out if to_teacher else schedule.target(x0, noise, t))
        terms["simple"] = float(l_simple.detach())
        loss = l_simple + float(distill["weight"] if distill else 0.0) * ld
        if ebb and not all(bool(m.stage2) for m in ebb):
            reg = ebb_regulariser(core.student)  # mean |s2| over EBB layers (0 once s2 is dropped)
            terms["s2"] = float(reg.detach())
            if tau > 0:
                terms["ebb"] = tau * terms["s2"]  # L_EBB as it enters the loss
                loss = loss + tau * reg
        return loss, terms

    return loss_fn


def divergence(metrics_csv, *, window: int = 5, factor: float = 2.0) -> dict:
    """Did the training loss diverge? Compares the mean of the last ``window`` logged rows of
    ``simple`` (L_simple) with the best mean of any earlier ``window`` rows: a run whose loss
    ends ``factor`` times above its best is reported as diverged (the W1A1 runs that blow up
    climb 5-7x; noisy but healthy runs stay within ~1.3x)."""
    import csv

    p = Path(metrics_csv)
    if not p.is_file():
        return {"diverged": False, "reason": "no log"}
    with p.open() as f:
        rows = [r for r in csv.DictReader(f)]
    key = "simple" if rows and "simple" in rows[0] else "loss"
    vals = []
    for r in rows:
        try:
            vals.append(float(r[key]))
        except (TypeError, ValueError, KeyError):
            continue
    if len(vals) < 2 * window:
        return {"diverged": False, "reason": f"only {len(vals)} log rows"}
    means = [sum(vals[i:i + window]) / window for i in range(len(vals) - window + 1)]
    best, last = min(means[:-1]), means[-1]
    ratio = last / best if best > 0 else float("inf")
    return {"diverged": bool(ratio > factor), "final": round(last, 6), "best": round(best, 6), "ratio": round(ratio, 3),
            "of": key}


def _schedule_callbacks(student, recipe_train: dict, total: int):
    switch_at = ebb_switch_at(recipe_train)
    warm = float(recipe_train.get("progressive_warmup", 0.0))
    order = _warmup_order(student) if warm > 0 else {}
    mods = {name: student.get_submodule(name) for name in order}

    def before(step: int):
        """Everything that depends on the step is a function of the step (so resume is exact)."""
        progress = step / max(total, 1)
        anneal(student, progress)
        if order:
            frac = progress / warm
            for name, m in mods.items():
                m.set_active(order[name] <= frac)
        if switch_at is not None and step >= int(switch_at * total) and ebb_modules(student):
            if any(not bool(m.stage2) for m in ebb_modules(student)):
                switch_ebb_to_stage2(student)

    return before


def check_conditioning(want, ds, data: str, cond_drop: float = 0.0):
    """The text embeddings the training batches carry: ``ds.context`` for a text-conditioned
    model (``want``: its context ``[L, D]``; refused when the data has none, or of another
    ``(L, D)``), None for other models (``want`` None; a latents file's context is then unused)."""
    if not 0.0 <= cond_drop <= 1.0:
        raise BqcError(f"--cond-drop must be a probability in [0, 1], got {cond_drop:g}")
    if not want:
        if cond_drop:
            raise BqcError(f"--cond-drop {cond_drop:g}: this model is not text-conditioned (no context input)",
                           hint="drop --cond-drop")
        return None
    want = [int(v) for v in want]
    if ds.context is None:
        raise BqcError(f"this artifact is text-conditioned (it takes a text embedding 'context' of {want[0]}x{want[1]} per "
                       f"sample) but the data {data!r} has no text embeddings"
                       + (" (image data cannot condition it)" if not ds.is_latents else ""),
                       hint="train on a latents file with context: `bqc encode IMAGES --vae VAE_DIR --captions "
                            "captions.json --text-encoder TEXT_DIR -o latents.safetensors` (or --context "
                            "embeddings.safetensors), then `--data latents.safetensors`")
    got = [int(v) for v in ds.context.shape[1:]]
    if got != want:
        raise BqcError(f"the data's text embeddings are {got[0]}x{got[1]} (L x D) per sample, this artifact takes "
                       f"{want[0]}x{want[1]}",
                       hint="encode with the model's text encoder and token count, or transform the model with "
                            f"--context-len {got[0]}" if got[1] == want[1] else "use the text encoder the model was trained with")
    if cond_drop > 0 and ds.uncond is None:
        raise BqcError(f"--cond-drop {cond_drop:g} replaces prompts with the empty-prompt embedding, which {data!r} "
                       "does not hold ('uncond')", hint="encode the data with --text-encoder (which stores it), or drop --cond-drop")
    return ds.context


def train_artifact(art_dir, data: str, out, opts: QATOptions, *, resume=False) -> Path:
    if opts.steps < 1:  # an untrained artifact labelled "trained", with uncalibrated quantizers
        raise BqcError(f"--steps {opts.steps}: training needs at least one step",
                       hint=f"train for some steps (e.g. --steps 500); to lower an untrained artifact, calibrate its "
                            f"activation quantizers on real data with `bqc lower {art_dir} --calibrate {data} -o DIR`")
    manifest = artifact.read_manifest(art_dir)  # the manifest and the data first: refusals cost no model build
    ds = load_dataset(data, "train", resize=opts.resize)
    context = check_conditioning((manifest.get("source") or {}).get("context"), ds, data, opts.cond_drop)
    art = artifact.load_artifact(art_dir)
    student = art.gm.train()
    teacher = art.teacher().gm.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train = dict(art.recipe.train)
    meta = ir.graph_meta(student)
    shape = tuple(ds.images.shape[1:])
    if shape != tuple(art.model.input_shape):
        raise BqcError(f"data {data!r} has images of shape {shape}, the model takes {tuple(art.model.input_shape)}")
    schedule = NoiseSchedule.from_manifest(art.manifest)  # the model's own process (default: linear eps)
    s_view, _, taps = _tap_views(student, teacher) if opts.distill else (None, None, [])
    lrm = None
    if taps and meta.get("distill", {}).get("loss") == "lrm":
        nodes = {n.name: n for n in student.graph.nodes}
        width = meta["distill"].get("form", "paper") == "code"  # the reference code projects the width axis
        dims = [int(nodes[tp["node"]].meta["val"].shape[-1 if width else 1]) for tp in taps]
        lrm = LRMProjections(dims, k=int(meta["distill"].get("k", 4)), axis="width" if width else "channel")
    model = QATModel(student, lrm, s_view)
    before = _schedule_callbacks(student, train, opts.steps)
    base_loss = make_loss(student, teacher, train, opts, schedule, opts.steps,
                          uncond=ds.uncond if context is not None else None)

    def loss_fn(m, batch, step):
        before(step)
        return base_loss(m, batch, step)

    out = Path(out)
    hp = resolved_hparams(train, opts)
    cfg = LoopConfig(steps=opts.steps, batch_size=opts.batch, lr=hp["lr"], warmup_steps=opts.warmup,
                     lr_schedule=hp.get("lr_schedule", "constant"), min_lr_ratio=hp.get("min_lr_ratio", 0.0),
                     weight_decay=hp["weight_decay"], grad_clip=hp["grad_clip"] or None, ema_decay=opts.ema_decay, ema_warmup=opts.ema_warmup, seed=opts.seed,
                     checkpoint_every=opts.checkpoint_every, progress=opts.progress)
    fingerprint = {"task": "qat", "recipe": art.recipe.to_dict(), "wbits": art.manifest["wbits"],
                   "abits": art.manifest["abits"], "source": art.manifest["source"], "data": data,
                   "gap": tbs_gap(train, opts, schedule), "distill": opts.distill}
    if schedule != NoiseSchedule():  # (absent for the default, so older runs still resume)
        fingerprint["diffusion"] = schedule.to_dict()
    if opts.cond_drop:
        fingerprint["cond_drop"] = opts.cond_drop
    target = loss_target(train, opts)
    if target != "true":  # (absent for the default, so older runs still resume)
        fingerprint["target"] = target
    if "float_lr_scale" in hp:
        fingerprint["float_lr_scale"] = hp["float_lr_scale"]
    if opts.t_range is not None:  # (absent for the default, so older runs still resume)
        fingerprint["t_range"] = list(timestep_range(opts, schedule))
    t0 = time.time()
    # on resume, an --lr / --grad-clip given explicitly may differ from the checkpoint's (recorded as a change)
    change = [k for k, v in (("lr", opts.lr), ("grad_clip", opts.grad_clip)) if v is not None] if resume else []
    nan_hint = (f"resume from it with a lower learning rate and/or a smaller gradient clip, e.g. `bqc train {art_dir} "
                f"--data {data} --steps {opts.steps} -o {out} --resume {out} --lr {hp['lr'] / 2:g} --grad-clip "
                f"{min(hp['grad_clip'] or 1.0, 1.0) / 2:g}`, or start a new run with a longer --warmup")
    groups = param_groups(model, student, hp.get("float_lr_scale", 1.0), hp["lr"])
    res = train_loop(model, (ds.images, ds.labels, context), loss_fn, cfg, out / "train", fingerprint=fingerprint, resume=resume,
                     param_groups=groups,
                     change=change, nonfinite_hint=nan_hint)
    wall = time.time() - t0
    if not DistContext.from_env("cpu").main:
        return out  # rank 0 writes the trained artifact
    before(res.step)  # the final schedule state (stage switch etc.) belongs to the saved model
    sd = res.ema_state_dict(model)
    model.load_state_dict(sd)
    student.eval()
    info = {"steps": res.step, "data": data, "wall_s_this_run": round(wall, 1), "resumed_from": res.resumed_from,
            "weights": "ema" if res.ema else "raw", "options": {k: v for k, v in vars(opts).items()},
            "hparams": hp, "target": target, "changes": res.changes, "divergence": divergence(out / "train" / "metrics.csv"),
            "from": str(art_dir)}
    artifact.save_artifact(out / ".artifact", base_ep=art.base_ep, gm=student, recipe=art.recipe,
                           wbits=art.manifest["wbits"], abits=art.manifest["abits"],
                           source=art.manifest["source"],
                           extra={"train": info, **({"diffusion": art.manifest["diffusion"]} if "diffusion" in art.manifest else {})})
    for f in (out / ".artifact").iterdir():  # artifact files next to train/ (checkpoints, log)
        shutil.move(str(f), out / f.name)
    (out / ".artifact").rmdir()
    (out / "train.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out
