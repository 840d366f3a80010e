"""Metric sanity: FID/KID of identical sets ~ 0 and growing with noise, precision/recall range,
IS bounds, evaluate() keys, and the shipped classifier."""
import json

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
