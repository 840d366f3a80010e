#!/usr/bin/env bash
# The real-budget study of issue 11: every main row at 4000 QAT steps and 2 seeds, then the
# ablations (seed 0), from the shipped mnist16 teacher, scored with the declared sampler
# (DDIM-100, eta 1) and DDIM-100 eta 0 as the second column. One process per core; both are
# resumable (rerun this script: finished runs are skipped, unfinished ones resume from their
# last checkpoint). About 45 core-hours in all on this 2-core machine (the two output-skip rows, bqc's own, included).
#
#   bash benchmarks/study_4k.sh [OUT]          # default OUT: /work/runs/study-4k
#
# Every finished run's results (JSON, grids, training log; no weights) are also kept in KEEP
# (default: benchmarks/results/study_4k of this checkout; set KEEP=/path/to/your/checkout/...
# when running from a frozen copy) and restored from there: commit KEEP and the study survives
# the loss of OUT (a new machine); only unfinished runs are lost.
#
# Run it from a frozen copy of the code, so that edits to your checkout never change a run in
# flight (a resumed run must see the code it started with):
#   git worktree add --detach /work/runs/code-study HEAD
#   python3 -m pip install --no-deps --no-build-isolation /work/runs/code-study --target /work/runs/code-study-site
#   KEEP=$PWD/benchmarks/results/study_4k PYTHONPATH=/work/runs/code-study-site bash /work/runs/code-study/benchmarks/study_4k.sh
#   python benchmarks/replicate.py --report --out /work/runs/study-4k --keep benchmarks/results/study_4k --doc docs/RESULTS.md   # regenerate the page
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/work/runs/study-4k}
KEEP=${KEEP:-$PWD/benchmarks/results/study_4k}
mkdir -p "$OUT"
common=(--steps 4000 --seeds 0,1 -n 1000 --sample-steps 100 --main-eta 1 --eta 0 --threads 1 --out "$OUT" --keep "$KEEP")
# core 1: the W1A1 table (the slow rows), core 2: the W1A4/W1A32 table, then the ablations.
# Each chain holds a lock while it runs (flock), so rerunning this script starts only the chains
# that are not running (two processes never train one run); logs are appended across resumes.
nohup flock -n "$OUT/core1.lock" python benchmarks/replicate.py --only table-b "${common[@]}" >> "$OUT/core1.log" 2>&1 &
nohup flock -n "$OUT/core2.lock" bash -c "python benchmarks/replicate.py --only table-a ${common[*]} && \
               python benchmarks/replicate.py --only ablation ${common[*]}" >> "$OUT/core2.log" 2>&1 &
echo "started the chains not already running; logs in $OUT/core1.log and $OUT/core2.log"
