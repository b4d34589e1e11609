"""Checks made before a run touches its directory, so that a run that cannot work stops at once
with one clear line instead of minutes (or a paper_jpeg conversion) later:

- every fresh stage's ``pretrained`` weights exist (the ImageNet file: ``convert.imagenet_weights``
  names the file to download and the ``lhcnet convert-weights`` command);
- the ``paper_jpeg`` training set of each input size fits on the device or in host memory
  (FER2013 at 224 px: 1.44 GB; ``data.placement.check_room_for_images``);
- ``--compile`` can work here (dynamo supports this Python; inductor finds a C++ compiler on
  the CPU, triton on CUDA).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from ..data.placement import check_room_for_images
from ..models import model_spec
from .recipe import Recipe

__all__ = ["check_before_training", "check_compile"]


def check_before_training(recipe: Recipe, train_count: int, device: torch.device, compile: bool,
                          resume: bool = False) -> None:
    """Raise ``FileNotFoundError``/``ValueError`` (one line each) for what would stop the run later.
    (A resumed run may be past its pretrained stages: their files are not asked for.)"""
    from ..convert import imagenet_weights

    for stage in recipe.stages:
        if resume or stage.start != "fresh" or stage.pretrained is None:
            continue
        if stage.pretrained == "imagenet":
            imagenet_weights(stage.model)
        elif not Path(stage.pretrained).expanduser().is_file():
            raise FileNotFoundError(f"stage {stage.name!r}: pretrained = {stage.pretrained!r}: no such file")
    if recipe.paper_jpeg:
        for size in sorted({model_spec(stage.model).input_size for stage in recipe.stages}):
            check_room_for_images(train_count, size, device, f"paper_jpeg (recipe {recipe.name!r})")
    if compile:
        check_compile(device)


def check_compile(device: torch.device) -> None:
    """``ValueError`` naming what ``torch.compile`` lacks here; nothing when it can work."""
    import torch._dynamo

    advice = "train without --compile"
    if not torch._dynamo.is_dynamo_supported():
        raise ValueError(f"--compile: torch.compile does not support Python {sys.version.split()[0]} on "
                         f"{sys.platform} with torch {torch.__version__}; {advice}")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError(f"--compile on CUDA needs triton (pip install triton); {advice}")
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:  # another torch layout: let torch.compile report for itself
            return
        try:
            get_cpp_compiler()
        except Exception as exc:  # torch._inductor.exc.InvalidCxxCompiler
            raise ValueError(f"--compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or "
                             f"$CXX): {' '.join(str(exc).split())}; {advice}") from None
