"""Quantizer and binarizer modules that passes insert (see METHODS.md for every formula).

Layout: ``ste`` (estimators), ``binary`` (1-bit weights), ``uniform`` (multi-bit, LSQ),
``binact`` (1-bit activations, RPReLU), ``parts`` (K map, XNOR++ scale, shortcut),
``layers`` (QConv2d / QLinear / QMatmul), ``registry`` (recipe names), ``training``
(model-wide trainer hooks). All state lives in parameters and buffers.
"""
from .binact import RPReLU, SignAct
from .binary import EBB, LMB, BinaryWeight, ReSTEWeight, SignScale, TwoBasis
from .layers import FLOAT_BITS, QConv2d, QLayer, QLinear, QMatmul
from .parts import FactorisedScale, KMap, Shortcut
from .registry import (ACT_QUANTIZERS, WEIGHT_QUANTIZERS, make_act_quantizer, make_qconv2d,
                       make_qlinear, make_weight_quantizer)
from .ste import (ReSTE, approx_sign, grad_scale, hard_sign, reste_sign, round_ste, sign_ste)
from .training import anneal, ebb_modules, ebb_regulariser, switch_ebb_to_stage2
from .uniform import LSQ, DoReFaAct, LSQWeight, UniformAct, UniformWeight, fake_quant

__all__ = [
    "RPReLU", "SignAct",
    "EBB", "LMB", "BinaryWeight", "ReSTEWeight", "SignScale", "TwoBasis",
    "FLOAT_BITS", "QConv2d", "QLayer", "QLinear", "QMatmul",
    "FactorisedScale", "KMap", "Shortcut",
    "ACT_QUANTIZERS", "WEIGHT_QUANTIZERS", "make_act_quantizer", "make_qconv2d",
    "make_qlinear", "make_weight_quantizer",
    "ReSTE", "approx_sign", "grad_scale", "hard_sign", "reste_sign", "round_ste", "sign_ste",
    "anneal", "ebb_modules", "ebb_regulariser", "switch_ebb_to_stage2",
    "LSQ", "DoReFaAct", "LSQWeight", "UniformAct", "UniformWeight", "fake_quant",
]
