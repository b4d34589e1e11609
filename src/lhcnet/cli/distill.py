"""``lhcnet distill``: ``lhcnet train`` on soft targets from teacher models (``lhcnet.distill``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .train import add_run_arguments, recipe_and_data, train_options


def _alpha(text: str) -> float:
    value = float(text)
    if not 0.5 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a value in [0.5, 1] (no other class may "
                                         "outweigh the true one)")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill", help="train a recipe on soft targets from teacher models (knowledge distillation)",
        description="Like 'lhcnet train', but each training face's target is alpha x its one-hot label "
                    "+ (1 - alpha) x the teachers' mean probability (Hinton et al. 2015, temperature 1). "
                    "The teachers' probabilities are stored in --out (teacher-probs.npy, distill.json) "
                    "and reused by --resume or a second student of the same teachers.")
    add_run_arguments(parser)
    parser.add_argument("--teachers", required=True, nargs="+", metavar="MODEL",
                        help="teacher model files (.safetensors)")
    parser.add_argument("--alpha", type=_alpha, default=0.5, help="weight of the hard label, in [0.5, 1] "
                                                                  "(default 0.5)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..distill import distill

    recipe, dataset = recipe_and_data(args)
    return distill(recipe, dataset, Path(args.out), args.teachers, args.alpha, train_options(args)).exit_code
