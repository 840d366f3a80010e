"""The deploy graph: trained quantized layers folded into their inference form, and its saved form.

    artifact ──fold──▶ deploy artifact ──lower──▶ compiled

A deploy graph is a trained QAT graph whose ``quant.<name>`` modules became *deploy modules*
(packed sign bits + per-channel scales, integer activation codes) and whose TBS blends became
buffer-only twins. Nothing else changes: the signature stays ``(x, t[, y], *tbs_caches,
tbs_flag) -> (eps, *tbs_features)``, so :class:`bqc.graph.BqcModel` and the samplers run it like
the QAT graph, and every node keeps its name and annotation (``node.meta["bqc"]["deploy"]`` adds
the layer's inference form). Its torch forward is the *reference executor*, the oracle every
backend is tested against.

=====================  ========================================================================
``ops``                the integer cores as ``bqc::*`` torch custom ops (reference kernels)
``modules``            the deploy modules (``BinaryConv2d``, ``IntConv2d``, ``TBSBlend``, ...)
``folding``            the fold stage: :func:`fold`, :func:`to_deploy`, the QAT -> deploy table
``summary``            what a deploy graph stores (:func:`deploy_summary`, per-layer rows)
``export``             :func:`step_inputs` (a step's example arguments, with TBS state),
                       :func:`export_program` (the TVM hand-off),
                       :func:`calibrate` (untrained QAT graphs, before folding)
``artifact``           :class:`DeployArtifact`: ``deploy.json`` + ``deploy.safetensors``, loaded
                       without pickle or recipe replay; zoo names of shipped deploy models
=====================  ========================================================================

(The fold stage's module is ``folding``, not ``fold``: a submodule named like the package's
``fold`` function would shadow it.)
"""
from __future__ import annotations

from .artifact import (DEPLOY_FILES, DeployArtifact, as_deploy_artifact, find_deploy_artifact, is_deploy_artifact,
                       load)
from .export import CALIBRATION_IMAGES, calibrate, example_inputs, export_program, step_inputs, uncalibrated
from .folding import deploy_graph, fold, to_deploy
from .modules import (DEPLOY_LAYERS, BinaryConv2d, BinaryLinear, FloatConv2d, FloatLinear, IntConv2d,
                      IntLinear, IntMatmul, KMap, OutScale, QuantizeCodes, RPReLU, Shortcut, SignBinarize,
                      TBSBlend, UnsignedBinarize, _DeployConv, _DeployLayer, _DeployLinear)
from .ops import (INPUT_KINDS, LAYOUT_VERSION, binary_conv2d, binary_dense, int_conv2d, int_dense, int_matmul,
                  quantize_codes, sign_pack, unpack_words, unsigned_pack, words_numpy)
from .summary import deploy_layers, deploy_summary, format_summary, is_deployed

__all__ = [
    "LAYOUT_VERSION", "INPUT_KINDS",
    "SignBinarize", "QuantizeCodes", "UnsignedBinarize", "KMap", "OutScale", "Shortcut", "RPReLU", "TBSBlend",
    "BinaryConv2d", "IntConv2d", "FloatConv2d", "BinaryLinear", "IntLinear", "FloatLinear",
    "IntMatmul", "DEPLOY_LAYERS", "to_deploy", "is_deployed", "deploy_layers", "deploy_summary",
    "format_summary", "unpack_words", "words_numpy", "export_program", "step_inputs", "example_inputs",
    "calibrate", "uncalibrated", "CALIBRATION_IMAGES",
    "fold", "deploy_graph", "DeployArtifact", "as_deploy_artifact", "load", "is_deploy_artifact", "find_deploy_artifact", "DEPLOY_FILES",
    "sign_pack", "unsigned_pack", "quantize_codes", "binary_conv2d", "binary_dense", "int_conv2d", "int_dense",
    "int_matmul",
]
