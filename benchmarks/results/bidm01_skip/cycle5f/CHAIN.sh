#!/usr/bin/env bash
# Session 20: score c5f (eta 1, seeds 0 and 1; eta 0 skipped) when its training (flock pid 4581) exits, then resume the study
while kill -0 4581 2>/dev/null; do sleep 20; done
SKIP_ETA0=1 /work/runs/bidm01-c5f/EVAL.sh > /work/runs/bidm01-c5f/eval.out 2>&1
kill -CONT 5524 5526 
echo "chain done $(date)"
