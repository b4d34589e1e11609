"""`lhcnet data prepare` / `lhcnet data stats`, on small files and (integration) the real FER2013."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
from conftest import FER2013_CSV_GZ, FERPLUS_CSV, SHARED_DATA, requires_shared_data
from test_data_fer2013 import fake_faces, fer_csv_text, write_fer_csv

from lhcnet.cli import main
from lhcnet.data import dataset_stats, load_cache, load_dataset


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))


def test_prepare_then_stats(tmp_path, capsys):
    images, labels, usages = write_fer_csv(tmp_path / "fer.csv.gz", n=9)
    assert main(["data", "prepare", str(tmp_path / "fer.csv.gz"), "-o", str(tmp_path / "c.npz")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "9 images 48x48 (Training 3, PublicTest 3, PrivateTest 3)" in out
    np.testing.assert_array_equal(load_cache(tmp_path / "c.npz").images, images)

    assert main(["data", "stats", str(tmp_path / "c.npz")]) == 0
    table = capsys.readouterr().out
    counts = np.zeros((3, 7), int)
    np.add.at(counts, ([["Training", "PublicTest", "PrivateTest"].index(u) for u in usages], labels), 1)
    assert "| split | Angry | Disgust | Fear | Happy | Sad | Surprise | Neutral |" in table
    assert f"| Training | {' | '.join(map(str, counts[0]))} |" in table
    assert "exact-duplicate groups: 0" in table


def test_stats_counts_blank_images_and_cross_split_duplicates(tmp_path, capsys):
    images, labels, _ = fake_faces(6)
    images[1] = 0  # blank
    images[4] = images[0]  # a Training image again in PublicTest, other label
    labels[4] = (labels[0] + 1) % 7
    usages = ["Training", "Training", "Training", "PublicTest", "PublicTest", "PrivateTest"]
    (tmp_path / "d.csv").write_text(fer_csv_text(images, labels, usages))
    assert main(["data", "stats", str(tmp_path / "d.csv"), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "blank (constant) images: 1" in out
    assert "exact-duplicate groups: 1 (1 with conflicting labels)" in out
    assert "PublicTest images also in Training: 1" in out
    assert "PrivateTest images also in Training: 0" in out
    assert not (tmp_path / "home").exists()


def test_skip_bad_reports_rows(tmp_path, capsys):
    images, labels, usages = fake_faces(4)
    lines = fer_csv_text(images, labels, usages).splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",Dev"
    (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    assert main(["data", "prepare", str(tmp_path / "b.csv"), "-o", str(tmp_path / "c.npz")]) == 2
    assert re.search(r"error: .*b\.csv: line 3: Usage 'Dev'", capsys.readouterr().err)
    assert main(["data", "prepare", str(tmp_path / "b.csv"), "-o", str(tmp_path / "c.npz"),
                 "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "3 images" in out and "skipped 1 bad rows:" in out and "b.csv: line 3: Usage 'Dev'" in out


def test_missing_source_is_a_one_line_error(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: no such file or folder" in capsys.readouterr().err


def _readme_table() -> list[str]:
    text = (SHARED_DATA / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if line.strip().startswith("|")]


@pytest.mark.integration
@requires_shared_data
def test_real_fer2013_prepare_time_and_stats_table(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["data", "prepare", str(FER2013_CSV_GZ), "-o", str(tmp_path / "fer.npz")]) == 0
    elapsed = time.perf_counter() - start
    assert elapsed <= 30, f"preparing the cache took {elapsed:.1f} s (limit 30 s)"
    capsys.readouterr()
    for src in (tmp_path / "fer.npz", FER2013_CSV_GZ):
        assert main(["data", "stats", str(src), "--no-cache"]) == 0
        out = capsys.readouterr().out
        table = [line for line in out.splitlines() if line.startswith("|")]
        assert table == _readme_table()
        # the README's known quirks
        assert "blank (constant) images: 12" in out
        assert "exact-duplicate groups: 1516 (57 with conflicting labels)" in out
        assert "PublicTest images also in Training: 280" in out
        assert "PrivateTest images also in Training: 288" in out


@pytest.mark.integration
@requires_shared_data
@pytest.mark.skipif(not FERPLUS_CSV.exists(), reason="ferplus.csv not found")
def test_real_ferplus(tmp_path):
    ds = load_dataset(FER2013_CSV_GZ, ferplus_csv=FERPLUS_CSV, cache_dir=tmp_path)
    assert len(ds) == 31412 and ds.counts().sum(1).tolist() == [25060, 3199, 3153]
    stats = dataset_stats(ds)
    assert stats.blank == 0  # the blank images are among FER+'s not-a-face rows
