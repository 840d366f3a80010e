#!/usr/bin/env bash
# Session 21: when c5f's training (flock pid 16459) exits: score it (eta 1, seeds 0 and 1), then start the study queue on this core.
while kill -0 16459 2>/dev/null; do sleep 20; done
SKIP_ETA0=1 /work/runs/bidm01-c5f/EVAL.sh > /work/runs/bidm01-c5f/eval.out 2>&1
echo "eval done $(date)"
nohup /work/runs/QUEUE-core2.sh >> /work/runs/queue-core2.out 2>&1 &
echo "chain done $(date)"
