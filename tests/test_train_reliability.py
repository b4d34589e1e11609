"""The training side of issue 18's reliability list: each test runs the case as a user (or an
accident) would and failed on the code before the fix."""
from __future__ import annotations

import csv
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_models as tm
from lhcnet.cli import main as lhcnet_main
from lhcnet.data import FaceDataset
from lhcnet.train import METRIC_COLUMNS, TIMING_COLUMNS, TrainOptions, load_recipe, train
from lhcnet.train.checkpoint import load_checkpoint, save_checkpoint

OPTIONS = dict(device="cpu", progress=False)
# the two-stage tiny recipe with patience 1: the backbone stops early after epoch 3, the LHC stage
# (acceptance rule) after epoch 4 of 6
EARLY_STOP_RECIPE = tm.TWO_STAGE_RECIPE.format(max_epochs=6).replace("patience = 3", "patience = 1")


def metric_rows(run_dir: Path) -> list[tuple[str, ...]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [tuple(row[c] for c in METRIC_COLUMNS) for row in csv.DictReader(f)]


def lhcnet_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``lhcnet`` with the tiny models registered, single-threaded, in a fresh process."""
    return subprocess.run([sys.executable, tm.__file__, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data CSV, recipe, and an uninterrupted reference run of it."""
    tmp = tmp_path_factory.mktemp("reliability")
    data = tm.write_fer2013_csv(tm.synthetic_faces(), tmp / "faces.csv")
    recipe = tmp / "recipe.toml"
    recipe.write_text(EARLY_STOP_RECIPE)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LHCNET_HOME", str(tmp / "home"))  # the data cache of `lhcnet train --data`
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        reference = train(load_recipe(recipe), tm.synthetic_faces(), tmp / "reference", TrainOptions(**OPTIONS))
        torch.set_num_threads(threads)
        assert reference.status == "finished"
        assert int(metric_rows(reference.out_dir)[-1][1]) < 6  # the LHC stage stopped early
        yield tmp, data, recipe, reference.out_dir


def copy_run(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to)
    return to


def resume(run_dir: Path, dataset: FaceDataset | None = None, **options):
    return train(load_recipe(run_dir / "config.toml"), dataset or tm.synthetic_faces(), run_dir,
                 TrainOptions(resume=True, **OPTIONS, **options))


def cli_error(capsys, *args: str) -> str:
    """Run ``lhcnet`` in this process; expect exit code 2 and a one-line error; return it."""
    assert lhcnet_main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_kill_during_the_end_of_stage_checks_resumes_where_an_uninterrupted_run_would(setup) -> None:
    tmp, data, recipe, reference = setup
    out = tmp / "killed-in-acceptance"
    common = ["train", "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress"]
    epochs = {stage: sum(r[0] == stage for r in metric_rows(reference)) for stage in ("backbone", "lhc")}
    # eval-mode forwards before the LHC stage's acceptance evaluation: 2 validation batches per
    # epoch and the starting model's training loss (280 images: 5 batches); killed in its 2nd batch
    at = 2 * epochs["backbone"] + 5 + 2 * epochs["lhc"] + 2
    killed = lhcnet_cli(*common, "--recipe", str(recipe), env={"LHCNET_TEST_KILL_AT_EVAL": str(at)})
    assert killed.returncode == -9, killed.stderr
    progress = load_checkpoint(out / "checkpoint.pt")["progress"]
    assert (progress["stage"], progress["epoch"], len(progress["results"])) == (1, epochs["lhc"], 1)  # stop decided
    assert lhcnet_main([*common, "--resume"]) == 0
    assert metric_rows(out) == metric_rows(reference)  # no extra epoch
    final, expected = load_file(str(out / "final.safetensors")), load_file(str(reference / "final.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_a_run_folder_in_use_is_refused_with_the_pid(setup) -> None:
    tmp, _, _, reference = setup
    run = copy_run(reference, tmp / "locked")
    with open(run / ".lock", "a+") as holder:  # another process training here holds this lock
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.seek(0)
        holder.truncate()
        holder.write("4242\n")
        holder.flush()
        with pytest.raises(ValueError, match=r"locked is in use by PID 4242"):
            resume(run)
    assert resume(run).message == "already finished"  # released: fine again


def test_resume_without_checkpoint_refuses_and_keeps_the_run(setup) -> None:
    tmp, _, _, reference = setup
    run = copy_run(reference, tmp / "no-checkpoint")
    (run / "checkpoint.pt").unlink()
    rows = metric_rows(run)
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.pt is missing, but the run got further "
                                                r"\(backbone-best\.safetensors, lhc-best\.safetensors"):
        resume(run)
    assert metric_rows(run) == rows and (run / "backbone-best.safetensors").exists()


def test_resume_refuses_other_data_options_or_an_edited_config_unless_forced(setup) -> None:
    tmp, _, _, reference = setup
    run = copy_run(reference, tmp / "fingerprint")
    with pytest.raises(ValueError, match=r"started with other settings: the data"):
        resume(run, tm.synthetic_faces(seed=1))
    with pytest.raises(ValueError, match=r"--bf16 \(was False, now True\)"):
        resume(run, bf16=True)
    config = run / "config.toml"
    config.write_text(config.read_text().replace("patience = 1", "patience = 2", 1))
    with pytest.raises(ValueError, match=r"config\.toml \(edited since the run started\)"):
        train(load_recipe(config), tm.synthetic_faces(), run, TrainOptions(resume=True, **OPTIONS))
    forced = train(load_recipe(config), tm.synthetic_faces(), run, TrainOptions(resume=True, force=True, **OPTIONS))
    assert forced.status == "finished"
    assert "--force: continuing although these differ" in (run / "train.log").read_text()


def test_damaged_run_files_are_one_line_errors_naming_the_file(setup, capsys) -> None:
    tmp, data, _, reference = setup
    common = ["train", "--data", str(data), "--device", "cpu", "--no-progress", "--resume", "--out"]

    run = copy_run(reference, tmp / "bad-checkpoint")
    raw = bytearray((run / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (run / "checkpoint.pt").write_bytes(bytes(raw))
    assert "checkpoint.pt: damaged checkpoint" in cli_error(capsys, *common, str(run))

    run = copy_run(reference, tmp / "bad-config")
    (run / "config.toml").write_bytes(b"name = \"\xff\xfe\"\n")
    assert "config.toml: not UTF-8" in cli_error(capsys, *common, str(run))

    run = copy_run(reference, tmp / "bad-metrics")
    (run / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes().replace(b"backbone,2", b"b\xe4ckbone,2"))
    assert "metrics.csv: not UTF-8" in cli_error(capsys, *common, str(run))

    bad_best = tmp / "bad-best.safetensors"
    raw = bytearray((reference / "backbone-best.safetensors").read_bytes())
    raw[-20] ^= 0x01
    bad_best.write_bytes(bytes(raw))
    recipe = tmp / "from-bad.toml"
    recipe.write_text(f'[[stage]]\nname = "s"\nmodel = "tiny"\nfrom = "{bad_best}"\n'
                      'optimizer = { type = "sgd", lr = 0.01 }\nbatch_size = 32\npatience = 1\nmax_epochs = 1\n')
    err = cli_error(capsys, "train", "--data", str(data), "--device", "cpu", "--no-progress",
                    "--recipe", str(recipe), "--out", str(tmp / "from-bad"))
    assert "bad-best.safetensors: damaged model file" in err


def test_a_read_only_folder_and_a_full_disk_are_one_line_errors(setup, capsys, monkeypatch) -> None:
    tmp, data, recipe, _ = setup
    common = ["train", "--data", str(data), "--device", "cpu", "--no-progress", "--recipe", str(recipe), "--out"]
    out = tmp / "read-only"
    out.mkdir()
    out.chmod(0o555)
    real_open = os.open
    if os.access(out, os.W_OK):  # root ignores the mode bits: refuse writes there as the kernel would

        def read_only_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", read_only_open)
    try:
        err = cli_error(capsys, *common, str(out))
    finally:
        out.chmod(0o755)
    assert "Permission denied" in err and str(out) in err

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "fsync", full_disk)
    err = cli_error(capsys, *common, str(tmp / "full-disk"))
    assert "No space left on device" in err and "config.toml" in err


def test_damaged_metrics_csv_is_refused_not_repaired(setup) -> None:
    tmp, _, _, reference = setup
    header, *rows = (reference / "metrics.csv").read_text().splitlines(keepends=True)

    run = copy_run(reference, tmp / "no-header")
    (run / "metrics.csv").write_text("".join(rows))
    with pytest.raises(ValueError, match=r"metrics\.csv: line 1: expected the header stage,epoch"):
        resume(run)
    assert (run / "metrics.csv").read_text() == "".join(rows)  # untouched: nothing dropped

    run = copy_run(reference, tmp / "half-row")
    (run / "metrics.csv").write_text(header + rows[0] + rows[1][:20] + "\r\n" + "".join(rows[2:]))
    with pytest.raises(ValueError, match=rf"metrics\.csv: line 3: expected {len(METRIC_COLUMNS + TIMING_COLUMNS)} fields"):
        resume(run)

    # a last row cut short (killed while appending it: after the checkpoint) is dropped
    run = copy_run(reference, tmp / "cut-last-row")
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    checkpoint["progress"].update(finished=False)
    save_checkpoint(run / "checkpoint.pt", checkpoint)
    (run / "metrics.csv").write_text(header + "".join(rows) + "lhc,5,1.2")
    assert resume(run).status == "finished"
    assert metric_rows(run) == metric_rows(reference)


def test_temp_files_of_a_killed_run_are_removed_on_resume(setup) -> None:
    tmp, _, _, reference = setup
    run = copy_run(reference, tmp / "temp-files")
    left = [run / ".checkpoint.pt.1234.abcd1234.tmp", run / ".lhc-best.safetensors.99.ffff0000.tmp"]
    for path in left:
        path.write_bytes(b"\0" * 1000)
    resume(run)
    assert not any(p.exists() for p in left)
    assert "removed 2 temp files" in (run / "train.log").read_text()


def test_a_checkpoint_whose_progress_does_not_fit_the_recipe_is_refused(setup) -> None:
    tmp, _, _, reference = setup
    run = copy_run(reference, tmp / "stage-99")
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    checkpoint["progress"].update(stage=99, finished=False)
    save_checkpoint(run / "checkpoint.pt", checkpoint)
    (run / "final.safetensors").unlink()
    with pytest.raises(ValueError, match=r"progress \(stage 100.*does not fit the 2-stage recipe"):
        resume(run)


def test_on_divergence_continue_also_when_the_first_epoch_diverges(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("""
name = "diverge-then-continue"
[defaults]
batch_size = 32
max_epochs = 2
patience = 2
[[stage]]
name = "explodes"
model = "tiny"
optimizer = { type = "adam", lr = 3e-3 }
loss_explosion = 0.5
on_divergence = "continue"
[[stage]]
name = "fresh"
model = "tiny"
optimizer = { type = "adam", lr = 3e-3 }
""")
    result = train(load_recipe(recipe), tm.synthetic_faces(), tmp_path / "run", TrainOptions(**OPTIONS))
    assert result.status == "finished", result.message
    assert [s["status"] for s in result.stages] == ["diverged", "finished"]
    assert result.final is not None and load_checkpoint(tmp_path / "run" / "checkpoint.pt")["progress"]["finished"]
    # a stage that starts from the diverged stage's (missing) best weights says so
    recipe.write_text(recipe.read_text().replace('name = "fresh"\nmodel = "tiny"', 'name = "fresh"\nfrom = "previous"'))
    with pytest.raises(FileNotFoundError, match=r"starts from the best weights of stage 'explodes'.*does not exist"):
        train(load_recipe(recipe), tm.synthetic_faces(), tmp_path / "run2", TrainOptions(**OPTIONS))


def test_train_offers_the_skip_bad_it_suggests(setup, tmp_path, capsys, monkeypatch) -> None:
    _, data, recipe, _ = setup
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))
    lines = data.read_text().splitlines(keepends=True)
    lines[3] = "9," + lines[3].split(",", 1)[1]  # two rows with label 9
    lines[5] = "9," + lines[5].split(",", 1)[1]
    bad = tmp_path / "bad.csv"
    bad.write_text("".join(lines))
    common = ["train", "--data", str(bad), "--device", "cpu", "--no-progress", "--recipe", str(recipe),
              "--max-epochs", "1", "--out"]
    err = cli_error(capsys, *common, str(tmp_path / "a"))
    assert "line 4: emotion '9'" in err and "--skip-bad drops them" in err
    assert lhcnet_main([*common, str(tmp_path / "b"), "--skip-bad"]) == 0


def test_data_without_training_or_publictest_rows_is_a_clear_error(tmp_path) -> None:
    faces = tm.synthetic_faces()
    only_training = faces.subset(faces.splits == 0)
    recipe = load_recipe(tm.two_stage_recipe(tmp_path / "r.toml"))
    with pytest.raises(ValueError, match="synthetic: no PublicTest rows; training needs Training rows"):
        train(recipe, only_training, tmp_path / "run", TrainOptions(**OPTIONS))
    test_only = FaceDataset(images=faces.images, labels=faces.labels, splits=np.full(len(faces), 2, np.uint8),
                            classes=faces.classes, source="test-only.csv")
    with pytest.raises(ValueError, match="test-only.csv: no Training rows"):
        train(recipe, test_only, tmp_path / "run", TrainOptions(**OPTIONS))


def test_negative_limits_are_refused(setup, capsys) -> None:
    _, data, recipe, _ = setup
    with pytest.raises(SystemExit) as exit_:
        lhcnet_main(["train", "--data", str(data), "--recipe", str(recipe), "--out", "x", "--limit-train", "-5"])
    assert exit_.value.code == 2 and "-5: expected 0 or a positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--limit-val = -1 is not allowed"):
        load_recipe(recipe).with_overrides(limit_val=-1)


def test_run_files_follow_the_umask(setup) -> None:
    tmp, _, recipe, _ = setup
    old = os.umask(0o022)
    try:
        text = recipe.read_text().replace("max_epochs = 6", "max_epochs = 1")
        (tmp / "umask.toml").write_text(text)
        result = train(load_recipe(tmp / "umask.toml"), tm.synthetic_faces(), tmp / "umask", TrainOptions(**OPTIONS))
    finally:
        os.umask(old)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in result.out_dir.iterdir() if p.is_file()}
    for name in ("config.toml", "checkpoint.pt", "backbone-best.safetensors", "final.safetensors",
                 "summary.json", "metrics.csv", "training-curves.png"):
        assert modes[name] == "0o644", (name, modes)


def test_recipe_paths_are_relative_to_the_recipe_file(setup, tmp_path, monkeypatch) -> None:
    _, _, _, reference = setup
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(reference / "backbone-best.safetensors", folder / "start.safetensors")
    (folder / "r.toml").write_text('[[stage]]\nname = "s"\nmodel = "tiny"\nfrom = "start.safetensors"\n'
                                   'optimizer = { type = "sgd", lr = 0.01 }\nbatch_size = 32\npatience = 1\n'
                                   'max_epochs = 1\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    result = train(load_recipe("recipes/r.toml"), tm.synthetic_faces(), tmp_path / "run", TrainOptions(**OPTIONS))
    assert result.status == "finished"
    assert f'from = "{folder / "start.safetensors"}"' in (tmp_path / "run" / "config.toml").read_text()
    (folder / "start.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{folder / 'start.safetensors'}.*no such model file.*"
                                                rf"recipe recipes/r\.toml"):
        train(load_recipe("recipes/r.toml"), tm.synthetic_faces(), tmp_path / "run2", TrainOptions(**OPTIONS))
