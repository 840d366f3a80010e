#!/usr/bin/env bash
# Session 21: sixth cycle on the float-lr lineage: from the fifth-cycle variant c5f (/work/runs/bidm01-c5f/run: float
# layers at 0.25 x lr, 4000 steps; FID 20.65 at eta 1 seed 0 against c5's 21.18), again with --float-lr-scale 0.25,
# 4000 steps, data order seed 5, L_simple against the FP teacher's eps. Frozen code /work/runs/code-s19 (main 6fd4e0a)
# via its site install. Resumable: rerun.
set -e
R=/work/runs/bidm01-c6f
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
A="/work/runs/bidm01-c5f/run --steps 4000 --seed 5 --sample-steps 100 --loss-target teacher --float-lr-scale 0.25 --threads 1 -o $R/run"
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train $A --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train $A
