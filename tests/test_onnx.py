"""ONNX export of the deploy graph: checker, the ai.bqc domain contract, packed initializers,
onnxruntime on the fake-quant form vs PyTorch, the custom form on its numpy reference."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from test_deploy import case, qat, rel

from bqc import artifact, ir
from bqc import deploy as D
from bqc.backends.onnx import DOMAIN, OPS, export_onnx
from bqc.deploy import step_inputs as example_inputs
from bqc.backends.onnx.reference import run as run_reference
from bqc.errors import BqcError
from bqc.pipeline import load_recipe


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """bidm (W1A1, TBS state) and baseline (W1A4, integer attention matmuls), tiny UNet."""
    out = {}
    for name in ("bidm", "baseline"):
        dg = D.to_deploy(case("tiny", name))
        out[name] = (dg, export_onnx(dg, tmp_path_factory.mktemp(f"onnx_{name}")))
    return out


def _initializers(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


@pytest.mark.parametrize("name", ["bidm", "baseline"])
def test_checker_and_custom_domain(exported, name):
    dg, res = exported[name]
    custom = onnx.load(str(res.paths["custom"]))
    fq = onnx.load(str(res.paths["fakequant"]))
    for m in (custom, fq):
        onnx.checker.check_model(m)
        assert {o.domain: o.version for o in m.opset_import}[""] >= 17
        assert [i.name for i in m.graph.input] == ir.graph_meta(dg)["inputs"]
        assert [o.name for o in m.graph.output] == res.manifest["outputs"]
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.domain: o.version for o in custom.opset_import}[DOMAIN] == 1 == res.manifest["custom_domain_version"]
    assert not any(n.domain for n in fq.graph.node)  # standard ops only
    nodes = [n for n in custom.graph.node if n.domain == DOMAIN]
    assert nodes
    for n in nodes:
        inputs, attrs = OPS[n.op_type]
        assert {a.name for a in n.attribute} <= set(attrs), n.name  # no bqc_layer left behind
        assert len([i for i in inputs if not i.endswith("?")]) <= len(n.input) <= len(inputs)
    layers = D.deploy_layers(dg)
    ops = res.manifest["files"]["model.onnx"]["custom_ops"]
    nbin = sum(isinstance(m, (D.BinaryConv2d, D.BinaryLinear)) for _, m in layers)
    assert ops.get("BinaryConv2d", 0) + ops.get("BinaryGemm", 0) == nbin
    assert ops["IntConv2d"] == 2  # 8-bit input and output convs
    if name == "bidm":
        assert ops["SignPack"] == nbin
    else:
        assert ops["IntMatMul"] == sum(isinstance(m, D.IntMatmul) for _, m in layers) > 0


@pytest.mark.parametrize("name", ["bidm", "baseline"])
def test_packed_initializers(exported, name):
    dg, res = exported[name]
    model = onnx.load(str(res.paths["custom"]))
    inits = _initializers(model)
    total = 0
    for n, m in D.deploy_layers(dg):
        if isinstance(m, (D.BinaryConv2d, D.BinaryLinear)):
            init = inits[f"{n.name}.w_packed"]
            assert init.data_type == TensorProto.UINT32
            words = numpy_helper.to_array(init)
            assert words.shape == tuple(m.w_packed.shape)
            if isinstance(m, D.BinaryConv2d):
                oc, c, (kh, kw) = m.out_channels, m.in_channels, m.kernel_size
                assert words.nbytes == m.bases * oc * kh * kw * -(-c // 32) * 4
            assert np.array_equal(words, D.words_numpy(m.w_packed))
            assert numpy_helper.to_array(inits[f"{n.name}.scale"]).shape == tuple(m.w_scale.shape)
            total += words.nbytes
        elif isinstance(m, D.IntConv2d):
            codes = numpy_helper.to_array(inits[f"{n.name}.w_codes"])
            assert codes.dtype == np.int8 and np.array_equal(codes, m.w_codes.numpy())
    sizes = res.manifest["files"]["model.onnx"]["initializers"]
    assert sizes["packed"] == total > 0
    summary = D.deploy_summary(dg)
    assert total == sum(r["weight_bytes"] for r in summary["layers"] if r["weight"] == "binary")
    # the binary model's weights are ~32x smaller than the fake-quant model's ±1 float weights
    fq = res.manifest["files"]["model_fakequant.onnx"]["initializers"]["float"]
    assert fq > sizes["float"] + 20 * total
    assert json.loads((res.out_dir / "export.json").read_text())["files"] == res.manifest["files"]


@pytest.mark.parametrize("name", ["bidm", "baseline"])
def test_fakequant_runs_in_onnxruntime(exported, name):
    import onnxruntime as ort

    # Fixed inputs, single-threaded ORT: deterministic. (On other inputs a value within float
    # rounding of a sign/rounding boundary can flip a code: see verify_fakequant.)
    dg, res = exported[name]
    assert res.verify["max_rel_err"] <= 1e-4  # batch 2, random TBS state, flag 1
    assert res.verify["min_frac_close"] == 1.0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(res.paths["fakequant"]), opts, providers=["CPUExecutionProvider"])
    args = example_inputs(dg, batch=3, seed=11, state=False)  # another batch, first sampling step
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    with torch.no_grad():
        want = dg(*args)
    for g, w in zip(got, want):
        assert rel(torch.from_numpy(g), w) <= 1e-4


@pytest.mark.parametrize("name", ["bidm", "baseline"])
def test_custom_form_on_reference_ops(exported, name):
    """model.onnx executed with the ai.bqc ops on bqc.packing's popcount references."""
    _check_on_reference_ops(*exported[name])


