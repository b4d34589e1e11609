"""The training loop: a recipe's stages, one after the other, on one process or under torchrun.

Read it top to bottom: ``train`` opens the run directory (or resumes it) and runs each stage;
``train_stage`` builds the stage's model (fresh, or the previous stage's best weights loaded by
name into this stage's model), freezes what the stage does not train, makes a fresh optimizer and
loops over epochs: train on shuffled, augmented batches, evaluate on PublicTest, log a row of
``metrics.csv``, keep the best weights, checkpoint, stop early after ``patience`` epochs without
improvement. At the end the best weights are restored (Keras ``restore_best_weights``).

Exact resume: the data order and augmentation of an epoch depend only on (seed, epoch) and the
global RNG (dropout) is re-seeded at every epoch start, so an epoch's result depends only on the
weights and optimizer state it starts from; a mid-epoch checkpoint also stores the RNG state of
every process and the number of batches done. A run killed at any point and resumed with
``resume=True`` ends with the same weights as an uninterrupted one (same device and settings).

Faults: a non-finite batch loss, or one above ``loss_explosion`` x max(ln classes, the stage's
first batch loss), ends the stage with a message and restores its best weights. SIGINT/SIGTERM
writes a checkpoint after the current batch and returns.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from ..models import create_model, freeze_except_gates, load_model, save_model, set_batchnorm_eval
from .checkpoint import (CHECKPOINT_NAME, atomic_write_text, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .distributed import Distributed, setup_distributed
from .recipe import OptimizerSettings, Recipe, Stage, parse_recipe, recipe_to_toml, tomllib

__all__ = ["TrainOptions", "TrainResult", "train", "METRIC_COLUMNS", "TIMING_COLUMNS", "EXIT_CODES"]

METRIC_COLUMNS = ("stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "improved")
TIMING_COLUMNS = ("seconds", "images_per_s")  # the only columns that differ between identical runs
EXIT_CODES = {"finished": 0, "diverged": 3, "rejected": 4, "interrupted": 130}


@dataclass
class TrainOptions:
    """How to run a recipe (none of these change what is trained, except ``bf16``)."""

    device: str = "auto"           # cpu, cuda, cuda:N or auto
    resume: bool = False           # continue the run in out_dir from its checkpoint
    bf16: bool = False             # bfloat16 autocast (CPU and CUDA)
    channels_last: bool = False
    compile: bool = False          # torch.compile the training model
    deterministic: bool = False    # torch.use_deterministic_algorithms (needed for CUDA repeatability)
    checkpoint_every: int = 0      # also checkpoint every N batches (0: epoch ends and signals only)
    progress: bool = True          # tqdm bar per epoch
    tensorboard: bool = False      # also log to out_dir/tensorboard (needs lhcnet[tensorboard])
    plot_every_s: float = 60.0     # redraw training-curves.png at most this often during a stage


@dataclass
class TrainResult:
    status: str                    # finished, diverged, rejected or interrupted
    message: str
    out_dir: Path
    stages: list[dict[str, Any]]
    final: Path | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint (plain numbers, JSON-able)."""

    stage: int = 0                 # index of the stage being trained
    epoch: int = 0                 # epochs finished in that stage
    step: int = 0                  # batches finished in the current epoch
    loss_sum: float = 0.0          # current epoch so far (global over processes)
    correct: float = 0.0
    seen: float = 0.0
    train_seconds: float = 0.0
    best: float | None = None      # best monitored value of the stage and its epoch (1-based)
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0            # epochs since the last improvement
    first_loss: float | None = None  # the stage's first batch loss (loss-explosion reference)
    start_train_loss: float | None = None  # acceptance: the previous stage's model's training loss
    results: list[dict[str, Any]] = field(default_factory=list)  # finished stages
    finished: bool = False

    def start_stage(self, index: int) -> None:
        keep = self.results
        self.__dict__.update(dataclasses.asdict(Progress(stage=index)))
        self.results = keep

    def start_epoch(self) -> None:
        self.step, self.loss_sum, self.correct, self.seen, self.train_seconds = 0, 0.0, 0.0, 0.0, 0.0


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current batch. A second SIGINT
    raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ------------------------------------------------------------------------------- run directory

