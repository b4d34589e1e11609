"""scripts/ingredient_table.py: best PublicTest per probe (weights and EMA), difference from the base."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ingredient_table.py"


def test_best_epochs_and_difference_from_the_base(tmp_path: Path) -> None:
    for name, rows in {"base": ["1,0.50,0.40", "2,0.60,0.62", "3,0.55,0.61"],
                       "erase": ["1,0.58,", "2,0.64,0.64", "3,0.64,0.63"]}.items():
        (tmp_path / f"probe-{name}").mkdir()
        (tmp_path / f"probe-{name}" / "metrics.csv").write_text(
            "stage,epoch,val_acc,ema_val_acc\n" + "".join(f"stage1,{r}\n" for r in rows))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    base = next(line for line in out if line.startswith("| base |"))
    erase = next(line for line in out if line.startswith("| erase |"))
    assert base.endswith("| 3 | 60.00 (2) | 62.00 (2) | – |")
    # ties keep the first epoch; an empty EMA cell is skipped; +2 points = 64 % vs the base's best 62 %
    assert erase.endswith("| 3 | 64.00 (2) | 64.00 (2) | +2.00 |")
