"""scripts/compare_runs.py: runs side by side at equal epochs (docs/results.md, stand-alone pair),
figures checked by hand."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"
HEADER = "stage,epoch,train_loss,train_acc,val_loss,val_acc,lr,improved,seconds,images_per_s\n"


def make_run(root: Path, name: str, losses_accs: list[tuple[float, float]]) -> Path:
    run = root / name
    run.mkdir()
    rows = "".join(f"stage1,{i + 1},{loss},0.5,1.0,{acc},0.01,1,60,200\n" for i, (loss, acc) in enumerate(losses_accs))
    (run / "metrics.csv").write_text(HEADER + rows)
    return run


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_equal_epochs_side_by_side_and_the_best_so_far(tmp_path: Path) -> None:
    plain = make_run(tmp_path, "plain", [(1.8, 0.25), (1.5, 0.45), (1.3, 0.52)])
    lhc = make_run(tmp_path, "lhc", [(1.9, 0.30), (1.6, 0.30)])  # cut after 2 epochs; ties: the first
    png = tmp_path / "curves.png"
    done = run_script(plain, lhc, "--labels", "host,LHC-Net", "--epochs", "1,3", "--png", png)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "| epoch | host | LHC-Net |",
        "|---|---|---|",
        "| 1 | 25.00 (1.800) | 30.00 (1.900) |",
        "| 3 | 52.00 (1.300) | – |",
        "| best so far | 52.00 (epoch 3 of 3) | 30.00 (epoch 1 of 2) |",
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_named(tmp_path: Path) -> None:
    plain = make_run(tmp_path, "plain", [(1.8, 0.25)])
    done = run_script(plain, tmp_path / "nowhere")
    assert done.returncode != 0 and f"{tmp_path / 'nowhere' / 'metrics.csv'}: no such file" in done.stderr
    done = run_script(plain, "--labels", "a,b")
    assert done.returncode != 0 and "2 labels for 1 runs" in done.stderr
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.csv").write_text("epoch,loss\n1,2\n")
    done = run_script(tmp_path / "odd")
    assert done.returncode != 0 and "missing train_loss, val_acc" in done.stderr
