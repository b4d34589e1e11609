"""Recipe files: validation messages, defaults, round trip, and the shipped recipes' numbers."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import tiny_models  # noqa: F401  (registers the tiny models used below)
from lhcnet.cli import main as lhcnet_main
from lhcnet.data import AugmentConfig
from lhcnet.train import RecipeError, load_recipe, parse_recipe, recipe_to_toml
from lhcnet.train.recipe import tomllib

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# docs/lhc-spec.md §4-5, stated once: (model, start, trainable, optimizer, lr, batch, patience,
# augmentation (rotation, shift, zoom, flip), seed) per stage; every stage max 300 epochs and
# early stopping on PublicTest accuracy; Adam beta 0.9/0.999 eps 1e-7; SGD momentum 0, no
# Nesterov; no weight decay; paper's JPEG training images.
PAPER = {
    "stage1": ("resnet34v2", "fresh", "all", "adam", 1e-4, 48, 30, (30, 0, 0, True), 5678),
    "stage2": ("resnet34v2", "previous", "all", "sgd", 0.01, 64, 10, (10, 0.1, 0.1, True), 5678),
    "stage3": ("resnet34v2", "previous", "all", "sgd", 0.01, 64, 5, (0, 0, 0, False), 1115),
    "stage4": ("lhcnet_resnet34v2", "previous", "all", "sgd", 0.01, 64, 3, (0, 0, 0, False), 0),
    "stageC": ("lhcnetc_resnet34v2", "previous", "gates", "adam", 1e-4, 32, 1, (0, 0, 0, False), 0),
}
STANDALONE = {  # lr, batch, patience, (rotation, shift, zoom, flip); seed 1; LHC-Net on ImageNet
    "stage1": ("adam", 1e-4, 48, 8, (30, 0, 0, True)),
    "stage2": ("sgd", 0.01, 64, 8, (10, 0.1, 0.1, True)),
    "stage3": ("sgd", 0.01, 64, 8, (0, 0, 0, False)),
}


def augment_tuple(a: AugmentConfig) -> tuple:
    return (a.rotation, a.shift, a.zoom, a.flip)


def test_paper_recipe_encodes_every_number_of_spec_section_5() -> None:
    recipe = load_recipe(RECIPES / "paper.toml")
    assert recipe.labels == "fer2013" and recipe.paper_jpeg
    got = {s.name: (s.model, s.start, s.trainable, s.optimizer.type, s.optimizer.lr, s.batch_size, s.patience,
                    augment_tuple(s.augment), s.seed) for s in recipe.stages}
    assert got == PAPER
    assert list(got) == list(PAPER)  # order
    for stage in recipe.stages:
        assert stage.max_epochs == 300 and stage.monitor == "val_acc"
        assert stage.optimizer.weight_decay == 0
        if stage.optimizer.type == "adam":
            assert stage.optimizer.betas == (0.9, 0.999) and stage.optimizer.eps == 1e-7
        else:
            assert stage.optimizer.momentum == 0 and not stage.optimizer.nesterov
    assert recipe.stages[0].pretrained == "imagenet"
    assert [s.name for s in recipe.stages if s.acceptance] == ["stage4"]  # the stage-4 filter
    assert recipe.stages[3].acceptance.margin == 0.0  # the paper's X is unknown


def test_standalone_recipe() -> None:
    recipe = load_recipe(RECIPES / "standalone.toml")
    assert [s.model for s in recipe.stages] == ["lhcnet_resnet34v2"] * 3
    assert recipe.stages[0].pretrained == "imagenet" and recipe.paper_jpeg
    got = {s.name: (s.optimizer.type, s.optimizer.lr, s.batch_size, s.patience, augment_tuple(s.augment))
           for s in recipe.stages}
    assert got == STANDALONE
    assert {s.seed for s in recipe.stages} == {1} and {s.max_epochs for s in recipe.stages} == {300}


def test_compact_recipe_is_the_48px_protocol() -> None:
    """The bundled model's recipe: backbone stages 1-3, LHC stage 4, gates stage C (spec §5)."""
    recipe = load_recipe(RECIPES / "fer2013_compact.toml")
    assert [s.model for s in recipe.stages] == ["resnet18v2_48"] * 3 + ["lhcnet_resnet18v2_48",
                                                                       "lhcnetc_resnet18v2_48"]
    assert [s.start for s in recipe.stages] == ["fresh"] + ["previous"] * 4
    assert recipe.stages[-1].trainable == "gates" and {s.monitor for s in recipe.stages} == {"val_acc"}
    assert recipe.stages[3].acceptance is not None


