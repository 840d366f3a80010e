#!/usr/bin/env bash
# Session 20: a fifth cycle of mnist16-bidm like bidm01-c5 (from the fourth cycle's run, seed 4, teacher's eps, recipe lr 2e-4)
# but with the float layers (residual projections, time embedding; frozen by the recipe: float_lr_scale = 0) trained
# at 0.25 x the lr, and 4000 steps: does unfreezing the real-valued paths help a late cycle? Frozen code
# /work/runs/code-s19 (main 6fd4e0a) via its site install. Resumable: rerun.
set -e
R=/work/runs/bidm01-c5f
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
A="/work/runs/bidm01-c4/run --steps 4000 --seed 4 --sample-steps 100 --loss-target teacher --float-lr-scale 0.25 --threads 1 -o $R/run"
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train $A --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train $A
