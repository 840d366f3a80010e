"""What bqc shows a person: progress, quiet third-party noise, and tables that fit the screen.

One home for three concerns every command shares:

* :class:`Progress`: progress of a long step on **stderr** (stdout stays clean for ``--json``).
  On a terminal a rich bar (or a spinner with the current stage when the total is unknown);
  otherwise (piped, CI logs) plain lines, one per update at most every ``every`` units
  (default: about ten lines per task), each with done/total, rate and ETA. It writes to its
  own duplicate of the stderr file descriptor, so it keeps working while :func:`quiet`
  filters the process's native stderr.
* :func:`quiet`: around third-party calls whose warnings carry no information for a bqc user
  (TVM's C++ "Fast mode segfaults ..." lines, torch.export's pytree FutureWarning), drop exactly
  those messages; ``bqc --debug`` (:func:`set_debug`) shows them again.
* :func:`show_table`: every table bqc prints stays readable at the console's width (80
  columns when piped): the full table when it fits; else without its ``optional`` columns
  (named in a note; ``--json`` has them all); else wrapped at word boundaries when no word
  or number would be cut; else one ``key: value`` block per row. Cells are never truncated.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

__all__ = ["set_debug", "debug_enabled", "quiet", "NATIVE_NOISE", "PYTHON_NOISE", "Progress", "staged",
           "Column", "show_table", "fmt_duration"]

# --------------------------------------------------------------------------------------- quiet
_STATE = {"debug": False}

#: native (C++) stderr lines dropped by :func:`quiet`: TVM 0.27 logs this once per ``take`` it
#: legalizes in "fast" mode (our gathers index in bounds by construction; the lowered model is
#: checked against the PyTorch reference)
NATIVE_NOISE = ("Fast mode segfaults when there are out-of-bounds indices",)

#: (message regex, category) of Python warnings dropped by :func:`quiet`: torch 2.13's
#: ``torch.export`` deep-copies pytree specs through a deprecated ``LeafSpec`` check
PYTHON_NOISE = ((r".*isinstance\(treespec, LeafSpec\)", FutureWarning),)


def set_debug(flag: bool) -> None:
    """``bqc --debug``: show tracebacks and the third-party warnings :func:`quiet` drops."""
    _STATE["debug"] = bool(flag)


def debug_enabled() -> bool:
    return _STATE["debug"]


@contextlib.contextmanager
def quiet(native: Sequence[str] = NATIVE_NOISE, python=PYTHON_NOISE) -> Iterator[None]:
    """Run a block with the known third-party noise dropped (nothing else): native stderr lines
    containing one of ``native`` (filtered at the file-descriptor level by
    :func:`bqc.backends.runtime.drop_native_log_lines`, since C++ writes there directly) and the
    Python warnings in ``python``. A no-op under ``--debug``. Other output of the block is
    kept; native lines come out when the block ends."""
    if _STATE["debug"]:
        yield
        return
    from bqc.backends.runtime import drop_native_log_lines

    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        for message, category in python:
            warnings.filterwarnings("ignore", message=message, category=category)
        for marker in native:
            stack.enter_context(drop_native_log_lines(marker))
        yield


# ------------------------------------------------------------------------------------ progress
def fmt_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short enough for an 80-column progress line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _stderr_file():
    """A line-buffered file on a duplicate of the current stderr descriptor (so output still
    reaches the terminal/pipe while :func:`quiet` redirects fd 2), or ``sys.stderr`` when it has
    no descriptor (e.g. captured in-process by a test)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr, False
    sys.stderr.flush()
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                     errors="replace"), True