def test_stage4_experiment_recipes_differ_only_in_the_lhc_blocks() -> None:
    """Sets A and C: the same stage 4 from the same backbone, with and without LHC blocks."""
    with_lhc = load_recipe(RECIPES / "fer2013_compact_stage4_lhc.toml").stages
    plain = load_recipe(RECIPES / "fer2013_compact_stage4_plain.toml").stages
    main_stage4 = load_recipe(RECIPES / "fer2013_compact.toml").stages[3]
    assert len(with_lhc) == len(plain) == 1
    assert (with_lhc[0].model, plain[0].model) == ("lhcnet_resnet18v2_48", "resnet18v2_48")
    # paths in a recipe are relative to its folder: recipes/../runs/... is the repository's runs/
    assert with_lhc[0].init_file == plain[0].init_file == str(RECIPES.parent / "runs/compact/stage3-best.safetensors")
    same = ("optimizer", "batch_size", "patience", "max_epochs", "augment", "clip_grad_norm", "acceptance")
    for key in same:
        assert getattr(with_lhc[0], key) == getattr(plain[0], key) == getattr(main_stage4, key), key


def test_standalone_recipes_are_the_probe_base_schedule_with_and_without_lhc() -> None:
    """Issue 14's stand-alone pair: from scratch, the same schedule, only the model differs; the
    plain one is exactly fer2013_probe_base (whose run counts as its seed 1)."""
    plain, lhc = (load_recipe(RECIPES / f"fer2013_standalone_{name}.toml").stages for name in ("plain", "lhc"))
    base = load_recipe(RECIPES / "fer2013_probe_base.toml").stages
    assert len(plain) == len(lhc) == len(base) == 1
    assert (plain[0].model, lhc[0].model) == ("resnet18v2_48", "lhcnet_resnet18v2_48")
    assert plain[0] == base[0]
    assert dataclasses.replace(lhc[0], model=plain[0].model) == plain[0]
    assert plain[0].init_file is None and not plain[0].pretrained
    lhc_ls = load_recipe(RECIPES / "fer2013_standalone_lhc_ls.toml").stages  # the identity-start variant
    assert len(lhc_ls) == 1 and lhc_ls[0].model_args == {"lhc_layer_scale_init": 1e-4}
    assert dataclasses.replace(lhc_ls[0], model_args={}) == lhc[0]


def test_adam_standalone_recipes_change_only_the_optimiser() -> None:
    """The second stand-alone pair: the first one's schedule with the paper's stand-alone stage-1
    optimiser (Adam 1e-4, Keras' eps, no weight decay); again only the model differs."""
    plain, lhc = (load_recipe(RECIPES / f"fer2013_standalone_adam_{name}.toml").stages[0] for name in ("plain", "lhc"))
    sgd_plain = load_recipe(RECIPES / "fer2013_standalone_plain.toml").stages[0]
    assert (plain.model, lhc.model) == ("resnet18v2_48", "lhcnet_resnet18v2_48")
    assert dataclasses.replace(lhc, model=plain.model) == plain
    assert plain.optimizer.type == "adam" and plain.optimizer.lr == 1e-4 and plain.optimizer.weight_decay == 0
    assert dataclasses.replace(plain, optimizer=sgd_plain.optimizer) == sgd_plain


def test_long_stage4_recipes_differ_only_in_the_lhc_blocks() -> None:
    """Issue 14's sets A, C and C with identity start: one stage 4 from the fer2013_long backbone,
    until early stopping (no cap), the paper's filter at margin 0; only the model differs."""
    stages = {name: load_recipe(RECIPES / f"fer2013_long_stage4_{name}.toml").stages for name in ("plain", "lhc", "lhc_ls")}
    assert all(len(s) == 1 for s in stages.values())
    plain, lhc, lhc_ls = (stages[name][0] for name in ("plain", "lhc", "lhc_ls"))
    assert (plain.model, lhc.model, lhc_ls.model) == ("resnet18v2_48", "lhcnet_resnet18v2_48", "lhcnet_resnet18v2_48")
    assert (plain.model_args, lhc.model_args, lhc_ls.model_args) == ({}, {}, {"lhc_layer_scale_init": 1e-4})
    backbone = load_recipe(RECIPES / "fer2013_long.toml").stages[0]
    assert plain.init_file == str(RECIPES.parent / "runs/long-seed1/stage1-ema.safetensors")
    for key in ("init_file", "optimizer", "batch_size", "patience", "max_epochs", "augment", "label_smoothing",
                "clip_grad_norm", "acceptance"):
        assert getattr(plain, key) == getattr(lhc, key) == getattr(lhc_ls, key), key
    assert plain.patience == 3 and plain.max_epochs >= 300 and plain.acceptance.margin == 0.0
    assert plain.augment.crop == backbone.augment.crop and plain.label_smoothing == backbone.label_smoothing


