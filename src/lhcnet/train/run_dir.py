"""The run folder: ``config.toml`` (the resolved recipe), ``train.log``, ``metrics.csv``,
TensorBoard, ``training-curves.png`` and ``summary.json``; ``.lock`` while a process trains in
it. Only the main process writes here.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..data import FaceDataset
from ..files import TEMP_PATTERN, FolderLock, atomic_write_text
from .checkpoint import CHECKPOINT_NAME
from .recipe import Recipe, load_recipe, recipe_to_toml
from .state import Progress

__all__ = ["METRIC_COLUMNS", "TIMING_COLUMNS", "run_lock", "RunLog", "open_run_dir", "write_summary",
           "remove_temp_files", "check_resumable", "data_fingerprint", "config_fingerprint",
           "fingerprint_differences"]

METRIC_COLUMNS = ("stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "improved",
                  "ema_val_loss", "ema_val_acc")  # the EMA columns stay empty without stage key ``ema``
TIMING_COLUMNS = ("seconds", "images_per_s")  # the only columns that differ between identical runs


def run_lock(out_dir: Path) -> FolderLock:
    """The lock on a run folder (``RUN/.lock``): a second process training in the same folder
    stops at once with "in use by PID n" (``lhcnet.files.FolderLock``)."""
    return FolderLock(out_dir / ".lock", f"{out_dir} is in use by PID {{pid}} (another lhcnet train "
                      "or distill); wait for it to end, or choose another --out")


def remove_temp_files(out_dir: Path) -> tuple[int, int]:
    """Delete the temp files of writes a killed process left behind (under the lock, nobody else
    writes here); returns (count, bytes)."""
    count = size = 0
    for tmp in out_dir.glob(TEMP_PATTERN):
        if tmp.is_file():
            size += tmp.stat().st_size
            tmp.unlink()
            count += 1
    return count, size


def check_resumable(out_dir: Path) -> None:
    """``--resume`` without ``checkpoint.pt``: fine if the run was killed before its first
    checkpoint; refused when the run had got further (metrics rows, best weights, a summary),
    since starting again would overwrite them."""
    if (out_dir / CHECKPOINT_NAME).exists():
        return
    found = [p.name for p in sorted(out_dir.glob("*-best.safetensors"))]
    found += [name for name in ("final.safetensors", "summary.json") if (out_dir / name).exists()]
    metrics = out_dir / "metrics.csv"
    if metrics.is_file() and len(metrics.read_bytes().splitlines()) > 1:
        found.append("metrics.csv")
    if found:
        raise FileNotFoundError(f"--resume: {out_dir / CHECKPOINT_NAME} is missing, but the run got further "
                                f"({', '.join(found)}); restore the checkpoint, or start a new run with "
                                "another --out (starting again here would overwrite them)")


def data_fingerprint(*splits: FaceDataset) -> str:
    """SHA-256 of what is trained and validated on: images, targets (soft labels if any), classes."""
    digest = hashlib.sha256()
    for split in splits:
        targets = split.soft_labels if split.soft_labels is not None else split.labels
        for array in (split.images, targets):
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
        digest.update(repr(tuple(split.classes)).encode())
    return digest.hexdigest()


def config_fingerprint(out_dir: Path) -> str:
    return hashlib.sha256((out_dir / "config.toml").read_bytes()).hexdigest()


def fingerprint_differences(started: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the fingerprint a run started with and the current one, in words."""
    differences = []
    if started.get("data") != now["data"]:
        differences.append("the data (training/validation images or labels; another --data or --limit-*?)")
    if started.get("config") != now["config"]:
        differences.append("config.toml (edited since the run started)")
    for key, value in now["options"].items():
        was = started.get("options", {}).get(key)
        if was != value:
            differences.append(f"{key} (was {was}, now {value})")
    return differences


def open_run_dir(out_dir: Path, recipe: Recipe, resume: bool) -> Recipe:
    """New run: write config.toml. Resume: the recipe must equal the run's config.toml."""
    config = out_dir / "config.toml"
    if resume:
        if not config.exists():
            raise FileNotFoundError(f"--resume: {out_dir} holds no run (no config.toml)")
        started = load_recipe(config)
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
        """On resume: drop the rows written after the checkpoint (killed between a row and the
        checkpoint), and a last line cut short (killed while appending it: also after the
        checkpoint). Anything else wrong with the file is an error naming the line: the rows
        before the checkpoint are the only record of those epochs, so nothing is "repaired"."""
        if not self.enabled or not self.metrics_path.exists():
            return
        path, columns = self.metrics_path, METRIC_COLUMNS + TIMING_COLUMNS
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); the file is damaged") from None
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines = lines[:-1]  # the row being appended when the process was killed
        rows = list(csv.reader(io.StringIO("".join(lines))))
        damaged = "The file is damaged: fix it, or move it away (it holds the metrics of the finished epochs)"
        if not rows or tuple(rows[0]) != columns:
            raise ValueError(f"{path}: line 1: expected the header {','.join(columns)}, got "
                             f"{','.join(rows[0]) if rows else 'nothing'!r}. {damaged}")
        order = {name: i for i, name in enumerate(stage_names)}
        keep = []
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != len(columns) or row[0] not in order or not row[1].isdigit():
                raise ValueError(f"{path}: line {line}: expected {len(columns)} fields starting with a stage "
                                 f"of the recipe and an epoch number, got {','.join(row)[:80]!r}. {damaged}")
            stage, epoch = order[row[0]], int(row[1])
            if stage < progress.stage or (stage == progress.stage and epoch <= progress.epoch):
                keep.append(row)
        if len(keep) + 1 != len(rows) or len(lines) != len(text.splitlines(keepends=True)):
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\r\n").writerows([columns, *keep])
            atomic_write_text(path, buffer.getvalue())

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
