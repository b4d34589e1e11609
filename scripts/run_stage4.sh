#!/bin/sh
# Issue 14's stage-4 runs from the fer2013_long backbone (recipes/fer2013_long_stage4_<set>.toml), one
# after the other, each into runs/stage4-long-<set>-seed<N>; a run with a checkpoint is resumed (a
# finished one: nothing to do), so the same command continues a queue after an interruption. Then
# `python3 scripts/stage4_results.py runs --prefix stage4-long` prints their table. Two queues of one
# core each on the 2-core machine:
#
#   OMP_NUM_THREADS=1 nohup scripts/run_stage4.sh ../shared/data/fer2013.csv.gz lhc:1 lhc_ls:1 > runs/stage4-1.log 2>&1 &
#   OMP_NUM_THREADS=1 nohup scripts/run_stage4.sh ../shared/data/fer2013.csv.gz plain:1 plain:2 plain:3 > runs/stage4-2.log 2>&1 &
set -eu
[ $# -ge 2 ] || { echo "usage: $0 DATA SET:SEED... (sets: plain lhc lhc_ls)" >&2; exit 2; }
data=$1
shift
for spec in "$@"; do
  set_name=${spec%%:*}
  seed=${spec#*:}
  recipe=recipes/fer2013_long_stage4_$set_name.toml
  run=runs/stage4-long-$(echo "$set_name" | tr _ -)-seed$seed
  [ -f "$recipe" ] || { echo "$0: no stage-4 recipe $recipe (from '$spec')" >&2; exit 2; }
  case $seed in ''|*[!0-9]*) echo "$0: '$spec': the seed after ':' must be a whole number" >&2; exit 2;; esac
  if [ -f "$run/checkpoint.pt" ]; then
    lhcnet train --out "$run" --data "$data" --resume --bf16 --channels-last --no-progress
  else
    lhcnet train --recipe "$recipe" --data "$data" --out "$run" --seed "$seed" --bf16 --channels-last --no-progress
  fi
done
