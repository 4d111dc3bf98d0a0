#!/bin/bash
# A/B of two checkouts of dist-train under mpirun -n 2, interleaved with the no-sync peer:
#   git worktree add /tmp/before <rev>; scripts/ab_versions.sh /tmp/before mlp 605 8
# prints samples/s and per-step data / compute / exchange / wait ms of each run.
set -u
OLD=$1; W=${2:-mlp}; STEPS=${3:-605}; REPS=${4:-5}
NEW=$(cd "$(dirname "$0")/.." && pwd)
PY=$NEW/.venv/bin/python
MPI="$NEW/.venv/bin/mpirun -n 2 --bind-to none $([ "$(id -u)" = 0 ] && echo --allow-run-as-root)"
for i in $(seq "$REPS"); do
  for v in old new; do
    d=$OLD; [ $v = new ] && d=$NEW
    out=$(mktemp -d)/run
    (cd "$d" && $MPI $PY launchers/mpi.py conf/bench_$W.yaml --out "$out" --set train.max_steps=$STEPS \
      --set train.epochs=1000 --set data.eval_fraction=0.01 >/dev/null 2>&1)
    $PY -c "import json;s=json.load(open('$out/summary.json'));t=s['seconds_mean_over_workers'];n=s['steps_run']-1;print('$v', round(s['steady_samples_per_sec']), 'data %.3f compute %.3f comm %.3f wait %.3f ms' % tuple(1000*t[k]/n for k in ('data','compute','comm','wait')))"
    rm -rf "$(dirname "$out")"
  done
  (cd "$NEW" && $MPI $PY scripts/peers/mpi_ref.py conf/bench_$W.yaml --mode nosync --steps $((STEPS-5)) 2>/dev/null \
    | tail -1 | $PY -c "import json,sys;print('nosync', round(json.loads(sys.stdin.read())['steady_samples_per_sec']))")
done
