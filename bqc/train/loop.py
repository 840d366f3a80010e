"""The generic training loop shared by FP pretraining and QAT.

``train_loop(model, data, loss_fn, config, out_dir)`` runs ``config.steps`` optimizer steps
*in total* (a resumed run continues up to that count) with:

- AdamW, linear warm-up (then constant or cosine), gradient-norm clipping;
- an EMA of the weights (``ema_decay``; started from the weights after the first step, so a
  quantizer that initialises its scales from the first batch is captured);
- ``loss_fn(model, batch, step) -> (loss, {name: value})``;
- progress on stderr (:class:`bqc.console.Progress`): a bar (loss terms, steps/s, ETA) on a
  terminal; otherwise a line every ``print_every`` steps (auto: ~10% of the run, a multiple of
  ``log_every``, at most ``10 * log_every``) with step/total, loss, steps/s and ETA; and a CSV log
  (``metrics.csv``: step, loss, terms, lr, grad_norm, it/s, elapsed seconds; the same
  scalars go to TensorBoard under ``tensorboard/`` when the ``tensorboard`` package is installed);
- checkpoints every ``checkpoint_every`` steps, at the end, and on Ctrl-C / SIGTERM /
  KeyboardInterrupt (``checkpoint.safetensors`` via :mod:`bqc.checkpoint`, atomic, no pickle).
  A signal is deferred to the end of the current step, so the saved state is never half-updated;
  the loop then raises :class:`TrainingInterrupted` (a KeyboardInterrupt saying what was saved).

Exact resume: the data order is a per-epoch permutation from a generator seeded with
``(seed, epoch)``, and the global torch RNG is re-seeded from ``(seed, step)`` at the start of
every step (so ``loss_fn`` may draw timesteps/noise from the global RNG, and the draws of step
s do not depend on history). RNG states, optimizer moments and the EMA are checkpointed, so
N steps + resume to 2N gives bit-identical weights to 2N steps in one run (same device and
thread count). Resuming refuses when the caller's ``fingerprint`` (model/recipe identity),
the optimisation settings or the data size differ, naming each mismatch.

A non-finite loss or gradient norm stops the run with a :class:`BqcError` before the update,
and so do non-finite weights (or EMA) when a checkpoint is due: no checkpoint with non-finite
state is ever written. The kept checkpoint is the last one whose weights were finite *and*
whose first following step had a finite loss: until that step succeeds the previous checkpoint
is kept as ``checkpoint.prev.safetensors``, and a NaN stop at that step puts it back (the
checkpoint that produced the NaN is moved to ``checkpoint.nonfinite.safetensors``). A resume
may change the learning rate and the gradient clip explicitly (``change=("lr", "grad_clip")``;
``bqc train --resume OUT --lr .. --grad-clip ..``): every other setting must match, and each
change is recorded with its step in the checkpoint (``changes``) and ``LoopResult.changes``.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from bqc.checkpoint import (
    flatten_optimizer_state, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state, split_prefix,
    unflatten_optimizer_state,
)
from bqc.errors import BqcError

__all__ = ["LoopConfig", "LoopResult", "TrainingInterrupted", "train_loop", "batch_indices", "derive_seed", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_NAME = "metrics.csv"
LossFn = Callable[[torch.nn.Module, Any, int], "tuple[torch.Tensor, dict]"]

# settings that must match for an exact resume (steps may grow; logging/checkpoint cadence may change)
_RESUME_KEYS = ("batch_size", "lr", "weight_decay", "betas", "eps", "warmup_steps", "lr_schedule",
                "min_lr_ratio", "grad_clip", "ema_decay", "ema_warmup", "seed")
# ... of which a resume may change these when the caller says so (``train_loop(change=...)``)
CHANGEABLE = ("lr", "grad_clip")
PREV_NAME = "checkpoint.prev.safetensors"          # the fallback until the newest checkpoint is confirmed
NONFINITE_NAME = "checkpoint.nonfinite.safetensors"  # a checkpoint whose first step was non-finite


@dataclass
class LoopConfig:
    steps: int                           # total optimizer steps (a resumed run stops here too)
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0                # linear warm-up from lr/warmup to lr
    lr_schedule: str = "constant"        # "constant" or "cosine" (to min_lr_ratio*lr at decay_steps)
    min_lr_ratio: float = 0.0
    decay_steps: Optional[int] = None    # cosine horizon; None = steps (then a longer resumed run
                                         # would change the schedule, so resume refuses it)
    grad_clip: Optional[float] = 1.0     # max global grad norm; None = no clipping
    ema_decay: Optional[float] = 0.999   # None = no EMA
    ema_warmup: bool = False             # decay min(ema_decay, (1+k)/(10+k)) at the k-th EMA update
    seed: int = 0
    checkpoint_every: int = 1000         # 0 = only at the end / on interrupt
    log_every: int = 10                  # CSV row (window means) every this many steps
    print_every: int = 0                 # plain progress lines when not on a terminal; 0 = auto (_print_every)
    progress: bool = True

    def validate(self) -> None:
        if int(self.steps) != self.steps or self.steps < 0:
            raise BqcError(f"steps must be a non-negative integer (the total step count), got {self.steps!r}")
        if self.batch_size < 1:
            raise BqcError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < math.inf:  # the comparisons also refuse NaN
            raise BqcError(f"learning rate (--lr) must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise BqcError(f"weight decay (--weight-decay) must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not 0 <= self.grad_clip < math.inf:
            # a negative max norm would flip every gradient's sign inside clip_grad_norm_
            raise BqcError(f"gradient clip (--grad-clip) must be a finite number >= 0 (0: no clipping), got {self.grad_clip}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise BqcError(f"the cosine's final lr ratio (--min-lr-ratio) must be in [0, 1], got {self.min_lr_ratio}")
        if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
            raise BqcError(f"warm-up steps (--warmup) must be a non-negative integer, got {self.warmup_steps!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise BqcError(f"unknown lr schedule {self.lr_schedule!r}", hint="use 'constant' or 'cosine'")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise BqcError(f"ema decay must be in [0, 1), got {self.ema_decay}")
        if int(self.checkpoint_every) != self.checkpoint_every or self.checkpoint_every < 0:
            raise BqcError(f"--checkpoint-every must be a non-negative integer (0: only at the end and on Ctrl-C), "
                           f"got {self.checkpoint_every!r}")

    def horizon(self) -> Optional[int]:
        if self.lr_schedule != "cosine":
            return None
        return int(self.decay_steps if self.decay_steps is not None else self.steps)

    def resume_view(self) -> dict:
        d = asdict(self)
        view = {k: d[k] for k in _RESUME_KEYS}
        view["cosine_horizon"] = self.horizon()
        return json.loads(json.dumps(view))


@dataclass
class LoopResult:
    step: int
    out_dir: Path
    checkpoint: Optional[Path]
    ema: Optional[dict]                  # name -> tensor for the EMA'd floating-point entries
    last_terms: dict = field(default_factory=dict)
    wall_s: float = 0.0                  # this run
    wall_s_total: float = 0.0            # all runs that led to this checkpoint (resumes add up)
    resumed_from: Optional[int] = None
    changes: list = field(default_factory=list)  # [{"step": k, "lr": [old, new], ...}] explicit resume changes

    def ema_state_dict(self, model: torch.nn.Module) -> dict:
        """``model.state_dict()`` with the EMA values substituted (the model itself is untouched)."""
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.ema:
            sd.update({k: v.clone() for k, v in self.ema.items()})
        return sd


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from ``seed`` and any labels (stable across runs and platforms)."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class _Sampler:
    """Batch indices of global step s: the s-th batch of per-epoch seeded permutations (drop last)."""

    def __init__(self, n: int, batch: int, seed: int):
        if n < batch:
            raise BqcError(f"the data set has {n} items, fewer than one batch of {batch}", hint="lower the batch size")
        self.n, self.batch, self.seed = n, batch, seed
        self.spe = n // batch
        self._epoch, self._perm = None, None

    def position(self, step: int) -> dict:
        return {"epoch": step // self.spe, "index_in_epoch": step % self.spe, "steps_per_epoch": self.spe,
                "n": self.n, "batch": self.batch}

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.spe)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[i * self.batch:(i + 1) * self.batch]


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """The data indices the loop uses at global step ``step`` (for tests and tools)."""
    return _Sampler(n, batch, seed).indices(step)


def _data_len(data) -> int:
    if isinstance(data, torch.Tensor):
        return len(data)
    lens = {len(t) for t in data if t is not None}
    if len(lens) != 1:
        raise BqcError(f"training data tensors have different lengths: {sorted(lens)}")
    return lens.pop()


def _take(data, idx, device):
    if isinstance(data, torch.Tensor):
        return data[idx].to(device)
    items = [None if t is None else t[idx].to(device) for t in data]
    if hasattr(data, "_fields"):  # NamedTuple (bqc.data.Dataset)
        return type(data)(*items)
    return tuple(items)


def _lr_factor(cfg: LoopConfig, step: int) -> float:
    f = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        f = (step + 1) / cfg.warmup_steps
    h = cfg.horizon()
    if h is not None and h > cfg.warmup_steps:
        p = min(1.0, max(0.0, (step - cfg.warmup_steps) / (h - cfg.warmup_steps)))
        f *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


class _InterruptGuard:
    """Defers the first SIGINT/SIGTERM to the next step boundary, where the loop saves a
    checkpoint and raises KeyboardInterrupt (a second signal interrupts at once)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self):
        self.requested = False
        self._prev: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True

            for s in self.SIGNALS:
                self._prev[s] = signal.getsignal(s)
                signal.signal(s, handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        return False


class _CsvLog:
    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        self.fields: list[str] = []
        self.rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                r = csv.DictReader(f)
                self.fields = list(r.fieldnames or [])
                self.rows = [row for row in r if row.get("step") and int(row["step"]) <= resume_step]
            self._rewrite()
        elif path.exists():
            path.unlink()

    def _rewrite(self):
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)

    def write(self, row: dict):
        new = [k for k in row if k not in self.fields]
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        if new or not self.path.exists():
            self.fields += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)


