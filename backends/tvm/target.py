"""TVM targets used by bqc kernels (TVM 0.27: targets are dicts, not strings).

``x86_target()`` is the deployment target we tune for (Cascade Lake: AVX-512BW + VNNI, no
VPOPCNTDQ); ``generic_target()`` is plain x86-64 (SSE2) LLVM, which every kernel must also
build for (tests check numerics on both).
"""
from __future__ import annotations

import tvm
from tvm.target import Target


def x86_target(num_cores: int = 2, mcpu: str = "cascadelake") -> Target:
    """``Target({"kind": "llvm", "mcpu": mcpu, "num-cores": num_cores})``."""
    return Target({"kind": "llvm", "mcpu": mcpu, "num-cores": int(num_cores)})


def generic_target(num_cores: int | None = None) -> Target:
    """Generic LLVM host target (baseline x86-64 ISA)."""
    cfg = {"kind": "llvm"}
    if num_cores is not None:
        cfg["num-cores"] = int(num_cores)
    return Target(cfg)


def as_target(target) -> Target:
    """Accept a Target, a dict, or the shorthands ``"x86"``/``"cascadelake"`` and ``"llvm"``."""
    if isinstance(target, Target):
        return target
    if target is None or target == "llvm":
        return generic_target()
    if target in ("x86", "cascadelake"):
        return x86_target()
    if isinstance(target, dict):
        return Target(target)
    return Target(target)


def has_feature(target, feature: str) -> bool:
    """Whether an LLVM CPU target has an ISA feature (e.g. ``"avx512vnni"``, ``"avx512bw"``)."""
    target = as_target(target)
    if target.kind.name != "llvm":
        return False
    try:
        return bool(tvm.target.codegen.target_has_features(feature, target))
    except Exception:  # pragma: no cover - unknown feature name on this LLVM
        return False


def is_cpu(target) -> bool:
    return as_target(target).kind.name == "llvm"


def has_vnni(target) -> bool:
    """AVX-512 VNNI (``vpdpbusd`` on zmm): the int8 route for W1Ak / int8 kernels."""
    return has_feature(target, "avx512vnni") and has_feature(target, "avx512bw")


def num_cores(target, default: int = 1) -> int:
    t = as_target(target)
    v = t.attrs.get("num-cores") if hasattr(t, "attrs") else None
    return int(v) if v else default
