"""PublicTest/PrivateTest faces whose pixels also occur in Training: found, counted and left out
(``lhcnet data stats --dedup``, ``lhcnet evaluate --dedup``), on synthetic data with planted
duplicates and (integration) on the real FER2013 file, against a count over its pixel strings."""
from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest
from conftest import FER2013_CSV_GZ, requires_shared_data
from test_data_fer2013 import fer_csv_text

from lhcnet.cli import main
from lhcnet.data import SPLITS, FaceDataset, load_dataset
from lhcnet.data.stats import training_duplicates, without_training_duplicates
from lhcnet.models import create_model, save_model

import tiny_fer
from tiny_fer import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))


def planted() -> tuple[np.ndarray, np.ndarray, list[str], set[int]]:
    """30 random faces (12 Training, 9 PublicTest, 9 PrivateTest) with duplicates planted; returns
    images, labels, usages and the indices that must be left out."""
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (30, 48, 48), dtype=np.uint8)
    labels = rng.integers(0, 7, 30)
    usages = ["Training"] * 12 + ["PublicTest"] * 9 + ["PrivateTest"] * 9
    images[21] = images[3]            # PrivateTest copy of a Training face (its label may differ)
    images[22] = images[3]            # ... and a second copy
    images[13] = images[5]            # PublicTest copy of a Training face
    images[23] = images[12]           # PrivateTest = PublicTest, not in Training: kept
    images[8] = images[7]             # a duplicate inside Training: kept
    images[24] = images[4]
    images[24, 10, 10] ^= 1           # one grey level off: not a duplicate, kept
    return images, labels, usages, {13, 21, 22}


def brute_force_duplicates(images: np.ndarray, splits: np.ndarray) -> set[int]:
    """Reference: compare every non-Training face with every Training face, pixel by pixel."""
    training = images[splits == 0]
    return {i for i in np.flatnonzero(splits != 0) if (training == images[i]).all(axis=(1, 2)).any()}


def test_planted_duplicates_are_found_and_left_out() -> None:
    images, labels, usages, expected = planted()
    splits = np.array([SPLITS.index(u) for u in usages], dtype=np.uint8)
    dataset = FaceDataset(images, labels, splits, tiny_fer.CLASSES)
    found = set(np.flatnonzero(training_duplicates(dataset)))
    assert found == expected == brute_force_duplicates(images, splits)
    kept = without_training_duplicates(dataset)
    np.testing.assert_array_equal(kept.row_ids, [i for i in range(30) if i not in expected])
    assert kept.counts().sum(1).tolist() == [12, 8, 7]


def test_data_stats_and_evaluate_with_dedup(tmp_path, capsys) -> None:
    images, labels, usages, _ = planted()
    data = tmp_path / "planted.csv"
    data.write_text(fer_csv_text(images, labels, usages))
    assert main(["data", "stats", str(data), "--no-cache", "--dedup"]) == 0
    out = capsys.readouterr().out
    assert "PrivateTest images also in Training: 2" in out and "PublicTest images also in Training: 1" in out
    assert "removed PublicTest 1, PrivateTest 2" in out
    assert "images: 27 (Training 12, PublicTest 8, PrivateTest 7)" in out
    kept = [i for i in range(21, 30) if i not in (21, 22)]
    row = np.bincount(labels[kept], minlength=7)
    assert f"| PrivateTest | {' | '.join(map(str, row))} |" in out.split("--dedup")[1]

    model = save_model(create_model(tiny_fer.NAME), tmp_path / "m.safetensors",
                       extra={"classes": list(tiny_fer.CLASSES)})
    assert main(["evaluate", str(model), "--data", str(data), "--dedup", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "PrivateTest without Training duplicates"
    assert report["models"][0]["metrics"]["count"] == 7
    assert report["models"][0]["metrics"]["support"] == row.tolist()


@pytest.mark.integration
@requires_shared_data
def test_real_fer2013_duplicates_match_a_count_over_the_pixel_strings() -> None:
    with gzip.open(FER2013_CSV_GZ, "rt") as f:
        assert next(f).strip() == "emotion,pixels,Usage"
        rows = [(hashlib.sha1(pixels.encode()).digest(), usage.strip())
                for _, pixels, usage in (line.split(",") for line in f)]
    training = {digest for digest, usage in rows if usage == "Training"}
    in_training = {u: sum(digest in training for digest, usage in rows if usage == u) for u in SPLITS[1:]}
    assert in_training == {"PublicTest": 280, "PrivateTest": 288}   # the figures of docs/data.md
    dataset = load_dataset(FER2013_CSV_GZ)
    removed = dataset.counts().sum(1) - without_training_duplicates(dataset).counts().sum(1)
    assert removed.tolist() == [0, in_training["PublicTest"], in_training["PrivateTest"]]
