"""Training recipes: a TOML file -> validated, immutable stage settings.

A recipe is a list of stages run in order (``docs/training.md``)::

    name = "paper"
    labels = "fer2013"

    [defaults]              # any stage key; a stage's own value wins
    max_epochs = 300

    [[stage]]
    name = "stage1"
    model = "resnet34v2"    # a fresh model (``pretrained`` optional) ...
    optimizer = { type = "adam", lr = 1e-4 }

    [[stage]]
    name = "stage4"
    from = "previous"       # ... or start from the previous stage's best weights,
    model = "lhcnet_resnet34v2"  # optionally in a model with LHC blocks (matched by name)

Every error names the file, the stage, the bad key and the allowed values. ``recipe_to_toml``
writes a resolved recipe (defaults applied) that ``load_recipe`` reads back unchanged: it is the
``config.toml`` of a run directory.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..data.augment import AugmentConfig

__all__ = ["RecipeError", "OptimizerSettings", "Acceptance", "Stage", "Recipe", "matched_tta",
           "load_recipe", "parse_recipe", "recipe_to_toml", "LABELS", "TRAINABLE", "MONITORS",
           "OPTIMIZERS", "ON_STOP"]

LABELS = ("fer2013", "ferplus")
TRAINABLE = ("all", "lhc", "gates")
MONITORS = ("val_acc", "val_loss")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
ON_STOP = ("stop", "continue")  # what a divergence / rejected stage does to the rest of the run
PRETRAINED_SOURCES = "'imagenet' or a path to a safetensors file of backbone weights"


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the key and the allowed values."""


@dataclass(frozen=True)
class OptimizerSettings:
    """Keras defaults: Adam eps 1e-7 (PyTorch's is 1e-8); SGD without momentum."""

    type: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Acceptance:
    """The paper's stage-4 filter: accept when the final training loss (un-augmented training set,
    eval mode) < the starting model's training loss + ``margin`` (the paper's margin is unknown)."""

    margin: float = 0.0
    on_reject: str = "stop"


@dataclass(frozen=True)
class Stage:
    name: str
    model: str
    start: str                      # "fresh", "previous" (the previous stage's best weights) or "file"
    optimizer: OptimizerSettings
    batch_size: int
    patience: int
    max_epochs: int
    pretrained: str | None = None   # only for fresh stages
    init_file: str | None = None    # start = "file": a model file whose weights are loaded by name
    model_args: dict[str, Any] = field(default_factory=dict)
    trainable: str = "all"
    augment: AugmentConfig = AugmentConfig()  # the training batches' augmentation (data/augment.py)
    monitor: str = "val_acc"
    seed: int = 0
    eval_batch_size: int = 0        # 0: 2 x batch_size
    loss_explosion: float = 10.0    # stop when a batch loss > factor x max(ln classes, first loss); 0: off
    clip_grad_norm: float = 0.0     # clip the global gradient L2 norm to this before each step; 0: off
    lr_schedule: str = "constant"   # "cosine": lr decays to 0 over max_epochs (per step); see lr_at
    on_divergence: str = "stop"
    acceptance: Acceptance | None = None
    label_smoothing: float = 0.0    # cross-entropy against (1 - e) one-hot + e / K (training loss only)
    warmup_epochs: int = 0          # lr rises linearly from lr / steps to lr over these epochs; see lr_at
    ema: float = 0.0                # decay of an exponential moving average of the weights; 0: off
    tta: str = ""                   # the TTA the stage's model files record; "" = matched_tta(augment)

    @property
    def model_tta(self) -> str:
        """What the stage's model files record as their TTA (``info["tta"]``)."""
        return self.tta or matched_tta(self.augment)


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    labels: str = "fer2013"
    paper_jpeg: bool = False        # training images floored to uint8 + JPEG q100 4:4:4 (spec §5)
    limit_train: int = 0            # debug: use only the first N training images (0: all)
    limit_val: int = 0              # debug: use only the first N validation images (0: all)
    source: str = ""                # the file it was read from (not written to config.toml)

    def with_overrides(self, seed: int | None = None, max_epochs: int | None = None,
                       limit_train: int | None = None, limit_val: int | None = None) -> Recipe:
        """The command line's ``--seed`` / ``--max-epochs`` apply to every stage."""
        stages = self.stages
        if seed is not None:
            stages = tuple(dataclasses.replace(s, seed=seed) for s in stages)
        if max_epochs is not None:
            _check(max_epochs >= 1, "--max-epochs", max_epochs, "a positive integer")
            stages = tuple(dataclasses.replace(s, max_epochs=max_epochs) for s in stages)
        recipe = dataclasses.replace(self, stages=stages)
        for flag, value in (("--limit-train", limit_train), ("--limit-val", limit_val)):
            _check(value is None or value >= 0, flag, value, "0 (all images) or a positive number of images")
        if limit_train is not None:
            recipe = dataclasses.replace(recipe, limit_train=limit_train)
        if limit_val is not None:
            recipe = dataclasses.replace(recipe, limit_val=limit_val)
        return recipe


