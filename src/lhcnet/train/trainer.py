"""The training loop: a recipe's stages, one after the other, on one process or under torchrun.

Read it top to bottom: ``train`` opens the run directory (or resumes it) and runs each stage;
``train_stage`` sets the stage up (``setup.py``: model, trainable parameters, fresh optimiser,
loaders) and loops over epochs: train on shuffled, augmented batches (``train_epoch``), evaluate
on PublicTest, log a row of ``metrics.csv``, keep the best weights, checkpoint, stop early after
``patience`` epochs without improvement (``EarlyStopping``). ``finish_stage`` restores the best
weights (Keras ``restore_best_weights``), applies the acceptance rule and records the stage.

Exact resume: the data order and augmentation of an epoch depend only on (seed, epoch) and the
global RNG (dropout) is re-seeded at every epoch start, so an epoch's result depends only on the
weights and optimizer state it starts from; a mid-epoch checkpoint also stores the RNG state of
every process and the number of batches done. A run killed at any point and resumed with
``resume=True`` ends with the same weights as an uninterrupted one (same device and settings).

Faults: a non-finite batch loss, or one above ``loss_explosion`` x max(ln classes, the stage's
first batch loss), raises ``Diverged``: the stage ends and keeps its best weights. SIGINT/SIGTERM
writes a checkpoint after the current batch and raises ``Interrupted``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import BatchLoader, FaceDataset
from ..evaluate import model_outputs
from ..seeds import derive_seed
from ..models import LHCNetModel, create_model, load_model, save_model, set_batchnorm_eval
from ..models.registry import load_weights
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, set_rng_state
from .distributed import Distributed, setup_distributed
from .preflight import check_before_training
from .recipe import Recipe, Stage
from .run_dir import (METRIC_COLUMNS, TIMING_COLUMNS, run_lock, RunLog, check_resumable, config_fingerprint,
                      data_fingerprint, fingerprint_differences, open_run_dir, remove_temp_files, write_summary)
from .setup import Run, StageSetup, TrainOptions, lr_at, model_args, model_info, setup_stage
from .state import Diverged, Interrupted, Progress, StopRequest

__all__ = ["TrainOptions", "TrainResult", "train", "METRIC_COLUMNS", "TIMING_COLUMNS", "EXIT_CODES"]

EXIT_CODES = {"finished": 0, "diverged": 3, "rejected": 4, "interrupted": 130}


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


def train(recipe: Recipe, dataset: FaceDataset, out_dir: str | Path,
          options: TrainOptions | None = None) -> TrainResult:
    """Run (or resume) every stage of ``recipe`` on ``dataset``, writing into ``out_dir``:
    config.toml, metrics.csv, train.log, checkpoint.pt, ``<stage>-best.safetensors``,
    final.safetensors, training-curves.png, summary.json."""
    options = options or TrainOptions()
    out_dir = Path(out_dir)
    dist = setup_distributed(options.device)
    try:
        return _train(recipe, dataset, out_dir, options, dist)
    finally:
        dist.close()


def _train(recipe: Recipe, dataset: FaceDataset, out_dir: Path, options: TrainOptions,
           dist: Distributed) -> TrainResult:
    if options.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size batches: the fastest convolutions, found once
    train_set, val_set = (_first(_split(dataset, name), limit) for name, limit in
                          (("Training", recipe.limit_train), ("PublicTest", recipe.limit_val)))
    check_before_training(recipe, len(train_set), dist.device, options.compile, options.resume)
    with run_lock(out_dir) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            recipe = open_run_dir(out_dir, recipe, options.resume)
        dist.barrier()
        log = RunLog(out_dir, dist.is_main, options.tensorboard)
        run = Run(recipe, options, dist, out_dir, log, StopRequest(), train_set, val_set, list(dataset.classes),
                  fingerprint={"data": data_fingerprint(train_set, val_set), "config": config_fingerprint(out_dir),
                               "options": {"--bf16": options.bf16, "--channels-last": options.channels_last,
                                           "--compile": options.compile, "--deterministic": options.deterministic,
                                           "device": dist.device.type, "processes": dist.world_size}})
        try:
            progress, checkpoint = _resume_point(run) if options.resume else (Progress(), None)
            return _run_stages(run, progress, checkpoint)
        finally:
            log.close()


def _split(dataset: FaceDataset, name: str) -> FaceDataset:
    split = dataset.split(name)
    if not len(split):
        raise ValueError(f"{dataset.source or 'the data set'}: no {name} rows; training needs Training rows to "
                         "learn from and PublicTest rows to validate on (FER2013's Usage column)")
    return split


def _resume_point(run: Run) -> tuple[Progress, dict[str, Any] | None]:
    """The progress and checkpoint ``--resume`` continues from, after checking it may: the
    checkpoint matches the recipe, the data and the numeric options (unless ``force``)."""
    out_dir, recipe, dist = run.out_dir, run.recipe, run.dist
    if dist.is_main:
        count, size = remove_temp_files(out_dir)
        if count:
            run.log.info(f"removed {count} temp files ({size / 2**20:.1f} MB) left by a killed run")
    check_resumable(out_dir)
    if not (out_dir / CHECKPOINT_NAME).exists():  # killed before the first checkpoint: start afresh
        return Progress(), None
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME)
    try:
        progress = Progress(**checkpoint["progress"])
        started = checkpoint["fingerprint"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME}: not a training checkpoint ({exc})") from None
    stages = len(recipe.stages)
    if not (0 <= progress.stage <= stages and len(progress.results) == progress.stage
            and (progress.stage == stages or 0 <= progress.epoch <= recipe.stages[progress.stage].max_epochs)):
        raise ValueError(f"{out_dir / CHECKPOINT_NAME}: progress (stage {progress.stage + 1}, epoch "
                         f"{progress.epoch}, {len(progress.results)} stages recorded) does not fit the "
                         f"{stages}-stage recipe; the checkpoint is damaged or from another run")
    if progress.step and len(checkpoint["rng"]) != dist.world_size:
        raise ValueError(f"--resume: the checkpoint was written mid-epoch by {len(checkpoint['rng'])} "
                         f"processes; resume it with the same number (not {dist.world_size})")
    differences = fingerprint_differences(started, run.fingerprint)
    if differences and not run.options.force:
        raise ValueError(f"--resume: the run in {out_dir} started with other settings: {'; '.join(differences)}. "
                         "Resume with the same data and options, or add --force to continue anyway")
    if differences:
        run.log.info(f"--force: continuing although these differ from the run's start: {'; '.join(differences)}")
    return progress, checkpoint


def _run_stages(run: Run, progress: Progress, checkpoint: dict[str, Any] | None) -> TrainResult:
    recipe, log, dist = run.recipe, run.log, run.dist
    log.keep_metrics_until([s.name for s in recipe.stages], progress)
    if progress.finished:
        return _finish(run, progress, "finished", "already finished")
    resuming = (f"; resuming stage {recipe.stages[progress.stage].name!r} after epoch {progress.epoch}"
                f" (+{progress.step} batches)") if checkpoint and progress.stage < len(recipe.stages) else ""
    log.info(f"recipe {recipe.name!r}: {len(recipe.stages)} stages, {len(run.train_set)} training and "
             f"{len(run.val_set)} validation images, {len(run.classes)} classes, device {dist.device}"
             + (f", {dist.world_size} processes" if dist.enabled else "") + resuming)
    try:
        with run.stop:
            for index in range(progress.stage, len(recipe.stages)):
                stage_checkpoint = checkpoint if checkpoint and checkpoint["model"] is not None else None
                result = train_stage(run, index, progress, stage_checkpoint)
                checkpoint = None  # only the stage being resumed uses it
                log.plot()
                status = result["status"]
                if status == "diverged" and recipe.stages[index].on_divergence == "continue":
                    status = "finished"
                if status != "finished":
                    message = result["message"]
                    if index + 1 < len(recipe.stages):
                        message += (f"; the run stops here (--resume continues with stage "
                                    f"{recipe.stages[index + 1].name!r})")
                    return _finish(run, progress, status, message)
            progress.finished = True
            run.save(progress)
            return _finish(run, progress, "finished", "all stages finished")
    except Interrupted as exc:
        return _finish(run, progress, "interrupted", str(exc))


def _first(split: FaceDataset, limit: int) -> FaceDataset:
    """The first ``limit`` images of a split (debug runs); all of them for 0."""
    return split if not limit else split.subset(np.arange(min(limit, len(split))))


def train_stage(run: Run, index: int, progress: Progress, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """Train stage ``index`` to its early stop; returns its record (also in ``progress.results``)."""
    if checkpoint is None:
        progress.start_stage(index)
    s = setup_stage(run, index, checkpoint)
    stage, log, stopper = s.stage, run.log, s.early_stopping
    log.info(describe_stage(run, s))
    if s.train_eval_loader is not None and progress.start_train_loss is None:
        start_model = load_model(s.start_from, run.dist.device)
        progress.start_train_loss, _ = evaluate(start_model, s.train_eval_loader, run.dist, run.options.bf16, False)
        log.info(f"stage {stage.name}: training loss of the starting model ({s.start_from.name}): "
                 f"{progress.start_train_loss:.4f}")
        del start_model
    try:
        for epoch in range(progress.epoch, stage.max_epochs):
            if stopper.should_stop:  # resumed after the stop was decided, before the stage was recorded
                break
            started = time.time() - progress.train_seconds
            train_epoch(run, s, progress, epoch, started, checkpoint)
            checkpoint, train_seconds = None, time.time() - started
            val_loss, val_acc = evaluate(s.model, s.val_loader, run.dist, run.options.bf16, run.options.channels_last)
            metrics = {"val_acc": val_acc, "val_loss": val_loss}
            if not math.isfinite(metrics[stage.monitor]):
                raise Diverged(f"validation {stage.monitor} is {metrics[stage.monitor]} after epoch {epoch + 1}")
            improved = stopper.update(metrics, epoch + 1, s.model)
            if improved:
                run.save_model_file(s.model, run.best_path(stage), {"stage": stage.name, "epoch": epoch + 1, **metrics,
                                                                    **model_info(stage)})
            if s.ema is not None:
                metrics = {**metrics, **evaluate_ema(run, s, epoch)}
            row = {"stage": stage.name, "epoch": epoch + 1, "train_loss": progress.loss_sum / progress.seen,
                   "train_acc": progress.correct / progress.seen, **metrics,
                   "lr": s.optimizer.param_groups[0]["lr"], "improved": int(improved),
                   "seconds": time.time() - started, "images_per_s": progress.seen / max(train_seconds, 1e-9)}
            log.metrics(row, global_epoch=sum(r["epochs"] for r in progress.results) + epoch + 1)
            progress.epoch = epoch + 1
            progress.start_epoch()
            run.save(progress, s)
            log.info(describe_epoch(stage, row, stopper.wait, progress.epoch))
            log.plot_every(run.options.plot_every_s)
    except Diverged as exc:
        return finish_stage(run, s, progress, "diverged", str(exc))
    reason = (f"early stop: no improvement of {stage.monitor} for {stage.patience} epochs"
              if stopper.should_stop else f"reached max_epochs = {stage.max_epochs}")
    return finish_stage(run, s, progress, "finished", reason)


def train_epoch(run: Run, s: StageSetup, progress: Progress, epoch: int, started: float,
                checkpoint: dict[str, Any] | None) -> None:
    """One pass over the training batches (from ``progress.step`` when resuming mid-epoch);
    ``started``: when the epoch began (its time so far counted in when resuming)."""
    stage, options, dist, device = s.stage, run.options, run.dist, run.dist.device
    s.loader.set_epoch(epoch)
    torch.manual_seed(derive_seed(stage.seed, stage.name, epoch, dist.rank))  # dropout
    skip = progress.step  # resuming mid-epoch: batches already done
    s.model.train()
    if stage.trainable != "all":
        set_batchnorm_eval(s.model)  # frozen BatchNorm runs in inference mode (TF2 trainable=False)
    with tqdm(total=len(s.loader), initial=skip, desc=f"{stage.name} epoch {epoch + 1}/{stage.max_epochs}",
              unit="batch", leave=False, dynamic_ncols=True, disable=not (dist.is_main and options.progress)) as bar:
        for step, (x, y) in enumerate(s.loader):
            if step < skip:
                continue
            if step == skip > 0:  # resuming mid-epoch: the RNG state where the checkpoint was written
                set_rng_state(checkpoint["rng"][dist.rank], device)
            if options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
                logits = s.train_model(x)
            loss = training_loss(logits, y, stage.label_smoothing)
            # one all-reduce per step: batch loss/accuracy and every process's stop request agree
            stats = dist.all_reduce_sum(torch.stack([
                loss.detach().double() * len(x), count_correct(logits.detach(), y).double(),
                torch.tensor(float(len(x)), dtype=torch.float64, device=device),
                torch.tensor(float(run.stop.signal is not None), dtype=torch.float64, device=device)]))
            batch_loss_sum, batch_correct, batch_seen, stop_flags = stats.tolist()
            check_loss(stage, progress, batch_loss_sum / batch_seen, len(run.classes), epoch, step)

            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in s.optimizer.param_groups:
                group["lr"] = lr_at(stage, epoch, step, len(s.loader))
            if stage.clip_grad_norm:  # gradients are already all-reduced: every process clips alike
                torch.nn.utils.clip_grad_norm_(s.model.parameters(), stage.clip_grad_norm)
            s.optimizer.step()
            if s.ema is not None:
                s.ema.update(s.model)

            progress.step = step + 1
            progress.loss_sum += batch_loss_sum
            progress.correct += batch_correct
            progress.seen += batch_seen
            bar.set_postfix(loss=f"{progress.loss_sum / progress.seen:.4f}",
                            acc=f"{progress.correct / progress.seen:.3f}", refresh=False)
            bar.update()
            interrupted = stop_flags > 0
            if interrupted or (options.checkpoint_every and progress.step % options.checkpoint_every == 0
                               and progress.step < len(s.loader)):
                progress.train_seconds = time.time() - started
                run.save(progress, s)
            if interrupted:
                raise Interrupted(f"{run.stop.name}: checkpoint written at stage {stage.name} epoch {epoch + 1} "
                                  f"batch {progress.step}; continue with --resume")


def training_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against int labels or soft targets (B, K); with ``label_smoothing`` e the
    target is (1 - e) x target + e / K (Szegedy et al. 2016, not in the paper). Validation losses
    stay the plain cross-entropy."""
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def evaluate_ema(run: Run, s: StageSetup, epoch: int) -> dict[str, float]:
    """Validate the moving average of the weights; keep its best epoch in ``<stage>-ema.safetensors``."""
    stage = s.stage
    loss, acc = evaluate(s.ema.module, s.val_loader, run.dist, run.options.bf16, run.options.channels_last)
    metrics = {"val_acc": acc, "val_loss": loss}
    if s.ema_stopping.update(metrics, epoch + 1, s.ema.module):
        run.save_model_file(s.ema.module, run.ema_path(stage), {"stage": stage.name, "epoch": epoch + 1,
                                                                **metrics, "ema": stage.ema, **model_info(stage)})
    return {"ema_val_acc": acc, "ema_val_loss": loss}


