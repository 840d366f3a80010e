#!/usr/bin/env bash
# Session 21: when c6f's training (flock pid 22022) exits and c6's scoring is done: fold, score eta 1 seeds 0 and 1 side by side, then the grid.
while kill -0 22022 2>/dev/null; do sleep 20; done
R=/work/runs/bidm01-c6f
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
[ -f $R/deploy/deploy.json ] || python3 -m bqc.cli fold $R/run -o $R/deploy
while kill -0 29330 2>/dev/null; do sleep 20; done  # c6 CHAIN.sh
for s in 0 1; do
  [ -s $R/eval-eta1-seed$s.json ] || python3 -m bqc.cli eval $R/deploy -n 1000 --steps 100 --eta 1 --seed $s --threads 1 --json > $R/eval-eta1-seed$s.json 2> $R/eval-eta1-seed$s.log &
done
wait
SKIP_ETA0=1 $R/EVAL.sh > $R/eval.out 2>&1
echo "chain done $(date)"
