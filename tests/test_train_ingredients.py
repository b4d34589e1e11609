"""Issue 13's recipe ingredients, each against a hand computation: warm-up + cosine learning rate,
label smoothing, the EMA of the weights, random crops and random erasing; then a tiny run with all
of them (files, metadata, the EMA evaluated like ``lhcnet evaluate``) and an exact resume."""
from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import tiny_models as tm
from lhcnet.cli import main as lhcnet_main
from lhcnet.data import AugmentConfig, augment
from lhcnet.data.augment import ERASE_AREA, random_erasing
from lhcnet.data.crop import centre_crop, crop_resize, random_crop
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import load_model
from lhcnet.train import METRIC_COLUMNS, RecipeError, TrainOptions, parse_recipe, recipe_to_toml, train
from lhcnet.train.ema import WeightEMA
from lhcnet.train.recipe import tomllib
from lhcnet.train.setup import lr_at
from lhcnet.train.trainer import training_loss

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

RECIPE = """
name = "tiny-ingredients"
[[stage]]
name = "s"
model = "tiny"
optimizer = {{ type = "sgd", lr = {lr}, momentum = 0.9, nesterov = true, weight_decay = 5e-4 }}
lr_schedule = "cosine"
warmup_epochs = 1
batch_size = 32
max_epochs = {epochs}
patience = 10
label_smoothing = {smoothing}
augment = {{ rotation = 10, flip = true, crop = 44, erase = 0.5 }}
ema = 0.9
seed = 3
"""


def tiny_recipe(lr: float = 0.05, epochs: int = 3, smoothing: float = 0.1):
    return parse_recipe(tomllib.loads(RECIPE.format(lr=lr, epochs=epochs, smoothing=smoothing)))


def one_stage(**keys) -> dict:
    stage = {"name": "s", "model": "tiny", "optimizer": {"type": "sgd", "lr": 0.1}, "batch_size": 8,
             "patience": 2, "max_epochs": 10, **keys}
    return {"stage": [stage]}


# ------------------------------------------------------------------------------ recipe keys

def test_new_stage_keys_parse_validate_and_round_trip() -> None:
    recipe = tiny_recipe()
    stage = recipe.stages[0]
    assert stage.augment == AugmentConfig(rotation=10, flip=True, crop=44, erase=0.5)
    assert (stage.label_smoothing, stage.warmup_epochs, stage.ema, stage.model_tta) == (0.1, 1, 0.9, "ten-crop")
    assert stage.optimizer.nesterov and stage.optimizer.weight_decay == 5e-4
    again = parse_recipe(tomllib.loads(recipe_to_toml(recipe)))
    assert again.stages == recipe.stages
    # the matched TTA follows the augmentation unless the recipe names one
    assert parse_recipe(one_stage(augment={"flip": True})).stages[0].model_tta == "flip"
    assert parse_recipe(one_stage()).stages[0].model_tta == "none"
    assert parse_recipe(one_stage(tta="paper")).stages[0].model_tta == "paper"
    for keys, message in [({"augment": {"crop": 50}}, "crop"), ({"augment": {"erase": 1.5}}, "probability"),
                          ({"label_smoothing": 1.0}, "label_smoothing"), ({"ema": 1.0}, "decay"),
                          ({"warmup_epochs": -1}, "warmup_epochs"), ({"tta": "twelve"}, "ten-crop"),
                          ({"tta": "ten-crop"}, "needs augment.crop")]:
        with pytest.raises(RecipeError, match=message):
            parse_recipe(one_stage(**keys))


def test_shipped_long_recipe_and_probes() -> None:
    from lhcnet.train import load_recipe

    long = load_recipe(RECIPES / "fer2013_long.toml").stages
    assert len(long) == 1 and long[0].model == "resnet18v2_48" and 150 <= long[0].max_epochs <= 200
    s = long[0]
    assert (s.optimizer.type, s.optimizer.nesterov, s.lr_schedule, s.label_smoothing) == ("sgd", True, "cosine", 0.1)
    assert s.warmup_epochs > 0 and s.optimizer.weight_decay > 0 and s.ema > 0 and s.patience >= s.max_epochs
    assert (s.augment.crop, s.augment.flip, s.augment.erase > 0, s.model_tta) == (44, True, True, "ten-crop")
    base = load_recipe(RECIPES / "fer2013_probe_base.toml").stages[0]
    for name, differs in [("ls", {"label_smoothing"}), ("crop44", {"augment", "tta"}), ("crop40", {"augment", "tta"}),
                          ("erase", {"augment"}), ("all", {"augment", "label_smoothing", "tta"})]:
        probe = load_recipe(RECIPES / f"fer2013_probe_{name}.toml").stages[0]
        changed = {k for k in vars(base) if getattr(base, k) != getattr(probe, k)}
        assert changed == differs, name


# ------------------------------------------------------------------------------ learning rate