def check_loss(stage: Stage, progress: Progress, batch_loss: float, num_classes: int, epoch: int, step: int) -> None:
    """Raise ``Diverged`` for a non-finite batch loss or one above ``loss_explosion`` x the reference."""
    if progress.first_loss is None:
        progress.first_loss = batch_loss
    limit = stage.loss_explosion * max(math.log(num_classes), progress.first_loss)
    if not math.isfinite(batch_loss) or (stage.loss_explosion and batch_loss > limit):
        what = "is not finite" if not math.isfinite(batch_loss) else \
            f"exploded (> {stage.loss_explosion:g} x {limit / stage.loss_explosion:.4f})"
        raise Diverged(f"training loss {what}: {batch_loss} at epoch {epoch + 1} batch {step + 1}")


def finish_stage(run: Run, s: StageSetup, progress: Progress, status: str, reason: str) -> dict[str, Any]:
    """Restore the best weights, apply the acceptance rule, record the stage, checkpoint."""
    stage, stopper = s.stage, s.early_stopping
    result: dict[str, Any] = {"stage": stage.name, "model": stage.model, "epochs": progress.epoch}
    if stopper.best_weights is None:  # nothing to restore, accept or start the next stage from
        message = f"stage {stage.name}: {reason}; no best weights (nothing finished)"
        result.update(stop=reason, status=status)
        run.log.info(f"stage {stage.name}: {reason}; no epoch finished, so there are no best weights to keep")
        return _record(run, s, progress, result, message)
    stopper.restore_best(s.model)
    result.update(best_epoch=stopper.best_epoch, best_val_acc=stopper.best_metrics["val_acc"],
                  best_val_loss=stopper.best_metrics["val_loss"], stop=reason, status=status)
    if s.ema is not None:
        result["ema"] = {"decay": stage.ema, "best_epoch": s.ema_stopping.best_epoch,
                         "best_val_acc": s.ema_stopping.best_metrics["val_acc"],
                         "best_val_loss": s.ema_stopping.best_metrics["val_loss"], "file": run.ema_path(stage).name}
    message = f"stage {stage.name}: {reason}; best {stage.monitor} {stopper.best:.4f} at epoch " \
              f"{stopper.best_epoch}, kept in {run.best_path(stage)}"
    if status == "finished" and s.train_eval_loader is not None:
        final_loss, _ = evaluate(s.model, s.train_eval_loader, run.dist, run.options.bf16, run.options.channels_last)
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
    run.log.info(message)
    return _record(run, s, progress, result, message)