def _check_on_reference_ops(dg, res):
    args = example_inputs(dg, batch=2, seed=12)
    got = run_reference(res.paths["custom"], dict(zip(ir.graph_meta(dg)["inputs"], [a.numpy() for a in args])))
    with torch.no_grad():
        want = dg(*args)
    for g, w in zip(got, want):
        assert rel(torch.from_numpy(np.asarray(g)), w) <= 1e-4


def test_unsigned_bits_export_and_reference(tmp_path):
    """DoReFa W1A1: {0, 1} activations as ``UnsignedPack`` + ``input_kind="bits01"`` binary ops
    (ai.bqc version 2, declared only by models that use them); the custom form on the reference
    ops and the fake-quant form in onnxruntime match the deploy graph."""
    dg = D.to_deploy(qat("tiny", "dorefa"))
    res = export_onnx(dg, tmp_path / "onnx")
    custom = onnx.load(str(res.paths["custom"]))
    onnx.checker.check_model(custom)
    assert {o.domain: o.version for o in custom.opset_import}[DOMAIN] == 2 == res.manifest["custom_domain_version"]
    ops = res.manifest["files"]["model.onnx"]["custom_ops"]
    nbin = sum(isinstance(m, (D.BinaryConv2d, D.BinaryLinear)) for _, m in D.deploy_layers(dg))
    assert ops["UnsignedPack"] == nbin and "SignPack" not in ops
    kinds = {a.s.decode() for n in custom.graph.node if n.op_type in ("BinaryConv2d", "BinaryGemm")
             for a in n.attribute if a.name == "input_kind"}
    assert kinds == {"bits01"}
    assert res.verify["max_rel_err"] <= 1e-4
    _check_on_reference_ops(dg, res)


def test_export_from_artifact_directory(tmp_path):
    """A saved (calibrated) QAT artifact exports directly; W1A4 with two-basis EBB layers."""
    gm = case("tiny", "binarydm-s1")
    from test_deploy import program

    rec = load_recipe("binarydm")
    path = artifact.save_artifact(tmp_path / "art", base_ep=program("tiny"), gm=gm, recipe=rec,
                                  wbits=rec.wbits, abits=rec.abits, source={"kind": "test"})
    res = export_onnx(D.fold(path), tmp_path / "onnx", forms=("fakequant",))
    assert res.verify["max_rel_err"] <= 1e-4
    assert (tmp_path / "onnx" / "model_fakequant.onnx").exists()
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_user_errors(tmp_path):
    with pytest.raises(BqcError, match="not a deploy artifact"):
        export_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(BqcError, match="opset"):
        export_onnx(D.to_deploy(case("tiny", "bidm")), tmp_path / "out", opset=13)
    with pytest.raises(BqcError):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "out")
    raw = qat("tiny", "baseline", calibrate=False)
    with pytest.raises(BqcError, match="deploy artifact"):
        export_onnx(raw, tmp_path / "out")  # a backend takes no QAT graph: fold it first
    with pytest.raises(BqcError, match="calibrated"):
        D.deploy_graph(raw)
    assert D.is_deployed(D.deploy_graph(ir.fresh_copy(raw), calibrate=True))
