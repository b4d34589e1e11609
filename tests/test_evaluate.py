"""Metrics, the evaluation loop and ``lhcnet evaluate`` on a tiny model trained in the test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lhcnet.cli import main
from lhcnet.data import to_model_input
from lhcnet.evaluate import (compute_metrics, evaluate_models, expected_calibration_error,
                             predict_probabilities)
from lhcnet.models import load_model, save_model

import tiny_fer
from tiny_fer import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    return tiny_fer.trained_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))  # the data cache goes there


def test_metrics_by_hand() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    probs = torch.tensor([[0.7, 0.2, 0.1],    # -> 0 correct
                          [0.3, 0.6, 0.1],    # -> 1 wrong (true 0, second choice 0)
                          [0.1, 0.8, 0.1],    # -> 1 correct
                          [0.2, 0.5, 0.3],    # -> 1 correct
                          [0.5, 0.4, 0.1]])   # -> 0 wrong (true 2, third choice)
    m = compute_metrics(probs, labels, ["a", "b", "c"])
    assert m.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.top2_accuracy == pytest.approx(4 / 5)
    assert m.precision == pytest.approx([1 / 2, 2 / 3, 0])
    assert m.recall == pytest.approx([1 / 2, 1, 0])
    assert m.f1 == pytest.approx([1 / 2, 0.8, 0])
    assert m.macro_f1 == pytest.approx(1.3 / 3)
    assert m.support == [2, 2, 1]
    assert m.confusion_normalized == [[0.5, 0.5, 0], [0, 1, 0], [1, 0, 0]]
    nll = -torch.tensor([0.7, 0.3, 0.8, 0.5, 0.1]).log().mean()
    assert m.nll == pytest.approx(float(nll))


def test_expected_calibration_error_by_hand() -> None:
    # bin (0.5, 0.6]: confidences 0.55, 0.55, one right -> |0.5 - 0.55| = 0.05, share 2/4
    # bin (0.9, 1.0]: confidences 0.95, 0.95, both right -> |1 - 0.95| = 0.05, share 2/4
    probs = torch.tensor([[0.55, 0.45], [0.55, 0.45], [0.95, 0.05], [0.05, 0.95]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.05)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == 0


def test_evaluation_batches_go_through_the_shared_preprocessing() -> None:
    seen = []

    class Recorder(nn.Module):
        input_size = 64

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return torch.zeros(len(x), 3)

    faces = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    probs = predict_probabilities(Recorder(), faces, batch_size=2)
    assert [len(x) for x in seen] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(seen), to_model_input(faces, 64))
    torch.testing.assert_close(probs, torch.full((5, 3), 1 / 3))


def test_ensemble_row_is_the_softmax_mean() -> None:
    class Fixed(nn.Module):
        input_size = 48

        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits[: len(x)]

    a, b = torch.randn(6, 4), torch.randn(6, 4)
    faces, labels = torch.zeros(6, 48, 48, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 0, 1])
    classes = list("wxyz")
    report = evaluate_models([("a", Fixed(a)), ("b", Fixed(b))], faces, labels, classes, batch_size=6)
    mean = (a.softmax(1) + b.softmax(1)) / 2
    assert report.ensemble is not None
    assert report.ensemble.metrics == compute_metrics(mean, labels, classes)
    assert [r.label for r in report.rows] == ["a", "b", "ensemble (2, softmax mean)"]


def test_tiny_trained_model_learned(trained: tuple[Path, Path, dict[str, int]]) -> None:
    model_file, _, _ = trained
    faces, labels = tiny_fer.synthetic_faces(5, seed=7)
    probs = predict_probabilities(load_model(model_file), torch.from_numpy(faces))
    assert (probs.argmax(1) == torch.from_numpy(labels)).double().mean() > 0.9


def test_evaluate_cli_writes_png_and_json(trained: tuple[Path, Path, dict[str, int]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model_file, csv, counts = trained
    out = tmp_path / "report"
    assert main(["evaluate", str(model_file), "--data", str(csv), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "acc %" in printed and "precision %" in printed
    report = json.loads((out / "report.json").read_text())
    metrics = report["models"][0]["metrics"]
    assert report["split"] == "PrivateTest" and report["tta"] is None and report["ensemble"] is None
    assert sum(map(sum, metrics["confusion"])) == counts["PrivateTest"] == metrics["count"]
    assert metrics["support"] == [counts["PrivateTest"] // 7] * 7
    assert metrics["classes"] == list(tiny_fer.CLASSES)
    assert metrics["accuracy"] > 0.9
    png = out / "confusion_tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


def test_evaluate_cli_several_models_with_tta(trained: tuple[Path, Path, dict[str, int]], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model_file, csv, counts = trained
    other = save_model(tiny_fer.train_tiny_model(steps=10, seed=1), tmp_path / "other.safetensors",
                       extra={"classes": list(tiny_fer.CLASSES)})
    code = main(["evaluate", str(model_file), str(other), "--data", str(csv), "--split", "test",
                 "--tta-views", "flip", "--limit", "21", "--json", "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tta"] == {"views": "flip", "count": 2, "total_weight": 2.0}
    assert [m["label"] for m in report["models"]] == ["tiny.safetensors", "other.safetensors"]
    assert report["ensemble"]["info"]["members"] == ["tiny.safetensors", "other.safetensors"]
    for row in report["models"] + [report["ensemble"]]:
        assert sum(map(sum, row["metrics"]["confusion"])) == 21


def test_evaluate_cli_tta_defaults_to_what_each_model_file_records(
        trained: tuple[Path, Path, dict[str, int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file, csv, _ = trained                      # written without info["tta"]: the paper's views
    flip = save_model(load_model(model_file), tmp_path / "flip.safetensors",
                      extra={"classes": list(tiny_fer.CLASSES), "tta": "flip"})
    assert main(["evaluate", str(model_file), str(flip), "--data", str(csv), "--tta", "--limit", "7",
                 "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tta"] == {"views": "per model"}
    assert [row["info"]["tta"] for row in report["models"]] == [
        {"views": "paper", "count": 60, "total_weight": 62.0}, {"views": "flip", "count": 2, "total_weight": 2.0}]
    assert main(["evaluate", str(flip), "--data", str(csv), "--tta-views", "ten-crop", "--device", "cpu"]) == 2
    assert "records none" in capsys.readouterr().err   # ten-crop needs a model trained on crops


def test_evaluate_cli_rejects_models_of_other_classes(trained: tuple[Path, Path, dict[str, int]],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_file, csv, _ = trained
    other = save_model(load_model(model_file), tmp_path / "shuffled.safetensors",
                       extra={"classes": list(reversed(tiny_fer.CLASSES))})
    assert main(["evaluate", str(other), "--data", str(csv), "--device", "cpu"]) == 2
    assert "trained on classes" in capsys.readouterr().err
