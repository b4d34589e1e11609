"""scripts/stage4_results.py: the stage-4 tables (docs/results.md) from run folders, with the
paper's acceptance filter read back from summary.json or train.log; figures checked by hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "stage4_results.py"
HEADER = "stage,epoch,train_loss,train_acc,val_loss,val_acc,lr,improved,seconds,images_per_s\n"


def make_run(root: Path, name: str, val_accs: list[float], test_acc: float, final_loss: float,
             start_loss: float = 0.65) -> None:
    run = root / name
    run.mkdir()
    rows = "".join(f"stage4,{i + 1},0.6,0.8,1.0,{acc},0.001,1,60,400\n" for i, acc in enumerate(val_accs))
    (run / "metrics.csv").write_text(HEADER + rows)
    word, sign = ("ACCEPTED", "<") if final_loss < start_loss + 0.05 else ("REJECTED", ">=")
    (run / "train.log").write_text(  # the trainer's own line, as in docs/runs/stage4/*/train.log
        f"2026-11-30 02:03:54 stage stage4: reached max_epochs = {len(val_accs)}; best val_acc ...; "
        f"acceptance: final training loss {final_loss:.4f} {sign} starting {start_loss:.4f} + margin 0.05 -> {word}\n")
    (run / "eval.json").write_text(json.dumps({"models": [{"metrics": {"accuracy": test_acc}}]}))


def run_script(root: Path, *options: str) -> str:
    return subprocess.run([sys.executable, str(SCRIPT), str(root), *options], check=True,
                          capture_output=True, text=True).stdout


def test_rows_acceptance_and_welch_t(tmp_path: Path) -> None:
    make_run(tmp_path, "stage4-plain-seed1", [0.60, 0.66], 0.66, final_loss=0.64)
    make_run(tmp_path, "stage4-plain-seed2", [0.68, 0.61], 0.68, final_loss=0.63)
    make_run(tmp_path, "stage4-lhc-seed1", [0.65, 0.70], 0.70, final_loss=0.66)  # loss rose: rejected at 0
    make_run(tmp_path, "stage4-lhc-seed2", [0.72, 0.64, 0.71], 0.72, final_loss=0.64)
    out = run_script(tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| C: with LHC")]
    # best epoch = first maximum of val_acc; PublicTest = that epoch's val_acc
    assert rows[0].startswith("| C: with LHC (lhcnet_resnet18v2_48) | 1 | 2 (2) | 70.00 | 70.00 | – "
                              "| 0.6500 → 0.6600 | **no** |")
    assert rows[1].startswith("| C: with LHC (lhcnet_resnet18v2_48) | 2 | 3 (1) | 72.00 | 72.00 | – "
                              "| 0.6500 → 0.6400 | yes |")
    everything, accepted_only = out.split("accepted runs only (margin 0):")
    # by hand: C test 0.70, 0.72 (mean 0.71, var 2e-4); A 0.66, 0.68 (mean 0.67, var 2e-4):
    # diff 4 points, se = sqrt(2e-4/2 + 2e-4/2) = 0.014142, t = 2.83
    assert "- PrivateTest: lhc - plain = +4.00 points (Welch t = +2.83, 2 vs 2 runs)" in everything
    assert "| C: with LHC (lhcnet_resnet18v2_48) | 2 | 71.00 ± 1.41 (n=2) | 71.00 ± 1.41 (n=2) | – |" in everything
    assert "| C: with LHC (lhcnet_resnet18v2_48) | 1 | 72.00 (n=1) | 72.00 (n=1) | – |" in accepted_only
    assert "lhc vs plain: fewer than 2 runs in a set, no test" in accepted_only
    # a margin of 0.05 accepts the run whose loss rose by 0.01
    assert "| 0.6500 → 0.6600 | yes |" in run_script(tmp_path, "--margin", "0.05")


def test_acceptance_is_read_from_summary_json_when_present(tmp_path: Path) -> None:
    make_run(tmp_path, "stage4-lhc-seed1", [0.65, 0.70], 0.70, final_loss=0.66)
    run = tmp_path / "stage4-lhc-seed1"
    (run / "train.log").unlink()  # only the trainer's summary.json records the check now
    (run / "summary.json").write_text(json.dumps({"stages": [
        {"stage": "stage1"},
        {"stage": "stage4", "acceptance": {"final_train_loss": 0.61, "start_train_loss": 0.64,
                                           "margin": 0.0, "accepted": True}}]}))
    assert "| 0.6400 → 0.6100 | yes |" in run_script(tmp_path)
