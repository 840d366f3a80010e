"""Capture + transform time of a zoo model (issue 15: LDM-4 bedrooms, 274M parameters, in <= 60 s).

Times each stage in one process at one thread: building the model, ``torch.export`` capture,
the recipe's passes, and writing the artifact (``save_artifact``: base.pt2 + safetensors + graph
text), then the whole `bqc transform` command line end to end in a subprocess. Writes
``benchmarks/results/capture_time.{json,md}`` with the command line and the load average.

    python benchmarks/capture_time.py --model ldm4-bedrooms --recipe bidm
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ldm4-bedrooms")
    p.add_argument("--recipe", default="bidm")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bqc import frontend, transform as tf

    rows = {}
    t = time.perf_counter()
    src = frontend.load_source(args.model)
    rows["build model"] = time.perf_counter() - t
    t = time.perf_counter()
    src.exported = frontend.capture(src)
    rows["capture (torch.export)"] = time.perf_counter() - t
    t = time.perf_counter()
    res = tf.transform(src, args.recipe)
    rows[f"transform ({args.recipe} passes)"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        tf.save(res, Path(d) / "art")
        rows["save artifact"] = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(["bqc", "transform", args.model, "--recipe", args.recipe, "-o", str(Path(d) / "cli"),
                        "--threads", "1"], check=True, capture_output=True)
        rows["`bqc transform` end to end (new process)"] = time.perf_counter() - t
    params = sum(v.numel() for v in src.exported.state_dict.values())
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    load = round(os.getloadavg()[0], 2)
    result = {"command": cmd, "model": args.model, "params": params, "recipe": args.recipe, "threads": 1,
              "load_avg_1m_at_end": load, "seconds": {k: round(v, 1) for k, v in rows.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_time.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"Command: `{cmd}` ({args.model}, {params / 1e6:.0f}M parameters, recipe {args.recipe}, 1 thread; "
          f"1-minute load average {load} at the end)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in rows.items()]
    (out / "capture_time.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
