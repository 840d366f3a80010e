"""Lowering text-conditioned UNets (issue 16, part 5): the ``context`` input through the signature,
fold, TVM (tvm-x86; tvm-arm run under qemu; tvm-cuda built without a GPU), the bundle runner and
ONNX, on tests/test_text2img.py's tiny models (5-token context). Each family is folded (random
calibration) and lowered once per backend for the module, at batch 2 (3 rows in the checks: one
padded and split call). Criterion: relative error <= 1e-4 against the deploy graph's reference
executor (torch), as tests/test_lower.py. The tvm-arm test follows tests/armenv.py's rule (skips
naming `.ci/arm_setup.sh` without the arm64 root; fails under BQC_REQUIRE_ARM=1); the tvm-cuda
test skips with BQC_SKIP_CUDA=1, as tests/test_lower.py's.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from bqc import deploy as D  # noqa: E402
from bqc import run as R  # noqa: E402
from bqc import transform as tf  # noqa: E402
from bqc.backends.runtime import load_compiled  # noqa: E402
from bqc.backends.tvm.lower import lower  # noqa: E402
from bqc.graph import BqcModel  # noqa: E402
from bqc.signature import Signature  # noqa: E402
from armenv import require_arm  # noqa: E402
from test_text2img import CTX_DIM, _source  # noqa: E402

L = 5
BATCH = 2
CASES = {"ldm": "bidm", "diffusers": "binarydm"}  # LDM: TBS state + context; diffusers: W1A4 + LRM
_CACHE: dict = {}


def _folded(family, tmp_path_factory):
    """(artifact folder, deploy artifact saved and loaded back) of the tiny ``family`` model; the
    folded graph before saving is kept as ``_CACHE["memory", family]``."""
    key = ("folded", family)
    if key not in _CACHE:
        _, src, _ = _source(family)
        root = tmp_path_factory.mktemp(f"text-{family}")
        art = tf.save(tf.transform(src, CASES[family]), root / "art")
        folded = D.fold(art, calibrate="random")
        folded.save(root / "deploy")
        _CACHE["memory", family] = folded.gm
        _CACHE[key] = (art, D.DeployArtifact.load(root / "deploy"))
    return _CACHE[key]


def _lowered(family, tmp_path_factory, backend="tvm-x86"):
    """(deploy artifact, ``backend`` bundle folder at batch 2), built once per family and backend."""
    key = ("lowered", family, backend)
    if key not in _CACHE:
        _, dart = _folded(family, tmp_path_factory)
        _CACHE[key] = lower(dart, backend, tmp_path_factory.mktemp(f"text-{family}-{backend}") / "lib", batch=BATCH,
                            threads=1)
    return _folded(family, tmp_path_factory)[1], _CACHE[key]


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(1, 1000, (n,), generator=g),
            torch.randn(n, L, CTX_DIM, generator=g))


def _other_context(n=3):
    """Another prompt for :func:`_inputs`' rows: a step with it must give another eps."""
    return torch.randn(n, L, CTX_DIM, generator=torch.Generator().manual_seed(2))


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _reference(dart):
    """The deploy reference (torch) at :func:`_inputs`: ``(eps, state, eps2)``, the first step's
    eps and TBS state (None without TBS) and, from that state, a second step's (t - 1) eps."""
    ref = BqcModel(dart.gm).eval()
    x, t, c = _inputs()
    with torch.no_grad():
        e, s = ref(x, t, context=c)
        e2 = None if s is None else ref(x, t - 1, state=s, context=c)[0]
    return e, s, e2


def _assert_steps_match(got, want):
    """The lowering criterion for a compiled step: ``got = (eps, state, eps2, eps_other)`` (the
    first step at :func:`_inputs`, its state, the second step from the *reference's* state, and
    the first step with :func:`_other_context`) against :func:`_reference`'s ``want``: each within
    1e-4 relative error, and another prompt changes eps (the context really enters)."""
    (e, s, e2, e_other), (e_r, s_r, e2_r) = got, want
    assert float(torch.as_tensor(e_r).abs().max()) > 0
    assert rel(e, e_r) <= 1e-4, rel(e, e_r)
    assert rel(e_other, e_r) > 1e-3
    assert (s is None) == (s_r is None)
    if s_r is not None:
        assert len(s) == len(s_r)
        for a, b in zip(s, s_r):
            assert rel(a, b) <= 1e-4, rel(a, b)
        assert rel(e2, e2_r) <= 1e-4, rel(e2, e2_r)