class Progress:
    """Progress of one long step (sampling, training, lowering) on stderr; see the module
    docstring. Use as a context manager::

        with Progress("sampling 64", total=4 * 50, unit="step") as p:
            ...; p.advance(info="loss 0.12")
        with Progress("lower tvm-x86", stages=("fold", "export", ...)) as p:
            p.stage("fold")

    ``enabled=False`` (``--quiet``) shows nothing. ``every``: plain-mode lines every this many
    units (default ~10 lines per task). ``start``: units already done (a resumed run; the rate
    and ETA count only this run's). ``transient``: a terminal bar disappears when done.
    """

    def __init__(self, label: str, total: Optional[int] = None, *, unit: str = "step", enabled: bool = True,
                 every: Optional[int] = None, start: int = 0, stages: Sequence[str] = (), transient: bool = True,
                 console: Optional[Console] = None):
        self.label, self.unit, self.enabled, self.transient = label, unit, enabled, transient
        self.stages = tuple(stages)
        self.total = len(self.stages) if self.stages and total is None else total
        self.done = self.start = int(start)
        self.every = every or (max(1, math.ceil(self.total / 10)) if self.total else 1)
        self._next_line = (self.done // self.every + 1) * self.every
        self._console = console
        self._own_file = None
        self._bar = self._task = None
        self._t0 = time.perf_counter()
        self._stage_name = ""
        self.info = ""

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        if self._console is None:
            f, owned = _stderr_file()
            self._own_file = f if owned else None
            self._console = Console(file=f, highlight=False)
        self._t0 = time.perf_counter()
        if self._console.is_terminal:
            self._start_bar()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def close(self, ok: bool = True) -> None:
        """Stop the display (a plain-mode run that finished says so, with its wall time)."""
        if not self.enabled or self._console is None:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif ok and self.stages:
            self._line(f"{self.label}: done in {fmt_duration(time.perf_counter() - self._t0)}")
        if self._own_file is not None:
            self._own_file.close()
            self._own_file = None
        self._console = None

    @property
    def interactive(self) -> bool:
        return self._bar is not None

    def _start_bar(self) -> None:
        from rich import progress as rp

        if self.total and not self.stages:
            cols = [rp.TextColumn("{task.description}"), rp.BarColumn(bar_width=24), rp.MofNCompleteColumn(),
                    rp.TextColumn("{task.fields[rate]}"), rp.TextColumn("ETA"), rp.TimeRemainingColumn(),
                    rp.TextColumn("{task.fields[info]}")]
        else:  # stages take very different times: the stage and the time so far, no ETA
            cols = [rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.TimeElapsedColumn(),
                    rp.TextColumn("{task.fields[info]}")]
        self._bar = rp.Progress(*cols, console=self._console, transient=self.transient)
        self._task = self._bar.add_task(escape(self.label), total=self.total or None, completed=self.done,
                                        rate="", info="")
        self._bar.start()

    # ----------------------------------------------------------------------------- updates
    def advance(self, n: int = 1, info: str = "") -> None:
        """``n`` more units done; ``info``: a short text shown after the numbers (e.g. loss)."""
        self.update(self.done + n, info)

    def update(self, completed: int, info: str = "", force: bool = False) -> None:
        """Set the units done (a plain line when a multiple of ``every`` is crossed, at the
        end, or with ``force``)."""
        self.done, self.info = int(completed), info or self.info
        if not self.enabled or self._console is None:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self._rate_text(), info=escape(self.info))
            return
        if force or self.done >= self._next_line or (self.total and self.done >= self.total):
            self._next_line = (self.done // self.every + 1) * self.every
            self._line(self.plain_line())

    def stage(self, name: str, info: str = "") -> None:
        """Start the named stage (a staged task: ``stages`` given, or an unknown total)."""
        if self._stage_name:
            self.done = self.stages.index(self._stage_name) + 1 if self._stage_name in self.stages else self.done + 1
        self._stage_name, self.info = name, info
        if not self.enabled or self._console is None:
            return
        where = f"[{self.stages.index(name) + 1}/{len(self.stages)}] " if name in self.stages else ""
        if self._bar is not None:
            self._bar.update(self._task, description=escape(f"{self.label} {where}{name}"), info=escape(info),
                             completed=self.done)
        else:
            self._line(f"{self.label} {where}{name}" + (f" {info}" if info else "")
                       + f"  (elapsed {fmt_duration(time.perf_counter() - self._t0)})")

    # ---------------------------------------------------------------------------- formatting
    def rate(self) -> float:
        """Units per second in this run (excludes units done before ``start``)."""
        dt = time.perf_counter() - self._t0
        return (self.done - self.start) / dt if dt > 0 else 0.0

    def eta(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if self.total and r > 0 else float("nan")

    def _rate_text(self) -> str:
        r = self.rate()
        return f"{r:.3g} {self.unit}/s" if r >= 1 or r == 0 else f"{1 / r:.3g} s/{self.unit}"

    def plain_line(self) -> str:
        """``label 40/200 20% 3.1 step/s ETA 52s info``: what a non-terminal gets per update;
        the ``info`` words that do not fit the console width are left off (never cut)."""
        head = f"{self.label} {self.done}/{self.total}" if self.total else f"{self.label} {self.done}"
        if self.total:
            head += f" {100 * self.done / self.total:.0f}%"
        head += f" {self._rate_text()}"
        if self.total and self.done < self.total:
            head += f" ETA {fmt_duration(self.eta())}"
        else:
            head += f" in {fmt_duration(time.perf_counter() - self._t0)}"
        width = self._console.width if self._console is not None else 80
        return _fit_words(head, self.info.split("  ") if self.info else [], width)

    def note(self, text: str) -> None:
        """A one-off line (e.g. what the task is about to do), above a terminal bar."""
        if self.enabled and self._console is not None:
            self._line(text)

    def _line(self, text: str) -> None:
        self._console.print(escape(text), highlight=False)


def _fit_words(head: str, extras: Sequence[str], width: int) -> str:
    """``head`` plus as many of ``extras`` (in order) as fit in ``width`` columns."""
    line = head
    for e in extras:
        if len(line) + 2 + len(e) > width:
            break
        line += "  " + e
    return line


def staged(progress: Optional[Callable[[str], None]], name: str) -> None:
    """Report the start of stage ``name`` to an optional ``progress(name)`` callback (the
    hook library functions such as :func:`bqc.backends.tvm.lower.lower` take)."""
    if progress is not None:
        progress(name)


# -------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """A table column. ``numeric``: right-aligned; ``optional``: left out (and named in a
    note) when the table is too wide for the console."""

    name: str
    numeric: bool = False
    optional: bool = False


def _build(cols: Sequence[Column], rows: Sequence[Sequence[str]]) -> Table:
    # a rule under the header, no vertical lines, two columns between cells
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for c in cols:
        # overflow "fold" only acts on a word wider than its column, which the layouts
        # show_table picks never produce (numbers are single words: never wrapped, never cut)
        t.add_column(c.name, justify="right" if c.numeric else "left", overflow="fold")
    for r in rows:
        t.add_row(*(escape(str(v)) for v in r))
    return t


def _columns_width(console: Console, t: Table) -> tuple[int, int]:
    """(minimum, natural) width of a table."""
    m = Measurement.get(console, console.options.update(width=1 << 16), t)
    return m.minimum, m.maximum


def show_table(console: Console, title: str, cols: Sequence[Column], rows: Sequence[Sequence[str]], *,
               caption: Optional[str] = None, wrap: bool = True) -> str:
    """Print ``title``, a table readable at ``console.width`` and ``caption``; returns the
    layout used: ``"table"``, ``"narrow"`` (optional columns left out), ``"wrapped"`` or
    ``"vertical"`` (see the module docstring). ``wrap=False``: prefer the vertical layout to
    wrapping long text cells."""
    width = console.width
    t = _build(cols, rows)
    lo, hi = _columns_width(console, t)
    kept = [i for i, c in enumerate(cols) if not c.optional]
    narrow = _build([cols[i] for i in kept], [[r[i] for i in kept] for r in rows]) if len(kept) < len(cols) else None
    lo2, hi2 = _columns_width(console, narrow) if narrow is not None else (lo, hi)
    if hi <= width:
        layout, table = "table", t
    elif narrow is not None and (hi2 <= width or (wrap and lo2 <= width)):
        layout, table = "narrow", narrow
    elif wrap and lo <= width:
        layout, table = "wrapped", t
    else:
        layout, table = "vertical", None
    if title:
        console.print(escape(title), style="bold", highlight=False)
    if table is None:
        _vertical(console, cols, rows)
    else:
        console.print(table)
    if layout == "narrow":
        dropped = ", ".join(c.name for c in cols if c.optional)
        console.print(escape(f"({dropped} left out at {width} columns: widen the terminal or use --json)"),
                      style="dim", highlight=False)
    if caption:
        console.print(escape(caption), highlight=False)
    return layout


def _vertical(console: Console, cols: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """One block per row: the first cell as a heading, then ``key  value`` lines (values wrap
    under themselves)."""
    key_w = max(len(c.name) for c in cols[1:]) if len(cols) > 1 else 0
    for r in rows:
        console.print(escape(str(r[0])), style="bold", highlight=False)
        g = Table.grid(padding=(0, 0, 0, 2), pad_edge=True)
        g.add_column(min_width=key_w + 2, no_wrap=True, style="dim")
        g.add_column(overflow="fold")
        for c, v in zip(cols[1:], r[1:]):
            g.add_row(escape(c.name), escape(str(v)))
        console.print(g)
