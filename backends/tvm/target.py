"""CPU targets of the TVM backend, in one place: names, host detection, ISA features, kernel routes.

TVM 0.27 targets are dicts (``Target({"kind": "llvm", "mcpu": ..., "num-cores": ...})``).

* :data:`X86_PRESETS`: the names ``bqc lower --backend tvm-x86 --cpu NAME`` accepts (any other
  x86 CPU name LLVM knows, e.g. ``skylake-avx512``, is accepted too); ``host`` / ``native``
  (the default) is :func:`host_target`: LLVM's name for this machine's CPU, with the features
  this machine lacks switched off (a VM that hides AVX-512 from a Zen 4 still says ``znver4``).
  ARM cores (``cortex-a72``, ``cortex-a76``, ``neoverse-n1``, ...) are LLVM's aarch64 CPU names,
  for ``--backend tvm-arm`` (:func:`bqc.backends.tvm.arm.arm_target`).
* :func:`resolve_target`: backend + ``--cpu`` / ``--target`` -> Target (one function for the
  CLI and :mod:`.lower`); :func:`target_record`: what the manifest records about it.
* :func:`required_features`: the ISA features a library built for a target may use, among those
  :mod:`bqc.backends.hostcpu` can check on a host (the runtime refuses a host that lacks one).
* :data:`KERNEL_ROUTES` / :func:`kernel_route`: which kernel variant each kernel family uses on a
  target, as a function of the target's features only (never of the machine that compiles).

``x86_target()`` (Cascade Lake by default: the target the kernels were first tuned for) and
``generic_target()`` (plain x86-64) are explicit targets for tests and benchmarks.
"""
from __future__ import annotations

import json
import os

import tvm
from tvm.target import Target

from bqc.errors import BqcError
from bqc.backends import hostcpu

__all__ = [
    "X86_PRESETS", "HOST_NAMES", "ARM_EXAMPLES", "KERNEL_ROUTES", "x86_target", "generic_target",
    "host_target", "cpu_target", "resolve_target", "as_target", "has_feature", "is_cpu", "is_arm",
    "has_vnni", "num_cores", "target_features", "required_features", "kernel_route", "kernel_routes",
    "target_record",
]

#: ``--cpu`` names for tvm-x86 -> (LLVM ``mcpu``, what it is)
X86_PRESETS = {
    "x86-64": ("x86-64", "baseline x86-64 (SSE2): runs on any x86-64 CPU"),
    "x86-64-v2": ("x86-64-v2", "SSE4.2 + POPCNT (2009+: Nehalem, Bulldozer)"),
    "x86-64-v3": ("x86-64-v3", "AVX2 + FMA, no AVX-512 (Haswell 2013+, Zen 1-3, most laptops)"),
    "x86-64-v4": ("x86-64-v4", "AVX-512 F/BW/CD/DQ/VL, no VNNI or VPOPCNTDQ (Skylake-SP)"),
    "cascadelake": ("cascadelake", "AVX-512 + VNNI, no VPOPCNTDQ (Xeon 2nd gen)"),
    "icelake-server": ("icelake-server", "AVX-512 + VNNI + VPOPCNTDQ (Xeon 3rd gen, also Sapphire Rapids)"),
    "znver4": ("znver4", "AMD Zen 4: AVX-512 + VNNI + VPOPCNTDQ + BF16"),
}
HOST_NAMES = ("host", "native")
#: a few aarch64 ``--cpu`` names (any LLVM aarch64 CPU name works)
ARM_EXAMPLES = ("cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1", "neoverse-v1", "apple-m1")
X86_TRIPLE = "x86_64-linux-gnu"
ARM_TRIPLE = "aarch64-linux-gnu"

