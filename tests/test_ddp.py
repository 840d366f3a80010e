"""Scale-out: `torchrun --nproc_per_node 2 -m bqc train` with gloo on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from bqc import frontend, transform as tf


def test_two_process_training_keeps_replicas_identical(tmp_path):
    from PIL import Image

    from conftest import TINY_CONFIG
    from bqc.models.unet import UNetModel

    data = tmp_path / "imgs"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        Image.fromarray((torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy(), mode="L").save(data / f"{i}.png")
    torch.manual_seed(0)
    src = frontend._from_module(UNetModel(**TINY_CONFIG).eval(), "zoo", "tiny")
    art = tf.save(tf.transform(src, "bidm"), tmp_path / "art")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "bqc", "train", str(art), "--data", str(data), "--steps", "3", "--batch", "4", "-o", str(out),
           "--warmup", "1", "--checkpoint-every", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "train" / "replicas.json").read_text())
    assert rep["world"] == 2 and len(set(rep["checksums"])) == 1
    assert (out / "model.safetensors").exists() and (out / "train" / "checkpoint.safetensors").exists()