def _record(run: Run, s: StageSetup, progress: Progress, result: dict[str, Any], message: str) -> dict[str, Any]:
    """Add the stage's record to the progress and checkpoint: the next stage starts from its best file."""
    progress.results.append(result)
    progress.start_stage(s.index + 1)
    run.save(progress)
    return {**result, "message": message}


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = y.argmax(dim=1) if y.ndim == 2 else y  # soft labels (FER+): the majority class
    return (logits.argmax(dim=1) == target).sum()


@torch.no_grad()
def evaluate(model: LHCNetModel, loader: BatchLoader, dist: Distributed, bf16: bool,
             channels_last: bool) -> tuple[float, float]:
    """(mean loss, accuracy) over a loader's images on all processes (``lhcnet.evaluate.model_outputs``)."""
    device = dist.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for logits, y in model_outputs(model, loader, bf16=bf16, channels_last=channels_last):
        sums += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                             count_correct(logits, y).double(), torch.tensor(len(y), dtype=torch.float64, device=device)])
    dist.all_reduce_sum(sums)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def describe_stage(run: Run, s: StageSetup) -> str:
    stage = s.stage
    return (f"stage {stage.name} ({s.index + 1}/{len(run.recipe.stages)}): {stage.model} "
            f"{'fresh' if s.start_from is None else 'from ' + str(s.start_from)}"
            f"{', pretrained ' + stage.pretrained if stage.pretrained else ''}; trains {stage.trainable} "
            f"({sum(p.numel() for p in s.params):,} parameters); {stage.optimizer.type} lr {stage.optimizer.lr:g}; "
            f"batch {stage.batch_size}; patience {stage.patience}; at most {stage.max_epochs} epochs"
            + (f"; gradient norm clipped to {stage.clip_grad_norm:g}" if stage.clip_grad_norm else "")
            + (f"; {stage.lr_schedule} lr schedule over {stage.max_epochs} epochs"
               if stage.lr_schedule != "constant" else "")
            + (f"; {stage.warmup_epochs} warm-up epochs" if stage.warmup_epochs else "")
            + (f"; label smoothing {stage.label_smoothing:g}" if stage.label_smoothing else "")
            + (f"; EMA of the weights, decay {stage.ema:g}" if stage.ema else "")
            + f"; model files record TTA {stage.model_tta!r}"
            + (f" and crop {stage.augment.crop} px" if stage.augment.crop else ""))


