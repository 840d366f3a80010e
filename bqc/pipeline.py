"""Pass manager and recipes.

A pass is a small class (one per file in ``passes/``) modelled on torch.fx's ``PassBase``:

* ``name``: how recipes refer to it;
* ``options``: its option names and defaults (a recipe or CLI key not in here is an error that
  names the key — typos never pass silently);
* ``requires`` / ``ensures``: graph *facts* it reads / establishes. A fact is a name with a
  checker in :data:`FACTS`; the manager checks ``requires`` before the pass and runs the checker
  of every ``ensures`` fact after it, together with ``graph.lint()`` and a check that every
  node carries its annotation;
* ``run(gm, ctx) -> PassResult(gm, changed)``; what it did or skipped, per node, goes to
  ``ctx.explain(...)`` (``bqc transform --explain``).

A recipe is data: a TOML file listing passes with options (``bqc/recipes/*.toml``, or a user
file via ``--recipe path.toml``). ``extends = "other"`` inherits another recipe's passes (its own
``[[passes]]``, if any, replace them), ``[[append]]`` adds passes after them, and
``[options.PASS]`` tables override the options of the passes so far. The quantized recipes all
extend ``_quantized`` (the shared six-pass pipeline); recipes whose name starts with ``_`` are
bases, not listed by :func:`recipe_names`.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch.fx as fx

from bqc import ir
from bqc.errors import BqcError, read_text_file

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class PassResult:
    gm: fx.GraphModule
    changed: bool


@dataclass
class Explanation:
    pass_name: str
    node: str
    action: str  # e.g. "binarized", "kept fp", "skipped"
    reason: str


@dataclass
class PassContext:
    """What passes may read besides the graph: bits, recipe-level settings, explanations."""

    wbits: int = 32
    abits: int = 32
    recipe: str = "fp"
    settings: dict = field(default_factory=dict)  # recipe [settings] table (e.g. head_tail_blocks)
    explanations: list[Explanation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # said to the user after the transform (one paragraph each)
    schedule: Any = None  # the model's diffusion process (NoiseSchedule), for passes that need it

    def explain(self, pass_name: str, node: str | fx.Node, action: str, reason: str) -> None:
        name = node.name if isinstance(node, fx.Node) else node
        self.explanations.append(Explanation(pass_name, name, action, reason))


# An option's value must have its default's type (a recipe's `connections = "x"` or `keep_fp = 3` was a
# ValueError / TypeError deep inside the pass); options whose default is None check their own values.
_OPTION_TYPES = ((bool, (bool,), "true or false"), (int, (int,), "an integer"), (float, (int, float), "a number"),
                 (str, (str,), "a string"), (list, (list, tuple), "a list"), (tuple, (list, tuple), "a list"),
                 (dict, (dict,), "a table"))


def _check_option_type(pass_name: str, key: str, value: Any, default: Any) -> None:
    for kind, accepted, words in _OPTION_TYPES:
        if isinstance(default, kind):
            if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
                raise BqcError(f"pass {pass_name!r} option {key} = {value!r:.40} must be {words} "
                               f"(its default is {default!r:.40})")
            return


class Pass:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    self_checked: ClassVar[tuple[str, ...]] = ()  # options the pass validates itself (their type is not the default's)
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **opts: Any):
        unknown = set(opts) - set(self.options)
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, list(self.options), n=1)
            raise BqcError(
                f"pass {self.name!r} has no option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                hint=f"its options are: {', '.join(sorted(self.options)) or '(none)'}",
            )
        for key, value in opts.items():
            if key not in self.self_checked:
                _check_option_type(self.name, key, value, self.options[key])
        self.opts = {**self.options, **opts}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.opts.items() if self.options.get(k) != v}
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


# facts ----------------------------------------------------------------------------------------
def _check_annotated(gm: fx.GraphModule) -> str | None:
    missing = [n.name for n in gm.graph.nodes if "kind" not in n.meta.get("bqc", {})]
    return f"nodes without annotations: {missing[:5]}" if missing else None


def _check_roles(gm: fx.GraphModule) -> str | None:
    bad = [n.name for n in gm.graph.nodes
           if ir.info(n).get("kind") in ir.QUANTIZABLE_KINDS and not ir.info(n).get("role")]
    return f"layers without a role: {bad[:5]}" if bad else None


FACTS: dict[str, Callable[[fx.GraphModule], str | None]] = {
    "annotated": _check_annotated,
    "roles": _check_roles,
}


def register_fact(name: str):
    def deco(fn):
        FACTS[name] = fn
        return fn
    return deco


# registry -------------------------------------------------------------------------------------
_PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _PASSES[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[Pass]]:
    import bqc.passes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"bqc.passes.{mod.name}")
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = all_passes()
    if name not in passes:
        close = difflib.get_close_matches(name, list(passes), n=1)
        raise BqcError(
            f"unknown pass {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            hint=f"known passes: {', '.join(passes)}",
        )
    return passes[name]


# manager --------------------------------------------------------------------------------------
class PassManager:
    def __init__(self, passes: list[Pass], *, dump_dir: str | Path | None = None, check: bool = True):
        self.passes = passes
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.check = check

    def _facts(self, gm: fx.GraphModule) -> set:
        return ir.graph_meta(gm).setdefault("facts", set())

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00_input.txt").write_text(ir.dump(gm))
        for i, p in enumerate(self.passes, 1):
            missing = [f for f in p.requires if f not in self._facts(gm)]
            if missing:
                raise BqcError(f"pass {p.name!r} requires {missing} but no earlier pass establishes it",
                               hint="reorder the recipe's passes or add the pass that provides it")
            res = p.run(gm, ctx)
            gm = res.gm
            if res.changed:
                gm.graph.lint()
                gm.recompile()
            self._facts(gm).update(p.ensures)
            if self.check:
                self.verify(gm, p)
            if self.dump_dir:
                (self.dump_dir / f"{i:02d}_{p.name}.txt").write_text(ir.dump(gm))
        return gm

    def verify(self, gm: fx.GraphModule, p: Pass | None = None) -> None:
        who = f"after pass {p.name!r}" if p else "graph"
        for fact in sorted(self._facts(gm)):
            check = FACTS.get(fact)
            problem = check(gm) if check else None
            if problem:
                raise AssertionError(f"{who}: invariant {fact!r} broken: {problem}")


# recipes --------------------------------------------------------------------------------------
RECIPE_KEYS = {"name", "description", "paper", "extends", "bits", "settings", "passes", "append", "options", "train"}
SUPPORTED_BITS = {"w": (1, 2, 3, 4, 8, 32), "a": (1, 2, 3, 4, 8, 32)}


#: the keys a recipe's [train] table may set, with their type and meaning (bqc.train.qat reads them)
TRAIN_KEYS = {
    "ebb_tau": (float, "L_EBB weight tau (BinaryDM stage 1)"),
    "ebb_switch": (float, "fraction of training after which EBB drops s2; negative: never (LMB)"),
    "progressive_warmup": (float, "LMB: fraction of training over which blocks turn binary, middle outwards"),
    "tbs_gap": ((int, str), "BiDM's training gap d: an int, or \"sampler\" (T / sampling steps)"),
    "lr": (float, "peak learning rate (bqc train --lr overrides)"),
    "weight_decay": (float, "AdamW weight decay (--weight-decay overrides)"),
    "grad_clip": (float, "max global grad norm, 0 = none"),
    "lr_schedule": (str, "\"constant\" or \"cosine\" (to min_lr_ratio x lr at the last step; --lr-schedule overrides)"),
    "min_lr_ratio": (float, "cosine: the last step's lr as a fraction of the peak"),
    "float_lr_scale": (float, "lr multiplier of the float Conv/Linear layers (residual projections kept FP, time embedding); 0 freezes them"),
    "target": (str, "L_simple's target: \"true\" (the noise/v/x0, the papers) or \"teacher\" (the FP teacher's output)"),
}


def check_train_table(train: dict, where: str) -> None:
    """Refuse unknown or mistyped [train] keys (a typo would otherwise be silently ignored)."""
    for k, v in train.items():
        if k not in TRAIN_KEYS:
            close = difflib.get_close_matches(k, list(TRAIN_KEYS), n=1)
            raise BqcError(f"recipe {where}: unknown [train] key {k!r}",
                           hint=(f"did you mean {close[0]!r}? " if close else "") + "valid keys: " + ", ".join(TRAIN_KEYS))
        typ = TRAIN_KEYS[k][0]
        ok = isinstance(v, typ) or (typ is float and isinstance(v, int)) if not isinstance(v, bool) else False
        if k == "tbs_gap" and isinstance(v, str) and v != "sampler":
            ok = False
        if not ok:
            raise BqcError(f"recipe {where}: [train] {k} = {v!r} has the wrong type ({TRAIN_KEYS[k][1]})")


def ebb_switch_at(train: dict) -> float | None:
    """The fraction of training at which EBB drops s2 (``[train] ebb_switch``), or None when the
    recipe never switches (no key, or a negative value: LMB keeps both bases)."""
    v = float(train.get("ebb_switch", -1))
    return v if v >= 0 else None


_STORED_RECIPE_FIELDS = {"name": str, "description": str, "paper": str, "wbits": int, "abits": int, "settings": dict,
                         "passes": list, "train": dict}
_JSON_KINDS = {str: "string", int: "integer", list: "array", dict: "object"}


@dataclass
class Recipe:
    name: str
    description: str
    paper: str
    wbits: int
    abits: int
    settings: dict
    passes: list[tuple[str, dict]]
    train: dict

    def to_dict(self) -> dict:
        """The fully resolved recipe (what artifacts store, so they never depend on recipe files)."""
        return {"name": self.name, "description": self.description, "paper": self.paper,
                "wbits": self.wbits, "abits": self.abits, "settings": self.settings,
                "passes": [[n, o] for n, o in self.passes], "train": self.train}

    @classmethod
    def from_dict(cls, d: dict, where: str = "stored recipe") -> "Recipe":
        """A recipe as :meth:`to_dict` wrote it (an artifact's ``bqc.json``), checked as a recipe file
        is: field types, pass names, option names and types, the [train] table."""
        for key, kind in _STORED_RECIPE_FIELDS.items():
            if type(d.get(key)) is not kind:
                raise BqcError(f"{where}: its recipe's {key!r} must be a JSON {_JSON_KINDS[kind]}, not {d.get(key)!r:.40}")
        passes = []
        for item in d["passes"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)):
                raise BqcError(f"{where}: its recipe's passes must be [name, options] pairs, not {item!r:.40}")
            get_pass(item[0])(**item[1])
            passes.append((item[0], dict(item[1])))
        check_train_table(d["train"], where)
        return cls(d["name"], d["description"], d["paper"], d["wbits"], d["abits"], dict(d["settings"]), passes,
                   dict(d["train"]))

    def build(self) -> list[Pass]:
        return [get_pass(name)(**opts) for name, opts in self.passes]

    def context(self, wbits: int | None = None, abits: int | None = None) -> PassContext:
        w = self.wbits if wbits is None else wbits
        a = self.abits if abits is None else abits
        for kind, bits in (("w", w), ("a", a)):
            if bits not in SUPPORTED_BITS[kind]:
                raise BqcError(f"unsupported {kind}bits {bits}",
                               hint=f"supported: {', '.join(map(str, SUPPORTED_BITS[kind]))}")
        return PassContext(wbits=w, abits=a, recipe=self.name, settings=dict(self.settings))


def recipe_names() -> list[str]:
    """The runnable built-in recipes (``_name.toml`` files are bases other recipes extend)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml") if not p.stem.startswith("_"))


def _read_recipe(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.exists():
            raise BqcError(f"recipe file not found: {path}")
    else:
        path = RECIPE_DIR / f"{name_or_path}.toml"
        if not path.exists():
            close = difflib.get_close_matches(name_or_path, recipe_names(), n=1)
            raise BqcError(
                f"unknown recipe {name_or_path!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                hint=f"valid recipes: {', '.join(recipe_names())}; or pass a path to a .toml file",
            )
    try:
        data = tomllib.loads(read_text_file(path, "recipe"))
    except tomllib.TOMLDecodeError as e:
        raise BqcError(f"recipe {path} is not valid TOML: {e}") from e
    except RecursionError:
        raise BqcError(f"recipe {path} nests too deeply to be a real recipe") from None
    bad = set(data) - RECIPE_KEYS
    if bad:
        key = sorted(bad)[0]
        close = difflib.get_close_matches(key, sorted(RECIPE_KEYS), n=1)
        raise BqcError(f"recipe {path} has an unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                       hint=f"recipe keys are: {', '.join(sorted(RECIPE_KEYS))}")
    return data, str(path)


def load_recipe(name_or_path: str, _seen: tuple = ()) -> Recipe:
    data, where = _read_recipe(name_or_path)
    if name_or_path in _seen:
        raise BqcError(f"recipe {name_or_path!r} extends itself (cycle {' -> '.join(_seen + (name_or_path,))})")
    base = load_recipe(data["extends"], _seen + (name_or_path,)) if "extends" in data else None
    def listed(key):
        return [(p["name"], {k: v for k, v in p.items() if k != "name"}) for p in data.get(key, [])]

    passes = listed("passes")
    if base is not None and not passes:
        passes = [(n, dict(o)) for n, o in base.passes]
    passes += listed("append")
    overrides = data.get("options", {})
    for pname, opts in overrides.items():
        hits = [o for n, o in passes if n == pname]
        if not hits:
            raise BqcError(f"recipe {where}: [options.{pname}] names a pass the recipe does not run")
        for o in hits:
            o.update(opts)
    for pname, opts in passes:  # validate names and options now, not at run time
        get_pass(pname)(**opts)
    bits = {**({"w": base.wbits, "a": base.abits} if base else {"w": 32, "a": 32}), **data.get("bits", {})}
    settings = {**(base.settings if base else {}), **data.get("settings", {})}
    train = {**(base.train if base else {}), **data.get("train", {})}
    check_train_table(train, where)
    name = data.get("name", Path(name_or_path).stem)
    return Recipe(
        name=name,
        description=data.get("description", base.description if base else ""),
        paper=data.get("paper", base.paper if base else ""),
        wbits=int(bits["w"]), abits=int(bits["a"]), settings=settings, passes=passes, train=train,
    )
