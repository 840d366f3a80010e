#!/usr/bin/env bash
# Session 20: fifth cosine cycle of mnist16-bidm (bidm01-skip, lr 2e-4 from the recipe), started from the fourth cycle's
# trained run (/work/runs/bidm01-c4/run, EMA latent weights), 5000 steps, data order seed 4, L_simple against the FP
# teacher's eps. Frozen code /work/runs/code-s19 (main 6fd4e0a) via its site install. Resumable: rerun.
set -e
R=/work/runs/bidm01-c5
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train /work/runs/bidm01-c4/run --steps 5000 --seed 4 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train /work/runs/bidm01-c4/run --steps 5000 --seed 4 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run
