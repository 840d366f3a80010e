"""The modules passes put in place of aten.conv2d / aten.linear / aten.matmul nodes.

A quantized layer owns its weight (and bias) and a few optional parts, each an nn.Module or
None:

    y = op(aq(x), wq(W)) [⊙ K(x)] [⊙ out_scale] + b [+ |s| shortcut(x)], then [post]

With every part None the layer is exactly the float op. The ``quant_active`` buffer turns the
whole layer back into the float op (used by progressive warm-ups); it is state, so it
round-trips through ``state_dict`` like everything else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FLOAT_BITS = 32


def _bits(part) -> int:
    return FLOAT_BITS if part is None else int(part.bits)


def _describe(part) -> dict | None:
    return None if part is None else part.describe()


class _Quantized(nn.Module):
    """What every quantized op shares: the active flag and ``describe``."""

    op = "?"

    def __init__(self):
        super().__init__()
        self.register_buffer("quant_active", torch.tensor(True))

    def set_active(self, active: bool) -> None:
        self.quant_active.fill_(bool(active))

    def _parts(self) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able summary: ``{"op", "w_bits", "a_bits", "w_bases", "active", "parts"}``."""
        raise NotImplementedError

    def _parts_description(self) -> dict:
        return {name: _describe(p) for name, p in self._parts().items() if p is not None}


class QLayer(_Quantized):
    """Base of QConv2d / QLinear: weight, bias, input quantizer ``aq``, weight quantizer
    ``wq`` and an output module ``post``; subclasses supply ``_float_op`` and ``_quant_op``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, wq=None, aq=None, post=None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.wq, self.aq, self.post = wq, aq, post

    def qweight(self) -> torch.Tensor:
        return self.weight if self.wq is None else self.wq(self.weight)

    def qinput(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.aq is None else self.aq(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.quant_active):
            return self._float_op(x, self.weight, self.bias)
        y = self._quant_op(x)
        return y if self.post is None else self.post(y)

    def _float_op(self, x, w, b):
        raise NotImplementedError

    def _quant_op(self, x):
        return self._float_op(self.qinput(x), self.qweight(), self.bias)

    def _parts(self) -> dict:
        return {"wq": self.wq, "aq": self.aq, "post": self.post}

    def describe(self) -> dict:
        return {"op": self.op, "w_bits": _bits(self.wq), "a_bits": _bits(self.aq),
                "w_bases": 0 if self.wq is None else int(self.wq.describe().get("bases", 1)),
                "bias": self.bias is not None, "active": bool(self.quant_active),
                "parts": self._parts_description()}

    @torch.no_grad()
    def deploy_form(self) -> dict:
        """The weight's inference form (see the weight quantizers) and the bias."""
        w = ({"kind": "float", "weight": self.weight.detach().clone()} if self.wq is None
             else self.wq.deploy_form(self.weight))
        return {"weight": w, "bias": None if self.bias is None else self.bias.detach().clone()}


class QConv2d(QLayer):
    """Quantized conv2d with optional K map, XNOR++ output scale and scaled shortcut."""

    op = "conv2d"

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                 wq=None, aq=None, out_scale=None, kmap=None, shortcut=None, post=None):
        super().__init__(weight, bias, wq=wq, aq=aq, post=post)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, int(groups)
        self.kmap, self.out_scale, self.shortcut = kmap, out_scale, shortcut

    def _float_op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _quant_op(self, x):
        xq, w = self.qinput(x), self.qweight()
        if self.kmap is None and self.out_scale is None:
            y = self._float_op(xq, w, self.bias)
        else:
            y = self._float_op(xq, w, None)
            if self.kmap is not None:
                y = y * self.kmap(x)
            if self.out_scale is not None:
                y = self.out_scale(y)
            if self.bias is not None:
                y = y + self.bias.view(1, -1, 1, 1)
        if self.shortcut is not None:
            y = y + self.shortcut(x, y.shape[-2:])
        return y

    def _parts(self) -> dict:
        return {**super()._parts(), "kmap": self.kmap, "out_scale": self.out_scale,
                "shortcut": self.shortcut}

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return (f"{i * self.groups}, {o}, kernel=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


class QLinear(QLayer):
    """Quantized linear: y = linear(aq(x), wq(W), b) [post]."""

    op = "linear"

    def _float_op(self, x, w, b):
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"


class QMatmul(_Quantized):
    """matmul(aq_a(a), aq_b(b)) for activation-activation products (attention q k^T, p v).

    ``describe`` reports the bits of ``b`` as ``w_bits`` and of ``a`` as ``a_bits`` so the
    BOPs accounting (MACs * b_w * b_a) treats it like any other layer.
    """

    op = "matmul"

    def __init__(self, aq_a=None, aq_b=None):
        super().__init__()
        self.aq_a, self.aq_b = aq_a, aq_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if bool(self.quant_active):
            a = a if self.aq_a is None else self.aq_a(a)
            b = b if self.aq_b is None else self.aq_b(b)
        return torch.matmul(a, b)

    def _parts(self) -> dict:
        return {"aq_a": self.aq_a, "aq_b": self.aq_b}

    def describe(self) -> dict:
        return {"op": self.op, "w_bits": _bits(self.aq_b), "a_bits": _bits(self.aq_a),
                "w_bases": 0, "bias": False, "active": bool(self.quant_active),
                "parts": self._parts_description()}
