"""BatchLoader: model-ready batches, determinism per (seed, epoch), sharding, soft labels."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lhcnet.data import (AugmentConfig, BatchLoader, FaceDataset, augment, jpeg_roundtrip, paper_jpeg,
                         to_model_input)
from lhcnet.data.placement import check_room_for_images, fits_on_device

STAGE2 = AugmentConfig(rotation=10, shift=0.1, zoom=0.1, flip=True)


def _dataset(n: int = 10) -> FaceDataset:
    rng = np.random.default_rng(0)
    soft = rng.random((n, 8)).astype(np.float32)
    return FaceDataset(images=rng.integers(0, 256, (n, 48, 48), dtype=np.uint8),
                       labels=np.arange(n, dtype=np.int64) % 7, splits=np.zeros(n, np.uint8),
                       classes=tuple("abcdefg"), soft_labels=soft / soft.sum(1, keepdims=True))


def _batches(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_batches_are_model_ready_and_in_order():
    ds = _dataset(10)
    loader = BatchLoader(ds, batch_size=4, size=64)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 3 and loader.num_samples == 10
    x, y = batches[0]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, to_model_input(torch.from_numpy(ds.images[:4]), 64))
    assert torch.cat([b[1] for b in batches]).tolist() == ds.labels.tolist()
    assert len(batches[-1][0]) == 2


def test_drop_last():
    loader = BatchLoader(_dataset(10), batch_size=4, size=48, drop_last=True)
    assert len(loader) == 2 and [len(x) for x, _ in loader] == [4, 4]


def test_native_resolution_passes_pixels_through():
    ds = _dataset(3)
    x, _ = next(iter(BatchLoader(ds, batch_size=3, size=48)))
    assert torch.equal(x[:, 0], torch.from_numpy(ds.images).float())


def test_images_and_labels_arrays_and_no_labels():
    ds = _dataset(5)
    _, y = next(iter(BatchLoader(ds.images, ds.labels, batch_size=5, size=48)))
    assert y.tolist() == ds.labels.tolist()
    _, y = next(iter(BatchLoader(torch.from_numpy(ds.images), batch_size=5, size=48)))
    assert (y == -1).all()


def test_shuffle_is_a_function_of_seed_and_epoch():
    ds = _dataset(50)
    loader = BatchLoader(ds, batch_size=8, size=48, shuffle=True, augment=STAGE2, seed=7)
    epoch0 = _batches(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, _batches(loader)))  # re-iterate
    loader.set_epoch(1)
    epoch1 = _batches(loader)
    assert torch.cat([y for _, y in epoch0]).tolist() != torch.cat([y for _, y in epoch1]).tolist()
    resumed = BatchLoader(ds, batch_size=8, size=48, shuffle=True, augment=STAGE2, seed=7)
    resumed.set_epoch(1)  # a resumed run reproduces epoch 1 exactly
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(epoch1, _batches(resumed)))
    other = BatchLoader(ds, batch_size=8, size=48, shuffle=True, seed=8)
    assert torch.cat([y for _, y in _batches(other)]).tolist() != \
        torch.cat([y for _, y in epoch0]).tolist()


def test_shuffled_epoch_is_a_permutation():
    loader = BatchLoader(_dataset(20), np.arange(20), batch_size=6, size=48, shuffle=True)
    seen = torch.cat([y for _, y in loader]).tolist()
    assert sorted(seen) == list(range(20)) and seen != list(range(20))


def test_augmentation_is_applied_per_batch():
    ds = _dataset(8)
    plain = next(iter(BatchLoader(ds, batch_size=8, size=64)))[0]
    x, _ = next(iter(BatchLoader(ds, batch_size=8, size=64, augment=STAGE2)))
    assert x.shape == plain.shape and not torch.allclose(x, plain)
    assert torch.equal(x[:, 0], x[:, 2])  # augmented once, then replicated
    none = next(iter(BatchLoader(ds, batch_size=8, size=64, augment=AugmentConfig())))[0]
    assert torch.equal(none, plain)


def test_loader_equals_augment_of_to_model_input():
    """Resize -> augment grey -> replicate is the documented augment(to_model_input(x))."""
    ds = _dataset(4)
    loader = BatchLoader(ds, batch_size=4, size=64, augment=STAGE2)
    x, _ = next(iter(loader))
    expected = augment(to_model_input(torch.from_numpy(ds.images), 64), STAGE2, loader.generator())
    assert torch.equal(x, expected)


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (2, 4)])
def test_ranks_shard_like_distributed_sampler(n, world):
    ds = _dataset(n)
    per_rank = []
    for rank in range(world):
        loader = BatchLoader(ds, np.arange(n), batch_size=2, size=48, shuffle=True, seed=1,
                             rank=rank, world_size=world)
        per_rank.append(torch.cat([y for _, y in loader]).tolist())
        assert loader.num_samples == -(-n // world)
    assert len({len(ids) for ids in per_rank}) == 1  # same count on every rank
    everything = sum(per_rank, [])
    assert set(everything) == set(range(n))  # all covered; padding repeats a few
    assert len(everything) == -(-n // world) * world


def test_soft_labels():
    ds = _dataset(6)
    _, y = next(iter(BatchLoader(ds, batch_size=6, size=48, soft_labels=True)))
    assert y.dtype == torch.float32 and y.shape == (6, 8)
    torch.testing.assert_close(y, torch.from_numpy(ds.soft_labels))
    explicit = np.eye(3, dtype=np.float32)[np.arange(6) % 3]
    _, y = next(iter(BatchLoader(ds, batch_size=6, size=48, soft_labels=explicit)))
    assert torch.equal(y, torch.from_numpy(explicit))


def test_loaders_share_the_image_array():
    """No per-loader copies: a stage's training and acceptance loaders read one array."""
    images = _dataset(6).images
    train = BatchLoader(images, batch_size=4, size=64, shuffle=True, augment=STAGE2)
    evaluation = BatchLoader(images, batch_size=4, size=64)
    assert train.images.data_ptr() == evaluation.images.data_ptr() == images.ctypes.data
    x, _ = next(iter(evaluation))
    assert torch.equal(x, to_model_input(torch.from_numpy(images[:4]), 64))


