"""Stage set-up: what a run shares (``Run``) and what each stage builds before its first epoch
(``StageSetup``): the model (fresh, or the weights it starts from loaded by name), the trainable
parameters, a fresh optimiser, the learning-rate schedule, the data loaders and early stopping.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import BatchLoader, FaceDataset, paper_jpeg
from ..data.placement import fits_on_device, place_images
from ..seeds import derive_seed
from ..models import LHCNetModel, create_model, freeze_except_gates, save_model
from ..models.registry import load_weights
from .checkpoint import CHECKPOINT_NAME, rng_state, save_checkpoint
from .distributed import Distributed
from .ema import WeightEMA
from .recipe import OptimizerSettings, Recipe, Stage
from .run_dir import RunLog
from .state import EarlyStopping, Progress, StopRequest

__all__ = ["TrainOptions", "Run", "StageSetup", "setup_stage", "build_model", "set_trainable",
           "make_optimizer", "lr_at", "make_loader", "start_weights", "model_info"]


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
    force: bool = False            # resume although the data, numeric options or config.toml changed
    progress: bool = True          # tqdm bar per epoch
    tensorboard: bool = False      # also log to out_dir/tensorboard (needs lhcnet[tensorboard])
    plot_every_s: float = 60.0     # redraw training-curves.png at most this often during a stage


@dataclass
class Run:
    """What every stage needs: the recipe, data, process group, run directory and options."""

    recipe: Recipe
    options: TrainOptions
    dist: Distributed
    out_dir: Path
    log: RunLog
    stop: StopRequest
    train_set: FaceDataset        # the Training split (``limit_train`` applied)
    val_set: FaceDataset          # the PublicTest split (``limit_val`` applied)
    classes: list[str]
    fingerprint: dict[str, Any] = field(default_factory=dict)  # data, numeric options, config.toml
    placed_images: dict[int, torch.Tensor] = field(default_factory=dict)  # by size (0: the originals)

    def training_images(self, size: int) -> torch.Tensor:
        """The training images as trained on, made once per run and placed where every loader
        reads them (``data.placement``: on the device when they fit): with ``paper_jpeg`` resized
        to ``size``, floored and JPEG-coded (spec §5; on a GPU written straight into its memory),
        else the 48 px originals (resized per batch)."""
        key = size if self.recipe.paper_jpeg else 0
        if key not in self.placed_images:
            device, images = self.dist.device, self.train_set.images
            if self.recipe.paper_jpeg:
                self.log.info(f"paper_jpeg: {len(images)} training images -> {size} px, floor, JPEG q100")
                on_device = fits_on_device(len(images) * size * size, device)
                images = paper_jpeg(images, size, out=torch.empty((len(images), size, size), dtype=torch.uint8,
                                                                  device=device if on_device else "cpu"))
            self.placed_images[key] = place_images(images, device)
        return self.placed_images[key]

    def best_path(self, stage: Stage) -> Path:
        return self.out_dir / f"{stage.name}-best.safetensors"

    def ema_path(self, stage: Stage) -> Path:
        """The best epoch of the stage's moving average of the weights (stage key ``ema``)."""
        return self.out_dir / f"{stage.name}-ema.safetensors"

    def save(self, progress: Progress, setup: StageSetup | None = None) -> None:
        """Checkpoint (every process calls this: the RNG states are gathered to the main one)."""
        rng = self.dist.all_gather_object(rng_state(self.dist.device))
        if self.dist.is_main:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, {
                "progress": dataclasses.asdict(progress), "rng": rng, "fingerprint": self.fingerprint,
                "model": None if setup is None else setup.model.state_dict(),
                "optimizer": None if setup is None else setup.optimizer.state_dict(),
                "early_stopping": None if setup is None else setup.early_stopping.state_dict(),
                "ema": None if setup is None or setup.ema is None else setup.ema.state_dict(),
                "ema_stopping": None if setup is None or setup.ema is None else setup.ema_stopping.state_dict()})
        self.dist.barrier()

    def save_model_file(self, model: nn.Module, path: Path, info: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_model(model, path, extra={"classes": self.classes, "recipe": self.recipe.name, **info})
        self.dist.barrier()


@dataclass
class StageSetup:
    """One stage, ready to train."""

    stage: Stage
    index: int
    model: LHCNetModel            # the weights (saved, evaluated)
    train_model: nn.Module        # what the batches go through: the model, or its DDP/compiled wrapper
    params: list[nn.Parameter]    # the trainable ones
    optimizer: torch.optim.Optimizer
    loader: BatchLoader           # shuffled, augmented training batches
    val_loader: BatchLoader       # PublicTest
    train_eval_loader: BatchLoader | None  # acceptance rule: the training images, unaugmented
    early_stopping: EarlyStopping
    start_from: Path | None       # the model file the stage starts from (None: fresh)
    ema: WeightEMA | None = None  # stage key ``ema``: the moving average of the weights ...
    ema_stopping: EarlyStopping | None = None  # ... and its best epoch (``<stage>-ema.safetensors``)


def setup_stage(run: Run, index: int, checkpoint: dict[str, Any] | None) -> StageSetup:
    """Build stage ``index``; with a ``checkpoint`` of this stage, restore its model, optimiser and
    early-stopping state."""
    stage, device, options = run.recipe.stages[index], run.dist.device, run.options
    start_from = start_weights(run, index)
    model = build_model(stage, len(run.classes), start_from)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    params = set_trainable(model, stage.trainable)
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(stage.optimizer, params)
    early_stopping = EarlyStopping(stage.monitor, stage.patience)
    ema = WeightEMA(model, stage.ema) if stage.ema else None
    ema_stopping = EarlyStopping(stage.monitor, stage.max_epochs + 1) if stage.ema else None  # never stops
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        early_stopping.load_state_dict(checkpoint["early_stopping"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
            ema_stopping.load_state_dict(checkpoint["ema_stopping"])
    train_model: nn.Module = model
    if run.dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if options.compile:
        train_model = torch.compile(train_model)  # (check_compile: before the run starts)

    size, eval_batch = model.input_size, stage.eval_batch_size or 2 * stage.batch_size
    train_images, train_targets = run.training_images(size), targets(run.train_set)
    layout = {"channels_last": options.channels_last}
    loader = make_loader(train_images, train_targets, batch_size=stage.batch_size, size=size, train=True,
                         stage=stage, dist=run.dist, **layout)
    val_loader = make_loader(run.val_set.images, targets(run.val_set), batch_size=eval_batch, size=size,
                             train=False, stage=stage, dist=run.dist, **layout)
    train_eval_loader = None
    if stage.acceptance is not None:  # the training images as trained on (paper: the JPEGs), unaugmented
        train_eval_loader = make_loader(train_images, train_targets, batch_size=eval_batch, size=size,
                                        train=False, stage=stage, dist=run.dist, **layout)
    return StageSetup(stage, index, model, train_model, params, optimizer, loader, val_loader,
                      train_eval_loader, early_stopping, start_from, ema, ema_stopping)


def model_info(stage: Stage) -> dict[str, Any]:
    """What the stage's model files record for evaluation (``lhcnet.tta``): the training crop
    (px of the 48-px face, 0: none) and the TTA matched to the stage's augmentation."""
    return {"crop": stage.augment.crop, "tta": stage.model_tta}


def targets(split: FaceDataset) -> np.ndarray:
    """Soft targets when the data set carries them (FER+ vote distributions, or the teachers'
    probabilities of ``lhcnet distill``), else the hard labels."""
    return split.soft_labels if split.soft_labels is not None else split.labels


def model_args(stage: Stage) -> dict[str, Any]:
    """The stage's model builder arguments (TOML arrays -> tuples, e.g. ``head_hidden``)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in stage.model_args.items()}


def build_model(stage: Stage, num_classes: int, start_from: Path | None) -> LHCNetModel:
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
            missing, unexpected = model.load_state_dict(load_weights(start_from), strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise ValueError(f"stage {stage.name!r}: the starting weights ({start_from}) "
                             f"do not fit {stage.model!r}: {exc}") from None
        not_lhc = [k for k in missing if not k.startswith("lhc.")]
        if unexpected or not_lhc:
            raise ValueError(f"stage {stage.name!r}: the starting weights ({start_from}) do "
                             f"not fit {stage.model!r}: unexpected {unexpected[:3]}, missing {not_lhc[:3]}")
    return model


def start_weights(run: Run, index: int) -> Path | None:
    """The model file stage ``index`` starts from: none (fresh), the previous best or ``from``."""
    stage = run.recipe.stages[index]
    if stage.start == "file":
        path = Path(stage.init_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"stage {stage.name!r}: from = {stage.init_file!r}: no such model file "
                                    f"(a relative path is taken from the recipe's folder; recipe {run.recipe.source})")
        return path
    if stage.start == "fresh":
        return None
    previous = run.recipe.stages[index - 1]
    if not run.best_path(previous).is_file():
        raise FileNotFoundError(f"stage {stage.name!r} starts from the best weights of stage {previous.name!r}, "
                                f"but {run.best_path(previous)} does not exist (did {previous.name!r} diverge "
                                "before its first epoch ended?)")
    return run.best_path(previous)


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
    ``warmup_epochs`` W > 0 (not in the paper): the first ``n_w = W x steps_per_epoch`` steps rise
    linearly, lr x (t + 1) / n_w at global step t, then the schedule runs over the remaining steps
    (the cosine from lr at step n_w to 0 at the end). W >= max_epochs: warm-up only.
    """
    base = stage.optimizer.lr
    t, warmup = epoch * steps_per_epoch + step, stage.warmup_epochs * steps_per_epoch
    if t < warmup:
        return base * (t + 1) / warmup
    if stage.lr_schedule == "constant":
        return base
    progress = (t - warmup) / (stage.max_epochs * steps_per_epoch - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_loader(images: np.ndarray | torch.Tensor, targets: np.ndarray, *, batch_size: int, size: int,
                train: bool, stage: Stage, dist: Distributed, channels_last: bool = False) -> BatchLoader:
    """Training batches (shuffled, augmented, sharded over processes) or evaluation batches.

    ``batch_size`` is the global batch: each of the ``world_size`` processes takes its share.
    ``targets``: int labels (N,) or FER+ vote distributions (N, K). ``images`` are used in place
    (``Run.training_images``: on the device when they fit).
    """
    labels = {"soft_labels": targets} if targets.ndim == 2 else {"labels": targets}
    if not train:  # evaluation: every process takes every world_size-th image, no padding
        shard = slice(dist.rank, None, dist.world_size)
        labels = {k: v[shard] for k, v in labels.items()}
        return BatchLoader(images[shard], **labels, batch_size=batch_size, size=size, device=dist.device,
                           channels_last=channels_last, crop=stage.augment.crop)  # a model trained on crops: its centre crop
    if batch_size % dist.world_size:
        raise ValueError(f"stage {stage.name!r}: batch_size {batch_size} is not divisible by the "
                         f"{dist.world_size} processes")
    return BatchLoader(images, **labels, batch_size=batch_size // dist.world_size, size=size, shuffle=True,
                       augment=stage.augment, seed=stage.seed, device=dist.device, drop_last=False, rank=dist.rank,
                       world_size=dist.world_size, channels_last=channels_last)
