"""Tabulate the stage-4 experiment (sets A and C at CPU scale) for docs/results.md.

Reads, for every run folder ``RUNS/stage4-{plain,lhc}-seed<N>``, its ``metrics.csv`` (written by
``lhcnet train``) and the PrivateTest reports ``eval.json`` / ``eval-tta.json`` (written by
``lhcnet evaluate ... --json``), and prints Markdown: one row per run, then mean ± sample std per set.

    python3 scripts/stage4_results.py runs
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

SETS = {"plain": "A: no LHC (resnet18v2_48)", "lhc": "C: with LHC (lhcnet_resnet18v2_48)"}


def accuracy(report: Path) -> float | None:
    """PrivateTest accuracy of the single model in an ``lhcnet evaluate --json`` report."""
    if not report.exists():
        return None
    return json.loads(report.read_text())["models"][0]["metrics"]["accuracy"]


def run_row(run: Path) -> dict:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    best = max(rows, key=lambda r: float(r["val_acc"]))  # ties: the first, as the trainer keeps it
    return {
        "run": run.name,
        "seed": int(re.search(r"seed(\d+)$", run.name).group(1)),
        "epochs": len(rows),
        "best_epoch": int(best["epoch"]),
        "val": float(best["val_acc"]),
        "test": accuracy(run / "eval.json"),
        "test_tta": accuracy(run / "eval-tta.json"),
        "minutes": sum(float(r["seconds"]) for r in rows) / 60,
        "img_s": statistics.fmean(float(r["images_per_s"]) for r in rows),
    }


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (n=1)"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f} (n={len(values)})"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means and Welch's t statistic."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return diff, diff / se if se else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding the stage4-{plain,lhc}-seed<N> runs")
    args = parser.parse_args()
    table = {key: [run_row(p) for p in sorted(args.runs.iterdir())
                   if re.fullmatch(rf"stage4-{key}-seed\d+", p.name) and (p / "metrics.csv").exists()]
             for key in SETS}

    print("| set | seed | epochs (best) | PublicTest acc % | PrivateTest acc % | PrivateTest + TTA % "
          "| train min | img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, rows in table.items():
        for r in rows:
            print(f"| {SETS[key]} | {r['seed']} | {r['epochs']} ({r['best_epoch']}) | {pct(r['val'])} "
                  f"| {pct(r['test'])} | {pct(r['test_tta'])} | {r['minutes']:.1f} | {r['img_s']:.0f} |")
    print()
    print("| set | runs | PublicTest acc % | PrivateTest acc % | PrivateTest + TTA % |")
    print("|---|---|---|---|---|")
    for key, rows in table.items():
        print(f"| {SETS[key]} | {len(rows)} | {mean_std([r['val'] for r in rows])} "
              f"| {mean_std([r['test'] for r in rows])} | {mean_std([r['test_tta'] for r in rows])} |")
    print()
    for column, title in (("val", "PublicTest"), ("test", "PrivateTest"), ("test_tta", "PrivateTest + TTA")):
        a = [r[column] for r in table["lhc"] if r[column] is not None]
        b = [r[column] for r in table["plain"] if r[column] is not None]
        if len(a) >= 2 and len(b) >= 2:
            diff, t = welch(a, b)
            print(f"- {title}: C - A = {100 * diff:+.2f} points (Welch t = {t:+.2f}, "
                  f"{len(a)} vs {len(b)} runs)")


if __name__ == "__main__":
    main()
