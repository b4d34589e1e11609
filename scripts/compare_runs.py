"""Compare training runs epoch by epoch: a Markdown table of PublicTest accuracy and training loss
per epoch from each run's ``metrics.csv`` (written by ``lhcnet train``), and optionally one PNG
with every run's curves. For runs of the same schedule (issue 14's stand-alone pair, runs cut at
different epochs): they are compared at equal epochs, not at their (unequal) best ones.

    python3 scripts/compare_runs.py docs/runs/probe-base docs/runs/standalone-lhc-ls-seed1 \
        --labels "plain host,LHC-Net (identity start)" --epochs 1,2,5,10,15,20 --png docs/figures/standalone.png
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.csv``; ``SystemExit`` naming the file if it is missing or has
    none of the trainer's columns."""
    path = run / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"compare_runs: {path}: no such file (is {run} a run folder of lhcnet train?)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"epoch", "train_loss", "val_acc"} - set(rows[0] if rows else ())
    if missing:
        raise SystemExit(f"compare_runs: {path}: expected the columns epoch, train_loss, val_acc; "
                         f"missing {', '.join(sorted(missing))}")
    return rows


def cell(rows: list[dict], epoch: int) -> str:
    """'PublicTest % (train loss)' of the epoch-th row (epochs counted over the whole run), or '–'."""
    if epoch > len(rows):
        return "–"
    row = rows[epoch - 1]
    return f"{100 * float(row['val_acc']):.2f} ({float(row['train_loss']):.3f})"


def table(runs: dict[str, list[dict]], epochs: list[int]) -> str:
    lines = ["| epoch | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {e} | " + " | ".join(cell(rows, e) for rows in runs.values()) + " |" for e in epochs]
    best = []
    for rows in runs.values():
        top = max(range(len(rows)), key=lambda i: float(rows[i]["val_acc"]))  # ties: the first
        best.append(f"{100 * float(rows[top]['val_acc']):.2f} (epoch {top + 1} of {len(rows)})")
    lines.append("| best so far | " + " | ".join(best) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lhcnet.train.plots import save_figure

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in runs.items():
        x = range(1, len(rows) + 1)
        ax_loss.plot(x, [float(r["train_loss"]) for r in rows], label=label)
        ax_acc.plot(x, [100 * float(r["val_acc"]) for r in rows], label=label)
    for ax, title in ((ax_loss, "training loss (augmented batches)"), (ax_acc, "PublicTest accuracy %")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out_png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders holding metrics.csv")
    parser.add_argument("--labels", help="comma-separated column names (default: the folder names)")
    parser.add_argument("--epochs", default="1,5,10,20", help="comma-separated epochs to tabulate")
    parser.add_argument("--png", type=Path, help="also draw every run's curves into this PNG")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"compare_runs: {len(labels)} labels for {len(args.runs)} runs")
    try:
        epochs = [int(e) for e in args.epochs.split(",")]
    except ValueError:
        raise SystemExit(f"compare_runs: --epochs takes whole numbers separated by commas, got {args.epochs!r}")
    runs = {label: read_metrics(run) for label, run in zip(labels, args.runs)}
    print(table(runs, epochs))
    if args.png:
        plot(runs, args.png)


if __name__ == "__main__":
    main()