# ------------------------------------------------------------------------------------ parsing

TOP_KEYS = ("name", "description", "labels", "paper_jpeg", "limit_train", "limit_val", "defaults",
            "stage")
STAGE_KEYS = ("name", "model", "from", "pretrained", "model_args", "trainable", "optimizer",
              "batch_size", "augment", "patience", "max_epochs", "monitor", "seed", "eval_batch_size",
              "loss_explosion", "clip_grad_norm", "lr_schedule", "on_divergence", "acceptance",
              "label_smoothing", "warmup_epochs", "ema", "tta")
OPTIMIZER_KEYS_BY_TYPE = {"adam": ("type", "lr", "betas", "eps", "weight_decay"),
                          "sgd": ("type", "lr", "momentum", "nesterov", "weight_decay")}
AUGMENT_KEYS = ("rotation", "shift", "zoom", "flip", "crop", "erase")
ACCEPTANCE_KEYS = ("margin", "on_reject")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def _check(ok: bool, where: str, value: Any, allowed: str) -> None:
    if not ok:
        raise RecipeError(f"{where} = {value!r} is not allowed; expected {allowed}")


def _unknown_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


def _number(table: dict[str, Any], key: str, where: str, default: Any = None, *, integer: bool = False,
            minimum: float | None = None, positive: bool = False) -> Any:
    if key not in table:
        if default is None:
            raise RecipeError(f"{where}: missing required key {key!r}")
        return default
    value = table[key]
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok, kind = value > 0, f"{kind} > 0"
    if ok and minimum is not None:
        ok, kind = value >= minimum, f"{kind} >= {minimum:g}"
    _check(ok, f"{where}.{key}", value, kind)
    return int(value) if integer else float(value)


def _choice(table: dict[str, Any], key: str, where: str, allowed: tuple[str, ...], default: str | None) -> str:
    value = table.get(key, default)
    if value is None:
        raise RecipeError(f"{where}: missing required key {key!r}; allowed values: {', '.join(allowed)}")
    _check(value in allowed, f"{where}.{key}", value, "one of " + ", ".join(map(repr, allowed)))
    return value