#: Kernel family -> routes in order of preference: ``(route, features the target needs)``; the
#: first route whose features the target has is used (:func:`kernel_route`).
#:
#: * ``w1a1``: XNOR-popcount conv / dense. ``vpopcnt``: plain per-lane vector popcount (one
#:   ``vpopcntd`` per 16 lanes); ``neon-cnt``: the aarch64 schedule (``cnt``); ``harley-seal``:
#:   the carry-save popcount network (x86 without VPOPCNTDQ: AVX-512 or AVX2 or SSE).
#: * ``hs-popcount``: the few popcounts left by Harley-Seal: ``vnni-lut`` (byte LUT + one
#:   ``vpdpbusd`` for the horizontal sum) or ``plain``.
#: * ``w1ak``: +-1 weights x k-bit codes (k = 2..8). ``vnni``: one ``vpdpbusd`` per 4 channels x
#:   16 lanes; ``avx512bw`` (zmm) / ``avx2`` (2 x ymm): ``vpmaddubsw`` + ``vpmaddwd`` + add
#:   (exact: |w| = 1 never saturates the int16 pair sums); ``generic``: vectorised int32
#:   multiply-add (slower than torch FP32: only for targets without AVX2).
#: * ``int8``: int8 weights x codes (8-bit head / tail layers): ``vnni`` or ``generic`` (the
#:   ``vpmaddubsw`` pair sums could saturate with |w| > 64).
KERNEL_ROUTES = {
    "w1a1": (("vpopcnt", ("avx512vpopcntdq",)), ("neon-cnt", ("neon",)), ("harley-seal", ())),
    "hs-popcount": (("vnni-lut", ("avx512vnni", "avx512bw")), ("plain", ())),
    "w1ak": (("vnni", ("avx512vnni", "avx512bw")), ("avx512bw", ("avx512bw",)), ("avx2", ("avx2",)),
             ("generic", ())),
    "int8": (("vnni", ("avx512vnni", "avx512bw")), ("generic", ())),
}


# ------------------------------------------------------------------------------- constructors
def x86_target(num_cores: int = 2, mcpu: str = "cascadelake", mattr=None) -> Target:
    """``Target({"kind": "llvm", "mcpu": mcpu, "num-cores": num_cores})`` (``mcpu`` may be a
    preset name of :data:`X86_PRESETS`)."""
    cfg = {"kind": "llvm", "mcpu": X86_PRESETS.get(mcpu, (mcpu,))[0], "num-cores": int(num_cores)}
    if mattr:
        cfg["mattr"] = list(mattr)
    return Target(cfg)


def generic_target(num_cores: int | None = None) -> Target:
    """Generic LLVM host target (baseline x86-64 ISA)."""
    cfg = {"kind": "llvm"}
    if num_cores is not None:
        cfg["num-cores"] = int(num_cores)
    return Target(cfg)


def host_target(num_cores: int | None = None) -> Target:
    """This machine's CPU: LLVM's host CPU name, minus the checked features the CPU (as this
    process sees it, :func:`bqc.backends.hostcpu.host_features`) lacks, plus the ones it has that
    the name does not imply. A name LLVM does not know (``generic``) becomes the best x86-64
    level the host reaches."""
    from tvm.target.codegen import llvm_get_system_cpu

    arch = hostcpu.machine()
    if arch not in ("x86_64", "aarch64"):
        raise BqcError(f"no bqc CPU target for this machine's architecture ({arch})",
                       hint="pass --cpu NAME for an x86-64 or aarch64 target")
    host = hostcpu.host_features()
    mcpu = str(llvm_get_system_cpu() or "generic")
    if arch == "x86_64" and mcpu == "generic":
        mcpu = hostcpu.best_x86_level(host)
    cfg = {"kind": "llvm", "mcpu": mcpu, "num-cores": int(num_cores or os.cpu_count() or 1)}
    if arch == "aarch64":
        cfg["mtriple"] = ARM_TRIPLE
    implied = target_features(Target(cfg))
    mattr = [f"-{f}" for f in sorted(implied) if host.get(f) is False]
    mattr += [f"+{f}" for f in sorted(host) if host[f] and f not in implied]
    if mattr:
        cfg["mattr"] = mattr
    return Target(cfg)


