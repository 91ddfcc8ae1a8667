#!/bin/bash
# Run the v2 pre-training to its last step, niced, restarting it after interruptions (it resumes from its newest
# checkpoint: Ray's memory monitor kills workers when the shared machine runs short of memory), and score every
# checkpoint's EMA teacher on the protocol's VAL split as it appears (benchmarks/pretrain_v2_finish.py).
#
#   nohup benchmarks/pretrain_v2_run.sh [JOB.yaml] > /dev/null 2>&1 &
#
# Logs: outputs/<job name>.log (training), outputs/<job name>-val.log (VAL curve). When it ends, pick and score on
# TEST with: nice -n 19 .venv/bin/python benchmarks/pretrain_v2_finish.py --test [--ship]
set -u
cd "$(dirname "$0")/.."
JOB=${1:-jobs/pretrain-tiny-v2.yaml}
NAME=$(basename "$JOB" .yaml)
PY=.venv/bin/python
read -r STEPS STORAGE < <($PY -c "
from pipeline.train.spec import load_pretrain_spec
s = load_pretrain_spec('$JOB'); print(s.steps, s.storage)")
LAST=$(printf '%s/checkpoints/step_%07d.pt' "$STORAGE" "$STEPS")

score() { nice -n 19 $PY benchmarks/pretrain_v2_finish.py --job "$JOB" >> "outputs/$NAME-val.log" 2>&1; }

( while [ ! -e "$LAST" ]; do sleep 600; score; done ) &
WATCHER=$!
for try in $(seq 1 50); do
  echo "== $(date -u +%FT%TZ) start $try" >> "outputs/$NAME.log"
  nice -n 19 .venv/bin/skypipe pretrain "$JOB" --no-progress >> "outputs/$NAME.log" 2>&1
  [ -e "$LAST" ] && break
  sleep 120
done
kill "$WATCHER" 2> /dev/null
score
echo "== $(date -u +%FT%TZ) done: $LAST" >> "outputs/$NAME.log"
