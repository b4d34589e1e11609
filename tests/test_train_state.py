"""``EarlyStopping``: Keras semantics (strict improvement, patience, restore best weights), checked
against hand-worked sequences."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lhcnet.train import EarlyStopping


def run(stopper: EarlyStopping, values: list[float], model: nn.Module | None = None) -> list[tuple[bool, bool]]:
    """(improved, should_stop) after each epoch; stops feeding once should_stop (as the trainer does)."""
    model = model or nn.Linear(1, 1)
    out = []
    for epoch, value in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights "of epoch e" are all e
        improved = stopper.update({stopper.monitor: value, "other": 0.0}, epoch, model)
        out.append((improved, stopper.should_stop))
        if stopper.should_stop:
            break
    return out


def test_equal_is_not_an_improvement_and_patience_counts_epochs_in_a_row() -> None:
    # val_acc, patience 2: 0.5 (first: improves), 0.6 (improves), 0.6 (equal: wait 1),
    # 0.7 (improves: wait 0), 0.65 (wait 1), 0.7 (equal to best: wait 2 -> stop)
    stopper = EarlyStopping("val_acc", patience=2)
    assert run(stopper, [0.5, 0.6, 0.6, 0.7, 0.65, 0.7, 0.9]) == [
        (True, False), (True, False), (False, False), (True, False), (False, False), (False, True)]
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (0.7, 4, 2)
    assert stopper.best_metrics == {"val_acc": 0.7, "other": 0.0}


def test_val_loss_is_minimised() -> None:
    stopper = EarlyStopping("val_loss", patience=1)
    assert run(stopper, [1.0, 0.8, 0.9]) == [(True, False), (True, False), (False, True)]
    assert (stopper.best, stopper.best_epoch) == (0.8, 2)
    assert EarlyStopping("val_loss", patience=1).improves(1e9)  # the first value always improves
    with pytest.raises(ValueError, match="monitor"):
        EarlyStopping("accuracy", patience=1)


def test_restore_best_loads_the_weights_of_the_best_epoch() -> None:
    model = nn.Linear(1, 1)
    stopper = EarlyStopping("val_acc", patience=3)
    run(stopper, [0.1, 0.4, 0.3, 0.2], model)  # best: epoch 2; the model now holds epoch 4's weights
    assert float(model.weight) == 4.0
    stopper.restore_best(model)
    assert float(model.weight) == 2.0
    with pytest.raises(ValueError, match="no best weights"):
        EarlyStopping("val_acc", patience=3).restore_best(model)


def test_state_dict_resumes_exactly() -> None:
    model = nn.Linear(1, 1)
    first = EarlyStopping("val_acc", patience=2)
    run(first, [0.3, 0.5, 0.4], model)
    second = EarlyStopping("val_acc", patience=2)
    second.load_state_dict(first.state_dict())
    assert (second.best, second.best_epoch, second.wait) == (0.5, 2, 1)
    assert second.update({"val_acc": 0.45}, 4, model) is False and second.should_stop
    second.restore_best(model)
    assert float(model.weight) == 2.0
