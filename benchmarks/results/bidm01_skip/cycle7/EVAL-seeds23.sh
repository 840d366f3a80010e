#!/usr/bin/env bash
# Session 22: two more noise draws of the seventh cycle (the command with --seed 2 / 3), side by side
R=/work/runs/bidm01-c7
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
for s in 2 3; do
  [ -s $R/eval-eta1-seed$s.json ] || python3 -m bqc.cli eval $R/deploy -n 1000 --steps 100 --eta 1 --seed $s --threads 1 --json > $R/eval-eta1-seed$s.json 2> $R/eval-eta1-seed$s.log &
done
wait
