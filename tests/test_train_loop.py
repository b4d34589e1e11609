"""The training loop on tiny models and separable synthetic data (in-process, one thread)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as tm
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import load_model
from lhcnet.train import METRIC_COLUMNS, TIMING_COLUMNS, TrainOptions, load_recipe, train
from lhcnet.train.checkpoint import load_checkpoint
from lhcnet.train.recipe import RecipeError, parse_recipe, tomllib
from lhcnet.train.setup import build_model, lr_at

CHANCE = 1 / 7


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are fastest (and bit-repeatable) on one thread of this shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metric_rows(run_dir: Path, columns=METRIC_COLUMNS) -> list[tuple[str, ...]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [tuple(row[c] for c in columns) for row in csv.DictReader(f)]


def train_tiny(tmp: Path, recipe_text: str | None = None, name: str = "run", max_epochs: int = 6,
               seed: int | None = None, **options):
    path = tmp / f"{name}.toml"
    if recipe_text is None:
        tm.two_stage_recipe(path, max_epochs=max_epochs)
    else:
        path.write_text(recipe_text)
    recipe = load_recipe(path).with_overrides(seed=seed)
    return train(recipe, tm.synthetic_faces(), tmp / name, TrainOptions(device="cpu", progress=False, **options))


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_stage")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = train_tiny(tmp)
    seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    return result, seconds


def test_two_stage_recipe_learns_separable_data(two_stage) -> None:
    result, seconds = two_stage
    run = result.out_dir
    print(f"two-stage tiny run: {seconds:.1f} s, final val acc {result.stages[-1]['best_val_acc']:.3f}")
    assert result.status == "finished" and result.exit_code == 0
    assert seconds < 60
    rows = metric_rows(run, METRIC_COLUMNS + TIMING_COLUMNS)
    assert [r[0] for r in rows] == ["backbone"] * 6 + ["lhc"] * 6
    assert [int(r[1]) for r in rows] == [1, 2, 3, 4, 5, 6] * 2
    val_acc = [float(r[5]) for r in rows]
    assert max(val_acc) >= 3 * CHANCE  # learned: chance is 1/7
    assert float(rows[-1][2]) < float(rows[0][2])  # training loss went down
    assert {float(r[6]) for r in rows[:6]} == {3e-3} and {float(r[6]) for r in rows[6:]} == {0.01}

    # the best epoch of each stage is kept; the final model is the last stage's best
    for stage in result.stages:
        assert stage["best_val_acc"] == pytest.approx(max(val_acc[:6] if stage["stage"] == "backbone"
                                                          else val_acc[6:]), rel=1e-7)  # the CSV has 8 digits
    final = load_model(result.final)
    # an independent path (lhcnet.evaluate, not the trainer's loop) scores the final model as recorded
    val = tm.synthetic_faces().split("PublicTest")
    probs = predict_probabilities(final, torch.from_numpy(val.images.copy()))
    assert (probs.argmax(1).numpy() == val.labels).mean() == pytest.approx(result.stages[-1]["best_val_acc"], abs=1e-9)
    info = final.lhcnet_metadata["info"]
    assert final.lhcnet_metadata["name"] == "lhcnet_tiny"
    assert info["recipe"] == "tiny-two-stage" and len(info["classes"]) == 7
    assert info["val_acc"] == pytest.approx(result.stages[-1]["best_val_acc"])
    best = load_file(str(run / "lhc-best.safetensors"))
    assert all(torch.equal(best[k], v) for k, v in load_file(str(result.final)).items())
    for name in ("config.toml", "train.log", "checkpoint.pt", "training-curves.png", "backbone-best.safetensors"):
        assert (run / name).stat().st_size > 0, name
    assert load_recipe(run / "config.toml").stages[1].acceptance.margin == 1.0

    # the acceptance rule of the LHC stage is reported
    summary = json.loads((run / "summary.json").read_text())
    acceptance = summary["stages"][1]["acceptance"]
    assert acceptance["accepted"] == (acceptance["final_train_loss"] < acceptance["start_train_loss"] + 1.0)
    assert "ACCEPTED" in (run / "train.log").read_text() or "REJECTED" in (run / "train.log").read_text()


def test_same_seed_gives_identical_metrics(two_stage, tmp_path) -> None:
    first, _ = two_stage
    again = train_tiny(tmp_path, name="again")
    assert metric_rows(again.out_dir) == metric_rows(first.out_dir)
    other = train_tiny(tmp_path, name="other", seed=8, max_epochs=2)
    assert metric_rows(other.out_dir)[:2] != metric_rows(first.out_dir)[:2]


def test_lhc_handover_loads_the_backbone_by_name(two_stage) -> None:
    result, _ = two_stage
    recipe = load_recipe(result.out_dir / "config.toml")
    best = load_file(str(result.out_dir / "backbone-best.safetensors"))
    model = build_model(recipe.stages[1], 7, result.out_dir / "backbone-best.safetensors")
    state = model.state_dict()
    assert {k for k in state if k not in best} == {k for k in state if k.startswith("lhc.")} != set()
    assert all(torch.equal(state[k], v) for k, v in best.items())


GATES_RECIPE = """
name = "tiny-gates"
paper_jpeg = true

