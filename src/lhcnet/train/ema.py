"""``WeightEMA``: an exponential moving average of a model's weights (not in the paper).

After every optimiser step ``ema = decay * ema + (1 - decay) * weights`` for every floating-point
entry of the ``state_dict`` (parameters and BatchNorm running statistics, as timm's
``ModelEmaV2``); integer entries (``num_batches_tracked``) are copied. The average starts from the
stage's starting weights and uses a constant decay (no warm-up of the decay), so after k steps
``ema_k = decay^k w_0 + (1 - decay) sum_{i=1..k} decay^(k-i) w_i``. Its horizon is about
``1 / (1 - decay)`` steps: 0.999 averages the last ~1000 steps (~4.5 FER2013 epochs at batch 128).

The averaged model is a copy of the trained one (``module``), evaluated and saved like it; its
state (``state_dict``) goes into every checkpoint, so a resumed run continues the same average.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """The moving average of ``model``'s weights, held in ``module`` (a frozen copy, eval mode)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights."""
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if averaged.is_floating_point():
                averaged.mul_(self.decay).add_(current.detach().to(averaged.dtype), alpha=1 - self.decay)
            else:
                averaged.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["decay"] != self.decay:
            raise ValueError(f"the checkpoint's EMA decay {state['decay']} is not this stage's {self.decay}")
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
