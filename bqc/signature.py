"""The step model's calling convention, written once: :class:`Signature`.

Every bqc graph (captured, QAT, deploy) and every lowered bundle is called the same way::

    (x, t[, context][, y], *tbs_caches, tbs_flag) -> (eps, *tbs_features)

* the *model inputs*, in order: ``x`` (the noisy image, ``input_shape`` per row), ``t`` (the
  timestep per row) and the conditioning inputs the model takes, in the order capture gives
  them: the text embedding ``context`` ``(L, D)`` per row (text-conditioned UNets) before the
  class labels ``y``. :meth:`Signature.step_args` follows ``model_inputs`` as recorded, so
  callers pass inputs by name and never rely on positions;
* the cross-timestep (TBS) *caches*, one per ``state_inputs`` entry (``name``, per-row ``shape``),
  zeros on the first sampling step, the previous step's features after;
* the scalar *flag*: 0 on the first step (the blend ignores the zero caches), 1 after;
* outputs: ``eps`` then the features the next step takes back as its caches (``state_outputs``).

:meth:`Signature.step_args` builds the positional list and :meth:`Signature.split_outputs`
splits the result: :class:`bqc.graph.BqcModel`, the QAT loop, :func:`bqc.deploy.example_inputs`
and the lowering use them. :meth:`Signature.to_json` is the one JSON form, in every manifest
(artifact ``bqc.json``, ``deploy.json``, a bundle's ``manifest.json``, ONNX ``export.json``;
``context``: ``[L, D]`` of a text-conditioned model, from the graph's ``gm.meta["bqc"]["context"]``);
:meth:`Signature.from_json` also reads the older forms (no ``state_flag``; ONNX's ``state``
block). The bundle runner (:mod:`bqc.run`, stdlib + numpy only) reads the same JSON keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

#: the JSON keys of the signature (flat, as in every manifest), in the order they are written
JSON_KEYS = ("inputs", "outputs", "input_shape", "conditional", "context", "state_inputs", "state_outputs",
             "state_flag")
#: the model inputs every UNet step takes, before its conditioning inputs
BASE_INPUTS = ("x", "t")


@dataclass(frozen=True)
class Signature:
    """A step model's inputs, TBS state and outputs (see the module docstring).

    ``model_inputs``: the per-row inputs in order (``("x", "t")``, ``("x", "t", "y")``,
    ``("x", "t", "context")``, ``("x", "t", "context", "y")``);
    ``state_inputs`` / ``state_outputs``: the TBS cache inputs and feature outputs as their JSON
    dicts (``name``, ``shape`` for inputs; ``block`` / ``node`` where recorded), in order;
    ``state_flag``: the flag input's name (None without TBS state); ``context``: the per-row
    shape ``(L, D)`` of the text embedding a text-conditioned model takes (None for other models,
    and for manifests written before it was recorded)."""

    model_inputs: tuple[str, ...] = BASE_INPUTS
    input_shape: tuple[int, ...] = ()
    conditional: bool = False
    context: tuple[int, int] | None = None
    state_inputs: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    state_outputs: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    state_flag: str | None = None

    # --- names ------------------------------------------------------------------------------
    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s["name"] for s in self.state_inputs)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every positional input name, in order: model inputs, caches, flag."""
        return self.model_inputs + self.state_names + ((self.state_flag,) if self.state_inputs else ())

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("eps",) + tuple(s["name"] for s in self.state_outputs)

    @property
    def has_state(self) -> bool:
        return bool(self.state_inputs)

    # --- the calling convention -------------------------------------------------------------
    def step_args(self, inputs: Mapping[str, Any], state: Sequence | None, *, zeros: Callable, flag: Callable,
                  error: Callable[[str], Exception] = ValueError) -> list:
        """The positional arguments ``(x, t[, context][, y], *caches, flag)`` (``model_inputs`` order).

        ``inputs``: model input name -> value (``None`` or absent for an input the model does
        not take); ``state``: the caches (the previous step's features), or ``None`` on the
        first step: then ``zeros(shape)`` makes each cache (``shape``: the per-row shape) and
        the flag is ``flag(0.0)``, else ``flag(1.0)``. ``error(message)``: the exception raised for
        a missing input or a state of the wrong length (``ValueError``; bqc passes ``BqcError``)."""
        args = []
        for name in self.model_inputs:
            v = inputs.get(name)
            if v is None:
                raise error("this model is class-conditional: pass class labels y" if name == "y"
                            else f"this model takes the input {name!r}: pass it")
            args.append(v)
        if self.state_inputs:
            if state is None:
                args += [zeros(tuple(s["shape"])) for s in self.state_inputs]
                args.append(flag(0.0))
            else:
                if len(state) != len(self.state_inputs):
                    raise error(f"state has {len(state)} tensors, the graph takes {len(self.state_inputs)}")
                args += list(state)
                args.append(flag(1.0))
        return args

    @staticmethod
    def split_outputs(outs) -> tuple[Any, list | None]:
        """``(eps, *features)`` -> ``(eps, features or None)``."""
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        return outs[0], (outs[1:] or None)

    # --- JSON (every manifest) ---------------------------------------------------------------
    def to_json(self) -> dict:
        """The flat JSON form every manifest holds (:data:`JSON_KEYS`); ``context`` is ``[L, D]``
        for a text-conditioned model, absent for others (so their manifests are unchanged)."""
        return {"inputs": list(self.inputs), "outputs": list(self.outputs),
                "input_shape": list(self.input_shape), "conditional": self.conditional,
                **({"context": list(self.context)} if self.context is not None else {}),
                "state_inputs": [_plain(s) for s in self.state_inputs],
                "state_outputs": [_plain(s) for s in self.state_outputs],
                "state_flag": self.state_flag}

    @classmethod
    def from_json(cls, d: Mapping) -> "Signature":
        """A signature from a manifest (or its ``signature`` entry): this form, or an older one
        (bqc.json before ``state_flag``: the flag is the last input; ONNX export.json's
        ``state`` block)."""
        d = dict(d["signature"] if isinstance(d.get("signature"), Mapping) else d)
        if isinstance(d.get("state"), Mapping) and "state_inputs" not in d:  # ONNX export.json
            st = d["state"]
            d.update(state_inputs=st.get("inputs") or [], state_outputs=st.get("outputs") or [],
                     state_flag=st.get("flag"))
        state_in = tuple(dict(s) for s in d.get("state_inputs") or [])
        state_out = tuple(dict(s) for s in d.get("state_outputs") or [])
        names = list(d.get("inputs") or BASE_INPUTS + (("y",) if d.get("conditional") else ()))
        flag = d.get("state_flag")
        if state_in and flag is None:  # older manifests: the flag is the last input
            flag = names[-1] if len(names) > len(state_in) + 2 else "tbs_flag"
        skip = {s["name"] for s in state_in} | ({flag} if flag else set())
        ctx = d.get("context")
        return cls(model_inputs=tuple(n for n in names if n not in skip),
                   input_shape=tuple(int(v) for v in d.get("input_shape") or ()),
                   conditional=bool(d.get("conditional")),
                   context=(int(ctx[0]), int(ctx[1])) if ctx else None, state_inputs=state_in, state_outputs=state_out,
                   state_flag=flag if state_in else None)

    # --- from a graph -----------------------------------------------------------------------
    @classmethod
    def from_meta(cls, meta: Mapping) -> "Signature":
        """The signature a graph's annotations (``gm.meta["bqc"]``, :func:`bqc.ir.graph_meta`) declare."""
        return cls.from_json(meta)

    @classmethod
    def of(cls, gm) -> "Signature":
        """The signature of a bqc graph (placeholders in order, state from its annotations)."""
        from bqc import ir

        meta = dict(ir.graph_meta(gm))
        meta["inputs"] = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        return cls.from_meta(meta)


def _plain(v):
    """JSON-ready copy (tuples -> lists) of a state entry."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v

