"""Write a batch of images as one PNG grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["make_grid", "save_grid"]


def make_grid(samples: torch.Tensor, nrow: int = 8, *, pad: int = 1, pad_value: float = 1.0,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images (``C`` 1 or 3, values in ``value_range``) into a uint8
    array ``(rows*(H+pad)+pad, nrow*(W+pad)+pad[, 3])``; ``nrow`` is images per row."""
    x = torch.as_tensor(samples).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"make_grid: expected (N, 1|3, H, W), got {tuple(x.shape)}")
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    nrow = max(1, min(int(nrow), n))
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), float(pad_value))
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = (grid.numpy() * 255.0 + 0.5).astype(np.uint8)
    return arr[0] if c == 1 else arr.transpose(1, 2, 0)


def save_grid(samples: torch.Tensor, path, nrow: int = 8, *, scale: int = 1, pad: int = 1,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Save ``samples`` (N, C, H, W) in ``value_range`` as a PNG grid with ``nrow`` images
    per row, each pixel enlarged ``scale`` times (nearest). Returns the path."""
    from PIL import Image

    arr = make_grid(samples, nrow, pad=pad, value_range=value_range)
    img = Image.fromarray(arr)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":  # marked, so that bqc knows it may replace this file (bqc.outputs)
        from PIL.PngImagePlugin import PngInfo

        from bqc.outputs import PNG_MARK

        info = PngInfo()
        info.add_text(*PNG_MARK)
        img.save(path, pnginfo=info)
    else:
        img.save(path)
    return path
