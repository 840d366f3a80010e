"""Deploy artifacts (``bqc fold``, bqc.deploy.artifact): the saved deploy graph loads bit-exactly,
small, without pickle or recipe replay; hostile files are refused before anything runs; zoo names
resolve in every command; ``bqc report`` counts the bits a deploy graph holds.

The QAT graphs are test_deploy's calibrated, untrained mnist16 graphs (one batch sets the
activation steps); binarydm's EBB layers are in stage 1 there, so they fold with two bases.
"""
from __future__ import annotations

import builtins
import json
import os
import shutil

import pytest
import torch
from test_deploy import program, qat

from bqc import artifact, ir
from bqc import deploy as D
from bqc.deploy import artifact as DA
from bqc.errors import BqcError
from bqc.pipeline import load_recipe
from clirun import run_cli

RECIPES = ("bidm", "binarydm", "bidm-skip", "dorefa")  # bidm-skip: OutputSkip; dorefa: {0, 1} packed inputs
_SAVED: dict = {}


def _manifest(recipe: str, run_dir) -> dict:
    """A source artifact manifest as bqc.json has it (with a host path in the train record)."""
    rec = load_recipe(recipe)
    return {"source": {"kind": "zoo", "name": "mnist16", "description": "zoo model mnist16", "config": {"big": 1}},
            "recipe": rec.to_dict(), "wbits": rec.wbits, "abits": rec.abits,
            "train": {"data": "mnist16", "steps": 7, "from": str(run_dir)},
            "diffusion": {"schedule": {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02, "kind": "linear"},
                          "prediction": "eps", "from": f"bqc checkpoint {run_dir}/model (meta.diffusion)"}}


def saved(recipe: str, tmp_path_factory):
    """(in-memory deploy graph, saved folder) for a calibrated mnist16 QAT graph (cached)."""
    if recipe not in _SAVED:
        dg = D.to_deploy(qat("mnist16", recipe))
        out = tmp_path_factory.mktemp(f"deploy-{recipe}") / "dep"
        D.DeployArtifact.from_graph(dg, _manifest(recipe, out.parent / "run"), calibration="test").save(out)
        _SAVED[recipe] = (dg, out)
    return _SAVED[recipe]


def _flat(text: str) -> str:
    """stderr without the console's line wrapping."""
    return " ".join(text.split())


def _outputs(gm, args):
    with torch.no_grad():
        return gm(*args)


# --- round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_roundtrip_is_bit_exact(recipe, tmp_path_factory):
    dg, out = saved(recipe, tmp_path_factory)
    art = D.load(out)
    gm = art.gm
    assert D.is_deployed(gm) and ir.dump(gm) == ir.dump(dg)
    assert ir.graph_meta(gm) == ir.graph_meta(dg)
    want, got = dg.state_dict(), gm.state_dict()
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in dg.named_parameters()}
    assert any(t.dtype == torch.uint32 for t in got.values())  # packed words stay packed
    for state in (True, False):  # with TBS state (random caches, flag 1) and without
        args = D.example_inputs(dg, batch=3, seed=4, state=state)
        for a, b in zip(_outputs(dg, args), _outputs(gm, args)):
            assert torch.equal(a, b)
    assert art.schedule.T == 1000 and art.schedule.prediction == "eps"
    assert art.manifest["signature"]["state_inputs"] == ir.graph_meta(dg)["state_inputs"]


def test_sampling_a_loaded_artifact_matches(tmp_path_factory):
    from bqc.diffusion.samplers import generate
    from bqc.graph import BqcModel

    dg, out = saved("bidm", tmp_path_factory)
    model = D.load(out).model
    kw = dict(steps=3, seed=1, batch=2)
    with torch.no_grad():  # three DDIM steps: the TBS state threads from step to step
        assert torch.equal(generate(model, 2, (1, 16, 16), **kw), generate(BqcModel(dg), 2, (1, 16, 16), **kw))


