"""Issue 12's training check: the same compact LHC-Net training run, from the same seed, with the
current LHC implementation and with the previous one (``tests/lhc_previous.py``, before the speed
work); their PublicTest accuracies must agree within 0.5 points.

    python3 benchmarks/lhc_training_equality.py --data ../shared/data/fer2013.csv.gz --out ~/runs/equality

Trains ``lhcnet_resnet18v2_48`` from scratch for ``--epochs`` (default 2) with the recipe below
(Adam 1e-3 with flips, gradient norm clipped to 5, batch 64, seed 1: fer2013_compact's stage-1
optimiser, which learns within 2 epochs; with SGD 0.01 both runs of docs/runs/equality still
predicted only the majority class after 2 epochs (PublicTest 24.94 % each), a check that cannot fail),
bf16 autocast + channels-last as in every compact run, once per implementation (OUT/new,
OUT/previous; a run that exists is resumed), then prints both runs' PublicTest accuracy per epoch
and the difference. ~10 minutes per epoch and run on one core (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

RECIPE = """\
name = "lhc_training_equality"
description = "issue 12: a short compact LHC-Net run, current vs previous LHC implementation"
labels = "fer2013"

[[stage]]
name = "stage1"
model = "lhcnet_resnet18v2_48"
optimizer = { type = "adam", lr = 1e-3 }
batch_size = 64
max_epochs = EPOCHS
patience = EPOCHS
clip_grad_norm = 5.0
augment = { flip = true }
seed = 1
"""


def train(implementation: str, data: str, out: Path) -> int:
    """One training run (``lhcnet train``) with the named LHC implementation; its exit code."""
    from lhcnet import LHC
    from lhcnet.cli import main
    if implementation == "previous":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from lhc_previous import previous_forward
        LHC.forward = previous_forward  # every LHC block of the model runs the old code
    run = out / implementation
    recipe = out / "recipe.toml"
    common = ["--data", data, "--out", str(run), "--bf16", "--channels-last", "--no-progress"]
    if (run / "checkpoint.pt").exists() or (run / "metrics.csv").exists():
        return main(["train", *common, "--resume"])
    return main(["train", "--recipe", str(recipe), *common])


def accuracies(run: Path) -> list[float]:
    """PublicTest accuracy per finished epoch (none before the run's first epoch)."""
    metrics = run / "metrics.csv"
    return [float(row["val_acc"]) for row in csv.DictReader(metrics.open())] if metrics.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--implementation", choices=["new", "previous"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.implementation:  # the child process: one training run
        raise SystemExit(train(args.implementation, args.data, args.out))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.toml").write_text(RECIPE.replace("EPOCHS", str(args.epochs)))
    for implementation in ("new", "previous"):  # separate processes: the patch never leaks
        if len(accuracies(args.out / implementation)) < args.epochs:
            subprocess.run([sys.executable, __file__, "--data", args.data, "--out", str(args.out),
                            "--epochs", str(args.epochs), "--implementation", implementation], check=True)
    new, old = accuracies(args.out / "new"), accuracies(args.out / "previous")
    print("epoch  PublicTest new %  previous %  difference (points)")
    for epoch, (a, b) in enumerate(zip(new, old), 1):
        print(f"{epoch:5d}  {100 * a:16.2f}  {100 * b:10.2f}  {100 * (a - b):+.2f}")
    diff = 100 * abs(new[-1] - old[-1])
    print(f"last epoch: |new - previous| = {diff:.2f} points ({'within' if diff <= 0.5 else 'NOT within'} 0.5)")


if __name__ == "__main__":
    main()
