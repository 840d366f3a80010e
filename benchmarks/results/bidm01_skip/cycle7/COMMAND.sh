#!/usr/bin/env bash
# Session 21: seventh cosine cycle of mnist16-bidm (bidm01-skip, lr 2e-4 from the recipe), from the sixth cycle's trained
# run (/work/runs/bidm01-c6/run, the shipped model's run), 5000 steps, data order seed 6, L_simple against the FP teacher's
# eps, a checkpoint every 250 steps (sessions end by stopping runs). Frozen code /work/runs/code-s19 (main 6fd4e0a) via its
# site install. Resumable: rerun.
set -e
R=/work/runs/bidm01-c7
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
A="/work/runs/bidm01-c6/run --steps 5000 --seed 6 --sample-steps 100 --loss-target teacher --checkpoint-every 250 --threads 1 -o $R/run"
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train $A --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train $A
