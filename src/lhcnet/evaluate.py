"""Evaluation: class probabilities for a split, metrics, comparison tables and reports.

``predict_probabilities`` runs a model over uint8 48x48 faces through the shared preprocessing
(``lhcnet.data.to_model_input``), optionally with test-time augmentation (``lhcnet.tta``).
``compute_metrics`` turns probabilities and labels into accuracy, top-2 accuracy, per-class
precision/recall/F1, macro-F1, the confusion matrix (counts and row-normalised), the expected
calibration error and the mean negative log-likelihood. ``evaluate_models`` does this for several
models at once and adds a softmax-averaged ensemble; ``write_report`` writes ``report.json`` and
one confusion-matrix PNG per row.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import to_model_input
from .files import atomic_write_text
from .tta import View, input_crop, model_views, recorded_tta, total_weight, tta_predict

__all__ = ["Metrics", "ModelResult", "EvaluationReport", "confusion_matrix",
           "expected_calibration_error", "compute_metrics", "predict_probabilities", "model_outputs",
           "describe_tta", "evaluate_models", "format_report", "plot_confusion", "write_report"]

ECE_BINS = 15


@dataclass
class Metrics:
    """Classification metrics of one model (or ensemble) on one split; rates are fractions."""

    classes: list[str]
    count: int
    accuracy: float
    top2_accuracy: float
    macro_f1: float
    ece: float
    nll: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    confusion: list[list[int]]             # rows: true class, columns: predicted class
    confusion_normalized: list[list[float]]  # each row divided by its support (0 for empty rows)


@dataclass
class ModelResult:
    """One row of a comparison: a model file (or the ensemble), its metrics and how it was run."""

    label: str
    metrics: Metrics
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationReport:
    """All rows of one evaluation; ``ensemble`` is set when several models were evaluated."""

    split: str
    tta: dict[str, Any] | None
    models: list[ModelResult]
    ensemble: ModelResult | None = None

    @property
    def rows(self) -> list[ModelResult]:
        return self.models + ([self.ensemble] if self.ensemble is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "tta": self.tta,
                "models": [asdict(row) for row in self.models],
                "ensemble": None if self.ensemble is None else asdict(self.ensemble)}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``[true, predicted]``, shape (K, K), int64."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins (lo, hi]: sum over bins of |accuracy - confidence| * share."""
    confidence, predictions = probs.max(dim=1)
    correct = (predictions == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    which = torch.bucketize(confidence, edges[1:-1])                      # bin index in [0, bins)
    count = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.bincount(which, weights=confidence.double(), minlength=bins)
    correct_sum = torch.bincount(which, weights=correct, minlength=bins)
    return float((conf_sum - correct_sum).abs().sum() / max(len(labels), 1))


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))