def _tensorboard_writer(log_dir: Path):
    """A ``SummaryWriter`` on ``log_dir`` when TensorBoard is installed, else None (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module needs the tensorboard package
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _log_scalars(writer, row: dict) -> None:
    """Every numeric column of a metrics row as a TensorBoard scalar at its step."""
    if writer is None:
        return
    for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
            writer.add_scalar(k, v, row["step"])
    writer.flush()


def _normalise(d) -> Any:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint has {va!r}, this run has {vb!r}")
    return out


@dataclass
class DistContext:
    """torchrun's environment: ``rank``/``world``; world 1 means a single process."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device) -> "DistContext":
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def check_replicas(self, model: torch.nn.Module, out_dir: Path) -> None:
        """All ranks must hold identical weights at the end; rank 0 records the checksums."""
        if self.world == 1:
            return
        import torch.distributed as dist

        # DDP broadcasts rank 0's buffers (e.g. running activation ranges) at the start of each
        # forward, so after the last step each rank still holds its own: adopt rank 0's.
        with torch.no_grad():
            for b in model.buffers():
                dist.broadcast(b, 0)
        h = hashlib.blake2b(digest_size=8)
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        mine = h.hexdigest()
        all_sums: list = [None] * self.world
        dist.all_gather_object(all_sums, mine)
        if self.main:
            (out_dir / "replicas.json").write_text(json.dumps({"world": self.world, "checksums": all_sums}) + "\n")
        if len(set(all_sums)) != 1:
            raise RuntimeError(f"replicas diverged: {all_sums}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def trainable_groups(model: torch.nn.Module) -> list[dict]:
    """The loop's default parameter groups: one group of every parameter that needs a gradient."""
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def make_optimizer(param_groups, config: LoopConfig) -> torch.optim.AdamW:
    """The loop's AdamW, with the multi-tensor (``foreach``) update: the same per-element
    arithmetic as the per-parameter loop (bitwise equal, tests/test_train_speed.py), without
    its ~10 Python-dispatched ops per parameter per step (QAT models have hundreds of small
    parameters: scales, thresholds, TBS coefficients). CPU tensors would default to the loop."""
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay, foreach=True)