@pytest.mark.parametrize("name", ["paper", "standalone", "fer2013_compact", "fer2013_compact_stage4_lhc"])
def test_resolved_recipe_round_trips(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.toml")
    again = parse_recipe(tomllib.loads(recipe_to_toml(recipe)), "config.toml")
    assert dataclasses.replace(again, source="") == dataclasses.replace(recipe, source="")


BASE = """
name = "t"
[defaults]
batch_size = 8
patience = 2
max_epochs = 3
[[stage]]
name = "a"
model = "tiny"
optimizer = { type = "adam", lr = 1e-3 }
"""


def parse(text: str):
    return parse_recipe(tomllib.loads(text), "r.toml")


@pytest.mark.parametrize("extra, message", [
    ('patiense = 3', "r.toml: stage 1 ('a'): unknown key 'patiense'; allowed keys: name, model, from"),
    ('trainable = "head"', "stage 1 ('a').trainable = 'head' is not allowed; expected one of 'all', 'lhc', 'gates'"),
    ('monitor = "acc"', "monitor = 'acc' is not allowed; expected one of 'val_acc', 'val_loss'"),
    ('augment = { rotate = 10 }', "stage 1 ('a').augment: unknown key 'rotate'; allowed keys: rotation, shift, zoom, flip"),
    ('augment = { zoom = 1.5 }', "augment.zoom = 1.5 is not allowed; expected a number in [0, 1)"),
    ('from = "previous"', "from = 'previous' but it is the first stage"),
    ('batch_size = 0', "batch_size = 0 is not allowed; expected an integer > 0"),
    ('batch_size = 8.5', "batch_size = 8.5 is not allowed; expected an integer"),
    ('on_divergence = "retry"', "on_divergence = 'retry' is not allowed; expected one of 'stop', 'continue'"),
])
def test_stage_errors_name_the_key_and_the_allowed_values(extra: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse(BASE + extra + "\n")
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    (BASE.replace('type = "adam"', 'type = "adamw"'),
     "optimizer.type = 'adamw' is not allowed; expected one of 'adam', 'sgd'"),
    (BASE.replace('lr = 1e-3', 'lr = 1e-3, momentum = 0.9'),
     "optimizer (adam): unknown key 'momentum'; allowed keys: type, lr, betas, eps, weight_decay"),
    (BASE.replace('model = "tiny"', 'model = "resnet35"'), "model = 'resnet35' is not allowed; expected one of"),
    (BASE.replace('name = "t"', 'name = "t"\nlabel = "fer2013"'),
     "top level: unknown key 'label'; allowed keys: name, description, labels"),
    (BASE.replace('name = "t"', 'name = "t"\nlabels = "affectnet"'),
     "labels = 'affectnet' is not allowed; expected one of 'fer2013', 'ferplus'"),
    (BASE.replace('model = "tiny"\n', ''), "stage 1 ('a'): missing required key 'model'"),
    (BASE.replace("patience = 2\n", ""), "stage 1 ('a'): missing required key 'patience'"),
    (BASE + '[[stage]]\nname = "a"\nfrom = "previous"\noptimizer = { type = "sgd", lr = 0.1 }\n',
     "stage 2: name 'a' is used twice"),
    (BASE + '[[stage]]\nname = "b"\noptimizer = { type = "sgd", lr = 0.1 }\n'
            'model = "tiny"\nacceptance = { margin = 0.1 }\n', "acceptance needs a stage with 'from'"),
    ('name = "t"\n', "no stages: add at least one [[stage]] table"),
])
def test_recipe_errors(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse(text)
    assert message in str(err.value)


def test_defaults_and_previous_stage_inheritance() -> None:
    recipe = parse(BASE + '[stage.model_args]\nhead_hidden = [4]\n[[stage]]\nname = "b"\nfrom = "previous"\n'
                          'model = "lhcnet_tiny"\nbatch_size = 16\noptimizer = { type = "sgd", lr = 0.1 }\n')
    a, b = recipe.stages
    assert (a.batch_size, b.batch_size, b.patience, b.max_epochs) == (8, 16, 2, 3)
    assert b.model_args == {"head_hidden": [4]}  # the previous stage's model settings carry over
    assert a.optimizer.eps == 1e-7  # Keras' Adam default, not PyTorch's 1e-8
    assert b.optimizer.momentum == 0.0
    assert recipe.with_overrides(seed=3, max_epochs=1).stages[1].seed == 3
    assert recipe.with_overrides(seed=3, max_epochs=1).stages[0].max_epochs == 1


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace("patience = 2", "patience = -2"))
    code = lhcnet_main(["train", "--recipe", str(bad), "--data", str(tmp_path / "none.csv"),
                        "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "lhcnet train: error:" in err and "patience = -2 is not allowed; expected an integer > 0" in err
    assert not (tmp_path / "run").exists()


def test_stage_can_start_from_a_model_file(tmp_path) -> None:
    recipe = parse_recipe({"stage": [{"name": "s4", "from": "runs/backbone.safetensors", "model": "lhcnet_tiny",
                                      "optimizer": {"type": "sgd", "lr": 0.01}, "batch_size": 4,
                                      "patience": 1, "max_epochs": 1, "acceptance": {"margin": 0.1}}]})
    stage = recipe.stages[0]
    assert (stage.start, stage.init_file) == ("file", "runs/backbone.safetensors")
    assert 'from = "runs/backbone.safetensors"' in recipe_to_toml(recipe)
    with pytest.raises(RecipeError, match=r"from.*'previous' or a path to a \.safetensors model file"):
        parse_recipe({"stage": [{"name": "s", "from": "backbone.pt", "model": "tiny",
                                 "optimizer": {"type": "sgd", "lr": 0.01}, "batch_size": 4,
                                 "patience": 1, "max_epochs": 1}]})
