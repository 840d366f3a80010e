"""bqc.signature.Signature: the one calling convention and its JSON form (old manifests read too)."""
from __future__ import annotations

import pytest

from bqc.signature import Signature

STATE_IN = [{"name": "tbs_cache_3", "block": 3, "shape": [8, 4, 4]}, {"name": "tbs_cache_4", "block": 4, "shape": [8, 8, 8]}]
STATE_OUT = [{"name": "tbs_feat_3", "node": "add_7", "block": 3}, {"name": "tbs_feat_4", "node": "add_9", "block": 4}]
NEW = {"inputs": ["x", "t", "y", "tbs_cache_3", "tbs_cache_4", "tbs_flag"], "outputs": ["eps", "tbs_feat_3", "tbs_feat_4"],
       "input_shape": [1, 16, 16], "conditional": True, "state_inputs": STATE_IN, "state_outputs": STATE_OUT,
       "state_flag": "tbs_flag"}


def test_json_round_trip_and_old_forms():
    sig = Signature.from_json(NEW)
    assert sig.model_inputs == ("x", "t", "y") and sig.state_flag == "tbs_flag" and sig.to_json() == NEW
    old_bqc_json = {"signature": {k: v for k, v in NEW.items() if k != "state_flag"} | {"outputs": ["eps"]}}
    assert Signature.from_json(old_bqc_json) == sig  # no state_flag, outputs without the features
    old_onnx = {k: v for k, v in NEW.items() if not k.startswith("state_")}
    old_onnx["state"] = {"inputs": STATE_IN, "outputs": STATE_OUT, "flag": "tbs_flag"}
    assert Signature.from_json(old_onnx) == sig
    plain = Signature.from_json({"inputs": ["x", "t"], "input_shape": [3, 8, 8], "conditional": False})
    assert plain.inputs == ("x", "t") and plain.outputs == ("eps",) and plain.state_flag is None


def test_step_args_and_outputs():
    sig = Signature.from_json(NEW)
    zeros = lambda shape: ("zeros", shape)  # noqa: E731
    first = sig.step_args({"x": "X", "t": "T", "y": "Y"}, None, zeros=zeros, flag=lambda v: v)
    assert first == ["X", "T", "Y", ("zeros", (8, 4, 4)), ("zeros", (8, 8, 8)), 0.0]
    later = sig.step_args({"x": "X", "t": "T", "y": "Y"}, ["a", "b"], zeros=zeros, flag=lambda v: v)
    assert later == ["X", "T", "Y", "a", "b", 1.0]
    with pytest.raises(ValueError, match="class-conditional"):
        sig.step_args({"x": "X", "t": "T"}, None, zeros=zeros, flag=lambda v: v)
    with pytest.raises(ValueError, match="state has 1"):
        sig.step_args({"x": "X", "t": "T", "y": "Y"}, ["a"], zeros=zeros, flag=lambda v: v)
    # a further conditioning input (e.g. text context) is one more named model input
    ctx = Signature.from_json({**NEW, "inputs": ["x", "t", "context", *NEW["inputs"][3:]], "conditional": False})
    assert ctx.step_args({"x": "X", "t": "T", "context": "C"}, ["a", "b"], zeros=zeros, flag=lambda v: v)[:3] == ["X", "T", "C"]
    assert Signature.split_outputs(("e", "f1", "f2")) == ("e", ["f1", "f2"])
    assert Signature.split_outputs(("e",)) == ("e", None)