def _bool(table: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    _check(isinstance(value, bool), f"{where}.{key}", value, "true or false")
    return value


def _table(table: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = table.get(key)
    if value is not None and not isinstance(value, dict):
        raise RecipeError(f"{where}.{key} must be a table, e.g. {key} = {{ ... }}; got {value!r}")
    return value


def _parse_optimizer(table: dict[str, Any], where: str) -> OptimizerSettings:
    kind = _choice(table, "type", where, OPTIMIZERS, None)
    _unknown_keys(table, OPTIMIZER_KEYS_BY_TYPE[kind], f"{where} ({kind})")
    betas = table.get("betas", [0.9, 0.999])
    _check(isinstance(betas, (list, tuple)) and len(betas) == 2
           and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
           f"{where}.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    nesterov = _bool(table, "nesterov", where, False)
    momentum = _number(table, "momentum", where, 0.0, minimum=0)
    _check(not nesterov or momentum > 0, f"{where}.nesterov", nesterov, "false when momentum is 0")
    return OptimizerSettings(type=kind, lr=_number(table, "lr", where, positive=True),
                             betas=(float(betas[0]), float(betas[1])),
                             eps=_number(table, "eps", where, 1e-7, positive=True),
                             momentum=momentum, nesterov=nesterov,
                             weight_decay=_number(table, "weight_decay", where, 0.0, minimum=0))


def _parse_augment(table: dict[str, Any] | None, where: str) -> AugmentConfig:
    if table is None:
        return AugmentConfig()
    _unknown_keys(table, AUGMENT_KEYS, where)
    zoom = _number(table, "zoom", where, 0.0, minimum=0)
    _check(zoom < 1, f"{where}.zoom", zoom, "a number in [0, 1)")
    crop = _number(table, "crop", where, 0, integer=True, minimum=0)
    _check(crop <= 48, f"{where}.crop", crop, "0 (no crop) or the crop's side in px of the 48-px face, 1..48")
    erase = _number(table, "erase", where, 0.0, minimum=0)
    _check(erase <= 1, f"{where}.erase", erase, "a probability in [0, 1]")
    return AugmentConfig(rotation=_number(table, "rotation", where, 0.0, minimum=0),
                         shift=_number(table, "shift", where, 0.0, minimum=0),
                         zoom=zoom, flip=_bool(table, "flip", where, False), crop=crop, erase=erase)


def matched_tta(augment: AugmentConfig) -> str:
    """The TTA view set that matches a stage's augmentation (``lhcnet.tta``): ten-crop after
    random crops, flip after flips, else the single view."""
    return "ten-crop" if augment.crop else "flip" if augment.flip else "none"


def _parse_tta(raw: dict[str, Any], where: str, augment: AugmentConfig) -> str:
    from ..tta import VIEW_SETS

    tta = raw.get("tta", matched_tta(augment))
    _check(tta in VIEW_SETS, f"{where}.tta", tta, "one of " + ", ".join(map(repr, VIEW_SETS)))
    _check(tta != "ten-crop" or augment.crop > 0, f"{where}.tta", tta,
           "a view set without crops: ten-crop needs augment.crop")
    return tta


def _parse_stage(raw: dict[str, Any], index: int, previous: Stage | None, models: list[str]) -> Stage:
    where = f"stage {index + 1}"
    if isinstance(raw.get("name"), str):
        where += f" ({raw['name']!r})"
    _unknown_keys(raw, STAGE_KEYS, where)
    name = raw.get("name", f"stage{index + 1}")
    _check(isinstance(name, str) and bool(NAME_PATTERN.match(name)), f"{where}.name", name,
           "letters, digits, '_' or '-' (it names the stage's files)")

    start, init_file = "fresh", None
    if "from" in raw:
        source = raw["from"]
        _check(isinstance(source, str) and (source == "previous" or source.endswith(".safetensors")),
               f"{where}.from", source, "'previous' or a path to a .safetensors model file (or leave it out)")
        start, init_file = ("previous", None) if source == "previous" else ("file", source)
        if start == "previous" and previous is None:
            raise RecipeError(f"{where}: from = 'previous' but it is the first stage")
        _check("pretrained" not in raw, f"{where}.pretrained", raw.get("pretrained"),
               "no 'pretrained' in a stage that starts from trained weights ('from')")
    model = raw.get("model", previous.model if start == "previous" else None)
    if model is None:
        raise RecipeError(f"{where}: missing required key 'model' (a stage needs a model unless "
                          "from = 'previous')")
    _check(model in models, f"{where}.model", model, "one of " + ", ".join(models))
    pretrained = raw.get("pretrained")
    _check(pretrained is None or (isinstance(pretrained, str) and pretrained != ""), f"{where}.pretrained",
           pretrained, PRETRAINED_SOURCES)
    model_args = _table(raw, "model_args", where) or {}
    if start == "previous" and "model_args" not in raw:
        model_args = previous.model_args

    optimizer = _table(raw, "optimizer", where)
    if optimizer is None:
        raise RecipeError(f"{where}: missing required key 'optimizer', e.g. optimizer = "
                          "{ type = 'adam', lr = 1e-4 }")
    acceptance = _table(raw, "acceptance", where)
    if acceptance is not None:
        _unknown_keys(acceptance, ACCEPTANCE_KEYS, f"{where}.acceptance")
        acceptance = Acceptance(margin=_number(acceptance, "margin", f"{where}.acceptance", 0.0),
                                on_reject=_choice(acceptance, "on_reject", f"{where}.acceptance", ON_STOP,
                                                  "stop"))
        if start == "fresh":
            raise RecipeError(f"{where}.acceptance needs a stage with 'from' (it compares with the "
                              "model the stage starts from)")
    augment = _parse_augment(_table(raw, "augment", where), f"{where}.augment")
    max_epochs = _number(raw, "max_epochs", where, integer=True, positive=True)
    warmup_epochs = _number(raw, "warmup_epochs", where, 0, integer=True, minimum=0)
    label_smoothing = _number(raw, "label_smoothing", where, 0.0, minimum=0)
    _check(label_smoothing < 1, f"{where}.label_smoothing", label_smoothing, "a number in [0, 1)")
    ema = _number(raw, "ema", where, 0.0, minimum=0)
    _check(ema < 1, f"{where}.ema", ema, "0 (off) or a decay in (0, 1), e.g. 0.999")
    return Stage(
        name=name, model=model, start=start, pretrained=pretrained, init_file=init_file,
        model_args=dict(model_args),
        trainable=_choice(raw, "trainable", where, TRAINABLE, "all"),
        optimizer=_parse_optimizer(optimizer, f"{where}.optimizer"),
        batch_size=_number(raw, "batch_size", where, integer=True, positive=True),
        augment=augment,
        patience=_number(raw, "patience", where, integer=True, positive=True),
        max_epochs=max_epochs,
        monitor=_choice(raw, "monitor", where, MONITORS, "val_acc"),
        seed=_number(raw, "seed", where, 0, integer=True, minimum=0),
        eval_batch_size=_number(raw, "eval_batch_size", where, 0, integer=True, minimum=0),
        loss_explosion=_number(raw, "loss_explosion", where, 10.0, minimum=0),
        clip_grad_norm=_number(raw, "clip_grad_norm", where, 0.0, minimum=0),
        lr_schedule=_choice(raw, "lr_schedule", where, LR_SCHEDULES, "constant"),
        on_divergence=_choice(raw, "on_divergence", where, ON_STOP, "stop"),
        acceptance=acceptance, label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, ema=ema,
        tta=_parse_tta(raw, where, augment),
    )


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a recipe's TOML table and apply ``[defaults]`` to every stage."""
    from ..models import list_models

    try:
        _unknown_keys(data, TOP_KEYS, "top level")
        name = data.get("name", Path(source).stem)
        _check(isinstance(name, str) and name != "", "name", name, "a non-empty string")
        defaults = _table(data, "defaults", "top level") or {}
        _unknown_keys(defaults, tuple(k for k in STAGE_KEYS if k not in ("name", "from")), "[defaults]")
        raw_stages = data.get("stage")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise RecipeError("no stages: add at least one [[stage]] table")
        stages: list[Stage] = []
        for index, raw in enumerate(raw_stages):
            stage = _parse_stage({**defaults, **raw}, index, stages[-1] if stages else None, list_models())
            if stage.name in {s.name for s in stages}:
                raise RecipeError(f"stage {index + 1}: name {stage.name!r} is used twice; stage names "
                                  "must be unique")
            stages.append(stage)
        description = data.get("description", "")
        _check(isinstance(description, str), "description", description, "a string")
        recipe = Recipe(name=name, stages=tuple(stages), description=description,
                        labels=_choice(data, "labels", "top level", LABELS, "fer2013"),
                        paper_jpeg=_bool(data, "paper_jpeg", "top level", False),
                        limit_train=_number(data, "limit_train", "top level", 0, integer=True, minimum=0),
                        limit_val=_number(data, "limit_val", "top level", 0, integer=True, minimum=0),
                        source=source)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); expected a TOML recipe") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    recipe = parse_recipe(data, str(path))
    return dataclasses.replace(recipe, stages=tuple(_relative_to(stage, path.parent) for stage in recipe.stages))


def _relative_to(stage: Stage, folder: Path) -> Stage:
    """The stage with its model file paths (``from``, ``pretrained``) resolved against the recipe's
    folder, as absolute paths (so config.toml, in the run folder, names the same files). ``..`` is
    folded without following symlinks (``os.path.abspath``): a ``runs`` link keeps its name."""
    def resolve(value: str | None) -> str | None:
        if value is None or value == "imagenet" or Path(value).expanduser().is_absolute():
            return value
        return os.path.abspath(folder / value)
    return dataclasses.replace(stage, init_file=resolve(stage.init_file), pretrained=resolve(stage.pretrained))


# ------------------------------------------------------------------------------------ writing

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _optimizer_table(opt: OptimizerSettings) -> dict[str, Any]:
    table: dict[str, Any] = {"type": opt.type, "lr": opt.lr}
    if opt.type == "adam":
        table.update(betas=list(opt.betas), eps=opt.eps)
    else:
        table.update(momentum=opt.momentum, nesterov=opt.nesterov)
    table["weight_decay"] = opt.weight_decay
    return table


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML (every setting explicit); ``parse_recipe`` reads it back equal."""
    lines = [f"# Resolved recipe (defaults applied) read from {recipe.source or 'a recipe'}",
             f"name = {_toml_value(recipe.name)}",
             f"description = {_toml_value(recipe.description)}",
             f"labels = {_toml_value(recipe.labels)}",
             f"paper_jpeg = {_toml_value(recipe.paper_jpeg)}",
             f"limit_train = {recipe.limit_train}",
             f"limit_val = {recipe.limit_val}"]
    for stage in recipe.stages:
        lines += ["", "[[stage]]", f"name = {_toml_value(stage.name)}"]
        if stage.start == "previous":
            lines.append('from = "previous"')
        elif stage.start == "file":
            lines.append(f"from = {_toml_value(stage.init_file)}")
        lines.append(f"model = {_toml_value(stage.model)}")
        if stage.pretrained is not None:
            lines.append(f"pretrained = {_toml_value(stage.pretrained)}")
        if stage.model_args:
            lines.append(f"model_args = {_toml_value(stage.model_args)}")
        lines += [f"trainable = {_toml_value(stage.trainable)}",
                  f"optimizer = {_toml_value(_optimizer_table(stage.optimizer))}",
                  f"batch_size = {stage.batch_size}",
                  f"augment = {_toml_value(dataclasses.asdict(stage.augment))}",
                  f"patience = {stage.patience}",
                  f"max_epochs = {stage.max_epochs}",
                  f"monitor = {_toml_value(stage.monitor)}",
                  f"seed = {stage.seed}",
                  f"eval_batch_size = {stage.eval_batch_size}",
                  f"loss_explosion = {_toml_value(stage.loss_explosion)}",
                  f"clip_grad_norm = {_toml_value(stage.clip_grad_norm)}",
                  f"lr_schedule = {_toml_value(stage.lr_schedule)}",
                  f"on_divergence = {_toml_value(stage.on_divergence)}",
                  f"label_smoothing = {_toml_value(stage.label_smoothing)}",
                  f"warmup_epochs = {stage.warmup_epochs}",
                  f"ema = {_toml_value(stage.ema)}",
                  f"tta = {_toml_value(stage.tta)}"]
        if stage.acceptance is not None:
            lines.append(f"acceptance = {_toml_value(dataclasses.asdict(stage.acceptance))}")
    return "\n".join(lines) + "\n"
