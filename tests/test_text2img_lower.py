"""Lowering text-conditioned UNets (issue 16, part 5): the ``context`` input through the signature,
fold, TVM (tvm-x86), the bundle runner and ONNX, on tests/test_text2img.py's tiny models (5-token
context). Each family is folded (random calibration) and lowered once for the module, at batch 2
(3 rows in the checks: one padded and split call). Criterion: relative error <= 1e-4 against the
deploy graph's reference executor (torch), as tests/test_lower.py.
"""
from __future__ import annotations

import json

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


def _lowered(family, tmp_path_factory):
    """(deploy artifact, tvm-x86 bundle folder at batch 2), built once per family."""
    key = ("lowered", family)
    if key not in _CACHE:
        _, dart = _folded(family, tmp_path_factory)
        _CACHE[key] = lower(dart, "tvm-x86", tmp_path_factory.mktemp(f"text-{family}-tvm") / "lib", batch=BATCH,
                            threads=1)
    return _folded(family, tmp_path_factory)[1], _CACHE[key]


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(1, 1000, (n,), generator=g),
            torch.randn(n, L, CTX_DIM, generator=g))


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


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
    ref = BqcModel(dart.gm).eval()
    x, t, c = _inputs()
    with torch.no_grad():
        e, s = model(x, t, context=c)
        e_r, s_r = ref(x, t, context=c)
        assert float(e_r.abs().max()) > 0
        assert rel(e, e_r) <= 1e-4, rel(e, e_r)
        assert rel(model(x, t, context=torch.randn(3, L, CTX_DIM))[0], e_r) > 1e-3  # the context really enters
        assert (s is None) == (s_r is None) == (family != "ldm")
        if s is not None:
            for a, b in zip(s, s_r):
                assert rel(a, b) <= 1e-4
            e2, _ = model(x, t - 1, state=s_r, context=c)
            e2_r, _ = ref(x, t - 1, state=s_r, context=c)
            assert rel(e2, e2_r) <= 1e-4, rel(e2, e2_r)
    with pytest.raises(ValueError, match="context"):
        model(x, t)


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
