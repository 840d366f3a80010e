#!/usr/bin/env bash
# Session 21: when c6's training (flock pid 16455) exits: fold and score it (eta 1, seeds 0 and 1, then the grid; eta 0 skipped).
while kill -0 16455 2>/dev/null; do sleep 20; done
SKIP_ETA0=1 /work/runs/bidm01-c6/EVAL.sh > /work/runs/bidm01-c6/eval.out 2>&1
echo "chain done $(date)"
