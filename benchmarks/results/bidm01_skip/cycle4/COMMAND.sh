#!/usr/bin/env bash
# Session 19: fourth cosine cycle of mnist16-bidm (bidm01-skip, lr 2e-4), started from the third cycle's trained
# artifact (/work/runs/bidm01-c3/run, EMA latent weights), 4000 steps, data order seed 3, L_simple against the FP
# teacher's eps. Frozen code /work/runs/code-s19 (main 6fd4e0a). Resumable: rerun.
set -e
cd /work/runs/bidm01-c4  # session 20: not code-s19, whose bqc/ lacks passes/ (package-dir maps bqc.passes); the frozen site has it
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
R=/work/runs/bidm01-c4
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train /work/runs/bidm01-c3/run --steps 4000 --seed 3 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train /work/runs/bidm01-c3/run --steps 4000 --seed 3 --sample-steps 100 --loss-target teacher --threads 1 -o $R/run
