"""A small CNN classifier for 16x16 MNIST: the feature extractor behind bqc's sample metrics.

Its 128-dimensional penultimate activations play the role Inception-v3's pool features play
for FID/KID/precision/recall on natural images, and its logits give the Inception-style score
and the class histogram. Weights ship as ``models/checkpoints/mnist16_classifier.safetensors``
(with ``mnist16_classifier.json``: test accuracy and the command that trained them).

Train again with ``python -m bqc.metrics.classifier --out models/checkpoints``.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bqc.errors import BqcError

__all__ = ["MnistClassifier", "default_classifier_path", "load_classifier", "train_classifier"]

FEATURE_DIM = 128
_NAME = "mnist16_classifier"


class MnistClassifier(nn.Module):
    """conv32-pool-conv64-pool-conv128-pool-fc128-fc10 for (N,1,16,16) inputs in [-1,1]
    (about 2.5M multiply-adds per image)."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 2 * 2, feature_dim)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) (post-ReLU input of the last layer)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.features(x)))

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode features and logits of a whole set, batched; float64 CPU outputs."""
        was = self.training
        self.eval()
        fs, ls = [], []
        dev = next(self.parameters()).device
        for i in range(0, len(x), batch):
            f = self.features(x[i:i + batch].to(dev, torch.float32))
            fs.append(f.double().cpu())
            ls.append(self.fc2(f).double().cpu())
        self.train(was)
        return torch.cat(fs), torch.cat(ls)


def default_classifier_path() -> Path:
    """``<bqc.models>/checkpoints/mnist16_classifier.safetensors``."""
    from importlib.resources import files

    return Path(str(files("bqc.models"))) / "checkpoints" / f"{_NAME}.safetensors"


_CACHE: dict = {}


def load_classifier(path=None) -> MnistClassifier:
    """Load the shipped (or a given) classifier in eval mode (cached per path)."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else default_classifier_path()
    key = str(p.resolve()) if p.exists() else str(p)
    if key in _CACHE:
        return _CACHE[key]
    if not p.is_file():
        raise BqcError(f"metrics classifier weights not found: {p}",
                       hint="train them with: python -m bqc.metrics.classifier --out models/checkpoints")
    m = MnistClassifier()
    m.load_state_dict(load_file(str(p)))
    m.eval()
    for q in m.parameters():
        q.requires_grad_(False)
    _CACHE[key] = m
    return m


def _accuracy(m: MnistClassifier, x, y) -> float:
    _, logits = m.features_and_logits(x)
    return float((logits.argmax(1) == y).double().mean())


def train_classifier(*, seed: int = 0, epochs: int = 3, batch: int = 128, lr: float = 2e-3,
                     out_dir=None, threads: int | None = 2, log=print) -> tuple[MnistClassifier, dict]:
    """Train on mnist16 ``trainval`` (60k) with small random shifts; report ``test`` accuracy.

    Reproducible for a seed on the same machine/thread count. Writes
    ``<out_dir>/mnist16_classifier.{safetensors,json}`` when ``out_dir`` is given."""
    from bqc.data import load_dataset

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    tr = load_dataset("mnist16", "trainval")
    te = load_dataset("mnist16", "test")
    m = MnistClassifier()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
    n = len(tr.images)
    spe = n // batch
    total = epochs * spe
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    step = 0
    for ep in range(epochs):
        m.train()
        perm = torch.randperm(n, generator=g)
        run = 0.0
        for i in range(spe):
            idx = perm[i * batch:(i + 1) * batch]
            x, y = tr.images[idx], tr.labels[idx]
            # random shift by up to 1 pixel (pad-and-crop), drawn from g
            sh = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts=sh, dims=(2, 3))[:, :, 1:-1, 1:-1]
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run += loss.item()
        acc = _accuracy(m, te.images, te.labels)
        log(f"epoch {ep + 1}/{epochs}: train loss {run / spe:.4f}, test acc {acc:.4f}, {time.time() - t0:.0f}s")
    wall = time.time() - t0
    acc = _accuracy(m, te.images, te.labels)
    info = {
        "test_accuracy": round(acc, 5),
        "test_set": "mnist16 test (10,000)",
        "train_set": "mnist16 trainval (60,000)",
        "seed": seed, "epochs": epochs, "batch": batch, "lr": lr,
        "train_seconds": round(wall, 1), "threads": threads,
        "feature_dim": FEATURE_DIM,
        "command": f"python -m bqc.metrics.classifier --out <dir> --seed {seed} --epochs {epochs} --threads {threads}",
        "torch": torch.__version__,
    }
    m.eval()
    if out_dir is not None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / f"{_NAME}.safetensors"))
        (out / f"{_NAME}.json").write_text(json.dumps(info, indent=2) + "\n")
    return m, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    _, info = train_classifier(seed=a.seed, epochs=a.epochs, out_dir=a.out, threads=a.threads)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
