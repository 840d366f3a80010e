"""Run ``bqc ARGS`` in-process (the console entry point, exit codes included) for the CLI tests."""
from __future__ import annotations

import sys

from bqc import cli


def run_cli(args, capsys):
    """``bqc ARGS`` in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["bqc", *map(str, args)]
    cli._STATE.pop("interrupted", None)
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