def test_binary_artifact_is_small_and_portable(tmp_path_factory):
    _, out = saved("bidm", tmp_path_factory)
    assert sum((out / f).stat().st_size for f in D.DEPLOY_FILES) < 1_000_000
    text = (out / "deploy.json").read_text()
    assert str(out.parent) not in text and "<path>/run" in text  # no host paths, only their last part
    doc = json.loads(text)
    assert doc["recipe"] == "bidm" and doc["wbits"] == doc["abits"] == 1 and "config" not in doc["source"]
    assert [r["name"] for r in doc["layers"]] == [n.name for n, _ in D.deploy_layers(D.load(out).gm)]
    assert artifact.trained_on(out)["data"] == "mnist16" and artifact.read_schedule(out).T == 1000  # bqc eval's


def test_allowlist_covers_the_deploy_graphs(tmp_path_factory):
    allowed = DA.functions()
    assert all(isinstance(allowed[n], torch._ops.OpOverload) for n in DA.ATEN_OPS)
    for recipe in RECIPES:
        assert DA.graph_functions(saved(recipe, tmp_path_factory)[0]) <= set(allowed)


def test_format_version_records_unsigned_inputs(tmp_path_factory, tmp_path):
    """A deploy graph with packed {0, 1} inputs (UnsignedBinarize, DoReFa W1A1) is written as
    deploy format 2 (:data:`DA.SINCE`); one without stays format 1, like every artifact before
    it, and a format-1 artifact loads and re-saves as 1 (the shipped mnist16-bidm-a4dec; the shipped
    mnist16-bidm has {0, 1} activations: format 2). A format-1 file holding an UnsignedBinarize,
    and a format this bqc does not know, are refused."""
    _, out = saved("dorefa", tmp_path_factory)
    doc = json.loads((out / "deploy.json").read_text())
    assert doc["version"] == 2 and any(e["class"] == "UnsignedBinarize" for e in doc["modules"])
    assert all(r["input"] == "bits01" for r in doc["layers"] if r["weight"] == "binary")
    assert json.loads((saved("bidm", tmp_path_factory)[1] / "deploy.json").read_text())["version"] == 1
    for name, version in (("mnist16-bidm-a4dec", 1), ("mnist16-bidm", 2)):
        shipped = D.load(name)
        assert json.loads((shipped.path / "deploy.json").read_text())["version"] == version
        assert json.loads((shipped.save(tmp_path / name) / "deploy.json").read_text())["version"] == version
    bad = tmp_path / "old"
    shutil.copytree(out, bad)
    js = bad / "deploy.json"
    js.write_text((out / "deploy.json").read_text().replace('"version": 2', '"version": 1', 1))
    with pytest.raises(BqcError, match="UnsignedBinarize module needs deploy format 2"):
        D.load(bad)
    js.write_text((out / "deploy.json").read_text().replace('"version": 2', '"version": 3', 1))
    with pytest.raises(BqcError, match="deploy format 3"):
        D.load(bad)


def test_save_refuses_what_it_cannot_reload(tmp_path):
    dg = ir.fresh_copy(D.to_deploy(qat("mnist16", "bidm")))
    node = next(n for n in dg.graph.nodes if n.op == "call_function" and "silu" in str(n.target))
    node.target = torch.ops.aten.tanh.default  # not in the allowlist (gelu is, for text UNets)
    with pytest.raises(BqcError, match="aten.tanh.default"):
        D.DeployArtifact.from_graph(dg).save(tmp_path / "d")
    with pytest.raises(BqcError, match="deploy graph"):
        D.DeployArtifact.from_graph(qat("mnist16", "bidm"))


# --- hostile files ----------------------------------------------------------------------------
def _first(doc, key, pred):
    return next(e for e in doc[key] if pred(e))


def _op(name):
    def edit(doc):
        _first(doc["graph"], "nodes", lambda e: e["op"] == "call_function")["target"] = name
    return edit


def _cls(name):
    def edit(doc):
        _first(doc, "modules", lambda e: e["class"] == "BinaryConv2d")["class"] = name
    return edit


def _extra_attr(doc):
    _first(doc, "modules", lambda e: e["class"] == "BinaryConv2d")["attrs"]["forward"] = 1


def _bad_attr(doc):
    _first(doc, "modules", lambda e: e["class"] == "Shortcut")["attrs"]["channels"] = "__import__('os')"


def _injected_name(doc):
    ph = _first(doc["graph"], "nodes", lambda e: e["op"] == "placeholder")
    ph["name"] = ph["target"] = "x=__import__('pathlib').Path('PWNED').touch()"


