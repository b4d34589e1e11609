"""``lhcnet distill``: soft targets from teacher models, trained through the ordinary recipe loop."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import tiny_models as tm
from lhcnet import distill
from lhcnet.cli import main as lhcnet_main
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import create_model, load_model, save_model
from lhcnet.train import TrainOptions, load_recipe, train

RECIPE = """
name = "tiny-distill"
[[stage]]
name = "s"
model = "tiny"
optimizer = { type = "sgd", lr = 0.05, momentum = 0.9 }
batch_size = 32
patience = 1
max_epochs = 1
seed = 3
"""


def test_targets_mix_label_and_teachers_on_training_rows_only() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 50)
    train_rows = np.arange(50) < 30  # then PublicTest and PrivateTest rows
    wrong = np.eye(7, dtype=np.float32)[(labels[:30] + 1) % 7]  # a teacher sure of another class
    teacher = 0.9 * wrong + 0.1 / 7
    targets = distill.distillation_targets(labels, train_rows, teacher, 0.6, 7)
    np.testing.assert_allclose(targets.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(targets[:30], 0.6 * np.eye(7)[labels[:30]] + 0.4 * teacher, rtol=1e-6)
    np.testing.assert_array_equal(targets[30:], np.eye(7)[labels[30:]])  # PublicTest/PrivateTest: hard
    assert (targets[:30].argmax(1) == labels[:30]).all()  # alpha > 0.5: the label still leads


def test_distill_trains_on_the_teachers_probabilities(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))  # the data cache
    faces = tm.synthetic_faces()
    data = tm.write_fer2013_csv(faces, tmp_path / "fer.csv")
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(create_model("tiny"), teacher)
    (tmp_path / "r.toml").write_text(RECIPE)

    def run_distill(out):
        return lhcnet_main(["distill", "--recipe", str(tmp_path / "r.toml"), "--data", str(data), "--out", str(out),
                            "--device", "cpu", "--no-progress", "--teachers", str(teacher), str(teacher)])

    out = tmp_path / "student"
    assert run_distill(out) == 0
    train_faces = torch.from_numpy(faces.split("Training").images.copy())
    expected = predict_probabilities(load_model(teacher), train_faces).numpy()
    np.testing.assert_allclose(np.load(out / "teacher-probs.npy"), expected, atol=1e-6)
    info = json.loads((out / "distill.json").read_text())
    assert info["alpha"] == 0.5 and len(info["teachers"]) == 2

    # a second student of the same teachers reuses their stored probabilities (here: made uniform)
    second = tmp_path / "second"
    second.mkdir()
    (second / "distill.json").write_text((out / "distill.json").read_text())
    np.save(second / "teacher-probs.npy", np.full_like(expected, 1 / 7))
    assert run_distill(second) == 0
    np.testing.assert_array_equal(np.load(second / "teacher-probs.npy"), np.full_like(expected, 1 / 7))

    # the same recipe and seed on the hard labels trains to a different loss: the soft targets are used
    hard = train(load_recipe(tmp_path / "r.toml"), faces, tmp_path / "hard", TrainOptions(device="cpu", progress=False))
    soft_loss, hard_loss = (float(list(csv.DictReader((d / "metrics.csv").open()))[0]["train_loss"])
                            for d in (out, hard.out_dir))
    assert soft_loss != pytest.approx(hard_loss, rel=1e-3)


def test_alpha_below_one_half_is_refused(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        lhcnet_main(["distill", "--recipe", "r.toml", "--data", "d.csv", "--out", str(tmp_path),
                     "--teachers", "t.safetensors", "--alpha", "0.3"])
    assert "expected a value in [0.5, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"expected a value in \[0.5, 1\]"):
        distill.distillation_targets(np.zeros(3, dtype=np.int64), np.ones(3, bool), np.zeros((3, 7)), 0.4, 7)
