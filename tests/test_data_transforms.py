"""Preprocessing (to_model_input, paper JPEG), the warp primitive and Keras-style augmentation."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lhcnet.data import (AugmentConfig, augment, hflip_matrix, jpeg_roundtrip, paper_jpeg,
                         random_matrices, rotation_matrix, to_model_input, translation_matrix,
                         warp, zoom_matrix)

STAGE2 = AugmentConfig(rotation=10, shift=0.1, zoom=0.1, flip=True)


def _faces(b: int = 4, c: int = 1, h: int = 20, w: int = 24) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(1)) * 255


# --- to_model_input -------------------------------------------------------------------------

def test_to_model_input_shape_dtype_and_grey_replication():
    x = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    out = to_model_input(x, 224)
    assert out.shape == (5, 3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert 0 <= out.min() and out.max() <= 255
    assert torch.equal(to_model_input(x[:, None], 224), out)  # (B, 1, H, W) input too


def test_resize_uses_half_pixel_centres():
    """Hand-computed tf.image.resize / align_corners=False: [0, 100] -> [0, 25, 75, 100]."""
    x = torch.tensor([[[0, 100], [0, 100]]], dtype=torch.uint8)
    out = to_model_input(x, 4)[0, 0]
    expected = torch.tensor([0.0, 25.0, 75.0, 100.0]).expand(4, 4)
    torch.testing.assert_close(out, expected)


def test_native_size_is_not_resampled():
    x = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    assert torch.equal(to_model_input(x, 48), x.float()[:, None].expand(-1, 3, -1, -1))


def test_grey_jpeg_equals_rgb_jpeg_of_replicated_grey():
    """Why the paper's RGB JPEGs can be cached as one grey channel (spec §5)."""
    grey = to_model_input(torch.randint(0, 256, (1, 48, 48), dtype=torch.uint8), 224)[0, 0]
    grey = grey.floor().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(buffer, "JPEG", quality=100, subsampling=0)
    rgb = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    ours = jpeg_roundtrip(grey)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], ours)


def test_paper_jpeg_floors_then_jpeg_q100():
    images = np.random.default_rng(0).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    out = paper_jpeg(images, 96)
    assert out.shape == (6, 96, 96) and out.dtype == np.uint8
    exact = to_model_input(torch.from_numpy(images), 96)[:, 0].numpy()
    assert np.abs(out.astype(float) - np.floor(exact)).max() <= 8  # q100: small coding error
    shift = out.mean() - exact.mean()
    assert -0.65 < shift < -0.35  # the floor's -0.5 that the paper discusses
    constant = np.full((1, 48, 48), 137, dtype=np.uint8)
    assert (paper_jpeg(constant, 64) == 137).all()


# --- warp -----------------------------------------------------------------------------------

def _edge_shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Roll content by (dx right, dy down), replicating the edge instead of wrapping."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return x[..., rows, :][..., cols]


def test_identity_is_exact():
    x = _faces(c=3)
    assert torch.equal(warp(x, torch.eye(3)), x)
    assert torch.equal(warp(x, translation_matrix(0, 0) @ rotation_matrix(0.0, 20, 24)), x)


@pytest.mark.parametrize("dx,dy", [(3, -2), (-5, 0), (0, 7), (1, 1)])
def test_integer_shift_is_edge_replicating_roll(dx, dy):
    x = _faces(c=2)
    torch.testing.assert_close(warp(x, translation_matrix(dx, dy)), _edge_shift(x, dx, dy),
                               atol=2e-3, rtol=0)


def test_per_image_matrices_and_exact_identity_rows():
    x = _faces(b=3)
    matrices = torch.stack([torch.eye(3, dtype=torch.float64), translation_matrix(2, 0),
                            torch.eye(3, dtype=torch.float64)])
    out = warp(x, matrices)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    torch.testing.assert_close(out[1], _edge_shift(x[1], 2, 0), atol=2e-3, rtol=0)


def _dot(size: int, row: int, col: int) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size)
    img[0, 0, row, col] = 255
    return img


def _where(img: torch.Tensor) -> tuple[int, int]:
    row, col = divmod(int(img.flatten().argmax()), img.shape[-1])
    return row, col


@pytest.mark.parametrize("degrees,expected", [(90, (5, 10)), (-90, (15, 10)), (180, (10, 5))])
def test_rotation_is_counter_clockwise_about_the_centre(degrees, expected):
    img = _dot(21, 10, 15)  # 5 px right of the centre (10, 10)
    out = warp(img, rotation_matrix(math.radians(degrees), 21, 21))
    assert _where(out) == expected
    assert out.max() > 254  # quarter turns land on pixel centres


def test_zoom_follows_keras():
    """z < 1 magnifies: a dot 4 px right of centre moves to 8 px at z = 0.5."""
    out = warp(_dot(21, 10, 14), zoom_matrix(0.5, 1.0, 21, 21))
    assert _where(out) == (10, 18)


def test_translation_moves_content_right_and_down():
    assert _where(warp(_dot(21, 4, 4), translation_matrix(3, 5))) == (9, 7)


