"""Optional parts of a quantized conv: K map, factorised output scale, scaled real shortcut."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


def _pair2(v) -> tuple[int, int]:
    """(a, b) from an int, a pair, or a 1-element list (aten's conv2d accepts ``stride=[1]``)."""
    v = _pair(v)
    return (int(v[0]),) * 2 if len(v) == 1 else (int(v[0]), int(v[1]))


def _param_or_buffer(module: nn.Module, name: str, value: torch.Tensor, learnable: bool) -> None:
    if learnable:
        setattr(module, name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


class KMap(nn.Module):
    """Activation scaling map K = k ⊛ A with A = mean_c |x| (B, 1, H, W).

    k is a 1-channel kernel with the main conv's kernel/stride/padding/dilation, initialised
    to 1/(kh kw): a fixed buffer for XNOR-Net, a parameter for BiDM (METHODS §5, §8).
    """

    kind = "kmap"

    def __init__(self, kernel_size, stride=1, padding=0, dilation=1, learnable: bool = True):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.learnable = bool(learnable)
        _param_or_buffer(self, "weight", torch.full((1, 1, kh, kw), 1.0 / (kh * kw)), self.learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sum / C, not mean: the same values, but the backward divides the small (B, 1, H, W)
        # gradient instead of the expanded full-size one
        a = x.abs().sum(dim=1, keepdim=True) / x.shape[1]
        # one depthwise conv with the batch as its channels: oneDNN runs a 1-in 1-out channel conv
        # 1.3-6x slower, forward + backward (mnist16 BiDM, batch 64: 1.87 -> 0.30 ms at 16x16)
        b = a.shape[0]
        y = F.conv2d(a.reshape(1, b, *a.shape[2:]), self.weight.expand(b, -1, -1, -1), None,
                     self.stride, self.padding, self.dilation, groups=b)
        return y.reshape(b, 1, *y.shape[2:])

    def describe(self) -> dict:
        return {"kind": self.kind, "learnable": self.learnable,
                "kernel": list(self.weight.shape[-2:])}


class FactorisedScale(nn.Module):
    """XNOR++ output scale Γ = alpha_o ⊗ beta_h ⊗ gamma_w, learned, applied to (B, O, H, W).

    All factors start at 1 (or alpha at ``init_alpha``, e.g. mean|W_o|).
    """

    kind = "factorised_scale"

    def __init__(self, out_channels: int, h: int, w: int, init_alpha: torch.Tensor | None = None):
        super().__init__()
        alpha = torch.ones(out_channels) if init_alpha is None else init_alpha.detach().clone().float()
        self.alpha = nn.Parameter(alpha.reshape(out_channels))
        self.beta = nn.Parameter(torch.ones(h))
        self.gamma = nn.Parameter(torch.ones(w))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y * self.alpha.view(1, -1, 1, 1) * self.beta.view(1, 1, -1, 1)
                * self.gamma.view(1, 1, 1, -1))

    def describe(self) -> dict:
        return {"kind": self.kind, "shape": [self.alpha.numel(), self.beta.numel(), self.gamma.numel()]}


def pool_channels(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Adaptive average over the channel axis of (B, C, H, W) to ``out_channels``.

    When one count divides the other, adaptive pooling is a mean over groups of C / out
    consecutive channels (reducing) or a repetition of each channel out / C times (expanding);
    those two cases (every UNet layer's) avoid the permute + adaptive_avg_pool1d round trip.
    """
    b, c, h, w = x.shape
    if c % out_channels == 0:
        return x.reshape(b, out_channels, c // out_channels, h, w).sum(dim=2) / (c // out_channels)
    if out_channels % c == 0:
        return x.repeat_interleave(out_channels // c, dim=1)
    x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(b, h * w, c), out_channels)
    return x.reshape(b, h, w, out_channels).permute(0, 3, 1, 2)


class Shortcut(nn.Module):
    """|s| * shortcut(x), shaped like the conv output (BiDM; ReActNet with a fixed s = 1).

    shortcut(x): average-pool by the conv stride, nearest-resize if the spatial size still
    differs, then, when the channel count changes, ``channels="pool"`` (default) maps channels
    without parameters (adaptive average over channel groups when reducing, repetition when
    expanding; any ratio), or ``channels="conv"`` uses a real-valued 1x1 conv (no bias).
    The default keeps the model binary: a float 1x1 conv on every channel-changing layer (e.g.
    attention qkv, C -> 3C) costs as much storage as the float layer it shortcuts and would
    put BiDM's LDM-4 model at ~206 MiB instead of the ~37 MiB its reported 28x saving implies.
    ``learnable=True`` makes s a parameter (BiDM, init 0.3), else a buffer.
    """

    kind = "shortcut"

    def __init__(self, in_channels: int, out_channels: int, stride=1, scale: float = 0.3,
                 learnable: bool = True, channels: str = "pool"):
        super().__init__()
        if channels not in ("pool", "conv"):
            raise ValueError(f"shortcut channels must be 'pool' or 'conv', got {channels!r}")
        self.stride = _pair2(stride)  # (1,) would read as "strided" and run a 1x1 avg-pool
        self.learnable = bool(learnable)
        self.out_channels = int(out_channels)
        change = in_channels != out_channels
        self.channels = channels if change else "same"
        self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=False) if change and channels == "conv" else None
        _param_or_buffer(self, "s", torch.tensor(float(scale)), self.learnable)

    def forward(self, x: torch.Tensor, out_hw) -> torch.Tensor:
        if self.stride != (1, 1):
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=tuple(out_hw), mode="nearest")
        if self.proj is not None:
            x = self.proj(x)
        elif self.channels == "pool":
            x = pool_channels(x, self.out_channels)
        return self.s.abs() * x

    def describe(self) -> dict:
        return {"kind": self.kind, "learnable": self.learnable, "channels": self.channels,
                "stride": list(self.stride)}
