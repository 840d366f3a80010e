"""The ISA features of the CPU running this process, named as LLVM names them.

Two users: :mod:`bqc.backends.runtime` refuses to load a library whose manifest requires a
feature this CPU lacks (a clear error instead of an illegal-instruction crash), and
:func:`bqc.backends.tvm.target.host_target` builds for the host by default. Standard library
and numpy only (the runtime side must not need the compiler).

Where the answer comes from: numpy's CPU dispatch table
(``numpy._core._multiarray_umath.__cpu_features__``), which asks the CPU itself (x86: CPUID,
and XGETBV for the OS-enabled AVX / AVX-512 register state; aarch64: the kernel's HWCAP bits).
That is what this process can really execute, including under an emulator and in VMs that hide
features: qemu-user passes the real machine's ``/proc/cpuinfo`` through, so its ``flags``
describe a CPU the program is not running on. Features numpy does not report are read from
``/proc/cpuinfo`` (x86 ``flags``, aarch64 ``Features``) when that has the line; anything else
is "unknown", and an unknown feature is never a reason to refuse.

Only the features in :data:`X86_FEATURES` / :data:`AARCH64_FEATURES` are checked: the ones a
compiler may use for vector code (an LLVM CPU name implies more, e.g. tuning flags, that are
not instructions).
"""
from __future__ import annotations

import platform

__all__ = ["X86_FEATURES", "AARCH64_FEATURES", "X86_LEVELS", "machine", "feature_table",
           "host_features", "missing_features", "best_x86_level"]

# LLVM feature name -> (numpy dispatch name or None, /proc/cpuinfo flag)
X86_FEATURES = {
    "sse3": ("SSE3", "pni"), "ssse3": ("SSSE3", "ssse3"), "sse4.1": ("SSE41", "sse4_1"),
    "sse4.2": ("SSE42", "sse4_2"), "popcnt": ("POPCNT", "popcnt"), "cx16": ("CX16", "cx16"),
    "avx": ("AVX", "avx"), "f16c": ("F16C", "f16c"), "fma": ("FMA3", "fma"), "avx2": ("AVX2", "avx2"),
    "bmi": ("BMI", "bmi1"), "bmi2": ("BMI2", "bmi2"), "lzcnt": ("LZCNT", "abm"), "movbe": ("MOVBE", "movbe"),
    "gfni": ("GFNI", "gfni"), "vaes": ("VAES", "vaes"), "vpclmulqdq": ("VPCLMULQDQ", "vpclmulqdq"),
    "avx512f": ("AVX512F", "avx512f"), "avx512cd": ("AVX512CD", "avx512cd"),
    "avx512bw": ("AVX512BW", "avx512bw"), "avx512dq": ("AVX512DQ", "avx512dq"),
    "avx512vl": ("AVX512VL", "avx512vl"), "avx512vnni": ("AVX512VNNI", "avx512_vnni"),
    "avx512vpopcntdq": ("AVX512VPOPCNTDQ", "avx512_vpopcntdq"),
    "avx512bitalg": ("AVX512BITALG", "avx512_bitalg"), "avx512vbmi": ("AVX512VBMI", "avx512vbmi"),
    "avx512vbmi2": ("AVX512VBMI2", "avx512_vbmi2"), "avx512ifma": ("AVX512IFMA", "avx512ifma"),
    "avx512bf16": ("AVX512BF16", "avx512_bf16"), "avx512fp16": ("AVX512FP16", "avx512_fp16"),
    "avxvnni": (None, "avx_vnni"),
}
AARCH64_FEATURES = {
    "neon": ("ASIMD", "asimd"), "fp-armv8": (None, "fp"), "crc": (None, "crc32"), "lse": (None, "atomics"),
    "rdm": (None, "asimdrdm"), "rcpc": (None, "lrcpc"), "aes": (None, "aes"), "sha2": (None, "sha2"),
    "dotprod": ("ASIMDDP", "asimddp"), "fullfp16": ("ASIMDHP", "asimdhp"), "i8mm": (None, "i8mm"),
    "bf16": (None, "bf16"), "sve": ("SVE", "sve"),
}
# The x86-64 psABI micro-architecture levels (the features of X86_FEATURES each one adds);
# tests/test_targets.py checks them against LLVM's x86-64-v2/v3/v4 CPU definitions.
X86_LEVELS = {
    "x86-64-v2": ("sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "cx16"),
    "x86-64-v3": ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def machine() -> str:
    """``"x86_64"``, ``"aarch64"`` or what ``platform.machine()`` says (lower case)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def feature_table(arch: str) -> dict:
    """The checked features of an architecture (``"x86_64"`` / ``"aarch64"``; else empty)."""
    return {"x86_64": X86_FEATURES, "aarch64": AARCH64_FEATURES}.get(arch, {})


def _numpy_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as f
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as f  # numpy < 2
        except ImportError:
            return {}
    return dict(f)


def _cpuinfo_flags(arch: str) -> set | None:
    """The ``flags`` (x86) / ``Features`` (aarch64) words of /proc/cpuinfo, or None."""
    key = "flags" if arch == "x86_64" else "features"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip().lower() == key:
                    return set(value.split())
    except OSError:
        pass
    return None


def host_features(arch: str | None = None) -> dict:
    """``{llvm feature: True/False}`` for the features of :func:`feature_table` this process
    can tell about the CPU it runs on (see the module docstring); unknown ones are left out."""
    arch = arch or machine()
    if arch != machine():  # nothing to tell about another architecture's CPU
        return {}
    table = feature_table(arch)
    npf = _numpy_features()
    flags = None
    out = {}
    for feat, (np_name, flag) in table.items():
        if np_name is not None and np_name in npf:
            out[feat] = bool(npf[np_name])
            continue
        if flags is None:
            flags = _cpuinfo_flags(arch) or set()
        if flags:
            out[feat] = flag in flags
    return out


def missing_features(required, host: dict | None = None) -> list[str]:
    """The features of ``required`` the host is known to lack (sorted)."""
    host = host_features() if host is None else host
    return sorted(f for f in required if host.get(f) is False)


def best_x86_level(host: dict | None = None) -> str:
    """The highest x86-64 psABI level whose features the host has (``"x86-64"`` at least)."""
    host = host_features("x86_64") if host is None else host
    best, have = "x86-64", True
    for level, feats in X86_LEVELS.items():
        have = have and all(host.get(f) for f in feats)
        if have:
            best = level
    return best
