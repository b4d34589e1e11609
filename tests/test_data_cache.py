"""The cache file and load_dataset's convert-once behaviour."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from test_data_fer2013 import write_fer_csv

from lhcnet.data import (CLASSES_FER2013, FaceDataset, is_cache, load_cache, load_dataset,
                         save_cache)
from lhcnet.data.dataset import BadRecord


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Keep the default cache inside the test's folder."""
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))


def _fail_if_parsed(monkeypatch) -> None:
    def parse(*args, **kwargs):
        raise AssertionError("the source was parsed again instead of reading the cache")
    monkeypatch.setattr("lhcnet.data.load.load_fer2013", parse)


def test_roundtrip_is_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    ds = FaceDataset(images=rng.integers(0, 256, (5, 48, 48), dtype=np.uint8),
                     labels=np.array([0, 1, 2, 3, 4]), splits=np.array([0, 0, 1, 2, 2], np.uint8),
                     classes=CLASSES_FER2013, soft_labels=rng.random((5, 8)).astype(np.float32),
                     source="x.csv", row_ids=np.array([0, 2, 3, 4, 7]),
                     bad_rows=[BadRecord("x.csv", 2, "bad")])
    path = save_cache(ds, tmp_path / "c.npz")
    assert is_cache(path) and not is_cache(tmp_path) and zipfile.is_zipfile(path)
    back = load_cache(path)
    assert isinstance(back.images, np.memmap) and not back.images.flags.writeable
    for name in ("images", "labels", "splits", "soft_labels", "row_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
    assert back.classes == ds.classes and back.source == "x.csv"
    assert back.bad_rows == ds.bad_rows
    assert back.labels.dtype == np.int64 and back.splits.dtype == np.uint8


def test_not_a_cache_is_rejected(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    assert not is_cache(tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"other\.npz: damaged data cache"):
        load_dataset(tmp_path / "other.npz")


def test_load_dataset_converts_once_then_reuses(tmp_path, monkeypatch):
    images, labels, _ = write_fer_csv(tmp_path / "fer.csv.gz", n=6)
    first = load_dataset(tmp_path / "fer.csv.gz")
    files = list((tmp_path / "home" / "data").glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("fer-")
    _fail_if_parsed(monkeypatch)
    second = load_dataset(tmp_path / "fer.csv.gz")
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(second.images, images)
    np.testing.assert_array_equal(second.labels, first.labels)


def test_changed_source_is_converted_again(tmp_path):
    write_fer_csv(tmp_path / "fer.csv", n=3, seed=0)
    load_dataset(tmp_path / "fer.csv", cache_dir=tmp_path / "c")
    images, _, _ = write_fer_csv(tmp_path / "fer.csv", n=4, seed=1)
    stat = os.stat(tmp_path / "fer.csv")
    os.utime(tmp_path / "fer.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(load_dataset(tmp_path / "fer.csv", cache_dir=tmp_path / "c").images,
                                  images)


def test_no_cache(tmp_path):
    write_fer_csv(tmp_path / "fer.csv", n=3)
    ds = load_dataset(tmp_path / "fer.csv", cache_dir=False)
    assert not isinstance(ds.images, np.memmap) and not (tmp_path / "home").exists()


def test_prepared_cache_is_a_source(tmp_path, monkeypatch):
    images, _, _ = write_fer_csv(tmp_path / "fer.csv", n=5)
    save_cache(load_dataset(tmp_path / "fer.csv", cache_dir=False), tmp_path / "prepared.npz")
    _fail_if_parsed(monkeypatch)
    ds = load_dataset(tmp_path / "prepared.npz")
    np.testing.assert_array_equal(ds.images, images)
    assert len(ds.split("train")) + len(ds.split("val")) + len(ds.split("test")) == 5


def test_unwritable_cache_dir_still_loads(tmp_path):
    write_fer_csv(tmp_path / "fer.csv", n=3)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert len(load_dataset(tmp_path / "fer.csv", cache_dir=blocker / "sub")) == 3


def test_image_size_resizes(tmp_path):
    write_fer_csv(tmp_path / "fer.csv", n=2)
    ds = load_dataset(tmp_path / "fer.csv", cache_dir=False, image_size=24)
    assert ds.images.shape == (2, 24, 24) and ds.images.dtype == np.uint8


def test_missing_source_and_unknown_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_dataset(tmp_path / "nope.csv")
    write_fer_csv(tmp_path / "fer.csv", n=2)
    with pytest.raises(ValueError, match="unknown label set 'affectnet'"):
        load_dataset(tmp_path / "fer.csv", labels="affectnet")
    with pytest.raises(ValueError, match="FER\\+ labels need the FER\\+ votes file"):
        load_dataset(tmp_path / "fer.csv", labels="ferplus", cache_dir=False)


def test_split_selection_and_aliases(tmp_path):
    _, labels, usages = write_fer_csv(tmp_path / "fer.csv", n=9)
    ds = load_dataset(tmp_path / "fer.csv", cache_dir=False)
    for alias, name in [("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest"),
                        ("PublicTest", "PublicTest")]:
        part = ds.split(alias)
        expected = [i for i, u in enumerate(usages) if u == name]
        np.testing.assert_array_equal(part.labels, labels[expected])
        np.testing.assert_array_equal(part.row_ids, expected)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ds.split("dev")