class RunLog:
    """Messages (stdout + train.log), metrics.csv, TensorBoard and the curves plot; main process only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.metrics_path = out_dir / "metrics.csv"
        self.writer = None
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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


# ------------------------------------------------------------------------------- stage pieces

def model_args(stage: Stage) -> dict[str, Any]:
    """The stage's model builder arguments (TOML arrays -> tuples, e.g. ``head_hidden``)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in stage.model_args.items()}


def build_model(stage: Stage, num_classes: int, start_from: Path | None) -> nn.Module:
    """A fresh model, or this stage's model with the weights it starts from (by name): the previous
    stage's best, or the stage's ``from`` model file.

    Going from a backbone to its LHC version, only the new ``lhc.*`` weights are missing (they
    keep their random initialisation): the paper's stage-4 handover.
    """
    torch.manual_seed(derive_seed(stage.seed, stage.name, "init"))
    pretrained = stage.pretrained if stage.start == "fresh" else None
    try:
        model = create_model(stage.model, num_classes=num_classes, pretrained=pretrained, **model_args(stage))
    except TypeError as exc:
        raise ValueError(f"stage {stage.name!r}: model_args {stage.model_args} do not fit "
                         f"{stage.model!r} ({exc})") from None
    if stage.start != "fresh":
        try:
            missing, unexpected = model.load_state_dict(load_file(str(start_from)), strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise ValueError(f"stage {stage.name!r}: the starting weights ({start_from}) "
                             f"do not fit {stage.model!r}: {exc}") from None
        not_lhc = [k for k in missing if not k.startswith("lhc.")]
        if unexpected or not_lhc:
            raise ValueError(f"stage {stage.name!r}: the starting weights ({start_from}) do "
                             f"not fit {stage.model!r}: unexpected {unexpected[:3]}, missing {not_lhc[:3]}")
    return model


def set_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """``all``; ``lhc``: only the LHC blocks; ``gates``: only LHC-NetC's gates (spec §4)."""
    if trainable == "gates":
        return freeze_except_gates(model)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith("lhc."))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"trainable = {trainable!r}: this model has no such parameters")
    return params


