"""``BqcModel``: the calling convention around a bqc graph.

``model(x, t, y=None, state=None) -> (eps, new_state)``: the protocol the samplers and trainer
use (``bqc.diffusion.samplers``). ``state`` is the list of cross-timestep (TBS) tensors the
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
    def num_state(self) -> int:
        return len(self.meta.get("state_outputs", []))

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise BqcError(
                f"input of shape {tuple(x.shape)} does not fit this model, which takes (N, {', '.join(map(str, self.input_shape))})",
            )

    def forward(self, x: torch.Tensor, t, y=None, state: list[torch.Tensor] | None = None):
        self.check_input(x)
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t
        args: list = [x, t]
        if self.conditional:
            if y is None:
                raise BqcError("this model is class-conditional: pass class labels y")
            args.append(torch.as_tensor(y, device=x.device).expand(b))
        specs = self.meta.get("state_inputs", [])
        if specs:
            if state is None:  # first sampling step: no cache; the flag input disables the blend
                state = [torch.zeros((b, *s["shape"]), dtype=x.dtype, device=x.device) for s in specs]
                flag = torch.zeros((), dtype=x.dtype, device=x.device)
            else:
                if len(state) != len(specs):
                    raise BqcError(f"state has {len(state)} tensors, the graph takes {len(specs)}")
                flag = torch.ones((), dtype=x.dtype, device=x.device)
            args.extend(state)
            args.append(flag)
        out = self.gm(*args)
        eps, new_state = out[0], list(out[1:])
        return eps, (new_state if new_state else None)

    def eps(self, x, t, y=None) -> torch.Tensor:
        """Noise prediction without state (training-time convenience)."""
        return self.forward(x, t, y)[0]