def test_warmup_then_cosine_learning_rate_follows_the_formula() -> None:
    stage = tiny_recipe(lr=0.2, epochs=6).stages[0]               # warm-up 1 epoch of 10 steps
    steps, total, warmup = 10, 60, 10
    for t in (0, 4, 9, 10, 11, 35, 59):
        expected = 0.2 * (t + 1) / warmup if t < warmup else \
            0.2 * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        assert lr_at(stage, t // steps, t % steps, steps) == pytest.approx(expected, rel=1e-12), t
    assert lr_at(stage, 0, 9, steps) == lr_at(stage, 1, 0, steps) == pytest.approx(0.2)   # continuous
    assert lr_at(stage, 5, 9, steps) < 0.2 * 0.001                                       # ends near 0


# ------------------------------------------------------------------------------ label smoothing

def test_label_smoothing_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    eps = 0.1
    by_hand = -((1 - eps) * logp[[0, 1], [0, 1]] + eps * logp.mean(1)).mean()
    assert float(training_loss(logits, labels, eps)) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(training_loss(logits, labels)) == pytest.approx(float(-logp[[0, 1], [0, 1]].mean()), rel=1e-6)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])
    by_hand = -(((1 - eps) * soft + eps / 3) * logp).sum(1).mean()
    assert float(training_loss(logits, soft, eps)) == pytest.approx(float(by_hand), rel=1e-6)


def test_the_logged_training_loss_is_linear_in_the_label_smoothing(tmp_path: Path) -> None:
    """With a learning rate of ~0 the weights and batches are the same for every smoothing e, so
    the epoch's mean loss is (1 - e) CE + e U for the same CE and U: L(0.4) - L(0) = 2 (L(0.2) - L(0))."""
    data = tm.synthetic_faces(n_train=96, n_val=14)
    losses = {}
    for eps in (0.0, 0.2, 0.4):
        result = train(tiny_recipe(lr=1e-12, epochs=1, smoothing=eps), data, tmp_path / f"ls{eps}",
                       TrainOptions(device="cpu", progress=False, plot_every_s=0))
        assert result.status == "finished"
        with open(result.out_dir / "metrics.csv", newline="") as f:
            losses[eps] = float(next(csv.DictReader(f))["train_loss"])
    # metrics.csv keeps 8 significant digits: L(0.4) - 2 L(0.2) + L(0) is exact to 4 x 5e-8
    assert losses[0.4] - losses[0.0] == pytest.approx(2 * (losses[0.2] - losses[0.0]), abs=3e-7)
    assert abs(losses[0.2] - losses[0.0]) > 1e-4                 # the smoothing does change the loss


# ------------------------------------------------------------------------------ EMA

def test_ema_after_k_steps_is_the_hand_computed_average() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema, decay = WeightEMA(model, 0.8), 0.8
    sequence = []
    for k in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        model(torch.randn(5, 3))                               # moves the BatchNorm statistics
        sequence.append({key: v.clone() for key, v in model.state_dict().items()})
        ema.update(model)
    averaged = ema.module.state_dict()
    for key, value in start.items():
        if not value.is_floating_point():
            assert torch.equal(averaged[key], sequence[-1][key])       # num_batches_tracked copied
            continue
        by_hand = decay ** 4 * value + sum((1 - decay) * decay ** (3 - i) * w[key] for i, w in enumerate(sequence))
        torch.testing.assert_close(averaged[key], by_hand)
    copy = WeightEMA(model, 0.8)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 4 and all(torch.equal(a, b) for a, b in
                                     zip(copy.module.state_dict().values(), averaged.values()))
    assert not any(p.requires_grad for p in ema.module.parameters())


# ------------------------------------------------------------------------------ crops, erasing

def test_random_crops_are_crops_at_uniform_corners_resized_back() -> None:
    x = torch.rand(64, 1, 48, 48, generator=torch.Generator().manual_seed(0)) * 255
    out = random_crop(x, 44, torch.Generator().manual_seed(1))
    assert out.shape == (64, 1, 48, 48)
    corners = []
    for image, cropped in zip(x, out):                         # which of the 5 x 5 positions it is
        found = [(t, l) for t in range(5) for l in range(5)
                 if torch.allclose(F.interpolate(image[None, :, t:t + 44, l:l + 44], size=(48, 48),
                                                 mode="bilinear", align_corners=False)[0], cropped)]
        assert len(found) == 1
        corners += found
    assert {t for t, _ in corners} == {l for _, l in corners} == set(range(5))
    torch.testing.assert_close(centre_crop(x, 44), crop_resize(x, 2, 2, 44))
    assert centre_crop(torch.zeros(2, 3, 16, 16), 44).shape == (2, 3, 16, 16)   # side round(44 / 3) = 15


