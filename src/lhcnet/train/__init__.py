"""Training: recipes (TOML) -> stages; the trainer (checkpoints, early stopping, DDP)."""
from .recipe import (Acceptance, OptimizerSettings, Recipe, RecipeError, Stage,
                     load_recipe, parse_recipe, recipe_to_toml)
from .run_dir import METRIC_COLUMNS, TIMING_COLUMNS
from .setup import TrainOptions
from .state import Diverged, EarlyStopping, Interrupted
from .trainer import EXIT_CODES, TrainResult, train

__all__ = ["Acceptance", "OptimizerSettings", "Recipe", "RecipeError", "Stage",
           "load_recipe", "parse_recipe", "recipe_to_toml", "EXIT_CODES", "METRIC_COLUMNS",
           "TIMING_COLUMNS", "TrainOptions", "TrainResult", "train", "Diverged", "EarlyStopping",
           "Interrupted"]
