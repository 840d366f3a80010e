#!/usr/bin/env bash
# Session 17 experiment: BiDM with {0,1} activations of a learned scale (1-bit unsigned LSQ), else as bidm01-lr2
# (bidm-skip's first cycle with DoReFa's fixed {0,1} code, lr 2e-4). Frozen code: /work/runs/code-s17 (main 57976d2).
# Resumable: rerun this script.
set -e
cd /work/runs/code-s17
export PYTHONPATH=/work/runs/code-s17-site OMP_NUM_THREADS=1
R=/work/runs/bidm01lsq
[ -f $R/art/bqc.json ] || python3 -m bqc.cli transform mnist16 --recipe $R/bidm01lsq-skip.toml -o $R/art
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train $R/art --steps 4000 --sample-steps 100 --threads 1 -o $R/run --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train $R/art --steps 4000 --sample-steps 100 --threads 1 -o $R/run