def _parse_raw(target: str) -> Target:
    """``--target``: a TVM target as JSON (``{"kind": "llvm", "mcpu": ...}``) or a bare kind."""
    try:
        cfg = json.loads(target) if target.lstrip().startswith("{") else target
        return Target(cfg)
    except Exception as e:  # noqa: BLE001 - TVM raises several types for a bad target
        raise BqcError(f"--target {target!r} is not a TVM target: {str(e).splitlines()[0] if str(e) else e}",
                       hint='give a JSON dict, e.g. --target \'{"kind": "llvm", "mcpu": "znver4", '
                            '"mattr": ["-avx512vnni"]}\' (TVM 0.27 rejects "llvm -mcpu=..." strings)') from None


def _with_cores(t: Target, threads: int | None, default: int) -> Target:
    cfg = dict(t.export())
    if threads or "num-cores" not in cfg or not cfg["num-cores"]:
        cfg["num-cores"] = int(threads or default)
    cfg.pop("keys", None)
    cfg.pop("tag", None)
    return Target(cfg)


def _unknown_cpu(cpu: str, backend: str) -> BqcError:
    if backend == "tvm-arm":
        names = ", ".join(HOST_NAMES + ARM_EXAMPLES)
        return BqcError(f"unknown aarch64 CPU {cpu!r} for --backend tvm-arm",
                        hint=f"use an LLVM aarch64 CPU name, e.g. {names}")
    names = ", ".join(HOST_NAMES + tuple(X86_PRESETS))
    return BqcError(f"unknown x86 CPU {cpu!r} for --backend tvm-x86",
                    hint=f"choose one of {names} (or another LLVM x86 CPU name such as skylake-avx512); "
                         "for ARM cores use --backend tvm-arm")


def cpu_target(backend: str, cpu: str | None, threads: int | None = None) -> Target:
    """``--cpu`` of a CPU backend -> Target (BqcError for a name neither bqc nor LLVM knows)."""
    from tvm.target.codegen import llvm_is_valid_cpu

    name = (cpu or "host").strip()
    if backend == "tvm-x86":
        if name in HOST_NAMES:
            if hostcpu.machine() != "x86_64":
                raise BqcError(f"--cpu {name} builds for this machine, which is not x86-64 ({hostcpu.machine()})",
                               hint=f"name an x86 CPU: {', '.join(X86_PRESETS)}")
            return host_target(threads)
        if name in X86_PRESETS or llvm_is_valid_cpu(name, X86_TRIPLE):
            return x86_target(threads or os.cpu_count() or 1, mcpu=name)
        raise _unknown_cpu(name, backend)
    if backend == "tvm-arm":
        from .arm import arm_target

        cores = threads or 4
        if cpu is None:
            return arm_target(num_cores=cores)
        if name in HOST_NAMES:
            if hostcpu.machine() != "aarch64":
                raise BqcError(f"--cpu {name} builds for this machine, which is not aarch64 ({hostcpu.machine()})",
                               hint=f"name an aarch64 CPU, e.g. {', '.join(ARM_EXAMPLES)}")
            return host_target(cores)
        if llvm_is_valid_cpu(name, ARM_TRIPLE):
            return arm_target(num_cores=cores, mcpu=name)
        raise _unknown_cpu(name, backend)
    raise BqcError(f"--cpu applies to the CPU backends (tvm-x86, tvm-arm), not {backend}")


def resolve_target(backend: str, cpu: str | None = None, target: str | dict | Target | None = None,
                   threads: int | None = None) -> Target:
    """The TVM target of a CPU backend (``tvm-x86`` / ``tvm-arm``) from ``--cpu`` or ``--target``
    (not both; neither: the host for tvm-x86, generic NEON for tvm-arm)."""
    if cpu is not None and target is not None:
        raise BqcError("give --cpu or --target, not both", hint="--cpu NAME is a preset; --target is a full TVM target")
    if target is None:
        return cpu_target(backend, cpu, threads)
    t = target if isinstance(target, Target) else _parse_raw(json.dumps(target) if isinstance(target, dict) else target)
    if t.kind.name != "llvm" or backend not in ("tvm-x86", "tvm-arm") or is_arm(t) != (backend == "tvm-arm"):
        want = "an aarch64 llvm target (mtriple aarch64-...)" if backend == "tvm-arm" else "an x86 llvm target"
        raise BqcError(f"--target {t} does not fit --backend {backend}", hint=f"give {want}")
    return _with_cores(t, threads, 4 if backend == "tvm-arm" else (os.cpu_count() or 1))