def train_loop(model: torch.nn.Module, data, loss_fn: LossFn, config: LoopConfig, out_dir, **kw) -> LoopResult:
    """:func:`_train_loop` (the docs are there) holding an exclusive lock on ``out_dir`` while it
    runs: a second `bqc train` / `pretrain` into the same folder (a `--resume` typed while the first
    still runs) interleaved checkpoints and metrics rows; it is refused instead."""
    config.validate()
    out_dir = Path(out_dir)
    with _exclusive(out_dir):
        return _train_loop(model, data, loss_fn, config, out_dir, **kw)


@contextlib.contextmanager
def _exclusive(folder: Path):
    """An advisory lock (flock) on ``folder`` itself, no file written; only the main process of a
    torchrun job takes it; a no-op where flock does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BqcError(f"{folder} is being written by another bqc process (it holds the folder's lock)",
                           hint="wait for it to finish (or stop it with Ctrl-C, which saves a checkpoint), then --resume") from None
        yield
    finally:
        os.close(fd)


def _train_loop(model: torch.nn.Module, data, loss_fn: LossFn, config: LoopConfig, out_dir, *,
               fingerprint: Optional[dict] = None, resume: bool | str = False,
               param_groups: Optional[Sequence[dict]] = None,
               callbacks: Iterable[Callable[[int, torch.nn.Module, dict], None]] = (),
               device: str | torch.device = "cpu", extra_meta: Optional[dict] = None,
               change: Iterable[str] = (), nonfinite_hint: Optional[str] = None) -> LoopResult:
    """Train ``model`` on ``data`` (a tensor, or a tuple/NamedTuple of equal-length tensors,
    ``None`` entries allowed; the batch passed to ``loss_fn`` has the same structure).

    ``resume``: ``False`` refuses to overwrite an existing checkpoint in ``out_dir``; ``True``
    requires one and continues from it; ``"auto"`` continues when one exists.
    ``param_groups``: AdamW groups (``{"params": [...], "lr": ...}``), default all trainable
    parameters. ``callbacks(step, model, terms)`` run after each completed step.
    ``fingerprint``: JSON-able identity of the model/recipe/data, checked on resume.
    ``change``: settings of :data:`CHANGEABLE` this resume may change on purpose (recorded).
    ``nonfinite_hint``: the hint of a NaN stop (name the caller's own options).
    """
    config.validate()
    dctx = DistContext.from_env(device)
    if config.batch_size % dctx.world:
        raise BqcError(f"batch {config.batch_size} does not split over {dctx.world} processes",
                       hint="use a batch size that is a multiple of --nproc_per_node")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    fingerprint = _normalise(fingerprint or {})
    n = _data_len(data)
    sampler = _Sampler(n, config.batch_size, config.seed)
    model.to(device)

    if param_groups is None:
        param_groups = trainable_groups(model)
    opt = make_optimizer(param_groups, config)
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    params = [p for g in opt.param_groups for p in g["params"]]

    # ---- resume ------------------------------------------------------------------------------
    if resume not in (True, False, "auto"):
        raise BqcError(f"resume must be True, False or 'auto', got {resume!r}")
    start, ema, resumed_from, wall_before = 0, None, None, 0.0
    change = set(change)
    if change - set(CHANGEABLE):
        raise BqcError(f"a resume can change only {', '.join(CHANGEABLE)}, not {sorted(change - set(CHANGEABLE))}")
    changes: list = []
    prev_path, bad_path = out_dir / PREV_NAME, out_dir / NONFINITE_NAME
    fallback = {"pending": False}  # PREV_NAME holds the fallback of a not yet confirmed checkpoint
    if ckpt_path.exists() and resume is False:
        raise BqcError(f"{out_dir} already holds a training checkpoint ({ckpt_path.name})",
                       hint="pass --resume to continue it, or choose another output folder")
    if resume is True and not ckpt_path.exists():
        raise BqcError(f"nothing to resume: no {CHECKPOINT_NAME} in {out_dir}")
    if resume and ckpt_path.exists():
        tensors, meta = load_checkpoint(ckpt_path)
        old_loop, new_loop = dict(meta.get("loop", {})), config.resume_view()
        changed = {k: [old_loop.get(k), new_loop[k]] for k in sorted(change) if old_loop.get(k) != new_loop[k]}
        old_loop.update({k: new_loop[k] for k in changed})
        problems = _diff({"fingerprint": meta.get("fingerprint", {}), "loop": old_loop},
                         {"fingerprint": fingerprint, "loop": new_loop})
        if meta.get("data_n") != n:
            problems.append(f"data set size: checkpoint has {meta.get('data_n')}, this run has {n}")
        if problems:
            hint = "use the original settings, or start a new run in another folder"
            if any(p.startswith(tuple(f"loop.{k}:" for k in CHANGEABLE)) for p in problems):
                hint += ("; the learning rate and the gradient clip may change on resume when given explicitly "
                         "(bqc train: --resume OUT with --lr / --grad-clip)")
            raise BqcError(f"cannot resume from {ckpt_path}: the checkpoint was made with different settings:\n  - "
                           + "\n  - ".join(problems), hint=hint)
        changes = list(meta.get("changes", []))
        if changed:
            changes.append({"step": int(meta["step"]), **changed})
        msd = split_prefix(tensors, "model/")
        want = model.state_dict()
        bad = [k for k in want if k not in msd or msd[k].shape != want[k].shape] + [k for k in msd if k not in want]
        if bad:
            raise BqcError(f"cannot resume from {ckpt_path}: model tensors differ from the checkpoint "
                           f"({len(bad)} mismatched, e.g. {bad[:3]})")
        model.load_state_dict(msd)
        mine = [{"initial_lr": g["initial_lr"], "lr": g["lr"], "foreach": g["foreach"]} for g in opt.param_groups]
        try:
            opt.load_state_dict(unflatten_optimizer_state(split_prefix(tensors, "optim/"), meta["optimizer"], prefix=""))
        except ValueError as e:
            raise BqcError(f"cannot resume from {ckpt_path}: the optimizer's parameter groups differ from the "
                           f"checkpoint ({e})") from None
        for g, m in zip(opt.param_groups, mine):  # this run's lr, foreach (load_state_dict restores the saved ones)
            g.update(m)
        ema_t = split_prefix(tensors, "ema/")
        ema = {k: v.to(device) for k, v in ema_t.items()} if meta.get("has_ema") else None
        set_rng_state(tensors, meta["rng"])
        start = resumed_from = int(meta["step"])
        wall_before = float(meta.get("wall_s", 0.0))
        if changed and dctx.main and config.progress:
            from rich.console import Console

            Console(stderr=True).print(f"resuming at step {start} with changed settings: "
                                       + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), highlight=False)

    train_model = model
    if dctx.world > 1:  # gradients are averaged by DDP; every rank starts from the same weights
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, find_unused_parameters=True)

    # ---- state helpers -----------------------------------------------------------------------
    def ema_keys():
        return [k for k, v in model.state_dict().items() if v.is_floating_point()]

    def nonfinite_state() -> list[str]:
        """Names of the model / EMA tensors holding NaN or inf."""
        sd = {f"model/{k}": v for k, v in model.state_dict().items()}
        sd.update({f"ema/{k}": v for k, v in (ema or {}).items()})
        return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]

    def write_checkpoint(step: int, or_keep: Any = _RAISE) -> Path | None:
        """Save the state of ``step``; the previous checkpoint stays as PREV_NAME until the step
        after this one succeeds (:func:`confirm_checkpoint`). Non-finite state is never saved:
        it raises, or (``or_keep``, on an interrupt) warns and returns ``or_keep``."""
        bad = nonfinite_state()
        if bad:  # every rank holds the same weights, so every rank stops here
            what = f"{len(bad)} tensors, e.g. {', '.join(bad[:3])}"
            if or_keep is _RAISE:
                raise _NonFinite(step, "weights", what, last_terms)
            Console(stderr=True).print(f"[yellow]not saving step {step}: non-finite weights ({what})[/]")
            return or_keep
        if not dctx.main:  # rank 0 checkpoints; the replicas are identical
            return None
        if ckpt_path.exists() and _ckpt_step(ckpt_path) != step:
            ckpt_path.replace(prev_path)
            fallback["pending"] = True
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        ot, oj = flatten_optimizer_state(opt.state_dict(), prefix="optim/")
        tensors.update(ot)
        if ema is not None:
            tensors.update({f"ema/{k}": v for k, v in ema.items()})
        rt, rj = get_rng_state()
        tensors.update(rt)
        meta = {"step": step, "steps_total": config.steps, "loop": config.resume_view(), "config": _normalise(asdict(config)),
                "fingerprint": fingerprint, "optimizer": oj, "rng": rj, "has_ema": ema is not None,
                "sampler": sampler.position(step), "data_n": n, "torch": torch.__version__,
                "wall_s": round(wall_before + time.time() - t_begin, 3), "changes": _normalise(changes),
                "extra": _normalise(extra_meta or {})}
        return save_checkpoint(ckpt_path, tensors, meta)

    def confirm_checkpoint() -> None:
        """A step after the newest checkpoint had a finite loss and gradient: drop the fallback."""
        if fallback["pending"]:
            prev_path.unlink(missing_ok=True)
            fallback["pending"] = False

    csvlog = _CsvLog(out_dir / METRICS_NAME, resumed_from) if dctx.main else None
    tb = _tensorboard_writer(out_dir / "tensorboard") if dctx.main else None
    from bqc.console import Progress

    show = bool(config.progress and dctx.main and start < config.steps)
    bar = Progress("train", total=config.steps, start=start, every=_print_every(config), enabled=show,
                   transient=False).__enter__()
    if show and not bar.interactive:
        bar.note(f"training steps {start}..{config.steps} -> {out_dir}" + (f" (resumed at {start})" if start else ""))

    t_begin = time.time()
    win_t, win_steps, win_sums = time.time(), 0, {}
    last_terms: dict = {}
    step = start
    last_ckpt = ckpt_path if ckpt_path.exists() and resumed_from is not None else None
    if dctx.main:
        if resumed_from is None:  # leftovers of an earlier run in this folder
            prev_path.unlink(missing_ok=True)
        fallback["pending"] = prev_path.exists()
    in_update = False
    callbacks = list(callbacks)
    try:
        with _InterruptGuard() as guard:
            model.train()
            while step < config.steps:
                if guard.requested:
                    raise KeyboardInterrupt
                if dctx.world == 1:
                    torch.manual_seed(derive_seed(config.seed, "step", step))
                    idx = sampler.indices(step)
                else:  # each rank takes its shard of the same global batch, with its own draws
                    torch.manual_seed(derive_seed(config.seed, "step", step, "rank", dctx.rank))
                    idx = sampler.indices(step)[dctx.rank::dctx.world]
                batch = _take(data, idx, device)
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * _lr_factor(config, step)
                out = loss_fn(train_model, batch, step)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError("loss_fn must return (loss, dict_of_terms)")
                loss, terms = out
                lval = dctx.mean(float(loss.detach()))  # every rank sees the same value (and stops together)
                terms = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}
                if not math.isfinite(lval):
                    raise _NonFinite(step, "loss", lval, terms)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else float("inf"))
                gn = float(gn)
                if not math.isfinite(gn):
                    raise _NonFinite(step, "gradient norm", gn, terms)
                confirm_checkpoint()  # the newest checkpoint's first step was finite
                in_update = True
                opt.step()
                if config.ema_decay is not None:
                    with torch.no_grad():
                        sd = model.state_dict()
                        if ema is None:
                            ema = {k: sd[k].detach().clone() for k in ema_keys()}
                        else:
                            d = config.ema_decay
                            if config.ema_warmup:  # k-th update (the EMA was created after step 1)
                                k_upd = step
                                d = min(d, (1 + k_upd) / (10 + k_upd))
                            keys = list(ema)  # v = d v + (1 - d) w, one multi-tensor op each
                            if keys:  # (foreach ops refuse empty lists)
                                torch._foreach_mul_([ema[k] for k in keys], d)
                                torch._foreach_add_([ema[k] for k in keys], [sd[k].detach() for k in keys], alpha=1 - d)
                step += 1
                in_update = False

                last_terms = {"loss": lval, **terms}
                for k, v in last_terms.items():
                    win_sums[k] = win_sums.get(k, 0.0) + v
                win_steps += 1
                for cb in callbacks:
                    cb(step, model, last_terms)
                if step % config.log_every == 0 or step == config.steps:
                    now = time.time()
                    rate = win_steps / max(now - win_t, 1e-9)
                    means = {k: v / win_steps for k, v in win_sums.items()}
                    if csvlog is not None:
                        row = {"step": step, **means, "lr": opt.param_groups[0]["lr"], "grad_norm": gn,
                               "it_s": rate, "elapsed_s": wall_before + now - t_begin}
                        csvlog.write(row)
                        _log_scalars(tb, row)
                    bar.update(step, "  ".join(f"{k} {v:.4g}" for k, v in means.items()))
                    win_t, win_steps, win_sums = now, 0, {}
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps:
                    last_ckpt = write_checkpoint(step)
    except KeyboardInterrupt as e:
        bar.close(ok=False)
        if in_update:
            msg = (f"interrupted during the update of step {step + 1}; the last checkpoint is kept "
                   f"(step {_ckpt_step(last_ckpt)}, {last_ckpt})" if last_ckpt else
                   f"interrupted during the update of step {step + 1}, before any checkpoint was written")
        else:
            if step > (resumed_from or 0) or last_ckpt is None:
                last_ckpt = write_checkpoint(step, or_keep=last_ckpt)
            msg = f"interrupted at step {step}; checkpoint saved to {last_ckpt}" if last_ckpt else \
                f"interrupted at step {step}"
        raise TrainingInterrupted(msg, step=step, checkpoint=last_ckpt) from e
    except _NonFinite as e:
        note = ""
        if dctx.main and e.what != "weights" and last_ckpt is not None and _ckpt_step(ckpt_path) == e.step:
            # the newest checkpoint's own weights gave the non-finite value: resuming from it would
            # repeat it whatever the settings, so fall back to the one before it
            if fallback["pending"] and prev_path.exists():
                ckpt_path.replace(bad_path)
                prev_path.replace(ckpt_path)
                fallback["pending"] = False
                note = (f" The checkpoint of step {e.step} gave this value at once: it is moved to {bad_path.name} "
                        f"and the one before it restored.")
            else:
                note = " That checkpoint gave this value at once: a resume from it repeats it unless its weights change."
        where = (f"the last checkpoint with finite weights and loss is kept: step {_ckpt_step(last_ckpt)}, {last_ckpt}"
                 if last_ckpt else "no checkpoint had been written yet")
        hint = nonfinite_hint or ("resume from that checkpoint with a lower learning rate or a smaller gradient-clip norm "
                                  "(train_loop(..., resume=True, change=('lr', 'grad_clip'))), or lengthen the warm-up "
                                  "in a new run")
        raise BqcError(f"training stopped at step {e.step}: non-finite {e.what} ({e.value}); terms {e.terms}. "
                       f"{where}.{note}", hint=hint) from None
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    if dctx.main:  # a finished run keeps one checkpoint
        prev_path.unlink(missing_ok=True)
    dctx.check_replicas(model, out_dir)
    return LoopResult(step=step, out_dir=out_dir, checkpoint=last_ckpt, ema=ema, last_terms=last_terms, changes=changes,
                      wall_s=time.time() - t_begin, wall_s_total=wall_before + time.time() - t_begin,
                      resumed_from=resumed_from)


def _print_every(config: LoopConfig) -> int:
    """Steps between plain progress lines: ``config.print_every``, else ~10% of the run rounded
    up to a multiple of ``log_every`` (the lines show the logged window means), at most
    ``10 * log_every``."""
    if config.print_every:
        return config.print_every
    le = max(config.log_every, 1)
    return min(10 * le, le * max(1, math.ceil(config.steps / 10 / le)))


def _ckpt_step(p) -> Any:
    from bqc.checkpoint import read_checkpoint_meta

    try:
        return read_checkpoint_meta(p)["step"]
    except Exception:
        return "?"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM stopped :func:`train_loop`: ``message`` says what was saved;
    ``checkpoint`` is the checkpoint a resume continues from (None when there is none)."""

    def __init__(self, message: str, *, step: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.message, self.step, self.checkpoint = message, step, checkpoint


_RAISE = object()


class _NonFinite(Exception):
    def __init__(self, step, what, value, terms):
        self.step, self.what, self.value, self.terms = step, what, value, terms