[defaults]
batch_size = 32
max_epochs = 2
patience = 3
seed = 7

[[stage]]
name = "lhc"
model = "lhcnet_tiny"
optimizer = { type = "adam", lr = 3e-3 }

[[stage]]
name = "gates"
from = "previous"
model = "lhcnetc_tiny"
trainable = "gates"
optimizer = { type = "adam", lr = 0.05 }
"""


def test_gates_stage_trains_only_the_gates(tmp_path) -> None:
    result = train_tiny(tmp_path, GATES_RECIPE)
    assert result.status == "finished"
    before = load_file(str(result.out_dir / "lhc-best.safetensors"))
    after = load_file(str(result.final))
    changed = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    # only the two gates moved: every other weight and the BatchNorm statistics stayed frozen
    assert changed == {"lhc.stem.gate", "lhc.stage2.gate"}
    assert [round(float(after[k]), 6) for k in sorted(changed)] != [-0.5, 0.0]


def test_nan_loss_stops_with_a_message_and_keeps_the_best(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tm, "_forwards", 0)
    monkeypatch.setenv("LHCNET_TEST_NAN_AT", str(6 * 9 + 9 + 3))  # stage 2, epoch 2, batch 3
    result = train_tiny(tmp_path)
    assert result.status == "diverged" and result.exit_code == 3
    assert "training loss is not finite: nan at epoch 2 batch 3" in result.message
    assert "training loss is not finite" in (result.out_dir / "train.log").read_text()
    best = load_model(result.out_dir / "lhc-best.safetensors")
    assert best.lhcnet_metadata["info"]["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in best.state_dict().values() if p.is_floating_point())
    with torch.no_grad():
        assert torch.isfinite(best(torch.rand(2, 3, 16, 16) * 255)).all()
    state = load_checkpoint(result.out_dir / "checkpoint.pt")
    assert state["progress"]["results"][-1]["status"] == "diverged"
    assert len(metric_rows(result.out_dir)) == 6 + 1  # the diverged epoch is not logged
    # --resume after a divergence continues after the diverged stage (here: the run ends)
    monkeypatch.delenv("LHCNET_TEST_NAN_AT")
    resumed = train(load_recipe(result.out_dir / "config.toml"), tm.synthetic_faces(), result.out_dir,
                    TrainOptions(device="cpu", progress=False, resume=True))
    assert resumed.status == "finished" and load_model(resumed.final).lhcnet_metadata["info"]["val_acc"] > CHANCE


def test_loss_explosion_before_any_epoch_keeps_nothing(tmp_path) -> None:
    text = tm.TWO_STAGE_RECIPE.format(max_epochs=2).replace("loss_explosion = 10.0", "loss_explosion = 0.5")
    result = train_tiny(tmp_path, text)
    assert result.status == "diverged"
    assert "exploded" in result.message and "no best weights" in result.message
    assert not (result.out_dir / "backbone-best.safetensors").exists()


def test_existing_run_dir_needs_resume(two_stage) -> None:
    result, _ = two_stage
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        train(load_recipe(result.out_dir / "config.toml"), tm.synthetic_faces(), result.out_dir,
              TrainOptions(device="cpu", progress=False))
    again = train(load_recipe(result.out_dir / "config.toml"), tm.synthetic_faces(), result.out_dir,
                  TrainOptions(device="cpu", progress=False, resume=True))
    assert again.status == "finished" and again.message == "already finished"
    with pytest.raises(ValueError, match="the recipe differs"):
        train(load_recipe(result.out_dir / "config.toml").with_overrides(seed=1), tm.synthetic_faces(),
              result.out_dir, TrainOptions(device="cpu", progress=False, resume=True))
    assert math.isfinite(result.stages[0]["best_val_loss"])


def one_stage_from_file(model_file: Path, model: str, lr: float, extra: str = "") -> str:
    """A one-epoch, one-stage recipe (stage ``s``) starting from ``model_file``; plain SGD."""
    return f"""
