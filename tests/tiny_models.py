"""Tiny models and synthetic data for the training tests (not part of the library).

``tiny`` / ``lhcnet_tiny`` / ``lhcnetc_tiny`` are a 2-stage pre-activation ResNet (widths 8, 16) at
16x16 px with two small LHC blocks, registered in the model registry when this module is
imported. Run as a script, it is ``lhcnet`` with these models registered (for subprocess and
torchrun tests), and these environment variables inject faults at the N-th training forward of
the process (counted over all stages):

- ``LHCNET_TEST_KILL_AT=N``: SIGKILL this process (a crash mid-epoch).
- ``LHCNET_TEST_SIGNAL_AT=N``: send SIGTERM to this process (a polite stop).
- ``LHCNET_TEST_NAN_AT=N``: the logits become NaN.
- ``LHCNET_TEST_KILL_AT_EVAL=N``: SIGKILL at the N-th forward in eval mode (validation, the
  acceptance rule's training-loss evaluation).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lhcnet.data.dataset import CLASSES_FER2013, FaceDataset
from lhcnet.models import LHCBlock, list_models
from lhcnet.models.backbones import PreActResNet
from lhcnet.models.registry import ModelSpec, register_model

TINY_BLOCKS = (LHCBlock("stem", 8, 8, heads=2, embed_dim=8), LHCBlock("stage2", 16, 4, heads=1, embed_dim=8))
_forwards = 0
_eval_forwards = 0


def _fault_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    global _forwards, _eval_forwards
    if not module.training:
        _eval_forwards += 1
        if _eval_forwards == int(os.environ.get("LHCNET_TEST_KILL_AT_EVAL", "0")):
            os.kill(os.getpid(), signal.SIGKILL)
        return output
    _forwards += 1
    if _forwards == int(os.environ.get("LHCNET_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if _forwards == int(os.environ.get("LHCNET_TEST_SIGNAL_AT", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
    if _forwards >= int(os.environ.get("LHCNET_TEST_NAN_AT", "0")) > 0:
        return output * float("nan")
    return output


def tiny_backbone(num_classes: int = 7, **kwargs) -> PreActResNet:
    kwargs.setdefault("head_hidden", (16,))
    model = PreActResNet((1, 1), (8, 16), num_classes, stem_kernel=3, stem_stride=1, input_size=16, **kwargs)
    for module in model.modules():  # a few dozen steps must settle the BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    model.register_forward_hook(_fault_hook)
    return model


if "tiny" not in list_models():
    defaults = {"input_size": 16}
    register_model(ModelSpec("tiny", tiny_backbone, defaults=defaults))
    register_model(ModelSpec("lhcnet_tiny", tiny_backbone, TINY_BLOCKS, defaults=defaults))
    register_model(ModelSpec("lhcnetc_tiny", tiny_backbone, TINY_BLOCKS, (0.0, -0.5), defaults=defaults))


def synthetic_faces(n_train: int = 280, n_val: int = 70, seed: int = 0) -> FaceDataset:
    """Separable 48x48 "faces": class k has mean brightness 20 + 35 k, plus pixel noise (std 25)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    labels = np.arange(n) % len(CLASSES_FER2013)
    rng.shuffle(labels)
    noise = rng.normal(0, 25, size=(n, 48, 48))
    images = np.clip(20 + 35 * labels[:, None, None] + noise, 0, 255).astype(np.uint8)
    splits = np.r_[np.zeros(n_train), np.ones(n_val)].astype(np.uint8)
    return FaceDataset(images=images, labels=labels.astype(np.int64), splits=splits,
                       classes=CLASSES_FER2013, source="synthetic")


def write_fer2013_csv(dataset: FaceDataset, path: Path) -> Path:
    """The dataset as a Kaggle-style ``emotion,pixels,Usage`` CSV (what ``lhcnet train --data`` reads)."""
    usage = ("Training", "PublicTest", "PrivateTest")
    with open(path, "w", encoding="ascii") as f:
        f.write("emotion,pixels,Usage\n")
        for image, label, split in zip(dataset.images, dataset.labels, dataset.splits):
            f.write(f"{label},{' '.join(map(str, image.ravel()))},{usage[split]}\n")
    return path


TWO_STAGE_RECIPE = """
name = "tiny-two-stage"
labels = "fer2013"

[defaults]
batch_size = 32
max_epochs = {max_epochs}
patience = 3
seed = 7
loss_explosion = 10.0

[[stage]]
name = "backbone"
model = "tiny"
optimizer = {{ type = "adam", lr = 3e-3 }}
augment = {{ rotation = 10, flip = true }}

[[stage]]
name = "lhc"
from = "previous"
model = "lhcnet_tiny"
optimizer = {{ type = "sgd", lr = 0.01 }}
acceptance = {{ margin = 1.0, on_reject = "continue" }}
"""


def two_stage_recipe(path: Path, max_epochs: int = 4) -> Path:
    path.write_text(TWO_STAGE_RECIPE.format(max_epochs=max_epochs))
    return path


def torchrun_train(args: list[str], home: Path, timeout: int = 120) -> str:
    """``lhcnet train ARGS --device cpu --no-progress`` under ``torchrun --nproc_per_node=2`` (gloo,
    one thread per process; this module is the entry point, so the tiny models exist too). Asserts
    that it finished; returns its stdout."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LHCNET_HOME": str(home)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__)), "train", *args, "--device", "cpu", "--no-progress"]
    # its own session, so that a hang kills torchrun's workers too
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
    assert job.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "2 processes" in stdout and stdout.count("finished: all stages finished") == 1
    return stdout


if __name__ == "__main__":
    from lhcnet.cli import main

    sys.exit(main())