def test_signature_json_round_trip_with_and_without_context():
    text = Signature(model_inputs=("x", "t", "context"), input_shape=(4, 8, 8), context=(L, CTX_DIM),
                     state_inputs=({"name": "tbs_cache_1", "shape": [8, 4, 4]},), state_outputs=({"name": "f1"},),
                     state_flag="tbs_flag")
    j = text.to_json()
    assert j["context"] == [L, CTX_DIM] and j["inputs"] == ["x", "t", "context", "tbs_cache_1", "tbs_flag"]
    assert Signature.from_json(json.loads(json.dumps(j))) == text
    plain = Signature(input_shape=(1, 8, 8), conditional=True, model_inputs=("x", "t", "y"))
    assert "context" not in plain.to_json()  # other models' manifests are unchanged
    assert Signature.from_json(plain.to_json()) == plain and Signature.from_json(plain.to_json()).context is None
    old = {k: v for k, v in j.items() if k != "context"}  # a manifest written before the key existed
    assert Signature.from_json(old).context is None and Signature.from_json(old).model_inputs == ("x", "t", "context")


def test_fold_round_trip_keeps_the_context(tmp_path_factory):
    _, dart = _folded("ldm", tmp_path_factory)
    assert dart.manifest["signature"]["context"] == [L, CTX_DIM]
    assert BqcModel(dart.gm).context == (L, CTX_DIM) and Signature.of(dart.gm).context == (L, CTX_DIM)
    args = D.step_inputs(dart.gm, batch=2, seed=3)
    assert [tuple(a.shape) for a in args[:3]] == [(2, 4, 8, 8), (2,), (2, L, CTX_DIM)]
    with torch.no_grad():  # the loaded graph computes what the folded one did
        for a, b in zip(dart.gm(*args), _CACHE["memory", "ldm"](*args)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", [
    "ldm", pytest.param("diffusers", marks=pytest.mark.slow)])  # each lowering takes ~30-60 s on 2 busy cores
def test_tvm_lowering_matches_the_deploy_reference(family, tmp_path_factory):
    dart, out = _lowered(family, tmp_path_factory)
    man = json.loads((out / "manifest.json").read_text())
    assert man["context"] == [L, CTX_DIM] and man["inputs"][:3] == ["x", "t", "context"]
    assert man["fallbacks"] == []
    model = load_compiled(out)
    assert model.context == (L, CTX_DIM) and model.batch == BATCH
    want = _reference(dart)
    x, t, c = _inputs()
    with torch.no_grad():
        e, s = model(x, t, context=c)
        e2 = None if s is None else model(x, t - 1, state=want[1], context=c)[0]
        _assert_steps_match((e, s, e2, model(x, t, context=_other_context())[0]), want)
    assert (s is None) == (family != "ldm")
    with pytest.raises(ValueError, match="context"):
        model(x, t)


#: run by the arm64 root's python3.11 under qemu: the bundle's run.py as a module (numpy and the
#: TVM runtime only, as on a board) computes the steps of _assert_steps_match on the inputs in IO,
#: then samples through its command line with the arguments after IO (what a user runs)
ARM_DRIVER = """
import importlib.util
import sys

import numpy as np

bundle, io, *cli = sys.argv[1:]
spec = importlib.util.spec_from_file_location("bundle_run", bundle + "/run.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)
def inp(name):
    return np.load(f"{io}/{name}.npy")
x, t, c = inp("x"), inp("t"), inp("c")
step = R.load(bundle, threads=1)
e, s = step(x, t, context=c)
out = {"e": e, "e_other": step(x, t, context=inp("c_other"))[0]}
if s is not None:
    out.update({f"s{i}": a for i, a in enumerate(s)})
    out["e2"] = step(x, t - 1, state=[inp(f"s_ref{i}") for i in range(len(s))], context=c)[0]
np.savez(f"{io}/out.npz", **out)
sys.exit(R.main(cli))
"""


