#!/usr/bin/env bash
# Session 22: fold bidm01-c7's run and score it with the issue's command (eta 1), seeds 0 and 1 side by side (one per
# core; the study queue SIGSTOPped meanwhile), then the sample grid; seeds 2 / 3 with EVAL-seeds23.sh.
# Frozen code /work/runs/code-s19 (main 6fd4e0a).
set -e
R=/work/runs/bidm01-c7
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
[ -f $R/deploy/deploy.json ] || python3 -m bqc.cli fold $R/run -o $R/deploy
for s in 0 1; do
  [ -s $R/eval-eta1-seed$s.json ] || python3 -m bqc.cli eval $R/deploy -n 1000 --steps 100 --eta 1 --seed $s --threads 1 --json > $R/eval-eta1-seed$s.json 2> $R/eval-eta1-seed$s.log &
done
wait
[ -s $R/samples.png ] || python3 -m bqc.cli sample $R/deploy -n 64 --steps 100 --eta 1 --seed 0 -o $R/samples.png > $R/sample.log 2>&1
