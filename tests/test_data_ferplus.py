"""FER+ votes: the reference majority rule, vote distributions, row alignment with FER2013."""
from __future__ import annotations

import numpy as np
import pytest
from test_data_fer2013 import write_fer_csv

from lhcnet.data import (CLASSES_FERPLUS, SPLITS, ferplus_majority, ferplus_soft_labels,
                         load_dataset, save_cache)

HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"

# votes in column order neutral..contempt, unknown, NF -> FER+ majority label (-1: dropped)
CASES = [
    ([10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0),
    ([0, 6, 0, 0, 0, 0, 0, 4, 0, 0], 1),
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], -1),  # tie: no majority
    ([5, 1, 1, 1, 1, 1, 0, 0, 0, 0], 0),  # single votes are outliers: 5 of 5 remain
    ([4, 3, 3, 0, 0, 0, 0, 0, 0, 0], -1),  # 4 of 10 is not a majority
    ([0, 0, 0, 0, 0, 0, 0, 3, 0, 0], 7),  # contempt
    ([2, 0, 0, 0, 0, 0, 0, 0, 8, 0], -1),  # unknown wins
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 10], -1),  # not a face
]


def _votes_csv(path, votes, usages) -> None:
    rows = [f"{u},fer{i:07d}.png,{','.join(map(str, v))}" for i, (v, u) in enumerate(zip(votes, usages))]
    path.write_text("\n".join([HEADER, *rows]) + "\n")


def test_majority_rule_of_the_reference_code():
    votes = np.array([v for v, _ in CASES])
    assert ferplus_majority(votes).tolist() == [label for _, label in CASES]


def test_soft_labels_are_emotion_vote_distributions():
    soft = ferplus_soft_labels(np.array([[5, 1, 1, 1, 1, 1, 0, 0, 0, 0], [0] * 9 + [10]]))
    np.testing.assert_allclose(soft[0], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0, 0])
    assert soft.dtype == np.float32 and not soft[1].any()


def test_load_with_ferplus_relabels_and_drops(tmp_path):
    images, _, usages = write_fer_csv(tmp_path / "fer.csv", n=len(CASES))
    _votes_csv(tmp_path / "ferplus.csv", [v for v, _ in CASES], usages)
    ds = load_dataset(tmp_path / "fer.csv", ferplus_csv=tmp_path / "ferplus.csv", cache_dir=False)
    kept = [i for i, (_, label) in enumerate(CASES) if label >= 0]
    assert ds.classes == CLASSES_FERPLUS
    assert ds.labels.tolist() == [CASES[i][1] for i in kept]
    np.testing.assert_array_equal(ds.images, images[kept])
    np.testing.assert_array_equal(ds.row_ids, kept)
    assert ds.soft_labels.shape == (len(kept), 8)
    np.testing.assert_allclose(ds.soft_labels.sum(1), 1, rtol=1e-6)


def test_alignment_survives_skipped_rows(tmp_path):
    """A FER2013 row dropped by --skip-bad must not shift the FER+ votes of later rows."""
    images, _, usages = write_fer_csv(tmp_path / "fer.csv", n=4)
    lines = (tmp_path / "fer.csv").read_text().splitlines()
    lines[2] = "9" + lines[2][1:]  # data row 1: bad label
    (tmp_path / "fer.csv").write_text("\n".join(lines) + "\n")
    votes = [[10] + [0] * 9, [0, 10] + [0] * 8, [0, 0, 10] + [0] * 7, [0, 0, 0, 10] + [0] * 6]
    _votes_csv(tmp_path / "ferplus.csv", votes, usages)
    ds = load_dataset(tmp_path / "fer.csv", ferplus_csv=tmp_path / "ferplus.csv", skip_bad=True,
                      cache_dir=False)
    assert ds.labels.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(ds.images, images[[0, 2, 3]])


def test_misaligned_files_are_an_error(tmp_path):
    _, _, usages = write_fer_csv(tmp_path / "fer.csv", n=3)
    _votes_csv(tmp_path / "short.csv", [[10] + [0] * 9] * 2, usages[:2])
    with pytest.raises(ValueError, match="2 rows, but the FER2013 data has 3"):
        load_dataset(tmp_path / "fer.csv", ferplus_csv=tmp_path / "short.csv", cache_dir=False)
    swapped = [SPLITS[(SPLITS.index(u) + 1) % 3] for u in usages]
    _votes_csv(tmp_path / "swapped.csv", [[10] + [0] * 9] * 3, swapped)
    with pytest.raises(ValueError, match=r"swapped\.csv: line 2: Usage PublicTest but FER2013 says "
                                         "Training"):
        load_dataset(tmp_path / "fer.csv", ferplus_csv=tmp_path / "swapped.csv", cache_dir=False)


@pytest.mark.parametrize("content,message", [
    ("", "empty file"),
    ("Usage,Image name,neutral\nTraining,a,1\n", "line 1: missing column happiness"),
    (HEADER + "\nTraining,a,1,2,x,0,0,0,0,0,0,0\n", "line 2: votes .*expected non-negative integers"),
    (HEADER + "\nTrain,a,1,2,0,0,0,0,0,0,0,0\n", "line 2: Usage 'Train'"),
])
def test_bad_ferplus_file(tmp_path, content, message):
    write_fer_csv(tmp_path / "fer.csv", n=1)
    (tmp_path / "v.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path / "fer.csv", ferplus_csv=tmp_path / "v.csv", cache_dir=False)


def test_ferplus_cache_keeps_its_labels(tmp_path):
    _, _, usages = write_fer_csv(tmp_path / "fer.csv", n=len(CASES))
    _votes_csv(tmp_path / "ferplus.csv", [v for v, _ in CASES], usages)
    ds = load_dataset(tmp_path / "fer.csv", labels="ferplus", ferplus_csv=tmp_path / "ferplus.csv",
                      cache_dir=False)
    save_cache(ds, tmp_path / "plus.npz")
    back = load_dataset(tmp_path / "plus.npz", labels="ferplus")
    assert back.classes == CLASSES_FERPLUS and back.labels.tolist() == ds.labels.tolist()
    np.testing.assert_array_equal(back.soft_labels, ds.soft_labels)
    with pytest.raises(ValueError, match="cannot provide fer2013 labels"):
        load_dataset(tmp_path / "plus.npz", labels="fer2013")