def test_tvm_arm_bundle_under_qemu_matches_the_deploy_reference(tmp_path_factory, tmp_path):
    """The tvm-arm bundle of the LDM ``bidm`` model (TBS state, binary activations, context), run
    by the arm64 root's python3.11 with TVM's aarch64 runtime (tests/test_bundle.py's route): its
    run.py step model equals the deploy reference (eps and TBS state, 3 rows on a batch-2
    library, and a second step from the reference state), and ``run.py --context`` samples
    latents equal to the torch DDIM sampler's on the deploy model from the same noise."""
    require_arm()
    require_arm(vm=True)
    import qemu
    from bqc.diffusion.samplers import ddim_sample

    dart, out = _lowered("ldm", tmp_path_factory, "tvm-arm")
    lib = (out / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[18] == 183  # EM_AARCH64
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend"] == "tvm-arm" and man["context"] == [L, CTX_DIM] and man["fallbacks"] == []
    want = _reference(dart)
    x, t, c = _inputs()
    feed = {"x": x, "t": t, "c": c, "c_other": _other_context(), **{f"s_ref{i}": a for i, a in enumerate(want[1])}}
    for name, a in feed.items():
        np.save(tmp_path / f"{name}.npy", a.numpy())
    (tmp_path / "driver.py").write_text(ARM_DRIVER)
    cli = [out, "-n", "3", "--steps", "2", "--eta", "0", "--seed", "0", "--context", tmp_path / "c.npy",
           "-o", tmp_path / "lat.npy"]
    proc = qemu.run_python_under_qemu([tmp_path / "driver.py", out, tmp_path, *cli], what="the bundle's run.py")
    assert "wrote" in proc.stdout and "latents" in proc.stdout, proc.stdout
    with np.load(tmp_path / "out.npz") as got:
        state = [got[f"s{i}"] for i in range(sum(k.startswith("s") for k in got.files))]
        _assert_steps_match((got["e"], state, got["e2"], got["e_other"]), want)

    x_T = np.random.default_rng(0).standard_normal((3, 4, 8, 8), dtype=np.float32)  # run.py's noise, seed 0
    with torch.no_grad():
        lat = ddim_sample(dart.model, x_T.shape, schedule=dart.schedule, steps=2, x_T=torch.from_numpy(x_T),
                          cond={"context": c})
    got = np.load(tmp_path / "lat.npy")
    assert got.shape == (3, 4, 8, 8) and rel(got, lat) <= 1e-4, rel(got, lat)


def _vm_param_shapes(executable, func: str = "main") -> list:
    """The shapes of ``func``'s parameters, in order, in a compiled Relax VM executable, read from
    its own argument checks (the VM's statistics list one ``ErrorContext(fn=..., loc=param[i],
    ..., annotation=R.Tensor((...)))`` per parameter): what the library checks each input against
    when it runs, available without loading it (a tvm-cuda library loads only on a GPU)."""
    pat = rf"fn={func}, loc=param\[(\d+)\], param=\w+, annotation=R\.Tensor\(\(([\d, ]*)\)"
    found = {int(i): tuple(int(d) for d in dims.replace(",", " ").split())
             for i, dims in re.findall(pat, executable.stats())}
    assert sorted(found) == list(range(len(found))), f"unexpected VM statistics: {sorted(found)}"
    return [found[i] for i in range(len(found))]


def test_tvm_cuda_lowering_builds_without_gpu(tmp_path_factory, monkeypatch):
    """tvm-cuda builds the text-conditioned step here (no GPU: running it needs one, see
    docs/text-to-image.md): the compiled module's ``main`` takes ``context`` of (batch, L, D) as
    its third input, in the manifest's order; no fallbacks, a kernel for every binary layer; CUDA
    source with ``__popc``. (The suite's one whole-model CUDA build: kernels are unit-tested in
    tests/test_cuda_build.py.)"""
    if os.environ.get("BQC_SKIP_CUDA") == "1":
        pytest.skip("BQC_SKIP_CUDA=1")
    from bqc.backends.tvm import lower as tvm_lower

    built = []
    build = tvm_lower._build_cuda
    monkeypatch.setattr(tvm_lower, "_build_cuda", lambda *a: built.append(build(*a)) or built[-1])
    dart, out = _lowered("ldm", tmp_path_factory, "tvm-cuda")
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend"] == "tvm-cuda" and man["context"] == [L, CTX_DIM]
    assert man["inputs"][:3] == ["x", "t", "context"] and man["state_inputs"]
    assert man["fallbacks"] == [] and man["kernel_failures"] == []
    # every binary layer (1x1 convs and the attention/feed-forward linears included) has a CUDA kernel
    nbin = sum(isinstance(m, (D.BinaryConv2d, D.BinaryLinear)) for _, m in D.deploy_layers(dart.gm))
    assert nbin and man["kernels"]["binary_conv2d"] + man["kernels"].get("binary_dense", 0) == nbin
    assert "__popc" in (out / "model.cu").read_text() and (out / "model.so").exists()
    (ex,) = built
    caches = [(BATCH, *st["shape"]) for st in man["state_inputs"]]
    assert man["inputs"] == ["x", "t", "context", *(st["name"] for st in man["state_inputs"]), man["state_flag"]]
    assert _vm_param_shapes(ex) == [(BATCH, 4, 8, 8), (BATCH,), (BATCH, L, CTX_DIM), *caches, ()]


def test_bundle_runner_with_context(tmp_path_factory, tmp_path, capsys):
    """bqc.run's StepModel (what a board runs) equals the deploy reference; one (L, D) row
    broadcasts; the CLI refuses a text model without --context (exit 2, one paragraph) and a PNG
    output for latents, and samples latents to .npy with guidance."""
    dart, out = _lowered("ldm", tmp_path_factory)
    step = R.load(out, threads=1)
    assert step.context == (L, CTX_DIM) and step.model_inputs == ["x", "t", "context"]
    x, t, c = _inputs()
    with torch.no_grad():
        e_r, _ = BqcModel(dart.gm).eval()(x, t, context=c)
        e_row, _ = BqcModel(dart.gm).eval()(x, t, context=c[:1].expand(3, L, CTX_DIM))
    e, state = step(x.numpy(), t.numpy(), context=c.numpy())
    assert rel(e, e_r) <= 1e-4 and state is not None and len(state) == step.num_state
    assert rel(step(x.numpy(), t.numpy(), context=c[0].numpy())[0], e_row) <= 1e-4

    args = [str(out), "-n", "2", "--steps", "2", "--threads", "1"]
    assert R.main([*args, "-o", str(tmp_path / "a.npy")]) == 2
    err = capsys.readouterr().err
    assert "text-conditioned" in err and "--context FILE.npy" in err and "(5, 16)" in err and "Traceback" not in err
    assert not (tmp_path / "a.npy").exists()
    np.save(tmp_path / "c.npy", c[:2].numpy())
    np.save(tmp_path / "u.npy", np.zeros((1, L, CTX_DIM), np.float32))
    assert R.main([*args, "--context", str(tmp_path / "c.npy"), "-o", str(tmp_path / "a.png")]) == 2
    assert "cannot decode" in capsys.readouterr().err and not (tmp_path / "a.png").exists()
    np.save(tmp_path / "bad.npy", np.zeros((L, CTX_DIM + 1), np.float32))
    assert R.main([*args, "--context", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "a.npy")]) == 2
    assert "shape" in capsys.readouterr().err
    assert R.main([*args, "--context", str(tmp_path / "c.npy"), "--guidance", "3", "-o", str(tmp_path / "a.npy")]) == 2
    assert "--uncond" in capsys.readouterr().err
    assert R.main([*args, "--context", str(tmp_path / "c.npy"), "--uncond", str(tmp_path / "u.npy"),
                   "--guidance", "3", "-o", str(tmp_path / "g.npy")]) == 0
    assert "latents" in capsys.readouterr().out
    g = np.load(tmp_path / "g.npy")
    assert g.shape == (2, 4, 8, 8) and np.isfinite(g).all()


