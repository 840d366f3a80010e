"""``BqcModel``: the calling convention around a bqc graph.

``model(x, t, y=None, state=None, context=None) -> (eps, new_state)``: the protocol the samplers
and trainer use (``bqc.diffusion.samplers``); ``context`` is the text embedding ``(N, L, D)`` of a
text-conditioned graph (:attr:`BqcModel.context` says whether it takes one), passed by keyword. ``state`` is the list of cross-timestep (TBS) tensors the
graph returned at the previous sampling step, or ``None`` on the first step; graphs without
state return ``None``. Nothing is kept in hooks or globals: the state is explicit graph
inputs/outputs, named in ``gm.meta["bqc"]``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from bqc import ir
from bqc.errors import BqcError
from bqc.signature import Signature


class BqcModel(nn.Module):
    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    @property
    def meta(self) -> dict:
        return ir.graph_meta(self.gm)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])

    @property
    def conditional(self) -> bool:
        return bool(self.meta.get("conditional"))

    @property
    def context(self) -> tuple[int, int] | None:
        """``(L, D)`` of the text embedding a text-conditioned graph takes, None for other graphs."""
        c = self.meta.get("context")
        return (int(c[0]), int(c[1])) if c else None

    @property
    def num_state(self) -> int:
        return len(self.meta.get("state_outputs", []))

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise BqcError(
                f"input of shape {tuple(x.shape)} does not fit this model, which takes (N, {', '.join(map(str, self.input_shape))})",
            )

    @property
    def signature(self) -> Signature:
        """The graph's Signature, derived once per graph (a pass that edits the graph in place
        changes its node count, which re-derives it): forward runs every sampling/training step."""
        key = (id(self.gm.graph), len(self.gm.graph.nodes), id(ir.graph_meta(self.gm)))
        if getattr(self, "_signature_key", None) != key:
            self._signature, self._signature_key = Signature.of(self.gm), key
        return self._signature

    def forward(self, x: torch.Tensor, t, y=None, state: list[torch.Tensor] | None = None, **inputs):
        """``inputs``: conditioning inputs other than ``y`` the graph takes, by name."""
        self.check_input(x)
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t
        sig = self.signature
        if y is not None and "y" in sig.model_inputs:
            y = torch.as_tensor(y, device=x.device).expand(b)
        args = sig.step_args(
            {**inputs, "x": x, "t": t, "y": y}, state, error=BqcError,
            zeros=lambda shape: torch.zeros((b, *shape), dtype=x.dtype, device=x.device),
            flag=lambda v: torch.full((), v, dtype=x.dtype, device=x.device))
        return Signature.split_outputs(self.gm(*args))

    def eps(self, x, t, y=None, **inputs) -> torch.Tensor:
        """Noise prediction without state (training-time convenience)."""
        return self.forward(x, t, y, **inputs)[0]
