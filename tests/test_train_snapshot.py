"""Run snapshots: a checkpoint packed small (float16, no optimizer state), unpacked on another
machine and resumed. The reference is the uninterrupted run of the same recipe."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiny_models as tm
from lhcnet.cli import main as lhcnet_main
from lhcnet.train.checkpoint import load_checkpoint
from lhcnet.train.snapshot import pack_snapshot, unpack_snapshot
from test_train_resume import BATCHES_PER_EPOCH, assert_same_run, metric_rows, reference_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_snapshot.py"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The uninterrupted reference run, and the same run stopped by SIGTERM in stage 1, epoch 2."""
    tmp = tmp_path_factory.mktemp("snapshot")
    data, recipe, reference = reference_run(tmp, max_epochs=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("LHCNET_HOME", str(tmp / "home"))
            env.setattr(tm, "_forwards", 0)
            env.setenv("LHCNET_TEST_SIGNAL_AT", str(BATCHES_PER_EPOCH + 5))
            out = tmp / "stopped"
            assert lhcnet_main(["train", "--recipe", str(recipe), "--data", str(data), "--out", str(out),
                                "--device", "cpu", "--no-progress"]) == 130
    finally:
        torch.set_num_threads(threads)
    yield tmp, data, reference, out


def resume(run: Path, data: Path, home: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("LHCNET_HOME", str(home))
            assert lhcnet_main(["train", "--data", str(data), "--out", str(run), "--device", "cpu",
                                "--no-progress", "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)


def test_an_exact_snapshot_resumes_to_the_uninterrupted_run(stopped) -> None:
    """float32 and the optimizer state kept: the carried run is bit-identical to the reference."""
    tmp, data, reference, out = stopped
    file = pack_snapshot(out, tmp / "exact.safetensors", dtype=torch.float32, optimizer_state=True)
    carried = tmp / "carried-exact"
    unpack_snapshot(file, carried)
    resume(carried, data, tmp / "home")
    assert_same_run(carried, reference)


def test_a_compact_snapshot_rounds_to_float16_drops_the_momentum_and_resumes(stopped) -> None:
    tmp, data, reference, out = stopped
    original = load_checkpoint(out / "checkpoint.pt")
    file = pack_snapshot(out, tmp / "compact.safetensors")
    exact = pack_snapshot(out, tmp / "exact-with-momentum.safetensors", dtype=torch.float32, optimizer_state=True)
    assert file.stat().st_size < 0.5 * exact.stat().st_size  # float16, no momentum, shared tensors once
    with safe_open(str(file), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "U8", "I64"}
    carried = tmp / "carried-compact"
    unpack_snapshot(file, carried)
    state = load_checkpoint(carried / "checkpoint.pt")
    for key in ("progress", "fingerprint"):
        assert state[key] == original[key], key
    assert torch.equal(state["rng"][0]["cpu"], original["rng"][0]["cpu"])
    assert state["optimizer"]["state"] == {} and original["optimizer"]["state"]
    assert state["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    for name, value in original["model"].items():
        restored = state["model"][name]
        assert restored.dtype == value.dtype, name
        if value.is_floating_point():  # float16 rounding: relative 2^-11, absolute 2^-24 near zero
            assert torch.allclose(restored, value, rtol=2 ** -11, atol=2 ** -24), name
        else:
            assert torch.equal(restored, value), name
    for name in ("config.toml", "metrics.csv", "train.log"):
        assert (carried / name).read_bytes() == (out / name).read_bytes(), name
    resume(carried, data, tmp / "home")
    rows, expected = metric_rows(carried), metric_rows(reference)
    assert len(rows) == len(expected)
    assert rows[0] == expected[0]  # the epoch finished before the snapshot, carried in metrics.csv
    assert (carried / "final.safetensors").is_file()


def test_unpack_refuses_a_folder_with_a_checkpoint_and_a_file_that_is_not_a_snapshot(stopped) -> None:
    tmp, _, reference, out = stopped
    file = pack_snapshot(out, tmp / "again.safetensors")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="checkpoint.pt exists: resume it"):
        unpack_snapshot(file, out)
    assert (out / "checkpoint.pt").read_bytes() == before
    with pytest.raises(ValueError, match="final.safetensors: not an lhcnet run snapshot"):
        unpack_snapshot(reference / "final.safetensors", tmp / "elsewhere")
    (tmp / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable run snapshot"):
        unpack_snapshot(tmp / "junk.safetensors", tmp / "elsewhere")
    assert not (tmp / "elsewhere" / "checkpoint.pt").exists()


def test_the_script_packs_and_unpacks(stopped) -> None:
    tmp, _, _, out = stopped
    packed = subprocess.run([sys.executable, str(SCRIPT), "pack", str(out), str(tmp / "cli.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr
    assert "cli.safetensors" in packed.stdout and "MB" in packed.stdout
    unpacked = subprocess.run([sys.executable, str(SCRIPT), "unpack", str(tmp / "cli.safetensors"), str(tmp / "cli-run")],
                              capture_output=True, text=True, timeout=120)
    assert unpacked.returncode == 0, unpacked.stderr
    assert load_checkpoint(tmp / "cli-run" / "checkpoint.pt")["progress"] == load_checkpoint(out / "checkpoint.pt")["progress"]
    again = subprocess.run([sys.executable, str(SCRIPT), "unpack", str(tmp / "cli.safetensors"), str(tmp / "cli-run")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "checkpoint.pt exists" in again.stderr and "Traceback" not in again.stderr
