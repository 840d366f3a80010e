"""CPU targets of the TVM backend (backends/tvm/target.py, backends/hostcpu.py): preset names,
ISA feature sets, the kernel-route table, the generated instructions of each route, the load-time
refusal of a library on a CPU without its features, and x86-64-v3 (AVX2, no AVX-512) builds run
under an emulated CPU without AVX-512 (``qemu-x86_64-static -cpu Haswell``).

The emulated runs keep the emulated process small: the TVM runtime and numpy only (torch is
blocked from being imported), one process per test, inputs and expected outputs in ``.npz``
files written by the host side. Skipped with the reason where qemu-user is not installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from bqc import packing as P  # noqa: E402
from bqc.backends import hostcpu  # noqa: E402
from bqc.backends.runtime import check_host_cpu, load_compiled  # noqa: E402
from bqc.backends.tvm import kernels as K  # noqa: E402
from bqc.backends.tvm import target as T  # noqa: E402
from bqc.errors import BqcError  # noqa: E402

QEMU = shutil.which("qemu-x86_64-static")
QEMU_CPU = "Haswell"  # AVX2 + FMA + BMI2, no AVX-512 (QEMU's TCG emulates none)
AVX512 = ("avx512f", "avx512bw", "avx512vnni", "avx512vpopcntdq")
_CACHE: dict = {}


def needs_qemu():
    if hostcpu.machine() != "x86_64":
        pytest.skip("x86-64 emulation tests need an x86-64 host")
    if QEMU is None:
        pytest.skip("qemu-x86_64-static is not installed (Debian: qemu-user-static)")


def host_lacks(*features) -> list:
    have = hostcpu.host_features()
    return [f for f in features if not have.get(f)]


# --------------------------------------------------------------------------------- presets
def test_presets_resolve_with_their_features():
    feats = {name: set(T.required_features(T.resolve_target("tvm-x86", cpu=name, threads=1)))
             for name in T.X86_PRESETS}
    assert not feats["x86-64"] & {"sse4.2", "avx", "avx2"}
    assert {"sse4.2", "popcnt"} <= feats["x86-64-v2"] and "avx" not in feats["x86-64-v2"]
    assert {"avx", "avx2", "fma", "bmi2"} <= feats["x86-64-v3"]
    assert not any(f.startswith("avx512") for f in feats["x86-64-v3"])
    assert {"avx512f", "avx512bw", "avx512vl"} <= feats["x86-64-v4"]
    assert not feats["x86-64-v4"] & {"avx512vnni", "avx512vpopcntdq"}
    assert "avx512vnni" in feats["cascadelake"] and "avx512vpopcntdq" not in feats["cascadelake"]
    for name in ("icelake-server", "znver4"):
        assert {"avx512vnni", "avx512vpopcntdq", "avx512bw"} <= feats[name]
    assert "avx512bf16" in feats["znver4"] and "avx512bf16" not in feats["icelake-server"]
    t = T.resolve_target("tvm-x86", cpu="x86-64-v3", threads=3)
    assert str(t.attrs["mcpu"]) == "x86-64-v3" and int(t.attrs["num-cores"]) == 3


def test_x86_levels_match_llvm():
    """hostcpu.X86_LEVELS (the runtime's table, no LLVM there) agrees with LLVM's CPU definitions."""
    below = set()
    for level, added in hostcpu.X86_LEVELS.items():
        feats = set(T.required_features(T.x86_target(1, level)))
        assert feats - below == set(added), level
        below = feats
    host = {f: True for fs in hostcpu.X86_LEVELS.values() for f in fs}
    assert hostcpu.best_x86_level(host) == "x86-64-v4"
    assert hostcpu.best_x86_level({**host, "avx512bw": False}) == "x86-64-v3"
    assert hostcpu.best_x86_level({**host, "fma": False}) == "x86-64-v2"
    assert hostcpu.best_x86_level({}) == "x86-64"


def test_kernel_routes_per_target():
    want = {
        "x86-64": ("harley-seal", "plain", "generic", "generic"),
        "x86-64-v2": ("harley-seal", "plain", "generic", "generic"),
        "x86-64-v3": ("harley-seal", "plain", "avx2", "generic"),
        "x86-64-v4": ("harley-seal", "plain", "avx512bw", "generic"),
        "cascadelake": ("harley-seal", "vnni-lut", "vnni", "vnni"),
        "icelake-server": ("vpopcnt", "vnni-lut", "vnni", "vnni"),
        "znver4": ("vpopcnt", "vnni-lut", "vnni", "vnni"),
    }
    for name, routes in want.items():
        got = T.kernel_routes(T.x86_target(1, name))
        assert tuple(got[f] for f in ("w1a1", "hs-popcount", "w1ak", "int8")) == routes, name
    assert T.kernel_route(T.generic_target(), "w1a1") == "harley-seal"
    from bqc.backends.tvm.arm import arm_target

    assert T.kernel_routes(arm_target(2, mcpu="cortex-a76"))["w1a1"] == "neon-cnt"
    # a raw target's mattr counts: VNNI switched off -> the AVX-512BW route
    t = T.resolve_target("tvm-x86", target='{"kind": "llvm", "mcpu": "cascadelake", "mattr": ["-avx512vnni"]}')
    assert T.kernel_route(t, "w1ak") == "avx512bw" and "avx512vnni" not in T.required_features(t)


def test_kernel_choice_depends_on_the_target_not_the_compiling_machine(monkeypatch):
    before = {n: T.kernel_routes(T.x86_target(1, n)) for n in ("x86-64-v3", "znver4")}
    monkeypatch.setattr(hostcpu, "host_features", lambda arch=None: {f: False for f in hostcpu.X86_FEATURES})
    assert {n: T.kernel_routes(T.x86_target(1, n)) for n in before} == before


def test_host_target_drops_what_the_host_lacks(monkeypatch):
    """A VM that hides AVX-512 (LLVM still names the CPU, e.g. znver4): the host target switches
    the missing features off, so neither the kernels nor the float code use them."""
    if hostcpu.machine() != "x86_64":
        pytest.skip("x86-64 host detection")
    fake = {f: f in hostcpu.X86_LEVELS["x86-64-v2"] + hostcpu.X86_LEVELS["x86-64-v3"] for f in hostcpu.X86_FEATURES}
    monkeypatch.setattr(hostcpu, "host_features", lambda arch=None: dict(fake))
    t = T.resolve_target("tvm-x86", threads=1)
    feats = set(T.required_features(t))
    assert {"avx2", "fma"} <= feats and not any(f.startswith("avx512") for f in feats)
    assert T.kernel_routes(t)["w1a1"] == "harley-seal" and T.kernel_routes(t)["w1ak"] == "avx2"
    assert T.target_record(t, "host")["name"] == "host"
    real = T.host_target(1)  # the real host: everything it requires, the host has
    monkeypatch.undo()
    assert hostcpu.missing_features(T.required_features(real)) == []


def test_bad_names_and_targets_are_refused(capsys):
    from clirun import run_cli

    for kwargs in [dict(cpu="pentium-x"), dict(cpu="cortex-a76"), dict(cpu="znver4", target="{}"),
                   dict(target="llvm -mcpu=znver4"), dict(target='{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}')]:
        with pytest.raises(BqcError):
            T.resolve_target("tvm-x86", **kwargs)
    with pytest.raises(BqcError):
        T.resolve_target("tvm-arm", cpu="znver4")
    from bqc.backends.tvm.lower import _target

    with pytest.raises(BqcError):
        _target("onnx", None, cpu="x86-64-v3")
    t = T.resolve_target("tvm-x86", target='{"kind": "llvm", "mcpu": "haswell"}', threads=1)
    assert str(t.attrs["mcpu"]) == "haswell" and int(t.attrs["num-cores"]) == 1
    a = T.resolve_target("tvm-arm", cpu="neoverse-n1")
    assert T.is_arm(a) and "dotprod" in T.required_features(a)
    code, _, err = run_cli(["lower", "no-such-artifact", "--cpu", "pentium-x", "-o", "/nonexistent-dir/x"], capsys)
    assert code == 2 and "pentium-x" in err and "x86-64-v3" in err and "znver4" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------- kernels per route
def _conv_case(seed=0, n=1, c=70, oc=20, h=5, w=6, k=3, s=1, p=1):
    rng = np.random.default_rng(seed)
    x, wt = rng.standard_normal((n, c, h, w)), rng.standard_normal((oc, c, k, k))
    xb, wb = P.pack_activations(x), P.pack_conv_weights(wt)
    q = rng.integers(-8, 8, (n, c, h, w))
    return dict(shape=(n, c, oc, h, w, k, s, p), xb=xb, wb=wb, wt=wt, q=q)


def _route_kernels(target) -> list:
    """``(name, Kernel, inputs, expected)`` of every kernel kind for ``target`` (exact references)."""
    cc = _conv_case()
    n, c, oc, h, w, k, s, p = cc["shape"]
    xb, wb, wt, q = cc["xb"], cc["wb"], cc["wt"], cc["q"]
    ws = P.sign(wt)
    rng = np.random.default_rng(1)
    xd, wd = rng.standard_normal((3, 100)), rng.standard_normal((20, 100))
    qd = rng.integers(-8, 8, (3, 100))
    x = rng.standard_normal((2, 37, 4, 5)).astype(np.float32)
    tau = (0.3 * rng.standard_normal(37)).astype(np.float32)
    w8 = rng.integers(-128, 128, (16, 20, 3, 3))
    q2, w2 = rng.integers(-128, 128, (1, 33, 8, 8)), rng.standard_normal((16, 33, 3, 3))  # 8-bit codes, stride 2
    q8 = rng.integers(-128, 128, (1, 20, 6, 6))
    a = rng.integers(-128, 128, (2, 3, 100), dtype=np.int8)
    b = rng.integers(-128, 128, (2, 100, 20), dtype=np.int8)
    scale = np.array([0.25], np.float32)
    xq = (3 * rng.standard_normal((2, 37, 4, 5))).astype(np.float32)
    return [
        ("binary_conv2d", K.build_binary_conv2d(n, c, oc, h, w, k, s, p, target=target),
         (xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p)), P.ref_binary_conv2d(xb, wb, c, s, p)),
        ("binary_conv2d_popcount", K.build_binary_conv2d(n, c, oc, h, w, k, s, p, target=target, microkernel="popcount"),
         (xb, P.block_oc(wb), P.conv_base_table(wb, c, h, w, s, p)), P.ref_binary_conv2d(xb, wb, c, s, p)),
        ("binary_dense", K.build_binary_dense(3, 100, 20, target=target),
         (P.pack_bits(xd), P.block_oc(P.pack_dense_weights(wd))),
         P.ref_binary_dense(P.pack_bits(xd), P.pack_dense_weights(wd), 100)),
        ("w1ak_conv2d", K.build_w1ak_conv2d(n, c, oc, h, w, k, s, p, target=target),
         (P.pack_codes(q), P.block_oc_int8(ws), P.int8_bias(ws)), P.ref_w1ak_conv2d(q, wt, s, p)),
        ("w1ak_conv2d_s2", K.build_w1ak_conv2d(1, 33, 16, 8, 8, 3, 2, 1, target=target),
         (P.pack_codes(q2), P.block_oc_int8(P.sign(w2)), P.int8_bias(P.sign(w2))), P.ref_w1ak_conv2d(q2, w2, 2, 1)),
        ("w1ak_dense", K.build_w1ak_dense(3, 100, 20, target=target),
         (P.pack_codes(qd), P.block_oc_int8(P.sign(wd)), P.int8_bias(P.sign(wd))), P.ref_w1ak_dense(qd, wd)),
        ("int8_conv2d", K.build_int8_conv2d(1, 20, 16, 6, 6, 3, 1, 1, target=target),
         (P.pack_codes(q8), P.block_oc_int8(w8), P.int8_bias(w8)), P.ref_int_conv2d(q8, w8, 1, 1)),
        ("bitpack", K.build_bitpack(2, 37, 4, 5, target=target), (x, tau), P.pack_activations(x, tau)),
        ("quantize", K.build_quantize(xq.shape, 4, target=target), (xq, scale),
         P.pack_codes(np.clip(np.round(xq / scale[0]), -8, 7).astype(np.int32))),
        ("int_matmul", K.build_int_matmul(2, 3, 100, 20, target=target, with_scale=False), (a, b),
         np.matmul(a.astype(np.int64), b.astype(np.int64))),
    ]


ROUTE_TARGETS = {  # one target per route of KERNEL_ROUTES on x86
    "x86-64-v3": (),
    "x86-64-v4": ("avx512f", "avx512bw"),
    "cascadelake": ("avx512bw", "avx512vnni"),
    "znver4": ("avx512bw", "avx512vnni", "avx512vpopcntdq", "avx512bf16"),
}


def _asm(kern) -> str:
    return kern.executable.mod.inspect_source("asm")


def _ops(asm: str) -> set:
    return set(re.findall(r"\b(vpopcnt[dq]|vpdpbusd|vpmaddubsw|vpmaddwd|vpternlog[dq])\b", asm))


def test_vpopcnt_exactly_where_the_target_has_vpopcntdq():
    """The W1A1 conv's assembly for every preset: ``vpopcntd`` iff the target has VPOPCNTDQ
    (znver4, icelake-server), never a zmm register below x86-64-v4."""
    for name in T.X86_PRESETS:
        target = T.x86_target(1, name)
        asm = _asm(K.build_binary_conv2d(1, 40, 16, 4, 4, 3, 1, 1, target=target))
        feats = T.required_features(target)
        assert bool(re.search(r"\bvpopcnt[dq]\b", asm)) == ("avx512vpopcntdq" in feats), name
        if "avx512f" not in feats:
            assert "zmm" not in asm, name


@pytest.mark.parametrize("name", list(ROUTE_TARGETS))
def test_each_route_is_exact_and_emits_its_instructions(name):
    """Every kernel built for each route's target: the instructions the route stands for are in
    the assembly (``vpopcntd`` only with VPOPCNTDQ; no zmm register in an x86-64-v3 build), and
    the outputs equal the numpy reference where this host can run the code."""
    target = T.x86_target(1, name)
    routes = T.kernel_routes(target)
    kernels = _route_kernels(target)
    asm = {kname: _asm(kern) for kname, kern, _, _ in kernels}
    conv, w1ak = _ops(asm["binary_conv2d"]), _ops(asm["w1ak_conv2d"])
    assert ("vpopcntd" in conv or "vpopcntq" in conv) == (routes["w1a1"] == "vpopcnt")
    assert ("vpdpbusd" in w1ak) == (routes["w1ak"] == "vnni")
    assert ("vpmaddubsw" in w1ak) == (routes["w1ak"] in ("avx2", "avx512bw"))
    if name == "x86-64-v3":
        assert not any("zmm" in a or "vpopcnt" in a for a in asm.values())
    lacking = host_lacks(*ROUTE_TARGETS[name])
    if lacking:
        pytest.skip(f"assembly checked; this CPU lacks {', '.join(lacking)} to run the {name} build")
    for kname, kern, inputs, want in kernels:
        np.testing.assert_array_equal(kern(*inputs), want, err_msg=f"{name} {kname}")


# ------------------------------------------------------------------- load-time refusal
def _fake_compiled(tmp_path, cpu_entry) -> "os.PathLike":
    d = tmp_path / "compiled"
    d.mkdir()
    (d / "model.so").write_bytes(b"")
    man = {"format": "bqc-tvm", "backend": "tvm-x86", "files": {"library": "model.so"}, "batch": 1,
           "input_shape": [1, 4, 4], "conditional": False}
    if cpu_entry is not None:
        man["cpu"] = cpu_entry
    (d / "manifest.json").write_text(json.dumps(man))
    return d


def test_library_needing_a_missing_feature_is_refused(tmp_path, monkeypatch):
    rec = T.target_record(T.x86_target(1, "znver4"), "znver4")
    monkeypatch.setattr(hostcpu, "host_features",
                        lambda arch=None: {f: f not in ("avx512f", "avx512vpopcntdq") for f in hostcpu.X86_FEATURES})
    with pytest.raises(BqcError) as e:
        load_compiled(_fake_compiled(tmp_path, rec))
    msg = str(e.value)
    assert "avx512f" in msg and "avx512vpopcntdq" in msg and "znver4" in msg and "illegal instruction" in msg
    assert "--cpu x86-64-v3" in msg and e.value.exit_code == 2
    # what the host has passes; a manifest from before the cpu entry passes; an aarch64 entry is
    # left to the architecture check
    check_host_cpu({"cpu": T.target_record(T.x86_target(1, "x86-64-v3"))}, tmp_path)
    check_host_cpu({}, tmp_path)
    check_host_cpu({"cpu": {"arch": "aarch64", "required_features": ["sve"]}}, tmp_path)


def test_a_feature_this_cpu_lacks_is_refused(tmp_path):
    """Without monkeypatching: a required feature the host reader reports absent (e.g. AVX-512
    FP16 on a Zen 4) is refused; skipped on a CPU that has every checked feature."""
    have = hostcpu.host_features()
    absent = sorted(f for f, v in have.items() if v is False)
    if not absent:
        pytest.skip("this CPU has every checked feature")
    rec = dict(T.target_record(T.x86_target(1, "x86-64-v3")), required_features=["avx2", absent[0]])
    with pytest.raises(BqcError, match=re.escape(absent[0])):
        load_compiled(_fake_compiled(tmp_path, rec))


# --------------------------------------------------------------------- emulated x86-64-v3
EMULATED = r"""
import json, sys
sys.modules["torch"] = None      # tvm_ffi imports these when present: the emulated process stays
sys.modules["ml_dtypes"] = None  # small (TVM runtime + numpy + bqc's runtime module)
import numpy as np
spec = json.load(open(sys.argv[1]))
from bqc.backends.hostcpu import host_features
res = {"host": host_features(), "kernels": {}, "models": {}}
import tvm
for k in spec["kernels"]:
    data = np.load(k["npz"])
    fn = tvm.runtime.load_module(k["lib"])[k["symbol"]]
    out = tvm.runtime.tensor(np.zeros_like(data["want"]))
    fn(*[tvm.runtime.tensor(data[f"in{i}"]) for i in range(k["n_in"])], out)
    res["kernels"][k["name"]] = bool(np.array_equal(out.numpy(), data["want"]))
from bqc.backends.runtime import load_compiled
from bqc.errors import BqcError
for m in spec["models"]:
    try:
        model = load_compiled(m["dir"])
    except BqcError as e:
        res["models"][m["dir"]] = {"refused": str(e)}
        continue
    data = np.load(m["npz"])
    eps, state = model(data["x"], data["t"])
    np.savez(m["out"], eps=eps, **{f"state{i}": s for i, s in enumerate(state or [])})
    res["models"][m["dir"]] = {"ran": True}
print("RESULT " + json.dumps(res))
"""


def run_emulated(tmp_path, kernels=(), models=()) -> dict:
    """Run :data:`EMULATED` under ``qemu-x86_64-static -cpu Haswell`` with a spec file."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kernels": list(kernels), "models": list(models)}))
    script = tmp_path / "emulated.py"
    script.write_text(EMULATED)
    env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([QEMU, "-cpu", QEMU_CPU, sys.executable, str(script), str(spec)],
                       capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    res = json.loads(lines[-1][len("RESULT "):])
    host = res["host"]
    assert host.get("avx2") and not host.get("avx512f"), f"the emulated CPU is not AVX2-without-AVX-512: {host}"
    return res


def _avx512_library(tmp_path):
    """A small compiled folder for znver4 (a Relax VM with one vpopcntd conv kernel), with the
    manifest ``cpu`` entry ``bqc lower`` writes for that target."""
    from tvm import relax

    target = T.x86_target(1, "znver4")
    n, c, oc, h, w = 1, 40, 16, 4, 4
    f = K.binary_conv2d_primfunc(n, c, oc, h, w, 3, 1, 1, target=target)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, h, w, P.num_words(c)), "uint32"))
    wb = P.pack_conv_weights(np.random.default_rng(0).standard_normal((oc, c, 3, 3)))
    with bb.function("main", [x]):
        gv = bb.add_func(f, str(f.attrs["global_symbol"]))
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, [x, relax.const(P.block_oc(wb)), relax.const(P.conv_base_table(wb, c, h, w, 1, 1))],
                                       relax.TensorType((n, h, w, oc), "int32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    d = _fake_compiled(tmp_path, T.target_record(target, "znver4"))
    tvm.compile(bb.get(), target=target).export_library(str(d / "model.so"))
    return d


def test_x86_64_v3_kernels_exact_under_emulation(tmp_path):
    """(a) every kernel built for x86-64-v3 gives exact results on an emulated AVX2 CPU without
    AVX-512; (c) a library built for znver4 (AVX-512) is refused there with the clear error."""
    needs_qemu()
    target = T.x86_target(1, "x86-64-v3")
    specs = []
    for kname, kern, inputs, want in _route_kernels(target):
        lib, npz = tmp_path / f"{kname}.so", tmp_path / f"{kname}.npz"
        kern.executable.export_library(str(lib))
        arrays = {f"in{i}": np.ascontiguousarray(a, dtype=dt) for i, (a, (_, dt)) in enumerate(zip(inputs, kern.in_specs))}
        np.savez(npz, want=np.asarray(want, dtype=kern.out_spec[1]), **arrays)
        specs.append({"name": kname, "lib": str(lib), "npz": str(npz), "symbol": kern.name, "n_in": len(inputs)})
    avx512 = _avx512_library(tmp_path)
    res = run_emulated(tmp_path, specs, [{"dir": str(avx512), "npz": "", "out": ""}])
    assert res["kernels"] == {s["name"]: True for s in specs}
    refused = res["models"][str(avx512)].get("refused", "")
    assert "avx512f" in refused and "avx512vpopcntdq" in refused and "illegal instruction" in refused
    assert "--cpu x86-64-v3" in refused  # the emulated Haswell reaches level v3


# ------------------------------------------------------------- emulated mnist16 (slow)
def _mnist16_bidm():
    import torch

    from bqc import artifact, frontend
    from bqc.backends.onnx import example_inputs
    from bqc.pipeline import load_recipe

    src = frontend.load_source("mnist16")
    rec = load_recipe("bidm")
    gm, _ = artifact.build_graph(frontend.capture(src), rec, rec.wbits, rec.abits)
    gm.eval()
    with torch.no_grad():
        gm(*example_inputs(gm, batch=2, seed=0))  # calibrate the activation quantizers
    return gm


def v3_mnist16(tmp_path_factory):
    """mnist16 bidm lowered for x86-64-v3 at batch 2 (once per module) and its deploy graph."""
    if "v3" not in _CACHE:
        from bqc import deploy as D
        from bqc.backends.tvm.lower import lower

        gm = _mnist16_bidm()
        out = lower(D.fold(gm), "tvm-x86", tmp_path_factory.mktemp("v3_mnist16"), batch=2, threads=1, cpu="x86-64-v3")
        _CACHE["v3"] = (gm, D.to_deploy(gm), out)
    return _CACHE["v3"]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.slow
def test_x86_64_v3_mnist16_matches_reference_natively_and_emulated(tmp_path, tmp_path_factory):
    """(b) mnist16 bidm built for x86-64-v3: the manifest records the target; natively and on the
    emulated AVX2 CPU the library matches the deploy reference (1e-4, the deploy contract), and
    the emulated run equals the native one."""
    needs_qemu()
    import torch

    from bqc.backends.onnx import example_inputs
    from bqc.graph import BqcModel

    gm, dg, out = v3_mnist16(tmp_path_factory)
    man = json.loads((out / "manifest.json").read_text())
    cpu = man["cpu"]
    assert cpu["mcpu"] == "x86-64-v3" and cpu["name"] == "x86-64-v3" and cpu["mtriple"].startswith("x86_64")
    assert "avx2" in cpu["required_features"] and not any(f.startswith("avx512") for f in cpu["required_features"])
    assert cpu["kernels"]["w1a1"] == "harley-seal" and man["fallbacks"] == [] and man["kernel_failures"] == []
    x, t = example_inputs(gm, batch=3, seed=1)[:2]  # 3 rows against a batch-2 library: pad + split
    with torch.no_grad():
        want, _ = BqcModel(dg).eval()(x, t)
    native, _ = load_compiled(out)(x.numpy(), t.numpy())
    assert rel(native, want.numpy()) <= 1e-4, rel(native, want.numpy())
    npz, got = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(npz, x=x.numpy(), t=t.numpy())
    res = run_emulated(tmp_path, models=[{"dir": str(out), "npz": str(npz), "out": str(got)}])
    assert res["models"][str(out)] == {"ran": True}
    emulated = np.load(got)["eps"]
    assert rel(emulated, want.numpy()) <= 1e-4, rel(emulated, want.numpy())
    assert rel(emulated, native) <= 1e-6, rel(emulated, native)
