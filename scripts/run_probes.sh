#!/bin/sh
# Issue 13's ingredient probes (recipes/fer2013_probe_<name>.toml), one after the other, each into
# runs/probe-<name>; a probe with a checkpoint is resumed (a finished one: nothing to do). Then
# `python3 scripts/ingredient_table.py runs` prints their table. On the 2-core machine, two queues
# of one core each train at ~210 img/s each (~50 min a probe), as fast as one queue on both cores:
#
#   OMP_NUM_THREADS=1 nohup scripts/run_probes.sh ../shared/data/fer2013.csv.gz base ls crop40 > runs/probes-1.log 2>&1 &
#   OMP_NUM_THREADS=1 nohup scripts/run_probes.sh ../shared/data/fer2013.csv.gz all crop44 erase > runs/probes-2.log 2>&1 &
set -eu
[ $# -ge 2 ] || { echo "usage: $0 DATA NAME... (names: base ls crop44 crop40 erase all)" >&2; exit 2; }
data=$1
shift
for name in "$@"; do
  recipe=recipes/fer2013_probe_$name.toml
  run=runs/probe-$name
  [ -f "$recipe" ] || { echo "$0: no probe recipe $recipe" >&2; exit 2; }
  if [ -f "$run/checkpoint.pt" ]; then  # a finished run: the trainer says "already finished"
    lhcnet train --out "$run" --data "$data" --resume --bf16 --channels-last --no-progress
  else
    lhcnet train --recipe "$recipe" --data "$data" --out "$run" --bf16 --channels-last --no-progress
  fi
done