def as_target(target) -> Target:
    """Accept a Target, a dict, ``None``/``"llvm"`` (generic), ``"x86"`` (Cascade Lake), a preset
    name of :data:`X86_PRESETS` or ``"host"``."""
    if isinstance(target, Target):
        return target
    if target is None or target == "llvm":
        return generic_target()
    if target == "x86":
        return x86_target()
    if isinstance(target, str) and target in X86_PRESETS:
        return x86_target(mcpu=target)
    if isinstance(target, str) and target in HOST_NAMES:
        return host_target()
    return Target(target)


# ------------------------------------------------------------------------------- features
def is_cpu(target) -> bool:
    return as_target(target).kind.name == "llvm"


def _mtriple(target: Target) -> str:
    return str(target.attrs.get("mtriple", "") or "")


def is_arm(target) -> bool:
    """An LLVM target with an aarch64 / arm ``mtriple``."""
    t = as_target(target)
    return is_cpu(t) and _mtriple(t).startswith(("aarch64", "arm"))


def target_features(target) -> frozenset:
    """Every LLVM feature the target enables (its ``mcpu`` + ``mattr``); empty for non-CPU targets."""
    from tvm.target.codegen import llvm_get_cpu_features

    t = as_target(target)
    if not is_cpu(t):
        return frozenset()
    return frozenset(str(f) for f in llvm_get_cpu_features(t))


def has_feature(target, feature: str) -> bool:
    """Whether an LLVM CPU target has an ISA feature (e.g. ``"avx512vnni"``, ``"avx512bw"``)."""
    return feature in target_features(target)


def has_vnni(target) -> bool:
    """AVX-512 VNNI (``vpdpbusd`` on zmm): the int8 route for W1Ak / int8 kernels."""
    return kernel_route(target, "int8") == "vnni"


def required_features(target) -> list[str]:
    """The ISA features a library built for ``target`` may use that a host can be checked for
    (:mod:`bqc.backends.hostcpu`), sorted: e.g. ``x86-64-v3`` -> avx, avx2, bmi, ..., no avx512*."""
    t = as_target(target)
    table = hostcpu.feature_table("aarch64" if is_arm(t) else "x86_64")
    return sorted(target_features(t) & set(table))


def kernel_route(target, family: str) -> str:
    """The route of :data:`KERNEL_ROUTES` ``family`` for ``target`` (first one whose features it has)."""
    feats = target_features(target)
    for route, needs in KERNEL_ROUTES[family]:
        if all(f in feats for f in needs):
            return route
    raise AssertionError(f"KERNEL_ROUTES[{family!r}] has no fallback route")  # pragma: no cover


def kernel_routes(target) -> dict:
    """``{family: route}`` for every kernel family (what the manifest records)."""
    return {family: kernel_route(target, family) for family in KERNEL_ROUTES}


def num_cores(target, default: int = 1) -> int:
    t = as_target(target)
    v = t.attrs.get("num-cores") if hasattr(t, "attrs") else None
    return int(v) if v else default


def target_record(target, name: str | None = None) -> dict:
    """The manifest's ``cpu`` entry: ``{"name", "kind", "mcpu", "mtriple", "mattr",
    "required_features", "kernels"}`` (``mtriple``: the target's, else the x86-64 default)."""
    t = as_target(target)
    arm = is_arm(t)
    return {
        "name": name or str(t.attrs.get("mcpu", "") or "generic"),
        "kind": t.kind.name,
        "mcpu": str(t.attrs.get("mcpu", "") or "generic"),
        "mtriple": _mtriple(t) or X86_TRIPLE,
        "arch": "aarch64" if arm else "x86_64",
        "mattr": [str(a) for a in t.attrs.get("mattr", [])],
        "required_features": required_features(t),
        "kernels": kernel_routes(t),
    }