def test_a_read_only_memmap_is_read_into_memory_once(tmp_path):
    images = _dataset(5).images
    mapped = np.lib.format.open_memmap(tmp_path / "faces.npy", mode="w+", dtype=np.uint8, shape=images.shape)
    mapped[:] = images
    mapped.flush()
    read_only = np.load(tmp_path / "faces.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about non-writable arrays: none may reach it
        loader = BatchLoader(read_only, batch_size=5, size=48)
    assert loader.images.data_ptr() != read_only.ctypes.data
    assert torch.equal(loader.images, torch.from_numpy(images))


def test_channels_last_batches_hold_the_same_values():
    ds = _dataset(4)
    plain = next(iter(BatchLoader(ds, batch_size=4, size=64, augment=STAGE2)))[0]
    x, _ = next(iter(BatchLoader(ds, batch_size=4, size=64, augment=STAGE2, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(x, plain)


def test_images_go_to_the_gpu_only_when_a_quarter_of_its_free_memory_holds_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4_000, 80_000))
    assert fits_on_device(1_000, "cuda") and not fits_on_device(1_001, "cuda")
    assert fits_on_device(10 ** 12, "cpu")


def test_paper_scale_set_is_refused_before_training_when_memory_is_short(monkeypatch):
    import lhcnet.data.placement as placement
    need = 28_709 * 224 * 224  # the paper's JPEG training set: 1.44 GB
    monkeypatch.setattr(placement, "available_host_memory", lambda: need)  # no room to convert
    with pytest.raises(ValueError, match=r"paper_jpeg: 28,709 images at 224 px need 1.44 GB of memory"):
        check_room_for_images(28_709, 224, "cpu", "paper_jpeg")
    monkeypatch.setattr(placement, "available_host_memory", lambda: 2 * need)
    assert check_room_for_images(28_709, 224, "cpu", "paper_jpeg") == need == 1_440_502_784  # 28,709 x 50,176
    monkeypatch.setattr(placement, "available_host_memory", lambda: None)  # unknown: no check
    assert check_room_for_images(28_709, 224, "cpu", "paper_jpeg") == need


def test_paper_jpeg_fills_a_given_tensor_block_by_block():
    images = _dataset(130).images  # more than one block of 128
    out = torch.zeros((130, 32, 32), dtype=torch.uint8)
    assert paper_jpeg(images, 32, out=out) is out
    expected = np.stack([jpeg_roundtrip(np.floor(to_model_input(torch.from_numpy(images[i:i + 1]), 32)[0, 0]
                                                 .numpy()).astype(np.uint8)) for i in (0, 127, 128, 129)])
    np.testing.assert_array_equal(out.numpy()[[0, 127, 128, 129]], expected)  # one image at a time
    np.testing.assert_array_equal(out.numpy(), paper_jpeg(images, 32))
    with pytest.raises(ValueError, match="out has shape"):
        paper_jpeg(images, 32, out=torch.zeros((130, 48, 48), dtype=torch.uint8))


def test_bad_arguments():
    ds = _dataset(4)
    with pytest.raises(ValueError, match="labels for"):
        BatchLoader(ds.images, np.arange(3), batch_size=2, size=48)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, batch_size=2, size=48, rank=2, world_size=2)
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(ds.images.astype(np.float32), batch_size=2, size=48)
    no_soft = FaceDataset(ds.images, ds.labels, ds.splits, ds.classes)
    with pytest.raises(ValueError, match="soft_labels=True"):
        BatchLoader(no_soft, batch_size=2, size=48, soft_labels=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batches_stay_on_the_device(monkeypatch):
    ds = _dataset(8)
    loader = BatchLoader(ds, batch_size=4, size=64, augment=STAGE2, device="cuda")
    assert loader.images.is_cuda
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda
    # images that do not fit stay pinned on the host; the batches are the same
    monkeypatch.setattr("lhcnet.data.placement.fits_on_device", lambda nbytes, device: False)
    host = BatchLoader(ds, batch_size=4, size=64, augment=STAGE2, device="cuda")
    assert host.images.is_pinned() and not host.images.is_cuda
    x_host, y_host = next(iter(host))
    assert x_host.is_cuda and torch.equal(x_host, x) and torch.equal(y_host, y)
