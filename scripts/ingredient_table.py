"""Issue 13's ingredient table for docs/results.md: each 20-epoch probe of recipes/fer2013_long.toml.

Each probe (``recipes/fer2013_probe_<name>.toml``) differs from ``fer2013_probe_base`` in one
ingredient (``all``: every one); this prints, per probe run ``RUNS/probe-<name>``, the best
PublicTest accuracy of the weights and of their EMA (``metrics.csv`` columns ``val_acc`` and
``ema_val_acc``), the epoch, and the difference from the base. Train the probes first with
``scripts/run_probes.sh`` (resumes; two queues of one core each train two probes
in ~50 min, as fast as one probe on both cores):

    OMP_NUM_THREADS=1 scripts/run_probes.sh fer2013.csv.gz base ls crop40 &
    OMP_NUM_THREADS=1 scripts/run_probes.sh fer2013.csv.gz all crop44 erase; wait
    python3 scripts/ingredient_table.py runs
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

PROBES = {"base": "base: SGD Nesterov, warm-up + cosine, weight decay, flips, rotation/shift/zoom",
          "ls": "+ label smoothing 0.1", "crop44": "+ random 44-px crops (ten-crop TTA)",
          "crop40": "+ random 40-px crops", "erase": "+ random erasing (p 0.5)",
          "all": "+ label smoothing, 44-px crops, erasing (= fer2013_long)"}


def best(rows: list[dict], column: str) -> tuple[float, int] | None:
    """Highest value of ``column`` and its epoch (the first, on ties); None if never recorded."""
    values = [(float(r[column]), int(r["epoch"])) for r in rows if r.get(column) not in (None, "")]
    return max(values, key=lambda v: (v[0], -v[1])) if values else None


def cell(value: tuple[float, int] | None) -> str:
    return "–" if value is None else f"{100 * value[0]:.2f} ({value[1]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding the probe-<name> runs")
    args = parser.parse_args()
    results = {}
    for name in PROBES:
        metrics = args.runs / f"probe-{name}" / "metrics.csv"
        if metrics.exists():
            rows = list(csv.DictReader(metrics.open()))
            results[name] = (len(rows), best(rows, "val_acc"), best(rows, "ema_val_acc"))
    top = {name: max(v[0] for v in bests if v is not None) for name, (_, *bests) in results.items()}
    print("| probe | ingredient | epochs | PublicTest % (epoch) | EMA PublicTest % (epoch) | vs base (points) |")
    print("|---|---|---|---|---|---|")
    for name, (epochs, plain, ema) in results.items():
        delta = "–" if "base" not in top or name == "base" else f"{100 * (top[name] - top['base']):+.2f}"
        print(f"| {name} | {PROBES[name]} | {epochs} | {cell(plain)} | {cell(ema)} | {delta} |")


if __name__ == "__main__":
    main()
