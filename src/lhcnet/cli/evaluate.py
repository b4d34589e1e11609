"""``lhcnet evaluate MODEL_FILE... --data SRC``: accuracy, per-class metrics, confusion matrices, TTA."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..train.distributed import resolve_device

__all__ = ["register", "run", "add_data_arguments", "load_faces", "load_models"]


def add_data_arguments(p: argparse.ArgumentParser,
                       limit_help: str = "evaluate only the first N images of the split") -> None:
    """The options that choose the faces (--data, --split, --labels, --ferplus-csv, --dedup,
    --limit) and run the model (--batch-size, --device)."""
    p.add_argument("--data", required=True, metavar="SRC",
                   help="FER2013 CSV (.csv, .csv.gz, .tar.gz), an image folder or a cache")
    p.add_argument("--split", default="PrivateTest",
                   help="Training, PublicTest or PrivateTest (or train/val/test); default PrivateTest")
    p.add_argument("--labels", default=None, choices=("fer2013", "ferplus"),
                   help="label set (default: the source's own): FER2013's 7 classes or FER+ majority votes")
    p.add_argument("--ferplus-csv", default=None, metavar="FILE",
                   help="FER+ votes (fer2013new.csv) for --labels ferplus on a FER2013 source")
    p.add_argument("--dedup", action="store_true",
                   help="leave out the PublicTest/PrivateTest faces whose pixels also occur in Training")
    p.add_argument("--limit", type=int, default=None, metavar="N", help=limit_help)
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="model inputs per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: CUDA if available)")


def load_faces(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """uint8 faces ``[N, H, W]``, int64 labels and class names of ``--split`` of ``--data``."""
    from ..data import load_dataset
    from ..data.stats import without_training_duplicates

    dataset = load_dataset(args.data, labels=args.labels, ferplus_csv=args.ferplus_csv)
    if args.dedup:
        dataset = without_training_duplicates(dataset)
    dataset = dataset.split(args.split)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be positive, got {args.limit}")
        dataset = dataset.subset(np.arange(min(args.limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{args.data}: no images in split {args.split!r}")
    images = torch.from_numpy(np.ascontiguousarray(dataset.images))
    labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
    return images, labels, tuple(dataset.classes)


def _check_classes(model: nn.Module, path: str, classes: tuple[str, ...]) -> None:
    outputs = model.lhcnet_metadata.get("num_classes")
    if outputs is not None and outputs != len(classes):
        raise ValueError(f"{path} predicts {outputs} classes but the labels have {len(classes)} "
                         f"({', '.join(classes)}); use the matching --labels")
    stored = model.lhcnet_metadata.get("info", {}).get("classes")
    if stored and [c.lower() for c in stored] != [c.lower() for c in classes]:
        raise ValueError(f"{path} was trained on classes {list(stored)} in that order, "
                         f"the data has {list(classes)}; use the matching --labels")


def load_models(paths: list[str], classes: tuple[str, ...],
                device: torch.device) -> list[tuple[str, nn.Module]]:
    """(row label, model) per file; labels are file names, or paths when names repeat."""
    from ..models import load_model

    names = [Path(p).name for p in paths]
    labels = names if len(set(names)) == len(names) else list(paths)
    models = []
    for label, path in zip(labels, paths):
        model = load_model(path, device=device)
        _check_classes(model, path, classes)
        models.append((label, model))
    return models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy, per-class metrics and confusion matrix of model files (TTA optional)",
        description="Evaluate one or more model files on a split: accuracy, top-2 accuracy, per-class "
                    "precision/recall/F1, macro-F1, confusion matrix, ECE. Several files also give "
                    "a softmax-averaged ensemble row. --tta uses the test-time augmentation each "
                    "model file records it was trained for (files without one: the paper's 60 "
                    "views); --tta-views chooses a view set for all.")
    p.add_argument("models", nargs="+", metavar="MODEL_FILE", help="model files written by lhcnet")
    add_data_arguments(p)
    p.add_argument("--tta", action="store_true",
                   help="the test-time augmentation the model file records (ten-crop, flip...; "
                        "the paper's 60 views for files that record none); a face counts once per "
                        "view in --batch-size")
    p.add_argument("--tta-views", default=None, metavar="NAME|N",
                   help="this TTA for every model (implies --tta): ten-crop, flip, paper (60), zoom "
                        "(8), none, or the first N 1..60 of the paper's views")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write report.json and confusion_<model>.png here")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_models, format_report, write_report
    from ..tta import select_views

    device = resolve_device(args.device)
    tta = args.tta_views if args.tta_views is not None else (True if args.tta else None)
    if isinstance(tta, str):
        select_views(tta)  # an unknown name stops here, before the data is read
    images, labels, classes = load_faces(args)
    models = load_models(args.models, classes, device)
    split = args.split + (" without Training duplicates" if args.dedup else "")
    report = evaluate_models(models, images, labels, classes, split=split, tta=tta,
                             batch_size=args.batch_size, device=device)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    if args.out:
        written = write_report(report, args.out)
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr if args.json else sys.stdout)
    return 0
