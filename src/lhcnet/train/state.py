"""Training state: where a run is (``Progress``), early stopping, the stop request, and the two
ways a stage ends before its early stop (``Diverged``, ``Interrupted``).

Everything here is plain numbers (or tensors, for the best weights), so it round-trips through a
checkpoint and a resumed run continues from exactly the same state.
"""
from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import nn

__all__ = ["Diverged", "Interrupted", "EarlyStopping", "Progress", "StopRequest"]


class Diverged(Exception):
    """A non-finite or exploding loss: the stage ends and keeps its best weights."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was written after the current batch; ``--resume`` continues."""


class EarlyStopping:
    """Keras ``EarlyStopping(monitor, patience, min_delta=0, restore_best_weights=True)``.

    ``val_acc`` is maximised, ``val_loss`` minimised; only a strict improvement counts (Keras
    compares ``current - min_delta`` with ``best`` by ``np.greater``/``np.less``), and the first
    value always improves. ``should_stop`` once ``patience`` epochs in a row did not improve.
    ``update`` keeps a CPU copy of the weights of the best epoch; ``restore_best`` loads them back
    (Keras 3 restores at the end of training, whether or not it stopped early). ``state_dict``
    holds everything, best weights included, so a checkpoint resumes it exactly.
    """

    def __init__(self, monitor: str, patience: int) -> None:
        if monitor not in ("val_acc", "val_loss"):
            raise ValueError(f"monitor {monitor!r}: expected 'val_acc' or 'val_loss'")
        self.monitor, self.patience = monitor, patience
        self.best: float | None = None
        self.best_epoch = 0                      # 1-based; 0: no epoch finished yet
        self.best_metrics: dict[str, float] = {}
        self.wait = 0                            # epochs since the last improvement
        self.best_weights: dict[str, torch.Tensor] | None = None

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.monitor == "val_acc" else value < self.best

    def update(self, metrics: dict[str, float], epoch: int, model: nn.Module) -> bool:
        """Record epoch ``epoch`` (1-based); True when it improved (its weights are kept)."""
        value = metrics[self.monitor]
        if not self.improves(value):
            self.wait += 1
            return False
        self.best, self.best_epoch, self.best_metrics, self.wait = value, epoch, dict(metrics), 0
        self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    @property
    def should_stop(self) -> bool:
        return self.wait >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        if self.best_weights is None:
            raise ValueError("no epoch finished: there are no best weights to restore")
        model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_metrics": self.best_metrics,
                "wait": self.wait, "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
        self.best_metrics, self.best_weights = dict(state["best_metrics"]), state["best_weights"]


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

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal or signal.SIGTERM).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
