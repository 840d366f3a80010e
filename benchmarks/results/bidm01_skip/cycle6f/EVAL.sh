#!/usr/bin/env bash
# Session 21: fold bidm01-c6f's run to a deploy artifact and score it with the command (eta 1, seeds 0 and 1)
# and eta 0 (seed 0); frozen code /work/runs/code-s19 (main 6fd4e0a).
set -e
R=/work/runs/bidm01-c6f
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1

[ -f $R/deploy/deploy.json ] || python3 -m bqc.cli fold $R/run -o $R/deploy
for s in 0 1; do
  [ -s $R/eval-eta1-seed$s.json ] || python3 -m bqc.cli eval $R/deploy -n 1000 --steps 100 --eta 1 --seed $s --threads 1 --json > $R/eval-eta1-seed$s.json 2> $R/eval-eta1-seed$s.log
done
[ -s $R/samples.png ] || python3 -m bqc.cli sample $R/deploy -n 64 --steps 100 --eta 1 --seed 0 -o $R/samples.png > $R/sample.log 2>&1
[ -n "$SKIP_ETA0" ] || [ -s $R/eval-eta0.json ] || python3 -m bqc.cli eval $R/deploy -n 1000 --steps 100 --eta 0 --threads 1 --json > $R/eval-eta0.json 2> $R/eval-eta0.log
