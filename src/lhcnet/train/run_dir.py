"""The run folder: ``config.toml`` (the resolved recipe), ``train.log``, ``metrics.csv``,
TensorBoard, ``training-curves.png`` and ``summary.json``. Only the main process writes here.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..files import atomic_write_text
from .checkpoint import CHECKPOINT_NAME
from .recipe import Recipe, parse_recipe, recipe_to_toml, tomllib
from .state import Progress

__all__ = ["METRIC_COLUMNS", "TIMING_COLUMNS", "RunLog", "open_run_dir", "write_summary"]

METRIC_COLUMNS = ("stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "improved",
                  "ema_val_loss", "ema_val_acc")  # the EMA columns stay empty without stage key ``ema``
TIMING_COLUMNS = ("seconds", "images_per_s")  # the only columns that differ between identical runs


def open_run_dir(out_dir: Path, recipe: Recipe, resume: bool) -> Recipe:
    """New run: write config.toml. Resume: the recipe must equal the run's config.toml."""
    config = out_dir / "config.toml"
    if resume:
        if not config.exists():
            raise FileNotFoundError(f"--resume: {out_dir} holds no run (no config.toml)")
        started = parse_recipe(tomllib.loads(config.read_text(encoding="utf-8")), str(config))
        if recipe_to_toml(dataclasses.replace(started, source="")) != recipe_to_toml(
                dataclasses.replace(recipe, source="")):
            ours, theirs = recipe_to_toml(recipe).splitlines(), recipe_to_toml(started).splitlines()
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(ours[1:], theirs[1:]) if a != b), "stage count")
            raise ValueError(f"--resume: the recipe differs from the one the run in {out_dir} started "
                             f"with ({diff}); resume without --recipe/--seed/--max-epochs changes")
        return recipe
    if (out_dir / CHECKPOINT_NAME).exists() or config.exists():
        raise ValueError(f"{out_dir} already holds a run; continue it with --resume or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config, recipe_to_toml(recipe))
    return recipe


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


class RunLog:
    """Messages (stdout + train.log), metrics.csv, TensorBoard and the curves plot; main process only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.metrics_path = out_dir / "metrics.csv"
        self.writer = None
        self.last_plot = 0.0  # when training-curves.png was last drawn
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("TensorBoard logging needs tensorboard: pip install 'lhcnet[tensorboard]'") from None
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        tqdm.write(message)
        with open(self.out_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def metrics(self, row: dict[str, Any], global_epoch: int) -> None:
        if not self.enabled:
            return
        new = not self.metrics_path.exists()
        with open(self.metrics_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS + TIMING_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.writer is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
                self.writer.add_scalar(key, row[key], global_epoch)
            self.writer.flush()

    def keep_metrics_until(self, stage_names: list[str], progress: Progress) -> None:
        """On resume: drop rows written after the checkpoint (killed between row and checkpoint)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        with open(self.metrics_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        order = {name: i for i, name in enumerate(stage_names)}
        keep = [r for r in rows if order[r["stage"]] < progress.stage
                or (order[r["stage"]] == progress.stage and int(r["epoch"]) <= progress.epoch)]
        with open(self.metrics_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS + TIMING_COLUMNS)
            writer.writeheader()
            writer.writerows(keep)

    def plot(self) -> None:
        if self.enabled and self.metrics_path.exists():
            from .plots import plot_training_curves
            plot_training_curves(self.metrics_path, self.out_dir / "training-curves.png")
        self.last_plot = time.time()

    def plot_every(self, seconds: float) -> None:
        """Redraw the curves when ``seconds`` have passed since the last drawing (0: never)."""
        if seconds and time.time() - self.last_plot > seconds:
            self.plot()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
