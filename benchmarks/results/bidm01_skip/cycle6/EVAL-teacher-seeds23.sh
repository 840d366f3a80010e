#!/usr/bin/env bash
# Session 21: the teacher under the same command on the two extra draws (--seed 2 / 3), side by side
R=/work/runs/bidm01-c6
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
for s in 2 3; do
  [ -s $R/teacher-eta1-seed$s.json ] || python3 -m bqc.cli eval mnist16 -n 1000 --steps 100 --eta 1 --seed $s --threads 1 --json > $R/teacher-eta1-seed$s.json 2> $R/teacher-eta1-seed$s.log &
done
wait
