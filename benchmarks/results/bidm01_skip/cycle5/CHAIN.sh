#!/usr/bin/env bash
# Session 20: when c5's training (flock pid 454) exits: pause the study (SIGSTOP), fold, then score on both cores
# (eta 1 seeds 0 and 1 side by side, then the grid and eta 0 side by side), then resume the study.
while kill -0 454 2>/dev/null; do sleep 15; done
STUDY=$(pgrep -f "python3 benchmarks/replicate.py" | tr '\n' ' ')
[ -n "$STUDY" ] && kill -STOP $STUDY
R=/work/runs/bidm01-c5
cd $R
export PYTHONPATH=/work/runs/code-s19-site OMP_NUM_THREADS=1
[ -f $R/deploy/deploy.json ] || python3 -m bqc.cli fold $R/run -o $R/deploy
for s in 0 1; do
  python3 -m bqc.cli eval $R/deploy -n 1000 --steps 100 --eta 1 --seed $s --threads 1 --json > $R/eval-eta1-seed$s.json 2> $R/eval-eta1-seed$s.log &
done
wait
python3 -m bqc.cli sample $R/deploy -n 64 --steps 100 --eta 1 --seed 0 -o $R/samples.png > $R/sample.log 2>&1 &
python3 -m bqc.cli eval $R/deploy -n 1000 --steps 100 --eta 0 --threads 1 --json > $R/eval-eta0.json 2> $R/eval-eta0.log &
wait
[ -n "$STUDY" ] && kill -CONT $STUDY
echo "chain done $(date)"
