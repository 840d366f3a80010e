"""Pickle-free, atomic training checkpoints.

A checkpoint is one safetensors file holding every tensor (model, EMA, optimizer state,
torch/numpy RNG states) with its JSON metadata (step, config, fingerprint, python RNG state,
data sampler position, the non-tensor part of the optimizer state) embedded in the
safetensors header under the key ``"bqc"``. Because everything lives in one file, a single
``os.replace`` makes a checkpoint appear atomically: a reader sees the old one or the new one,
never a mix, and the temporary file (same folder, ``.tmp-`` prefix) never has the real name.
A pretty-printed copy of the metadata is written next to it as ``<name>.json`` for people and
scripts; the loader trusts only the embedded copy.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bqc.errors import BqcError

__all__ = [
    "atomic_write_text", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta",
    "flatten_optimizer_state", "unflatten_optimizer_state", "get_rng_state", "set_rng_state",
    "split_prefix",
]

META_KEY = "bqc"
FORMAT = "bqc-checkpoint-1"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are ordinary files
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write a text file atomically (temp file in the same folder, then ``os.replace``)."""
    def w(tmp):
        Path(tmp).write_text(text)
    return _atomic_write(Path(path), w)


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, json_copy: bool = True) -> Path:
    """Atomically write ``tensors`` + JSON-serialisable ``meta`` to ``path`` (.safetensors)."""
    from safetensors.torch import save_file

    meta = dict(meta)
    meta.setdefault("format", FORMAT)
    text = json.dumps(meta, sort_keys=True)
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tens = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    path = _atomic_write(Path(path), lambda tmp: save_file(tens, tmp, metadata={META_KEY: text}))
    if json_copy:
        atomic_write_text(Path(path).with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_checkpoint_meta(path) -> dict:
    """The embedded metadata of a checkpoint without loading its tensors."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise BqcError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:
        raise BqcError(f"cannot read checkpoint {p}: {e}") from None
    if META_KEY not in md:
        raise BqcError(f"{p} is a safetensors file but not a bqc checkpoint (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(md[META_KEY])
    except (ValueError, RecursionError) as e:  # a damaged or hand-made checkpoint was json's traceback
        raise BqcError(f"{p}: its '{META_KEY}' metadata is not valid JSON ({str(e)[:120]})",
                       hint="the checkpoint is damaged; resume from another one or start a new run") from None
    if not isinstance(meta, dict):
        raise BqcError(f"{p}: its '{META_KEY}' metadata is not a JSON object", hint="the checkpoint is damaged")
    return meta


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    return load_file(str(path)), meta


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{k[len(prefix):]: v}`` for the keys that start with ``prefix``."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# optimizer state <-> (tensors, json)
# ---------------------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, tuple):
        return {"__tuple__": [_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} in checkpoint metadata")


def _unjson(v):
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_unjson(x) for x in v["__tuple__"])
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v


def flatten_optimizer_state(sd: dict, prefix: str = "optim/") -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors ``{prefix}{param_id}/{key}`` and a JSON
    part (param groups and any non-tensor per-parameter values)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}{pid}/{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = _jsonable(v)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], js: dict, prefix: str = "optim/") -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            pid, key = k[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[key] = v
    for pid, d in js.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(_unjson(d))
    return {"state": state, "param_groups": _unjson(js["param_groups"])}


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------
def get_rng_state(prefix: str = "rng/") -> tuple[dict[str, torch.Tensor], dict]:
    """torch (CPU and, if initialised, CUDA), numpy legacy and python ``random`` states."""
    tensors = {f"{prefix}torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors[f"{prefix}numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    ver, pystate, gauss_next = random.getstate()
    js = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": {"version": ver, "state": list(pystate), "gauss_next": gauss_next}}
    return tensors, js


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict, prefix: str = "rng/") -> None:
    torch.set_rng_state(tensors[f"{prefix}torch"].to(torch.uint8))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(f"{prefix}cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([c.to(torch.uint8) for c in cuda])
    npj = js["numpy"]
    np.random.set_state((npj["kind"], tensors[f"{prefix}numpy_keys"].numpy().astype(np.uint32), npj["pos"],
                         npj["has_gauss"], npj["cached_gaussian"]))
    pj = js["python"]
    random.setstate((pj["version"], tuple(pj["state"]), pj["gauss_next"]))