def _injected_kwarg(doc):
    _first(doc["graph"], "nodes", lambda e: e["op"] == "call_function")["kwargs"] = {
        "y=__import__('pathlib').Path('PWNED').touch(),z": 1}


def _bad_get_attr(doc):
    _first(doc["graph"], "nodes", lambda e: e["op"] == "get_attr")["target"] = "__class__.__init__"


def _bad_tag(doc):
    _first(doc["graph"], "nodes", lambda e: e["op"] == "call_function")["args"].append({"$eval": "1"})


def _json_shape(doc):  # deploy.json and deploy.safetensors disagree
    e = _first(doc, "modules", lambda e: e["class"] == "BinaryConv2d")
    e["buffers"]["w_packed"]["shape"][1] += 1


def _huge_input(doc):  # sampling allocated n x 1 x 100000 x 100000 (40 GB per sample): a traceback or the OOM killer
    doc["graph"]["meta"]["input_shape"] = [1, 100000, 100000]


def _huge_T(doc):  # a T = 10**9 schedule took 21 GB before the kernel killed the process
    doc["diffusion"]["schedule"]["T"] = 10**9


HOSTILE = {
    "huge input shape": (_huge_input, "signature annotations"),
    "huge diffusion T": (_huge_T, "T must be an integer in"),
    "op os.system": (_op("os.system"), "unknown op"),
    "op builtins.eval": (_op("builtins.eval"), "unknown op"),
    "op torch.ops.aten.__class__": (_op("torch.ops.aten.__class__"), "unknown op"),
    "op aten.__class__.default": (_op("aten.__class__.default"), "unknown op"),
    "class torch.nn.Linear": (_cls("torch.nn.Linear"), "unknown module class"),
    "class Evil": (_cls("Evil"), "unknown module class"),
    "class GraphModule inside": (_cls("GraphModule"), "root"),
    "undeclared attribute": (_extra_attr, "takes the attributes"),
    "attribute value": (_bad_attr, "attribute channels"),
    "code in a node name": (_injected_name, "not a valid name"),
    "code in a keyword": (_injected_kwarg, "not a valid name"),
    "get_attr outside the tensors": (_bad_get_attr, "no tensor"),
    "unknown value tag": (_bad_tag, "invalid value"),
    "shape in deploy.json": (_json_shape, "deploy.json says"),
}


@pytest.fixture
def no_execution(monkeypatch, tmp_path):
    """Record any call of the usual code-execution entry points while a hostile file loads."""
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(("os.system", a)))
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: calls.append(("eval", a)))
    monkeypatch.chdir(tmp_path)
    yield calls
    assert not calls and not (tmp_path / "PWNED").exists()


@pytest.fixture
def bidm_saved(tmp_path_factory):
    """The saved bidm deploy artifact, built before ``no_execution`` patches eval (torch.export
    itself calls eval: with ``-k`` this test may be the first to build it)."""
    return saved("bidm", tmp_path_factory)[1]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_json_is_refused_before_anything_runs(case, bidm_saved, tmp_path, no_execution):
    good = bidm_saved
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    doc = json.loads((bad / "deploy.json").read_text())
    edit, match = HOSTILE[case]
    edit(doc)
    (bad / "deploy.json").write_text(json.dumps(doc))
    with pytest.raises(BqcError, match=match):
        D.load(bad)


