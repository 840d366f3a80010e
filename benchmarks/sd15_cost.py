"""Size and OPs of Stable Diffusion 1.5's UNet per recipe (issue 16): the table in docs/text-to-image.md.

The UNet is built from SD-1.5's configuration (LDM's v1-inference.yaml ``unet_config``; the same
859,520,964 parameters as diffusers' ``unet/config.json``) on the *meta* device: no weights are
downloaded or even allocated, because sizes and OPs depend only on shapes. The latent input is
4 x 64 x 64 (512 x 512 images) and the text embedding 77 x 768 (CLIP ViT-L/14), per sample, one
sampling step. Each recipe is applied by bqc's own pipeline (capture, annotate, plan, quantizers)
and counted by :func:`bqc.report.cost_report`, exactly as ``bqc report`` does.

    python3 benchmarks/sd15_cost.py            # writes benchmarks/results/sd15_cost.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

RECIPES = ["fp", "baseline", "binarydm", "binarydm-w1a32", "binarydm-lmb", "bidm"]
SD15 = dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
OUT = Path(__file__).parent / "results" / "sd15_cost.md"


def sd15_source():
    """SD-1.5's UNet (bqc's LDM-compatible UNetModel) on the meta device, as a bqc model source."""
    from bqc import frontend
    from bqc.models.unet import UNetModel

    with torch.device("meta"):
        m = UNetModel(**SD15)
    src = frontend._from_module(m, "config", "SD-1.5 UNet (v1-inference.yaml unet_config, meta device)")
    src.exported = frontend.capture(src)
    return src


def costs(src, recipes) -> list[dict]:
    from bqc import transform as tf
    from bqc.report import cost_report

    rows = []
    for name in recipes:
        t0 = time.time()
        res = tf.transform(src, name)
        rep = cost_report(res.gm)
        kv = rep["by_role"].get("cross-kv", {})
        rows.append({"recipe": name, "bits": f"W{res.ctx.wbits}A{res.ctx.abits}", "params": rep["params"],
                     "size_mb": rep["size_mb"], "fp32_size_mb": rep["fp32_size_mb"], "ops": rep["ops"],
                     "fp32_ops": rep["fp32_ops"], "size_saving": rep["size_saving"], "ops_saving": rep["ops_saving"],
                     "kv_mb": kv.get("size_mb", 0.0), "seconds": time.time() - t0})
        print(f"{name}: {rows[-1]['size_mb']:.1f} MiB, {rows[-1]['ops']:.4g} OPs ({rows[-1]['seconds']:.0f} s)",
              file=sys.stderr)
        del res
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# SD-1.5 UNet: size and OPs per recipe",
        "",
        f"Written by `{command}` (bqc's pipeline on SD-1.5's UNet configuration with meta-device weights;",
        "one step, per sample, latent 4x64x64, text 77x768; sizes in MiB = 2^20 bytes; OPs = BOPs/64 + FLOPs,",
        "as `bqc report` counts them, docs/recipes.md).",
        "",
        "| recipe | bits | params | size MiB | FP32 MiB | size saving | OPs | FP32 OPs | OPs saving | cross-attn K/V MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['bits']} | {r['params']:,} | {r['size_mb']:.1f} | {r['fp32_size_mb']:.1f} | "
                     f"{r['size_saving']:.1f}x | {r['ops']:.4g} | {r['fp32_ops']:.4g} | {r['ops_saving']:.1f}x | "
                     f"{r['kv_mb']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("-o", "--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    src = sd15_source()
    print(f"captured in {time.time() - t0:.0f} s", file=sys.stderr)
    rows = costs(src, args.recipes)
    cmd = "python3 benchmarks/sd15_cost.py" + ("" if args.recipes == RECIPES else " --recipes " + " ".join(args.recipes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, cmd))
    print(args.out)


if __name__ == "__main__":
    main()
