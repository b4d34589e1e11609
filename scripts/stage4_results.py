"""Tabulate the stage-4 experiment (sets A and C at CPU scale) for docs/results.md.

Reads, for every run folder ``RUNS/<prefix>-<set>-seed<N>`` (sets: ``SETS``), its ``metrics.csv`` and
``summary.json`` or ``train.log`` (written by ``lhcnet train``) and the PrivateTest reports ``eval.json`` /
``eval-tta.json`` (written by ``lhcnet evaluate ... --json``), and prints Markdown: one row per run,
then mean ± sample std per set over all runs and over the runs that pass the paper's acceptance
filter (spec §4: keep a stage-4 model only if its final training loss is below the starting
network's; ``--margin`` adds a tolerance, 0 = the paper's rule as stated), then Welch's t of C - A.

    python3 scripts/stage4_results.py runs [--margin 0] [--prefix stage4-long]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

SETS = {"plain": "A: no LHC (resnet18v2_48)", "lhc": "C: with LHC (lhcnet_resnet18v2_48)",
        "lhc-ls": "C, identity start (LHC layer scale 1e-4)"}
# The trainer's last stage line (lhcnet.train.trainer.finish_stage) holds the acceptance losses.
ACCEPTANCE = re.compile(r"acceptance: final training loss ([0-9.]+) (?:<|>=) starting ([0-9.]+)")


def acceptance_losses(run: Path) -> tuple[float, float] | None:
    """(final, starting) training loss of the run's last acceptance check: from ``summary.json``
    (the trainer records it per stage) or, for runs committed without one, from ``train.log``."""
    summary = run / "summary.json"
    if summary.exists():
        checks = [s["acceptance"] for s in json.loads(summary.read_text())["stages"] if "acceptance" in s]
        if checks:
            return checks[-1]["final_train_loss"], checks[-1]["start_train_loss"]
    found = ACCEPTANCE.findall((run / "train.log").read_text()) if (run / "train.log").exists() else []
    return (float(found[-1][0]), float(found[-1][1])) if found else None


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
        "losses": acceptance_losses(run),
    }


def accepted(row: dict, margin: float) -> bool | None:
    """The paper's filter: final training loss < starting loss + margin; None if not recorded."""
    return None if row["losses"] is None else row["losses"][0] < row["losses"][1] + margin


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
    parser.add_argument("runs", type=Path, help="folder holding the stage4-<set>-seed<N> runs")
    parser.add_argument("--prefix", default="stage4",
                        help="run folders are PREFIX-<set>-seed<N> (stage4-long: the fer2013_long_stage4_* runs)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="acceptance tolerance on the training loss (default 0: the paper's rule)")
    args = parser.parse_args()
    table = {key: [run_row(p) for p in sorted(args.runs.iterdir())
                   if re.fullmatch(rf"{re.escape(args.prefix)}-{re.escape(key)}-seed\d+", p.name) and (p / "metrics.csv").exists()]
             for key in SETS}
    table = {key: rows for key, rows in table.items() if rows}

    print("| set | seed | epochs (best) | PublicTest acc % | PrivateTest acc % | PrivateTest + TTA % "
          f"| train loss start → end | accepted (margin {args.margin:g}) | train min | img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, rows in table.items():
        for r in rows:
            losses = "–" if r["losses"] is None else f"{r['losses'][1]:.4f} → {r['losses'][0]:.4f}"
            verdict = {True: "yes", False: "**no**", None: "–"}[accepted(r, args.margin)]
            print(f"| {SETS[key]} | {r['seed']} | {r['epochs']} ({r['best_epoch']}) | {pct(r['val'])} "
                  f"| {pct(r['test'])} | {pct(r['test_tta'])} | {losses} | {verdict} "
                  f"| {r['minutes']:.1f} | {r['img_s']:.0f} |")
    for title, keep in (("all runs", lambda r: True),
                        (f"accepted runs only (margin {args.margin:g})", lambda r: accepted(r, args.margin))):
        print(f"\n{title}:\n")
        print("| set | runs | PublicTest acc % | PrivateTest acc % | PrivateTest + TTA % |")
        print("|---|---|---|---|---|")
        kept = {key: [r for r in rows if keep(r)] for key, rows in table.items()}
        for key, rows in kept.items():
            print(f"| {SETS[key]} | {len(rows)} | {mean_std([r['val'] for r in rows])} "
                  f"| {mean_std([r['test'] for r in rows])} | {mean_std([r['test_tta'] for r in rows])} |")
        print()
        for key in (k for k in kept if k != "plain" and "plain" in kept):
            for column, name in (("val", "PublicTest"), ("test", "PrivateTest"), ("test_tta", "PrivateTest + TTA")):
                a = [r[column] for r in kept[key] if r[column] is not None]
                b = [r[column] for r in kept["plain"] if r[column] is not None]
                if len(a) >= 2 and len(b) >= 2:
                    diff, t = welch(a, b)
                    print(f"- {name}: {key} - plain = {100 * diff:+.2f} points (Welch t = {t:+.2f}, "
                          f"{len(a)} vs {len(b)} runs)")
                else:
                    print(f"- {name}: {key} vs plain: fewer than 2 runs in a set, no test")


if __name__ == "__main__":
    main()
