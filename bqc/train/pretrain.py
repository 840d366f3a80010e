"""Full-precision DDPM pretraining of a zoo UNet (the teacher that QAT starts from).

``pretrain(model_name, data, steps, ...)`` trains with the epsilon-prediction loss through the
generic loop (:mod:`bqc.train.loop`), then writes the EMA weights to ``out_dir`` in the zoo
format (``config.json`` + ``model.safetensors``, loadable with
``bqc.models.zoo.load_model``). The loop's checkpoint and CSV log live in ``out_dir/train/``,
so ``resume=True`` continues an interrupted run.

Command line: ``python -m bqc.train.pretrain --steps 12000 --out runs/mnist16-fp``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bqc.data import load_dataset
from bqc.diffusion.schedule import NoiseSchedule, eps_loss
from bqc.errors import BqcError
from bqc.train.loop import LoopConfig, train_loop

__all__ = ["pretrain", "diffusion_loss_fn", "schedule_from_config", "load_training_ema", "sample_model", "evaluate_model"]


def diffusion_loss_fn(schedule: NoiseSchedule, conditional: bool):
    """``loss_fn(model, batch, step)`` for the loop: DDPM simple loss, t and noise from the
    global RNG (which the loop seeds per step)."""

    def loss_fn(model, batch, step):
        x0, y = batch
        loss = eps_loss(model, schedule, x0, y if conditional else None)
        return loss, {}

    return loss_fn


def _zoo():
    try:
        from bqc.models import zoo
    except ImportError as e:  # pragma: no cover - the zoo ships with bqc
        raise BqcError(f"bqc.models.zoo is not available: {e}") from None
    return zoo


def pretrain(model_name: str = "mnist16", data: str = "mnist16", steps: int = 12000, batch: int = 64,
             lr: float = 1e-3, seed: int = 0, out_dir="runs/mnist16-fp", *, warmup: int = 200,
             ema_decay: float = 0.999, ema_warmup: bool = True, grad_clip: float = 1.0, weight_decay: float = 0.0,
             checkpoint_every: int = 1000, log_every: int = 50, resume: bool | str = False,
             schedule: NoiseSchedule | None = None, threads: int | None = None,
             progress: bool = True, device: str = "cpu", resize=None, init_from=None,
             lr_schedule: str = "constant", min_lr_ratio: float = 0.0) -> Path:
    """Train ``model_name`` (a zoo name) on ``data`` for ``steps`` total steps; returns ``out_dir``.

    ``init_from``: a zoo-format model dir (``config.json`` + ``model.safetensors``) whose weights
    start the run (a warm start; its architecture and noise schedule must equal ``model_name``'s).
    ``lr_schedule="cosine"`` decays the lr to ``min_lr_ratio * lr`` at ``steps``."""
    zoo = _zoo()
    if threads:
        torch.set_num_threads(int(threads))
    schedule = schedule or NoiseSchedule()
    torch.manual_seed(seed)  # model initialisation
    model_config = zoo.model_config(model_name)
    model = zoo.build_model(model_config)
    init_info = None
    if init_from is not None:
        init_model, init_cfg = zoo.load_model(Path(init_from))
        if init_cfg.get("params") != model_config.get("params"):
            raise BqcError(f"--init {init_from}: its architecture differs from {model_name}'s",
                           hint="warm-start only from a model of the same zoo configuration")
        if schedule_from_config(init_cfg).to_dict() != schedule.to_dict():
            raise BqcError(f"--init {init_from} was trained with another noise schedule")
        model.load_state_dict(init_model.state_dict())
        init_info = {"path": str(init_from), "pretrain": (init_cfg.get("meta") or {}).get("pretrain")}
    conditional = getattr(model, "num_classes", None) is not None
    ds = load_dataset(data, "train", resize=resize)
    if conditional and ds.labels is None:
        raise BqcError(f"{model_name} is class-conditional but the data set {data!r} has no labels")
    shape = tuple(ds.images.shape[1:])
    want_c = getattr(model, "in_channels", shape[0])
    if want_c != shape[0]:
        raise BqcError(f"{model_name} takes {want_c}-channel images but {data!r} has {shape[0]} channels")
    out_dir = Path(out_dir)
    cfg = LoopConfig(steps=steps, batch_size=batch, lr=lr, weight_decay=weight_decay, warmup_steps=warmup,
                     grad_clip=grad_clip, ema_decay=ema_decay, ema_warmup=ema_warmup, seed=seed, checkpoint_every=checkpoint_every,
                     log_every=log_every, progress=progress, lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio)
    fingerprint = {"task": "pretrain-eps", "model": model_name, "model_config": model_config, "data": data,
                   "data_shape": list(shape), "schedule": schedule.to_dict(), "conditional": conditional}
    if init_info is not None:
        fingerprint["init_from"] = init_info
    t0 = time.time()
    res = train_loop(model, (ds.images, ds.labels), diffusion_loss_fn(schedule, conditional), cfg,
                     out_dir / "train", fingerprint=fingerprint, resume=resume, device=device)
    wall = time.time() - t0
    model.load_state_dict(res.ema_state_dict(model))
    model.eval()
    info = {"steps": res.step, "batch": batch, "lr": lr, "warmup": warmup, "ema_decay": ema_decay, "ema_warmup": ema_warmup, "seed": seed,
            "data": data, "threads": torch.get_num_threads(), "train_wall_s": round(res.wall_s_total, 1),
            "weights": "ema" if res.ema else "raw", "torch": torch.__version__,
            "lr_schedule": lr_schedule, "min_lr_ratio": min_lr_ratio}
    if init_info is not None:
        info["init_from"] = init_info
    config = dict(model_config)
    config["meta"] = {**config.get("meta", {}), "diffusion": {"objective": "eps", **schedule.to_dict()},
                      "pretrain": info}
    zoo.save_model(model, config, out_dir)
    run_info = {**info, "wall_s_this_run": round(wall, 1), "resumed_from": res.resumed_from}
    (out_dir / "train" / "pretrain_info.json").write_text(json.dumps(run_info, indent=2) + "\n")
    return out_dir


def schedule_from_config(config: dict) -> NoiseSchedule:
    """The noise schedule recorded in a model config's ``meta.diffusion`` (written by
    :func:`pretrain`); the DDPM default when absent."""
    d = dict(((config or {}).get("meta") or {}).get("diffusion") or {})
    obj = d.pop("objective", "eps")
    if obj != "eps":
        raise BqcError(f"model was trained with objective {obj!r}; bqc's samplers expect eps-prediction")
    return NoiseSchedule.from_dict(d)


def load_training_ema(train_dir, model_name: str = "mnist16"):
    """A zoo model holding the EMA weights of a (possibly still running) training checkpoint
    in ``train_dir`` (``<out_dir>/train``); returns ``(model, step)``."""
    from bqc.checkpoint import load_checkpoint, split_prefix
    from bqc.train.loop import CHECKPOINT_NAME

    tensors, meta = load_checkpoint(Path(train_dir) / CHECKPOINT_NAME)
    model = _zoo().build_model(model_name)
    sd = split_prefix(tensors, "model/")
    sd.update(split_prefix(tensors, "ema/"))
    model.load_state_dict(sd)
    return model.eval(), int(meta["step"])


def sample_model(model, n: int, *, steps: int = 50, seed: int = 0, batch: int = 250, eta: float = 0.0,
                 schedule: NoiseSchedule | None = None, progress: bool = False) -> torch.Tensor:
    """``n`` DDIM samples (``eta``, ``steps`` steps) of an unconditional or class-conditional
    zoo model (classes cycle 0..9 for a conditional one); CPU tensor in [-1, 1]."""
    from bqc.diffusion.samplers import as_step_model, generate

    model.eval()
    shape = (model.in_channels, model.image_size, model.image_size)
    y = None
    if getattr(model, "num_classes", None) is not None:
        y = torch.arange(n) % model.num_classes
    with torch.no_grad():
        return generate(as_step_model(model), n, shape, schedule=schedule or NoiseSchedule(), steps=steps, eta=eta,
                        seed=seed, batch=batch, y=y, progress=progress)


def evaluate_model(model, n: int = 1000, *, steps: int = 50, seed: int = 0, grid=None, eta: float = 0.0,
                   schedule: NoiseSchedule | None = None, progress: bool = False) -> dict:
    """Sample ``n`` images with DDIM-``steps`` and score them against the mnist16 test split
    (:func:`bqc.metrics.evaluate`); optionally save the first 64 as a grid PNG."""
    from bqc.diffusion.grid import save_grid
    from bqc.metrics import evaluate

    t0 = time.time()
    x = sample_model(model, n, steps=steps, seed=seed, eta=eta, schedule=schedule, progress=progress)
    sample_s = time.time() - t0
    if grid is not None:
        save_grid(x[:64], grid, nrow=8, scale=4)
    m = evaluate(x, None, n=n, seed=seed)
    m.update({"sampler": f"ddim-{steps} eta={eta:g}", "seed": seed, "sample_seconds": round(sample_s, 1)})
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description="FP DDPM pretraining of a zoo UNet (or --evaluate a trained one)")
    ap.add_argument("--model", default="mnist16")
    ap.add_argument("--data", default="mnist16")
    ap.add_argument("--steps", type=int, default=12000, help="total optimizer steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    ap.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: final lr as a fraction of --lr")
    ap.add_argument("--init", metavar="DIR", default=None,
                    help="warm start from a model dir of the same architecture (config.json + model.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/mnist16-fp")
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (use 1 on a busy machine: oversubscribed OpenMP threads spin)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--evaluate", metavar="DIR", default=None,
                    help="evaluate a model dir (config.json + model.safetensors) or a training dir (its EMA) instead")
    ap.add_argument("--n", type=int, default=1000, help="samples for --evaluate")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for --evaluate")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta for --evaluate (0 deterministic, 1 stochastic)")
    ap.add_argument("--grid", default=None, help="PNG path for a grid of 64 samples (--evaluate)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.evaluate:
        from bqc.metrics import format_metrics

        d = Path(a.evaluate)
        schedule = None
        if (d / "config.json").is_file():
            model, cfg = _zoo().load_model(d)
            schedule = schedule_from_config(cfg)
            step = None
        else:
            model, step = load_training_ema(d, a.model)
        m = evaluate_model(model, a.n, steps=a.sample_steps, seed=a.seed, grid=a.grid, schedule=schedule, eta=a.eta,
                           progress=True)
        m["train_step"] = step
        print(format_metrics(m))
        print(json.dumps(m))
        return
    out = pretrain(a.model, a.data, a.steps, a.batch, a.lr, a.seed, a.out, warmup=a.warmup, ema_decay=a.ema_decay,
                   checkpoint_every=a.checkpoint_every, resume=a.resume, threads=a.threads,
                   init_from=a.init, lr_schedule=a.lr_schedule, min_lr_ratio=a.min_lr_ratio)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
