#!/usr/bin/env bash
# Session 17 experiment: BiDM with DoReFa's {0,1} activation code (plain DoReFa W1A1 was the only plain W1A1
# study row with digits, and dorefa-skip reached FID 27.17). Everything else as bidm-skip's first cycle; lr 2e-4.
# Frozen code: /work/runs/code-s16 (main 5fb9c80). Resumable: rerun this script.
set -e
cd /work/runs/code-s16
export PYTHONPATH=/work/runs/code-s16-site OMP_NUM_THREADS=1
R=/work/runs/bidm01-lr2
[ -f $R/art/bqc.json ] || python3 -m bqc.cli transform mnist16 --recipe $R/bidm01-skip.toml -o $R/art
if [ -f $R/run/train/checkpoint.safetensors ]; then
  exec flock -n $R/run.lock python3 -m bqc.cli train $R/art --steps 4000 --sample-steps 100 --threads 1 -o $R/run --resume $R/run
fi
exec flock -n $R/run.lock python3 -m bqc.cli train $R/art --steps 4000 --sample-steps 100 --threads 1 -o $R/run