def test_random_erasing_changes_exactly_one_rectangle() -> None:
    x = torch.rand(200, 1, 48, 48, generator=torch.Generator().manual_seed(2)) * 255
    out = random_erasing(x, 1.0, torch.Generator().manual_seed(3))
    for image, erased in zip(x, out):
        changed = (image != erased)[0]
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        box = torch.zeros_like(changed)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(changed, box)                       # a filled rectangle, nothing else
        assert ERASE_AREA[0] * 0.8 <= changed.double().mean() <= ERASE_AREA[1] * 1.25
        assert erased[0][box].min() >= 0 and erased[0][box].max() <= 255
    half = random_erasing(x, 0.5, torch.Generator().manual_seed(4))
    assert 70 < int((half != x).flatten(1).any(1).sum()) < 130
    assert torch.equal(augment(x, AugmentConfig(erase=0.0, flip=False), torch.Generator()), x)
    rgb = augment(x[:4].expand(-1, 3, -1, -1), AugmentConfig(crop=40, erase=1.0), torch.Generator().manual_seed(5))
    assert torch.equal(rgb[:, 0], rgb[:, 2])                   # the channels alike (grey stays grey)


# ------------------------------------------------------------------------------ a run with all of them

@pytest.fixture(scope="module")
def run_with_everything(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ingredients")
    data = tm.synthetic_faces(n_train=160, n_val=42)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(tiny_recipe(), data, tmp / "reference", TrainOptions(device="cpu", progress=False,
                                                                              plot_every_s=0))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "finished"
    return tmp, data, result.out_dir


def test_a_run_records_the_ema_the_crop_and_the_tta(run_with_everything) -> None:
    _, data, out = run_with_everything
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    stage = tiny_recipe().stages[0]
    for epoch, row in enumerate(rows):                          # the lr after each epoch's last step
        assert float(row["lr"]) == pytest.approx(lr_at(stage, epoch, 4, 5), rel=1e-6)
    ema_file, best_file = load_model(out / "s-ema.safetensors"), load_model(out / "s-best.safetensors")
    assert ema_file.lhcnet_metadata["info"]["ema"] == 0.9
    for model in (ema_file, best_file, load_model(out / "final.safetensors")):
        assert {k: model.lhcnet_metadata["info"][k] for k in ("crop", "tta")} == {"crop": 44, "tta": "ten-crop"}
    summary = json.loads((out / "summary.json").read_text())["stages"][0]["ema"]
    assert summary["file"] == "s-ema.safetensors"
    # the trainer's validation (centre crops) is what lhcnet evaluate computes for the saved files
    val = data.split("PublicTest")
    faces, labels = torch.from_numpy(val.images), torch.from_numpy(val.labels)
    for model, prefix, epoch in ((ema_file, "ema_", summary["best_epoch"]),
                                 (best_file, "", best_file.lhcnet_metadata["info"]["epoch"])):
        probs = predict_probabilities(model, faces)
        nll = -probs[torch.arange(len(labels)), labels].log().mean()
        assert float(rows[epoch - 1][prefix + "val_loss"]) == pytest.approx(float(nll), rel=1e-4)
        accuracy = (probs.argmax(1) == labels).double().mean()
        assert float(rows[epoch - 1][prefix + "val_acc"]) == pytest.approx(float(accuracy), abs=1e-7)  # csv: 8 digits
    no_crop = predict_probabilities(load_model(out / "s-ema.safetensors"), faces, views=())  # views () -> crop too
    assert torch.equal(no_crop, predict_probabilities(ema_file, faces))
    assert max(float(r["ema_val_acc"]) for r in rows) == pytest.approx(summary["best_val_acc"])


def test_sigterm_mid_epoch_then_resume_continues_the_same_ema(run_with_everything, monkeypatch) -> None:
    tmp, data, reference = run_with_everything
    csv_path = tm.write_fer2013_csv(data, tmp / "faces.csv")
    recipe = tmp / "recipe.toml"
    recipe.write_text(RECIPE.format(lr=0.05, epochs=3, smoothing=0.1))
    common = ["train", "--data", str(csv_path), "--out", str(tmp / "stopped"), "--device", "cpu", "--no-progress"]
    monkeypatch.setenv("LHCNET_HOME", str(tmp / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(tm, "_forwards", 0)
        monkeypatch.setenv("LHCNET_TEST_SIGNAL_AT", "8")            # epoch 2, batch 3 (5 batches an epoch)
        assert lhcnet_main(common + ["--recipe", str(recipe)]) == 130
        monkeypatch.delenv("LHCNET_TEST_SIGNAL_AT")
        assert lhcnet_main(common + ["--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    for name in ("s-ema.safetensors", "final.safetensors"):
        got, expected = load_file(str(tmp / "stopped" / name)), load_file(str(reference / name))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert metric_rows(tmp / "stopped") == metric_rows(reference)   # incl. the EMA's loss every epoch


def metric_rows(run: Path) -> list[tuple[str, ...]]:
    with open(run / "metrics.csv", newline="") as f:
        return [tuple(row[c] for c in METRIC_COLUMNS) for row in csv.DictReader(f)]