def compute_metrics(probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> Metrics:
    """Metrics from class probabilities ``(N, K)`` and integer labels ``(N,)``.

    Macro-F1 averages over the classes that occur in the labels or the predictions (as
    scikit-learn does by default), so a ``--limit`` that drops a class does not count it as 0.
    """
    probs, labels = probs.detach().double().cpu(), labels.detach().long().cpu()
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities {tuple(probs.shape)} do not match labels {tuple(labels.shape)}")
    num_classes = probs.shape[1]
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} model outputs")
    count = len(labels)
    predictions = probs.argmax(dim=1)
    counts = confusion_matrix(labels, predictions, num_classes)
    true_positive = counts.diag().double()
    support, predicted = counts.sum(dim=1).double(), counts.sum(dim=0).double()
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    top2 = probs.topk(min(2, num_classes), dim=1).indices.eq(labels[:, None]).any(dim=1)
    nll = -probs.gather(1, labels[:, None]).clamp(min=1e-12).log().mean()
    normalized = _safe_divide(counts.double(), support[:, None].expand_as(counts))
    return Metrics(
        classes=list(classes), count=count,
        accuracy=float((predictions == labels).double().mean()) if count else 0.0,
        top2_accuracy=float(top2.double().mean()) if count else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        ece=expected_calibration_error(probs, labels), nll=float(nll) if count else 0.0,
        precision=precision.tolist(), recall=recall.tolist(), f1=f1.tolist(),
        support=[int(s) for s in support.tolist()], confusion=counts.tolist(),
        confusion_normalized=normalized.tolist())


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                          views: Sequence[View] | None = None,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax probabilities ``(N, K)`` (float32, CPU) for uint8 faces ``[N, H, W]``.

    Every batch goes through ``to_model_input`` at ``model.input_size``, exactly as in training.
    With ``views`` (TTA) the forward batch holds ``len(views)`` inputs per face, so the number of
    faces per forward is ``batch_size // len(views)`` (at least one): memory stays bounded by
    ``batch_size`` either way. Without ``views`` a model trained on crops sees its centre crop
    (``lhcnet.tta.model_views``). Inputs and weights are channels-last (NHWC): the same numbers up
    to float rounding, and oneDNN's convolutions run ~1.5x faster on CPU (60-view TTA is 60 forwards).
    """
    views = views or model_views(model, None)
    model = model.to(device, memory_format=torch.channels_last).eval()
    size = int(getattr(model, "input_size", 224))
    step = batch_size if not views else max(1, batch_size // len(views))
    batches = ((to_model_input(images[start:start + step].to(device), size), None)
               for start in range(0, len(images), step))
    if views:  # tta_predict lays its views out channels-last itself
        outputs = model_outputs(model, batches, lambda x: tta_predict(model, x, views), channels_last=False)
    else:
        outputs = model_outputs(model, batches, lambda x: torch.softmax(model(x).float(), dim=1))
    out = [probs.float().cpu() for probs, _ in outputs]
    if not out:
        raise ValueError("no images to evaluate")
    return torch.cat(out)


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]],
                  forward: Callable[[torch.Tensor], torch.Tensor] | None = None, *, bf16: bool = False,
                  channels_last: bool = True) -> Iterator[tuple[torch.Tensor, Any]]:
    """The one evaluation loop (evaluation, prediction of a split, the trainer's validation and
    acceptance rule): ``model`` in eval mode, without gradients, over model-ready batches ``(x, y)``;
    yields ``(forward(x), y)`` (``forward`` defaults to the model's logits), with ``x`` channels-last
    and under bfloat16 autocast if asked. The model's train/eval mode is restored afterwards."""
    forward = forward or model
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(x)
            yield out, y
    finally:
        model.train(was_training)


def describe_tta(model: nn.Module, tta: bool | str | int | None) -> dict[str, Any] | None:
    """What ``tta`` means for ``model``: the view set's name, view count and total weight; None
    without TTA. True: the TTA the model file records (``lhcnet.tta.recorded_tta``)."""
    if tta is None or tta is False:
        return None
    views = model_views(model, tta)
    name = recorded_tta(model) if tta is True else tta
    name = f"{name} views" if isinstance(name, int) or name.strip().isdigit() else name
    return {"views": name, "count": len(views), "total_weight": total_weight(views)}


def evaluate_models(models: Sequence[tuple[str, nn.Module]], images: torch.Tensor, labels: torch.Tensor,
                    classes: Sequence[str], *, split: str = "", tta: bool | str | int | None = None,
                    batch_size: int = 256, device: str | torch.device = "cpu") -> EvaluationReport:
    """Evaluate ``(label, model)`` pairs on the same faces; two or more also give the ensemble
    row (the average of the models' softmax probabilities).

    ``tta``: None (each model's single view), True (each model's recorded TTA), or a view set name
    or count for ``lhcnet.tta.select_views`` (the same for every model). Each row's ``info``
    says which TTA it ran (``tta``) and its training crop (``crop``, 0: none); the report's ``tta``
    is the common one, or ``{"views": "per model"}`` when the models record different ones.
    """
    if not models:
        raise ValueError("no models to evaluate")
    results, all_probs = [], []
    for label, model in models:
        began = time.perf_counter()
        probs = predict_probabilities(model, images, batch_size=batch_size,
                                      views=model_views(model, tta), device=device)
        seconds = time.perf_counter() - began
        info = {"model": getattr(model, "lhcnet_config", {}).get("name", type(model).__name__),
                "input_size": int(getattr(model, "input_size", 224)), "crop": input_crop(model),
                "tta": describe_tta(model, tta),
                "seconds": round(seconds, 3), "seconds_per_image": seconds / len(images)}
        results.append(ModelResult(label, compute_metrics(probs, labels, classes), info))
        all_probs.append(probs)
    ensemble = None
    if len(models) > 1:
        probs = torch.stack(all_probs).mean(dim=0)
        ensemble = ModelResult(f"ensemble ({len(models)}, softmax mean)",
                               compute_metrics(probs, labels, classes), {"members": [m[0] for m in models]})
    ttas = [row.info["tta"] for row in results]
    report_tta = ttas[0] if all(t == ttas[0] for t in ttas) else {"views": "per model"}
    return EvaluationReport(split, report_tta, results, ensemble)


def _short(name: str, width: int = 5) -> str:
    return name[:width]


def format_report(report: EvaluationReport) -> str:
    """A comparison table (one row per model, plus the ensemble) and, for a single model, the
    per-class precision/recall/F1 table."""
    rows = report.rows
    classes = rows[0].metrics.classes
    width = max(12, *(len(r.label) for r in rows))
    tta = ("no TTA" if report.tta is None else f"TTA {report.tta['views']}" + (
        f" (total weight {report.tta['total_weight']:g})" if "total_weight" in report.tta
        else ": " + ", ".join(f"{r.label} {r.info['tta']['views']}" for r in report.models)))
    lines = [f"split {report.split or '?'}: {rows[0].metrics.count} images, {tta}", ""]
    header = (f"{'model':<{width}}  {'acc %':>6}  {'top-2 %':>7}  {'macro-F1':>8}  {'ECE':>6}  {'NLL':>6}  "
              + "  ".join(f"{_short(c):>5}" for c in classes))
    lines += [header + "   (per-class F1 %)", "-" * len(header)]
    for row in rows:
        m = row.metrics
        lines.append(f"{row.label:<{width}}  {100 * m.accuracy:6.2f}  {100 * m.top2_accuracy:7.2f}  "
                     f"{100 * m.macro_f1:8.2f}  {m.ece:6.4f}  {m.nll:6.4f}  "
                     + "  ".join(f"{100 * f:5.1f}" for f in m.f1))
    if len(rows) == 1:
        m = rows[0].metrics
        lines += ["", f"{'class':<10}  {'precision %':>11}  {'recall %':>8}  {'F1 %':>6}  {'support':>7}"]
        for name, p, r, f, s in zip(m.classes, m.precision, m.recall, m.f1, m.support):
            lines.append(f"{name:<10}  {100 * p:11.2f}  {100 * r:8.2f}  {100 * f:6.2f}  {s:7d}")
    return "\n".join(lines)


def plot_confusion(metrics: Metrics, path: str | Path, title: str = "") -> Path:
    """Confusion matrix as a PNG: counts (left) and row-normalised (right), annotated cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(metrics.confusion)
    normalized = torch.tensor(metrics.confusion_normalized)
    k = len(metrics.classes)
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 0.9 * k, 2.4 + 0.45 * k), dpi=90)
    for ax, values, name, fmt in ((axes[0], counts, "counts", "{:.0f}"),
                                  (axes[1], normalized, "row-normalised (recall)", "{:.2f}")):
        ax.imshow(values.numpy(), cmap="Blues", vmin=0)
        ax.set_xticks(range(k), metrics.classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), metrics.classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=9)
        limit = float(values.max()) if values.numel() else 0.0
        for i in range(k):
            for j in range(k):
                value = float(values[i, j])
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 * limit else "black")
    fig.suptitle(title or f"accuracy {100 * metrics.accuracy:.2f}% on {metrics.count} images", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _file_label(label: str) -> str:
    label = re.sub(r"\.safetensors$", "", label)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def write_report(report: EvaluationReport, out_dir: str | Path) -> list[Path]:
    """Write ``report.json`` and ``confusion_<label>.png`` per row; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    written = [json_path]
    for row in report.rows:
        label = "ensemble" if row is report.ensemble else _file_label(row.label)
        title = (f"{row.label}: accuracy {100 * row.metrics.accuracy:.2f}% "
                 f"({report.split}, {row.metrics.count} images)")
        written.append(plot_confusion(row.metrics, out_dir / f"confusion_{label}.png", title))
    return written
