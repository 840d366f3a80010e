"""A deploy graph's hand-off to compilers, and what a QAT graph needs before it can be folded.

* :func:`step_inputs`: a graph step's example arguments in order (x, t[, context][, y], TBS
  caches, flag; ``context`` a seeded Gaussian ``(batch, L, D)`` for text-conditioned graphs);
* :func:`export_program`: ``torch.export`` of a deploy graph (dynamic batch), each integer
  core one ``bqc.*`` node: what the TVM lowering imports;
* :func:`uncalibrated` / :func:`calibrate`: an untrained QAT graph's activation quantizers
  have no step yet; folding refuses it unless they are calibrated on data first.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from bqc.errors import BqcError
from bqc.signature import Signature

from .summary import is_deployed


class _Signature(nn.Module):
    """``gm`` with a tuple output, as torch.export wants it."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return tuple(self.gm(*args))


def uncalibrated(gm: fx.GraphModule) -> list[str]:
    """Names of the activation quantizers that no forward pass has initialised (an untrained
    QAT graph of a recipe with LSQ / uniform activations); empty for trained or deploy graphs."""
    from bqc.quant.uniform import LSQ, UniformAct

    return [name for name, m in gm.named_modules()
            if isinstance(m, (LSQ, UniformAct)) and not bool(m.initialised)]


CALIBRATION_IMAGES = 64


def calibrate(gm: fx.GraphModule, data: str, *, manifest: dict | None = None, n: int = CALIBRATION_IMAGES,
              seed: int = 0) -> str:
    """Initialise the activation quantizers of an untrained QAT graph in place; returns what was done.

    ``data``: a data set (``mnist16`` or an image folder, as ``bqc train --data``): ``n`` training
    images, noised to uniformly drawn timesteps of the model's own schedule (as training sees
    them), in one forward pass (a text-conditioned model takes the data's ``context`` rows of
    those images: a latents file). ``"random"``: one batch of 2 Gaussian inputs, for speed
    measurements and smoke tests only (the steps it sets mean nothing).
    """
    from bqc.graph import BqcModel

    model = BqcModel(gm)
    gm.eval()
    if data == "random":
        feed = model_feed(model.signature, 2, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            model(**{k: v for k, v in feed.items() if k in model.signature.model_inputs})
        return "random (2 Gaussian inputs; for speed measurements only)"
    from bqc.data import load_dataset
    from bqc.diffusion.schedule import NoiseSchedule, q_sample

    ds = load_dataset(data, "train")
    if tuple(ds.images.shape[1:]) != model.input_shape:
        raise BqcError(f"calibration data {data!r} has images of shape {tuple(ds.images.shape[1:])}, "
                       f"the model takes {model.input_shape}")
    sched = NoiseSchedule.from_manifest(manifest)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.images), generator=g)[:n]
    x0 = ds.images[idx]
    t = torch.randint(0, sched.T, (len(idx),), generator=g)
    x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=g))
    y, cond = None, {}
    if model.conditional:
        y = ds.labels[idx] if ds.labels is not None else torch.zeros(len(idx), dtype=torch.long)
    if model.context is not None:
        if getattr(ds, "context", None) is None:
            raise BqcError(f"this model is text-conditioned; calibration data {data!r} has no text embeddings",
                           hint="calibrate on a latents file with 'context' (bqc encode --captions/--context)")
        if tuple(ds.context.shape[1:]) != model.context:
            raise BqcError(f"calibration data {data!r} has text embeddings of shape {tuple(ds.context.shape[1:])}, "
                           f"the model takes {model.context}")
        cond["context"] = ds.context[idx].float()
    with torch.no_grad():
        model(x_t, t, y, **cond)
    return f"{data} ({len(idx)} training images at random timesteps)"


def model_feed(sig: Signature, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded example *model inputs* by name (``x``, ``t``, ``context`` of a text-conditioned
    model, ``y``): what :func:`step_inputs` and random calibration feed. ``context`` (Gaussian,
    ``(batch, L, D)``) is drawn only for a model that takes it, so other models' inputs are those
    of earlier versions for the same seed."""
    feed = {"x": torch.randn(batch, *sig.input_shape, generator=g),
            "t": torch.randint(0, 1000, (batch,), generator=g)}
    if "context" in sig.model_inputs:
        if sig.context is None:
            raise BqcError("this graph takes a text embedding 'context' but records no (L, D) shape for it",
                           hint="transform the model again with this bqc version")
        feed["context"] = torch.randn(batch, *sig.context, generator=g)
    feed["y"] = torch.zeros(batch, dtype=torch.long)
    return feed


def step_inputs(gm: fx.GraphModule, batch: int = 1, seed: int = 0, state: bool = True) -> list[torch.Tensor]:
    """Seeded example arguments of a graph's *step* in graph order (:class:`bqc.signature.Signature`):
    x, t[, context][, y], TBS caches (random and flag 1 if ``state``, else zeros and flag 0). Not
    the model's own example inputs (``bqc.frontend.example_inputs``: ``(x, t[, context][, y])`` of
    a source model, before any graph exists)."""
    sig = Signature.of(gm)
    g = torch.Generator().manual_seed(seed)
    feed = model_feed(sig, batch, g)
    caches = [torch.randn(batch, *s["shape"], generator=g) for s in sig.state_inputs] if state else None
    return sig.step_args(feed, caches, error=BqcError,
                         zeros=lambda shape: torch.zeros(batch, *shape), flag=torch.tensor)


#: the former name of :func:`step_inputs`
example_inputs = step_inputs


def export_program(gm: fx.GraphModule, args: list[torch.Tensor] | None = None, *, dynamic_batch: bool = True):
    """``torch.export`` of a deploy graph: the hand-off to compiler backends (TVM Relax).

    The integer cores stay single nodes (``bqc.sign_pack.default``, ``bqc.binary_conv2d.default``,
    ...; see :mod:`bqc.deploy.ops`); everything else is ATen. ``args`` defaults to
    ``step_inputs(gm, batch=2)``; the batch dimension of every input but the TBS flag (``x``,
    ``t``, ``context``, ``y``, the caches) is dynamic unless ``dynamic_batch=False``.
    """
    if not is_deployed(gm):
        raise BqcError("export_program takes a deploy graph", hint="fold it first: bqc.deploy.to_deploy(gm)")
    if args is None:
        args = step_inputs(gm, batch=2)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        sig = Signature.of(gm)
        shapes = (tuple(None if name == sig.state_flag or a.dim() == 0 else {0: batch}
                        for name, a in zip(sig.inputs, args)),)
    return torch.export.export(_Signature(gm), tuple(args), dynamic_shapes=shapes, strict=False)
