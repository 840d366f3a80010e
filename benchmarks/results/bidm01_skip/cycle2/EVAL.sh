#!/usr/bin/env bash
# Session 18: score bidm01-c2 with the command (eta 1, seeds 0 and 1) and eta 0; frozen code.
cd /work/runs/code-s18
export PYTHONPATH=/work/runs/code-s18-site OMP_NUM_THREADS=1
R=/work/runs/bidm01-c2
[ -s $R/eval-eta1.json ] || python3 -m bqc.cli eval $R/run -n 1000 --steps 100 --eta 1 --threads 1 --json > $R/eval-eta1.json 2> $R/eval-eta1.log
python3 -m bqc.cli sample $R/run -n 64 --steps 100 --eta 1 --seed 0 -o $R/samples.png > $R/sample.log 2>&1
[ -s $R/eval-eta0.json ] || python3 -m bqc.cli eval $R/run -n 1000 --steps 100 --eta 0 --threads 1 --json > $R/eval-eta0.json 2> $R/eval-eta0.log
