#!/usr/bin/env bash
# Session 19: third cosine cycle of mnist16-bidm (bidm01-skip, lr 2e-4), started from the second cycle's trained
# artifact (/work/runs/bidm01-c2/run: its EMA latent weights, which the shipped model folds), 5000 steps, new data
# order (seed 2), L_simple against the FP teacher's eps. Frozen code /work/runs/code-s19 (main 6fd4e0a). Resumable: rerun.
set -e
cd /work/runs/code-s19
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
R=/work/runs/bidm01-c3
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train /work/runs/bidm01-c2/run --steps 5000 --seed 2 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train /work/runs/bidm01-c2/run --steps 5000 --seed 2 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run