def test_guided_sampling_matches_the_torch_sampler(tmp_path_factory):
    """run.py's guided DDIM equals bqc.diffusion.samplers' on the deploy reference, given the same
    starting noise (each branch its own TBS state)."""
    from bqc.diffusion.samplers import ddim_sample

    dart, out = _lowered("ldm", tmp_path_factory)
    step = R.load(out, threads=1)
    x_T, _, c = _inputs(n=2, seed=5)
    u = torch.randn(1, L, CTX_DIM, generator=torch.Generator().manual_seed(9))
    sched = dart.schedule
    got = R.ddim(step, x_T.numpy(), R.Schedule.from_manifest(step.manifest), 3, context=c.numpy(),
                 uncond=u.expand(2, L, CTX_DIM).numpy(), guidance=4.0)
    with torch.no_grad():
        want = ddim_sample(dart.model, x_T.shape, schedule=sched, steps=3, x_T=x_T, cond={"context": c},
                           uncond={"context": u.expand(2, L, CTX_DIM)}, guidance=4.0)
    assert rel(got, want) <= 1e-3, rel(got, want)


def test_bench_times_the_fp_teacher_with_context(tmp_path_factory):
    from bqc.backends.tvm.lower import bench
    from bqc.teacher import bundle_teacher

    art, _ = _folded("ldm", tmp_path_factory)
    _, out = _lowered("ldm", tmp_path_factory)
    r = bench(out, threads=1, teacher=bundle_teacher(out, str(art)), repeat=1, profile=False)
    assert r["torch_fp32_ms"] > 0 and r["speedup"] > 0 and r["batch"] == BATCH


def test_onnx_export_with_context(tmp_path_factory, tmp_path):
    pytest.importorskip("onnxruntime")
    from bqc.backends.onnx.export import export_onnx

    _, dart = _folded("ldm", tmp_path_factory)
    res = export_onnx(dart, tmp_path / "onnx", forms=("fakequant",))
    man = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert man["context"] == [L, CTX_DIM] and man["inputs"][:3] == ["x", "t", "context"]
    import onnx

    model = onnx.load(str(res.paths["fakequant"]))
    ctx = next(i for i in model.graph.input if i.name == "context")
    dims = [d.dim_param or d.dim_value for d in ctx.type.tensor_type.shape.dim]
    assert dims == ["batch", L, CTX_DIM]
    assert res.verify["max_rel_err"] <= 1e-4 and res.verify["min_frac_close"] == 1.0