name = "from-file"
[[stage]]
name = "s"
from = "{model_file}"
model = "{model}"
optimizer = {{ type = "sgd", lr = {lr} }}
batch_size = 32
patience = 1
max_epochs = 1
{extra}
"""


def test_stage_from_a_model_file_continues_a_trained_backbone(two_stage, tmp_path) -> None:
    """The paper's sets A and C: stage 4 runs, with and without LHC, from one trained backbone file."""
    result, _ = two_stage
    backbone = result.out_dir / "backbone-best.safetensors"
    recipe = one_stage_from_file(backbone, "lhcnet_tiny", lr=0.01,
                                 extra='acceptance = { margin = 1.0, on_reject = "continue" }')
    run = train_tiny(tmp_path, recipe, name="s4")
    assert run.status == "finished"
    log = (run.out_dir / "train.log").read_text()
    assert f"from {backbone}" in log and "training loss of the starting model" in log
    # the starting model's accuracy carries over: far above chance after a single epoch
    assert run.stages[0]["best_val_acc"] >= 0.5

    missing = recipe.replace(str(backbone), str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such model file"):
        train_tiny(tmp_path, missing, name="s4-missing")


def test_clip_grad_norm_bounds_every_step(two_stage, tmp_path) -> None:
    """``clip_grad_norm``: each plain-SGD step moves the weights by at most lr x the clip norm."""
    result, _ = two_stage
    backbone = result.out_dir / "backbone-best.safetensors"
    recipe = one_stage_from_file(backbone, "tiny", lr=1.0, extra="loss_explosion = 0\nclip_grad_norm = {clip}")
    start = load_file(str(backbone))

    def moved(clip: float, name: str) -> float:
        run = train_tiny(tmp_path, recipe.replace("{clip}", repr(clip)), name=name)
        assert "clip_grad_norm = " + repr(clip) in (run.out_dir / "config.toml").read_text()
        assert ("gradient norm clipped to 0.0001" in (run.out_dir / "train.log").read_text()) == (clip > 0)
        end = load_file(str(run.out_dir / "s-best.safetensors"))
        names = [k for k in start if "running" not in k and "num_batches" not in k]
        return math.sqrt(sum(float((end[k].double() - start[k].double()).pow(2).sum()) for k in names))

    steps = math.ceil(len(tm.synthetic_faces().split("Training").labels) / 32)
    assert moved(1e-4, "clipped") <= steps * 1.0 * 1e-4 * (1 + 1e-3)
    assert moved(0.0, "free") > 100 * steps * 1e-4  # lr 1.0 unclipped moves far


def test_lr_at_cosine_runs_from_the_base_lr_to_zero() -> None:
    """``lr_schedule = "cosine"``: lr(0) = base, lr(half way) = base / 2, falling to 0; constant stays."""
    stage = parse_recipe(tomllib.loads(one_stage_from_file(Path("m.safetensors"), "tiny", lr=0.1,
                                                           extra='lr_schedule = "cosine"')),
                         "cosine.toml").stages[0]
    stage = dataclasses.replace(stage, max_epochs=4)
    assert lr_at(stage, 0, 0, 10) == pytest.approx(0.1)
    assert lr_at(stage, 2, 0, 10) == pytest.approx(0.05)
    assert lr_at(stage, 3, 9, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    values = [lr_at(stage, e, s, 10) for e in range(4) for s in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly falling
    constant = dataclasses.replace(stage, lr_schedule="constant")
    assert {lr_at(constant, e, s, 10) for e in range(4) for s in range(10)} == {0.1}


def test_cosine_schedule_sets_the_optimizer_lr(two_stage, tmp_path) -> None:
    """A run with the cosine schedule records it and ends its epoch at lr_at's last value."""
    result, _ = two_stage
    backbone = result.out_dir / "backbone-best.safetensors"
    run = train_tiny(tmp_path, one_stage_from_file(backbone, "tiny", lr=0.01, extra='lr_schedule = "cosine"'),
                     name="cosine")
    assert 'lr_schedule = "cosine"' in (run.out_dir / "config.toml").read_text()
    assert "cosine lr schedule over 1 epochs" in (run.out_dir / "train.log").read_text()
    rows = list(csv.DictReader((run.out_dir / "metrics.csv").open()))
    steps = math.ceil(len(tm.synthetic_faces().split("Training").labels) / 32)
    assert float(rows[-1]["lr"]) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * (steps - 1) / steps)))
    with pytest.raises(RecipeError, match="lr_schedule"):
        parse_recipe(tomllib.loads(one_stage_from_file(backbone, "tiny", lr=0.01, extra='lr_schedule = "step"')))