def test_tensor_that_does_not_fit_is_refused(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    _, good = saved("bidm", tmp_path_factory)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    tensors = load_file(str(bad / "deploy.safetensors"))
    key = next(k for k in tensors if k.endswith("w_packed"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(bad / "deploy.safetensors"))
    with pytest.raises(BqcError, match="deploy.json says"):
        D.load(bad)
    # the same change in both files: the layer's geometry still refuses it
    doc = json.loads((bad / "deploy.json").read_text())
    path, _, name = key.rpartition(".")
    _first(doc, "modules", lambda e: e["path"] == path)["buffers"][name]["shape"] = list(tensors[key].shape)
    (bad / "deploy.json").write_text(json.dumps(doc))
    with pytest.raises(BqcError, match="geometry"):
        D.load(bad)


@pytest.mark.parametrize("damage", ["truncated json", "not json", "nan", "truncated tensors", "no tensors"])
def test_corrupt_files_are_refused(damage, tmp_path_factory, tmp_path):
    _, good = saved("bidm", tmp_path_factory)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    js, st = bad / "deploy.json", bad / "deploy.safetensors"
    if damage == "truncated json":
        js.write_text(js.read_text()[:5000])
    elif damage == "not json":
        js.write_bytes(b"\x80\x04\x95pickle")
    elif damage == "nan":
        js.write_text(js.read_text().replace('"version": 1', '"version": NaN', 1))
    elif damage == "truncated tensors":
        st.write_bytes(st.read_bytes()[:1000])
    else:
        st.unlink()
    with pytest.raises(BqcError):
        D.load(bad)


# --- commands -----------------------------------------------------------------------------------
@pytest.fixture
def shipped(tmp_path_factory, tmp_path, monkeypatch):
    """A models/checkpoints folder (monkeypatched) that ships the bidm deploy model as mnist16-bidm."""
    _, good = saved("bidm", tmp_path_factory)
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(good, ckpt / "mnist16-bidm")
    monkeypatch.setattr(DA, "CHECKPOINTS", ckpt)
    monkeypatch.chdir(tmp_path)
    return ckpt / "mnist16-bidm"


def test_zoo_names_resolve_in_every_command(shipped, tmp_path, capsys):
    from bqc import cli
    assert D.find_deploy_artifact("mnist16-bidm") == shipped
    assert D.find_deploy_artifact("mnist16") is None and D.find_deploy_artifact("../checkpoints") is None
    assert D.find_deploy_artifact(shipped) == shipped
    assert D.is_deployed(D.as_deploy_artifact("mnist16-bidm").gm)  # what every backend (bqc lower) calls
    model = cli._step_model("mnist16-bidm")  # bqc sample / eval
    assert model.num_state == 8 and model.schedule.T == 1000
    code, out, err = run_cli(["report", "mnist16-bidm", "--json"], capsys)
    assert code == 0, err
    assert "deploy artifact: bidm W1A1" in json.loads(out)["model"]
    code, _, err = run_cli(["sample", "mnist16-bidm", "-n", "2", "--steps", "2", "-o", tmp_path / "g.png", "-q"],
                           capsys)
    assert code == 0 and (tmp_path / "g.png").is_file(), err


def test_report_counts_the_bases_a_deploy_graph_holds(tmp_path_factory):
    from bqc.report import cost_report

    gm = D.load(saved("binarydm", tmp_path_factory)[1]).gm  # EBB stage 1: two bases kept
    rows = {r["name"]: r for r in cost_report(gm)["layers"]}
    two = 0
    for n, m in D.deploy_layers(gm):
        row = D.summary.layer_row(n, m)
        assert rows[n.name]["size_mb"] * 8 * 2**20 == pytest.approx(row["nominal_bits"])
        if row["bases"] == 2:
            two += 1
            assert rows[n.name]["bases"] == 2 and row["nominal_bits"] > 2 * row["weights"]
    assert two > 0
    qat_rows = {r["name"]: r for r in cost_report(qat("mnist16", "binarydm"))["layers"]}
    assert all(qat_rows[k]["bases"] == 1 for k in rows if rows[k]["bases"] == 2)  # the papers' count


def test_fold_command(tmp_path, capsys):
    """`bqc fold`: exit 2 for a non-artifact or an untrained artifact, then the saved model is the
    in-memory fold of the same calibration, bit for bit; its folder is bqc's own."""
    from bqc.outputs import output_kind

    rec = load_recipe("bidm")
    gm = qat("mnist16", "bidm", calibrate=False)
    art = artifact.save_artifact(tmp_path / "art", base_ep=program("mnist16"), gm=gm, recipe=rec, wbits=rec.wbits,
                                 abits=rec.abits, source={"kind": "zoo", "name": "mnist16"})
    code, _, err = run_cli(["fold", tmp_path / "nothing", "-o", tmp_path / "d"], capsys)
    assert code == 2 and "not a bqc artifact" in _flat(err) and "Traceback" not in err
    code, _, err = run_cli(["fold", art, "-o", tmp_path / "d"], capsys)
    assert code == 2 and "never calibrated" in _flat(err) and "bqc fold ART --calibrate mnist16" in _flat(err)
    assert not (tmp_path / "d").exists()
    code, out, err = run_cli(["fold", art, "--calibrate", "random", "-o", tmp_path / "d"], capsys)
    assert code == 0 and "wrote" in out and "random" in err, err
    assert output_kind(tmp_path / "d") == "deploy"
    loaded = D.load(tmp_path / "d")
    assert loaded.manifest["calibration"].startswith("random")
    g = ir.fresh_copy(gm)
    D.calibrate(g, "random")
    want = D.to_deploy(g)
    args = D.example_inputs(want, batch=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(want, args), _outputs(loaded.gm, args)))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    code, _, err = run_cli(["fold", art, "--calibrate", "random", "-o", tmp_path / "mine"], capsys)
    assert code == 2 and "--force" in err


def test_a_copy_of_a_shipped_model_is_recorded_by_its_zoo_name(tmp_path):
    """A model trained from a byte-identical copy of a shipped model (another folder, other host
    paths in its training record) records the zoo name, so `bqc bench` finds the FP teacher; one
    changed byte of the weights, and it stays a plain checkpoint."""
    import json
    import shutil

    from bqc.deploy.artifact import CHECKPOINTS, _provenance, zoo_twin

    ship = CHECKPOINTS / "mnist16"
    copy = tmp_path / "teacher"
    copy.mkdir()
    shutil.copy(ship / "model.safetensors", copy / "model.safetensors")
    cfg = json.loads((ship / "config.json").read_text())
    cfg["meta"]["note"] = f"trained in {tmp_path}"
    (copy / "config.json").write_text(json.dumps(cfg))
    src = {"kind": "bqc", "path": str(copy), "description": f"bqc checkpoint {copy}"}
    assert zoo_twin(src) == "mnist16"
    rec = _provenance({"source": src}, None)["source"]
    assert rec["kind"] == "zoo" and rec["name"] == "mnist16" and str(tmp_path) not in json.dumps(rec)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert zoo_twin(src) is None and _provenance({"source": src}, None)["source"]["kind"] == "bqc"
    assert zoo_twin({"kind": "zoo", "name": "mnist16"}) is None


def test_title_names_the_layers_of_other_precisions():
    """A --bits mix reads as one: the recipe's bits plus the layers of any other precision than
    the recipe's and the 8-bit head/tail."""
    def title(*bits):
        layers = [{"w_bits": w, "a_bits": a} for w, a in bits]
        return D.DeployArtifact(None, {"recipe": "bidm-skip", "wbits": 1, "abits": 1, "layers": layers}).title()

    assert title((8, 8), (1, 1), (1, 1), (8, 8)) == "deploy artifact: bidm-skip W1A1"
    assert title((8, 8), (1, 1), (1, 4), (1, 4), (4, 4)) == "deploy artifact: bidm-skip W1A1 + W1A4 (2 layers) + W4A4 (1 layer)"
    mixed = D.DeployArtifact(None, {"wbits": 1, "abits": 1, "layers": [{"w_bits": 1, "a_bits": a} for a in (1, 4, 2)]})
    assert mixed.bits() == "W1A1+A2+A4"
    assert D.DeployArtifact(None, {"wbits": 1, "abits": 4, "layers": [{"w_bits": 4, "a_bits": 4}]}).bits() == "W1A4"


@pytest.mark.parametrize("name", sorted(p.name for p in DA.CHECKPOINTS.iterdir() if (p / "deploy.json").is_file()))
def test_every_shipped_binary_model_loads_and_steps(name):
    """Each deploy artifact bqc ships loads by its zoo name (the allowlisted graph, no pickle),
    records the zoo teacher it was trained from, and takes a sampling step (with its TBS state
    when it has one) to finite outputs."""
    from bqc import cli

    dart = D.load(name)
    assert dart.manifest["source"]["kind"] == "zoo" and dart.manifest["source"]["name"] == "mnist16"
    model = cli._step_model(name)
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 20])
    with torch.no_grad():
        eps, state = model(x, t)
        if state is not None:
            eps, state = model(x, t - 10, state=state)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    if name == "mnist16-bidm-a4dec":  # binary weights everywhere, 4-bit activations in the decoder
        assert "W1A1 + W1A4 (35 layers)" in dart.title()
        assert all(r["w_bits"] in (1, 4, 8) for r in dart.manifest["layers"])
