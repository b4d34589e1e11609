"""Checkpoints and exact resume: a run killed (SIGKILL) or stopped (SIGTERM) mid-epoch and resumed
with ``--resume`` ends with the same weights and metrics as an uninterrupted run."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as tm
from lhcnet.cli import main as lhcnet_main
from lhcnet.data import load_dataset
from lhcnet.train import METRIC_COLUMNS, TrainOptions, load_recipe, train
from lhcnet.files import atomic_write_text
from lhcnet.train.checkpoint import load_checkpoint, save_checkpoint

HELPER = Path(tm.__file__)
BATCHES_PER_EPOCH = 9  # 280 training images, batch 32


def lhcnet_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``lhcnet`` with the tiny models registered, single-threaded, in a fresh process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(HELPER), *args], env=full_env, capture_output=True,
                          text=True, timeout=120)


def metric_rows(run_dir: Path) -> list[tuple[str, ...]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [tuple(row[c] for c in METRIC_COLUMNS) for row in csv.DictReader(f)]


def reference_run(tmp: Path, max_epochs: int) -> tuple[Path, Path, Path]:
    """The data as a CSV file, the two-stage recipe, and its uninterrupted run (in-process, 1 thread)."""
    data = tm.write_fer2013_csv(tm.synthetic_faces(), tmp / "faces.csv")
    recipe = tm.two_stage_recipe(tmp / "recipe.toml", max_epochs=max_epochs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train(load_recipe(recipe), load_dataset(data, labels="fer2013", cache_dir=False),
                          tmp / "reference", TrainOptions(device="cpu", progress=False))
    finally:
        torch.set_num_threads(threads)
    assert reference.status == "finished"
    return data, recipe, reference.out_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data, the recipe, and the uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("resume")
    data, recipe, reference = reference_run(tmp, max_epochs=4)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LHCNET_HOME", str(tmp / "home"))  # the data cache of `lhcnet train --data`
        yield tmp, data, recipe, reference


def assert_same_run(run: Path, reference: Path) -> None:
    final, expected = load_file(str(run / "final.safetensors")), load_file(str(reference / "final.safetensors"))
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    assert metric_rows(run) == metric_rows(reference)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(setup, capsys) -> None:
    tmp, data, recipe, reference = setup
    out = tmp / "killed"
    common = ["train", "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress"]
    # killed in stage 1, epoch 2, batch 4 (the last checkpoint is the end of epoch 1) ...
    first = lhcnet_cli(*common, "--recipe", str(recipe), env={"LHCNET_TEST_KILL_AT": str(BATCHES_PER_EPOCH + 4)})
    assert first.returncode == -9, first.stderr
    assert load_checkpoint(out / "checkpoint.pt")["progress"]["epoch"] == 1
    # ... resumed (epoch 2 again), now also checkpointing every 4 batches, and killed in stage 2
    # (LHC), epoch 1, batch 7: the last checkpoint is mid-epoch, after batch 4 ...
    second = lhcnet_cli(*common, "--resume", "--checkpoint-every", "4",
                        env={"LHCNET_TEST_KILL_AT": str(3 * BATCHES_PER_EPOCH + 7)})
    assert second.returncode == -9, second.stderr
    progress = load_checkpoint(out / "checkpoint.pt")["progress"]
    assert (progress["stage"], progress["epoch"], progress["step"]) == (1, 0, 4)
    # ... and resumed to the end (in this process, also single-threaded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert lhcnet_main([*common, "--resume", "--recipe", str(recipe)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "resuming stage 'lhc' after epoch 0 (+4 batches)" in capsys.readouterr().out
    assert_same_run(out, reference)


def test_sigterm_checkpoints_mid_epoch_and_resume_matches(setup, monkeypatch, capsys) -> None:
    """In this process: the signal handler must catch SIGTERM (else pytest itself would die)."""
    tmp, data, recipe, reference = setup
    out = tmp / "stopped"
    common = ["train", "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(tm, "_forwards", 0)
        monkeypatch.setenv("LHCNET_TEST_SIGNAL_AT", str(BATCHES_PER_EPOCH + 5))
        assert lhcnet_main(common + ["--recipe", str(recipe)]) == 130
        assert "SIGTERM: checkpoint written at stage backbone epoch 2 batch 5; continue with --resume" \
            in capsys.readouterr().out
        progress = load_checkpoint(out / "checkpoint.pt")["progress"]
        assert (progress["stage"], progress["epoch"], progress["step"]) == (0, 1, 5)
        monkeypatch.delenv("LHCNET_TEST_SIGNAL_AT")
        assert lhcnet_main(common + ["--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer restored the handler
    assert_same_run(out, reference)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"progress": {"epoch": 1}})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"progress": {"epoch": 2}})
    monkeypatch.undo()
    assert load_checkpoint(path)["progress"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x"