def test_hflip_matrix_matches_tensor_flip_and_twice_is_identity():
    x = _faces()
    flip = hflip_matrix(x.shape[-1])
    torch.testing.assert_close(warp(x, flip), x.flip(-1), atol=2e-3, rtol=0)
    torch.testing.assert_close(warp(warp(x, flip), flip), x, atol=4e-3, rtol=0)


def test_matrices_compose():
    a, b = 0.3, -0.7
    torch.testing.assert_close(rotation_matrix(a, 9, 13) @ rotation_matrix(b, 9, 13),
                               rotation_matrix(a + b, 9, 13))
    torch.testing.assert_close(translation_matrix(1, 2) @ translation_matrix(3, -4),
                               translation_matrix(4, -2))


def test_warp_matches_scipy_affine_transform():
    """Same inverse-mapping convention as Keras' apply_affine_transform (scipy, order 1, nearest)."""
    from scipy import ndimage  # a [dev] dependency: this independent check must not be skipped
    x = _faces(b=1)
    m = (rotation_matrix(0.4, 20, 24) @ translation_matrix(2.5, -1.25)
         @ zoom_matrix(1.1, 0.9, 20, 24)).numpy()
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # scipy works in (row, col)
    m_rc = swap @ m @ swap
    ref = ndimage.affine_transform(x[0, 0].double().numpy(), m_rc[:2, :2], m_rc[:2, 2], order=1,
                                   mode="nearest")
    np.testing.assert_allclose(warp(x, m)[0, 0].numpy(), ref, atol=5e-3)


# --- augment --------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_zero_augmentation_is_identity():
    x = _faces()
    assert torch.equal(augment(x, AugmentConfig(), _gen(0)), x)


def test_same_seed_same_batch_other_seed_other_batch():
    x = _faces(b=8)
    a, b = augment(x, STAGE2, _gen(3)), augment(x, STAGE2, _gen(3))
    assert torch.equal(a, b)
    assert not torch.allclose(a, augment(x, STAGE2, _gen(4)))


def test_flip_is_exact_mirror_with_probability_half():
    x = _faces(b=64)
    out = augment(x, AugmentConfig(flip=True), _gen(0))
    mirrored = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x)]
    assert all(m != k for m, k in zip(mirrored, kept))
    assert 16 < sum(mirrored) < 48


def test_flipping_twice_is_identity():
    x = _faces(b=16)
    config = AugmentConfig(flip=True)
    assert torch.equal(augment(augment(x, config, _gen(9)), config, _gen(9)), x)


def test_channels_are_augmented_alike():
    """So the loader can augment one grey channel and replicate afterwards."""
    grey = _faces(b=5)
    rgb = augment(grey.expand(-1, 3, -1, -1), STAGE2, _gen(2))
    one = augment(grey, STAGE2, _gen(2))
    assert torch.equal(rgb, one.expand(-1, 3, -1, -1))


def test_random_parameters_follow_keras_ranges():
    n, size = 4000, 100
    centre = torch.tensor([(size - 1) / 2, (size - 1) / 2, 1.0], dtype=torch.float64)

    rot, flip = random_matrices(AugmentConfig(rotation=30, flip=True), n, size, size, _gen(0))
    angle = torch.rad2deg(torch.atan2(rot[:, 1, 0], rot[:, 0, 0]))
    assert angle.abs().max() <= 30 and angle.min() < -29 and angle.max() > 29
    assert abs(angle.mean()) < 1.5 and 0.45 < flip.double().mean() < 0.55
    torch.testing.assert_close(rot @ centre, centre.expand(n, 3))  # about the centre

    shift, flip = random_matrices(AugmentConfig(shift=0.1), n, size, size, _gen(1))
    dx, dy = -shift[:, 0, 2], -shift[:, 1, 2]
    assert max(dx.abs().max(), dy.abs().max()) <= 10 and min(dx.max(), dy.max()) > 9.8
    assert not flip.any()
    assert abs(np.corrcoef(dx, dy)[0, 1]) < 0.1  # independent

    zoom, _ = random_matrices(AugmentConfig(zoom=0.1), n, size, size, _gen(2))
    zx, zy = zoom[:, 0, 0], zoom[:, 1, 1]
    assert zx.min() >= 0.9 and zx.max() <= 1.1 and zy.min() < 0.91 and zy.max() > 1.09
    assert abs(np.corrcoef(zx, zy)[0, 1]) < 0.1  # drawn independently: aspect ratio changes
    torch.testing.assert_close(zoom @ centre, centre.expand(n, 3))


def test_augmented_values_stay_in_range_and_edges_are_replicated():
    """fill_mode='nearest': a shift never brings in black (0) from outside the image."""
    x = torch.full((8, 1, 32, 32), 200.0)
    out = augment(x, AugmentConfig(rotation=30, shift=0.2, zoom=0.2), _gen(0))
    torch.testing.assert_close(out, x)


def test_invalid_config():
    with pytest.raises(ValueError):
        AugmentConfig(zoom=1.5)
