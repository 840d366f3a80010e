#!/usr/bin/env bash
# Session 16 experiment: does DoReFa's {0,1} activation code + bqc's output skip (frozen float layers) make a W1A1
# mnist16 that generates? Frozen code: /work/runs/code-s16 (main 5fb9c80). Resumable: rerun this script.
set -e
cd /work/runs/code-s16
export PYTHONPATH=/work/runs/code-s16-site OMP_NUM_THREADS=1
R=/work/runs/dorefa-skip
[ -f $R/art/bqc.json ] || python3 -m bqc.cli transform mnist16 --recipe $R/dorefa-skip.toml -o $R/art
exec flock -n $R/run.lock python3 -m bqc.cli train $R/art --steps 4000 --sample-steps 100 --threads 1 -o $R/run
