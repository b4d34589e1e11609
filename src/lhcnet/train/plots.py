"""``training-curves.png``: loss and accuracy per epoch from a run's ``metrics.csv``, stages marked."""
from __future__ import annotations

import csv
from pathlib import Path

from ..files import atomic_write

__all__ = ["plot_training_curves", "save_figure"]


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Two panels (loss, accuracy), train and validation, x = epochs over the whole run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    x = list(range(1, len(rows) + 1))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "acc", "accuracy")):
        ax.plot(x, [float(r[f"train_{metric}"]) for r in rows], label="train", color="tab:blue")
        ax.plot(x, [float(r[f"val_{metric}"]) for r in rows], label="validation (PublicTest)", color="tab:orange")
        best = [i for i, r in zip(x, rows) if r["improved"] == "1"]
        ax.scatter(best, [float(rows[i - 1][f"val_{metric}"]) for i in best], s=12, color="tab:orange",
                   zorder=3, label="improved (kept as best)")
        starts = [0] + [i for i in range(1, len(rows)) if rows[i]["stage"] != rows[i - 1]["stage"]]
        for start, end in zip(starts, starts[1:] + [len(rows)]):  # rows[start:end] is one stage
            ax.text((start + 1 + end) / 2, 1.0, rows[start]["stage"], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8)
            if start:
                ax.axvline(start + 0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("epoch (whole run)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str | Path) -> Path:
    """Lay out ``fig``, write it to ``out_png`` atomically (PNG, 100 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
