#!/usr/bin/env bash
# Session 18: second cosine cycle of the shipped mnist16-bidm (bidm01-skip, lr 2e-4, first cycle only), warm-started
# through `bqc unfold` (session 17's run folder, with its latent weights and EMA, was lost with that machine), new data
# order (seed 1), L_simple against the FP teacher's eps. Frozen code /work/runs/code-s18 (main 302aabd). Resumable: rerun.
set -e
cd /work/runs/code-s18
export PYTHONPATH=/work/runs/code-s18-site OMP_NUM_THREADS=1
R=/work/runs/bidm01-c2
[ -f $R/art/bqc.json ] || python3 -m bqc.cli unfold mnist16-bidm -o $R/art --threads 1
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train $R/art --steps 4000 --seed 1 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train $R/art --steps 4000 --seed 1 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run
