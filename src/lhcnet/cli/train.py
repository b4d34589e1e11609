"""``lhcnet train``: run a recipe's stages (``docs/training.md``); also under ``torchrun``.

``add_run_arguments`` / ``recipe_and_data`` / ``train_options`` are shared with ``lhcnet distill``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..data import FaceDataset
    from ..train import Recipe, TrainOptions


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected 0 or a positive number of images")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train the stages of a recipe (recipes/paper.toml, ...)",
        description="Train a recipe's stages one after the other, writing checkpoints, metrics.csv, "
                    "training-curves.png and <stage>-best.safetensors / final.safetensors into --out. "
                    "Stop with Ctrl-C (a checkpoint is written) and continue with --resume. Under "
                    "'torchrun --nproc_per_node=N -m lhcnet.cli train ...' it trains with "
                    "DistributedDataParallel.")
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe TOML file (optional with --resume: the run's config.toml)")
    parser.add_argument("--data", required=True, help="FER2013 CSV (.csv/.csv.gz/.tar.gz), FER+ or a cache")
    parser.add_argument("--ferplus-csv", help="FER+ votes (fer2013new.csv) for recipes with labels = 'ferplus'")
    parser.add_argument("--skip-bad", action="store_true", help="drop malformed CSV rows (and list them) "
                                                                "instead of stopping at the first")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: continue even if the data, numeric options or config.toml "
                             "differ from the run's start")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--seed", type=int, help="override every stage's seed")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU and CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--max-epochs", type=int, help="override every stage's max_epochs (quick runs)")
    parser.add_argument("--limit-train", type=_non_negative, help="debug: only the first N training images")
    parser.add_argument("--limit-val", type=_non_negative, help="debug: only the first N validation images")
    parser.add_argument("--checkpoint-every", type=_non_negative, default=0, metavar="N",
                        help="also checkpoint every N batches (default: at epoch ends and on Ctrl-C)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms (repeatable CUDA runs; slower)")
    parser.add_argument("--tensorboard", action="store_true", help="log to RUN_DIR/tensorboard too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (epoch lines only)")


def recipe_and_data(args: argparse.Namespace) -> tuple[Recipe, FaceDataset]:
    """The recipe (``--recipe``, or the run's config.toml with ``--resume``) with the command
    line's overrides, and the data set it trains on."""
    from ..data import load_dataset
    from ..train import load_recipe

    out = Path(args.out)
    if args.recipe is None:
        if not args.resume:
            raise ValueError("--recipe is required (except with --resume, which reads RUN_DIR/config.toml)")
        if not (out / "config.toml").is_file():
            raise FileNotFoundError(f"--resume: {out} holds no run (no config.toml)")
        recipe = load_recipe(out / "config.toml")
    else:
        recipe = load_recipe(args.recipe)
    recipe = recipe.with_overrides(seed=args.seed, max_epochs=args.max_epochs, limit_train=args.limit_train,
                                   limit_val=args.limit_val)
    dataset = load_dataset(args.data, labels=recipe.labels, ferplus_csv=args.ferplus_csv, skip_bad=args.skip_bad)
    return recipe, dataset


def train_options(args: argparse.Namespace) -> TrainOptions:
    from ..train import TrainOptions
    return TrainOptions(device=args.device, resume=args.resume, force=args.force, bf16=args.bf16,
                        channels_last=args.channels_last, compile=args.compile,
                        deterministic=args.deterministic, checkpoint_every=args.checkpoint_every,
                        progress=not args.no_progress, tensorboard=args.tensorboard)


def run(args: argparse.Namespace) -> int:
    from ..allocator import keep_freed_memory
    from ..train import train

    keep_freed_memory()  # ~10 % faster steps on CPU: tensors reuse freed memory (lhcnet.allocator)
    recipe, dataset = recipe_and_data(args)
    return train(recipe, dataset, Path(args.out), train_options(args)).exit_code