def describe_epoch(stage: Stage, row: dict[str, Any], wait: int, epochs_done: int) -> str:
    seconds, left_max = row["seconds"], stage.max_epochs - epochs_done
    left_if_flat = min(stage.patience - wait, left_max)
    return (f"{stage.name} epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{' *' if row['improved'] else ''}"
            + (f" | EMA val acc {row['ema_val_acc']:.4f}" if "ema_val_acc" in row else "") + " | "
            f"{seconds:.1f} s, {row['images_per_s']:.0f} img/s | stage ends in {left_if_flat} epochs "
            f"(~{format_seconds(left_if_flat * seconds)}) without improvement, at most "
            f"{left_max} (~{format_seconds(left_max * seconds)})")


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _finish(run: Run, progress: Progress, status: str, message: str) -> TrainResult:
    final = None
    last = progress.results[-1] if progress.results else {}
    if status == "finished" and "best_val_acc" in last:  # (a stage that diverged at once has no best)
        final = run.out_dir / "final.safetensors"
        if run.dist.is_main:
            model = _load_best(run, run.recipe.stages[-1])
            save_model(model, final, extra={"classes": run.classes, "recipe": run.recipe.name,
                                            "val_acc": last["best_val_acc"], "val_loss": last["best_val_loss"],
                                            "stages": progress.results, **model_info(run.recipe.stages[-1])})
    if run.dist.is_main:
        write_summary(run.out_dir, {"status": status, "message": message, "recipe": run.recipe.name,
                                    "stages": progress.results, "final": None if final is None else final.name})
    run.log.info(f"{status}: {message}" + (f"; final model {final}" if final else ""))
    return TrainResult(status, message, run.out_dir, progress.results, final)


def _load_best(run: Run, stage: Stage) -> LHCNetModel:
    model = create_model(stage.model, num_classes=len(run.classes), **model_args(stage))
    model.load_state_dict(load_weights(run.best_path(stage)))
    return model