def make_optimizer(settings: OptimizerSettings, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if settings.type == "adam":
        return torch.optim.Adam(params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov,
                           weight_decay=settings.weight_decay)


def lr_at(stage: Stage, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate of ``stage`` at (0-based) ``epoch`` and ``step``.

    ``constant`` (the paper's stages): the optimiser's lr throughout. ``cosine``: half a cosine from
    the optimiser's lr to 0 over ``max_epochs`` x ``steps_per_epoch`` steps, computed from the position
    alone, so a resumed run continues on the same curve (not in the paper: our CPU recipes' choice).
    """
    base = stage.optimizer.lr
    if stage.lr_schedule == "constant":
        return base
    progress = (epoch * steps_per_epoch + step) / (stage.max_epochs * steps_per_epoch)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_loader(images: Any, targets: Any, *, batch_size: int, size: int, train: bool, stage: Stage,
                device: torch.device, dist: Distributed) -> Any:
    """Training batches (shuffled, augmented, sharded over processes) or evaluation batches.

    ``batch_size`` is the global batch: each of the ``world_size`` processes takes its share.
    ``targets``: int labels (N,) or FER+ vote distributions (N, K).
    """
    from ..data import AugmentConfig, BatchLoader

    soft = getattr(targets, "ndim", 1) == 2
    labels = {"soft_labels": targets} if soft else {"labels": targets}
    if not train:  # evaluation: every process takes every world_size-th image, no padding
        shard = slice(dist.rank, None, dist.world_size)
        labels = {k: v[shard] for k, v in labels.items()}
        return BatchLoader(images[shard], **labels, batch_size=batch_size, size=size, device=device)
    if batch_size % dist.world_size:
        raise ValueError(f"stage {stage.name!r}: batch_size {batch_size} is not divisible by the "
                         f"{dist.world_size} processes")
    aug = stage.augment
    augment = AugmentConfig(aug.rotation, aug.shift, aug.zoom, aug.flip) if aug.enabled else None
    return BatchLoader(images, **labels, batch_size=batch_size // dist.world_size, size=size, shuffle=True,
                       augment=augment, seed=stage.seed, device=device, drop_last=False, rank=dist.rank,
                       world_size=dist.world_size)


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = y.argmax(dim=1) if y.ndim == 2 else y  # soft labels (FER+): the majority class
    return (logits.argmax(dim=1) == target).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, dist: Distributed, bf16: bool,
             channels_last: bool) -> tuple[float, float]:
    """(mean loss, accuracy) over a loader's images on all processes; model in eval mode."""
    was_training = model.training
    model.eval()
    device = dist.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        sums += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                             count_correct(logits, y).double(), torch.tensor(len(x), dtype=torch.float64, device=device)])
    dist.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------- the loop

@dataclass
class Run:
    """What every stage needs: the recipe, data, process group, run directory and options."""

    recipe: Recipe
    options: TrainOptions
    dist: Distributed
    out_dir: Path
    log: RunLog
    stop: StopRequest
    train_images: Any
    train_labels: Any
    val_images: Any
    val_labels: Any
    classes: list[str]
    last_plot: float = 0.0  # when training-curves.png was last drawn
    jpeg_images: dict[int, Any] = field(default_factory=dict)

    def training_images(self, size: int) -> Any:
        """The training images as trained on: with ``paper_jpeg`` resized to ``size``, floored and
        JPEG-coded once per run (spec §5), else the 48 px originals (resized per batch)."""
        if not self.recipe.paper_jpeg:
            return self.train_images
        if size not in self.jpeg_images:
            from ..data import paper_jpeg
            self.log.info(f"paper_jpeg: {len(self.train_images)} training images -> {size} px, floor, JPEG q100")
            self.jpeg_images[size] = paper_jpeg(self.train_images, size)
        return self.jpeg_images[size]

    def best_path(self, stage: Stage) -> Path:
        return self.out_dir / f"{stage.name}-best.safetensors"

    def save(self, progress: Progress, model: nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Checkpoint (every process calls this: the RNG states are gathered to the main one)."""
        rng = self.dist.all_gather_object(rng_state(self.dist.device))
        if self.dist.is_main:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, {
                "progress": dataclasses.asdict(progress), "rng": rng,
                "model": None if model is None else model.state_dict(),
                "optimizer": None if optimizer is None else optimizer.state_dict()})
        self.dist.barrier()

    def save_model_file(self, model: nn.Module, path: Path, info: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_model(model, path, extra={"classes": self.classes, "recipe": self.recipe.name, **info})
        self.dist.barrier()


def train(recipe: Recipe, dataset: Any, out_dir: str | Path, options: TrainOptions | None = None) -> TrainResult:
    """Run (or resume) every stage of ``recipe`` on ``dataset`` (a ``FaceDataset``), writing into
    ``out_dir``: config.toml, metrics.csv, train.log, checkpoint.pt, ``<stage>-best.safetensors``,
    final.safetensors, training-curves.png, summary.json."""
    options = options or TrainOptions()
    out_dir = Path(out_dir)
    dist = setup_distributed(options.device)
    try:
        return _train(recipe, dataset, out_dir, options, dist)
    finally:
        dist.close()


def _train(recipe: Recipe, dataset: Any, out_dir: Path, options: TrainOptions, dist: Distributed) -> TrainResult:
    if options.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if dist.is_main:
        recipe = open_run_dir(out_dir, recipe, options.resume)
    dist.barrier()

    progress, checkpoint = Progress(), None
    if options.resume and (out_dir / CHECKPOINT_NAME).exists():  # else: killed before the first one
        checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME)
        progress = Progress(**checkpoint["progress"])
        if progress.step and len(checkpoint["rng"]) != dist.world_size:
            raise ValueError(f"--resume: the checkpoint was written mid-epoch by {len(checkpoint['rng'])} "
                             f"processes; resume it with the same number (not {dist.world_size})")
    train_set, val_set = dataset.split("Training"), dataset.split("PublicTest")
    limit_train, limit_val = recipe.limit_train or len(train_set), recipe.limit_val or len(val_set)
    log = RunLog(out_dir, dist.is_main, options.tensorboard)
    run = Run(recipe, options, dist, out_dir, log, StopRequest(),
              train_images=train_set.images[:limit_train], train_labels=_labels(train_set)[:limit_train],
              val_images=val_set.images[:limit_val], val_labels=_labels(val_set)[:limit_val],
              classes=list(dataset.classes))
    try:
        log.keep_metrics_until([s.name for s in recipe.stages], progress)
        if progress.finished:
            return _finish(run, progress, "finished", "already finished")
        resuming = (f"; resuming stage {recipe.stages[progress.stage].name!r} after epoch {progress.epoch}"
                    f" (+{progress.step} batches)") if checkpoint and progress.stage < len(recipe.stages) else ""
        log.info(f"recipe {recipe.name!r}: {len(recipe.stages)} stages, {len(run.train_images)} training and "
                 f"{len(run.val_images)} validation images, {len(run.classes)} classes, device {dist.device}"
                 + (f", {dist.world_size} processes" if dist.enabled else "") + resuming)
        with run.stop:
            for index, stage in enumerate(recipe.stages):
                if index < progress.stage:
                    continue
                status, message = train_stage(run, index, stage, progress, checkpoint)
                checkpoint = None  # only the stage being resumed uses it
                log.plot()
                if status != "finished":
                    return _finish(run, progress, status, message)
            progress.finished = True
            run.save(progress)
            return _finish(run, progress, "finished", "all stages finished")
    finally:
        log.close()


def _labels(split: Any) -> Any:
    """Soft targets when the data set carries them (FER+ vote distributions, or the teachers'
    probabilities that ``scripts/distill.py`` adds), else the hard labels."""
    if split.soft_labels is not None:
        return split.soft_labels
    return split.labels


def _finish(run: Run, progress: Progress, status: str, message: str) -> TrainResult:
    final = None
    if status == "finished" and progress.results:
        last = progress.results[-1]
        final = run.out_dir / "final.safetensors"
        if run.dist.is_main:
            model = _load_best(run, run.recipe.stages[-1])
            save_model(model, final, extra={"classes": run.classes, "recipe": run.recipe.name,
                                            "val_acc": last["best_val_acc"], "val_loss": last["best_val_loss"],
                                            "stages": progress.results})
    if run.dist.is_main:
        summary = {"status": status, "message": message, "recipe": run.recipe.name, "stages": progress.results,
                   "final": None if final is None else final.name}
        atomic_write_text(run.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    run.log.info(f"{status}: {message}" + (f"; final model {final}" if final else ""))
    return TrainResult(status, message, run.out_dir, progress.results, final)


def start_weights(run: Run, index: int) -> Path | None:
    """The model file stage ``index`` starts from: none (fresh), the previous best or ``from``."""
    stage = run.recipe.stages[index]
    if stage.start == "file":
        path = Path(stage.init_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"stage {stage.name!r}: from = {stage.init_file!r}: no such model file")
        return path
    return run.best_path(run.recipe.stages[index - 1]) if stage.start == "previous" else None


def _load_best(run: Run, stage: Stage) -> nn.Module:
    model = create_model(stage.model, num_classes=len(run.classes), **model_args(stage))
    model.load_state_dict(load_file(str(run.best_path(stage))))
    return model


def train_stage(run: Run, index: int, stage: Stage, progress: Progress,
                checkpoint: dict[str, Any] | None) -> tuple[str, str]:
    """Train one stage to its early stop; returns (status, message)."""
    recipe, options, dist, log = run.recipe, run.options, run.dist, run.log
    device, main = dist.device, dist.is_main
    resuming = checkpoint is not None and checkpoint["model"] is not None
    if not resuming:
        progress.start_stage(index)
    start_from = start_weights(run, index)

    # --- model: fresh or from the previous stage; trainable subset; fresh optimizer
    model = build_model(stage, len(run.classes), start_from)
    if resuming:
        model.load_state_dict(checkpoint["model"])
    params = set_trainable(model, stage.trainable)
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(stage.optimizer, params)
    if resuming:
        optimizer.load_state_dict(checkpoint["optimizer"])
    train_model: nn.Module = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if options.compile:
        train_model = torch.compile(train_model)
    size = model.input_size

    # --- data
    loader = make_loader(run.training_images(size), run.train_labels, batch_size=stage.batch_size, size=size,
                         train=True, stage=stage, device=device, dist=dist)
    eval_batch = stage.eval_batch_size or 2 * stage.batch_size
    val_loader = make_loader(run.val_images, run.val_labels, batch_size=eval_batch, size=size, train=False,
                             stage=stage, device=device, dist=dist)
    n_params = sum(p.numel() for p in params)
    log.info(f"stage {stage.name} ({index + 1}/{len(recipe.stages)}): {stage.model} "
             f"{'fresh' if start_from is None else 'from ' + str(start_from)}"
             f"{', pretrained ' + stage.pretrained if stage.pretrained else ''}; trains {stage.trainable} "
             f"({n_params:,} parameters); {stage.optimizer.type} lr {stage.optimizer.lr:g}; batch "
             f"{stage.batch_size}; patience {stage.patience}; at most {stage.max_epochs} epochs"
             + (f"; gradient norm clipped to {stage.clip_grad_norm:g}" if stage.clip_grad_norm else "")
             + (f"; {stage.lr_schedule} lr schedule over {stage.max_epochs} epochs"
                if stage.lr_schedule != "constant" else ""))

    # --- acceptance rule (stage 4): the starting model's training loss, once per stage
    train_eval_loader = None
    if stage.acceptance is not None:  # the training images as trained on (paper: the JPEGs), unaugmented
        train_eval_loader = make_loader(run.training_images(size), run.train_labels, batch_size=eval_batch, size=size,
                                        train=False, stage=stage, device=device, dist=dist)
        if progress.start_train_loss is None:
            start_model = load_model(start_from, device)
            progress.start_train_loss, _ = evaluate(start_model, train_eval_loader, dist, options.bf16, False)
            log.info(f"stage {stage.name}: training loss of the starting model ({start_from.name}): "
                     f"{progress.start_train_loss:.4f}")
            del start_model

    # --- epochs
    for epoch in range(progress.epoch, stage.max_epochs):
        epoch_started = time.time() - progress.train_seconds
        loader.set_epoch(epoch)
        torch.manual_seed(derive_seed(stage.seed, stage.name, epoch, dist.rank))  # dropout
        skip = progress.step  # resuming mid-epoch: batches already done
        model.train()
        if stage.trainable != "all":
            set_batchnorm_eval(model)  # frozen BatchNorm runs in inference mode (TF2 trainable=False)
        bar = tqdm(total=len(loader), initial=skip, desc=f"{stage.name} epoch {epoch + 1}/{stage.max_epochs}",
                   unit="batch", leave=False, dynamic_ncols=True, disable=not (main and options.progress))
        for step, (x, y) in enumerate(loader):
            if step < skip:
                continue
            if step == skip > 0:  # resuming mid-epoch: the RNG state where the checkpoint was written
                set_rng_state(checkpoint["rng"][dist.rank], device)
            if options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
                logits = train_model(x)
            loss = F.cross_entropy(logits.float(), y)
            # one all-reduce per step: batch loss/accuracy and every process's stop request agree
            stats = dist.all_reduce_sum(torch.stack([
                loss.detach().double() * len(x), count_correct(logits.detach(), y).double(),
                torch.tensor(float(len(x)), dtype=torch.float64, device=device),
                torch.tensor(float(run.stop.signal is not None), dtype=torch.float64, device=device)]))
            batch_loss_sum, batch_correct, batch_seen, stop_flags = stats.tolist()
            batch_loss = batch_loss_sum / batch_seen
            if progress.first_loss is None:
                progress.first_loss = batch_loss
            limit = stage.loss_explosion * max(math.log(len(run.classes)), progress.first_loss)
            if not math.isfinite(batch_loss) or (stage.loss_explosion and batch_loss > limit):
                bar.close()
                what = "is not finite" if not math.isfinite(batch_loss) else \
                    f"exploded (> {stage.loss_explosion:g} x {limit / stage.loss_explosion:.4f})"
                return end_stage(run, index, stage, model, progress, "diverged",
                                 f"training loss {what}: {batch_loss} at epoch {epoch + 1} batch {step + 1}")

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(stage, epoch, step, len(loader))
            if stage.clip_grad_norm:  # gradients are already all-reduced: every process clips alike
                torch.nn.utils.clip_grad_norm_(model.parameters(), stage.clip_grad_norm)
            optimizer.step()

            progress.step = step + 1
            progress.loss_sum += batch_loss_sum
            progress.correct += batch_correct
            progress.seen += batch_seen
            bar.set_postfix(loss=f"{progress.loss_sum / progress.seen:.4f}",
                            acc=f"{progress.correct / progress.seen:.3f}", refresh=False)
            bar.update()
            interrupted = stop_flags > 0
            if interrupted or (options.checkpoint_every and progress.step % options.checkpoint_every == 0
                               and progress.step < len(loader)):
                progress.train_seconds = time.time() - epoch_started
                run.save(progress, model, optimizer)
            if interrupted:
                bar.close()
                name = signal.Signals(run.stop.signal or signal.SIGTERM).name
                return "interrupted", (f"{name}: checkpoint written at stage {stage.name} epoch {epoch + 1} "
                                       f"batch {progress.step}; continue with --resume")
        bar.close()
        train_seconds = time.time() - epoch_started

        # --- validate, log, keep the best weights, checkpoint, early stop
        val_loss, val_acc = evaluate(model, val_loader, dist, options.bf16, options.channels_last)
        value = val_acc if stage.monitor == "val_acc" else val_loss
        if not math.isfinite(value):
            return end_stage(run, index, stage, model, progress, "diverged",
                             f"validation {stage.monitor} is {value} after epoch {epoch + 1}")
        improved = progress.best is None or (value > progress.best if stage.monitor == "val_acc"
                                             else value < progress.best)
        if improved:
            progress.best, progress.best_epoch, progress.bad_epochs = value, epoch + 1, 0
            progress.best_val = {"val_acc": val_acc, "val_loss": val_loss}
            run.save_model_file(model, run.best_path(stage), {"stage": stage.name, "epoch": epoch + 1,
                                                              "val_acc": val_acc, "val_loss": val_loss})
        else:
            progress.bad_epochs += 1
        seconds = time.time() - epoch_started
        row = {"stage": stage.name, "epoch": epoch + 1, "train_loss": progress.loss_sum / progress.seen,
               "train_acc": progress.correct / progress.seen, "val_loss": val_loss, "val_acc": val_acc,
               "lr": optimizer.param_groups[0]["lr"], "improved": int(improved), "seconds": seconds,
               "images_per_s": progress.seen / max(train_seconds, 1e-9)}
        log.metrics(row, global_epoch=sum(r["epochs"] for r in progress.results) + epoch + 1)
        progress.epoch = epoch + 1
        progress.start_epoch()
        run.save(progress, model, optimizer)

        left_if_flat = min(stage.patience - progress.bad_epochs, stage.max_epochs - progress.epoch)
        log.info(f"{stage.name} epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                 f" | val loss {val_loss:.4f} acc {val_acc:.4f}{' *' if improved else ''} | {seconds:.1f} s, "
                 f"{row['images_per_s']:.0f} img/s | stage ends in {left_if_flat} epochs "
                 f"(~{format_seconds(left_if_flat * seconds)}) without improvement, at most "
                 f"{stage.max_epochs - progress.epoch} (~{format_seconds((stage.max_epochs - progress.epoch) * seconds)})")
        if options.plot_every_s and time.time() - run.last_plot > options.plot_every_s:
            log.plot()
            run.last_plot = time.time()
        if progress.bad_epochs >= stage.patience:
            return end_stage(run, index, stage, model, progress, "finished",
                             f"early stop: no improvement of {stage.monitor} for {stage.patience} epochs",
                             train_eval_loader)
    return end_stage(run, index, stage, model, progress, "finished", f"reached max_epochs = {stage.max_epochs}",
                     train_eval_loader)


def end_stage(run: Run, index: int, stage: Stage, model: nn.Module, progress: Progress, status: str,
              reason: str, train_eval_loader: Any = None) -> tuple[str, str]:
    """Restore the best weights, apply the acceptance rule, record the stage, checkpoint."""
    log = run.log
    if progress.best is None:
        log.info(f"stage {stage.name}: {reason}; no epoch finished, so there are no best weights to keep")
        return status, f"stage {stage.name}: {reason}; no best weights (nothing finished)"
    model.load_state_dict(load_file(str(run.best_path(stage))))
    result: dict[str, Any] = {"stage": stage.name, "model": stage.model, "epochs": progress.epoch,
                              "best_epoch": progress.best_epoch, "best_val_acc": progress.best_val["val_acc"],
                              "best_val_loss": progress.best_val["val_loss"], "stop": reason, "status": status}
    message = f"stage {stage.name}: {reason}; best {stage.monitor} {progress.best:.4f} at epoch " \
              f"{progress.best_epoch}, kept in {run.best_path(stage)}"
    if status == "finished" and stage.acceptance is not None and train_eval_loader is not None:
        final_loss, _ = evaluate(model, train_eval_loader, run.dist, run.options.bf16, run.options.channels_last)
        bound = progress.start_train_loss + stage.acceptance.margin
        accepted = final_loss < bound
        result["acceptance"] = {"final_train_loss": final_loss, "start_train_loss": progress.start_train_loss,
                                "margin": stage.acceptance.margin, "accepted": accepted}
        message += (f"; acceptance: final training loss {final_loss:.4f} "
                    f"{'<' if accepted else '>='} starting {progress.start_train_loss:.4f} + margin "
                    f"{stage.acceptance.margin:g} -> {'ACCEPTED' if accepted else 'REJECTED'}")
        if not accepted and stage.acceptance.on_reject == "stop":
            status = "rejected"
    result["status"] = status
    progress.results.append(result)
    progress.start_stage(index + 1)
    run.save(progress)  # the next stage starts from this stage's best file
    log.info(message)
    if status == "diverged" and stage.on_divergence == "continue":
        status = "finished"
    if status != "finished" and index + 1 < len(run.recipe.stages):
        message += f"; the run stops here (--resume continues with stage {run.recipe.stages[index + 1].name!r})"
    return status, message
