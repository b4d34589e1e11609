"""TTA (spec §6): the view list, the geometry of each step, and the weighted average."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from lhcnet.data import to_model_input
from lhcnet.evaluate import compute_metrics, evaluate_models, predict_probabilities
from lhcnet.tta import (REFERENCE_SIZE, View, central_crop_box, make_views, model_views, paper_views,
                        select_views, ten_crop_views, total_weight, tta_predict)

from tiny_fer import single_thread  # noqa: F401  (autouse fixture)


class ConstantModel(nn.Module):
    """Logits that ignore the input (a learned bias only)."""

    input_size = 48

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


def blob(size: int, x: float, y: float, sigma: float = 1.5) -> torch.Tensor:
    """A smooth dot centred at pixel coordinates (x, y) (pixel centres at integers), (1, 1, S, S)."""
    coords = torch.arange(size, dtype=torch.float64)
    image = torch.exp(-((coords[None, :] - x) ** 2 + (coords[:, None] - y) ** 2) / (2 * sigma ** 2))
    return (255 * image).float()[None, None]


def centroid(image: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted centre (x, y) of a (..., S, S) image above its background."""
    image = image.double().squeeze()
    image = (image - image.min()).clamp(min=0)
    coords = torch.arange(image.shape[-1], dtype=torch.float64)
    total = image.sum()
    return float((image.sum(0) * coords).sum() / total), float((image.sum(1) * coords).sum() / total)


def expected_position(view: View, size: int, x: float, y: float) -> tuple[float, float]:
    """Where the paper's pipeline sends the point (x, y): flip -> zoom -> translate -> rotate."""
    c = (size - 1) / 2
    if view.flip:
        x = size - 1 - x
    if view.zoom != 1.0:
        _, crop = central_crop_box(size, view.zoom)
        x, y = c + (x - c) * size / crop, c + (y - c) * size / crop
    scale = size / REFERENCE_SIZE
    x, y = x + view.dx * scale, y + view.dy * scale
    u, v, a = x - c, y - c, view.angle   # counter-clockwise as displayed (y axis points down)
    return c + math.cos(a) * u + math.sin(a) * v, c - math.sin(a) * u + math.cos(a) * v


def test_paper_view_list_has_60_distinct_views_with_total_weight_62() -> None:
    views = paper_views()
    assert len(views) == 60
    assert len(set(views)) == 60
    assert total_weight(views) == 62
    identity = [v for v in views if v.is_identity]
    assert identity == [views[0]] and identity[0].weight == 3
    assert all(v.weight == 1 for v in views[1:])
    batch1 = [v for v in views[1:] if v.zoom == 1.0]
    batch2 = [v for v in views if v.zoom != 1.0]
    assert len(batch1) == 53 and len(batch2) == 6
    assert {v.angle for v in batch1} == {0.0, 0.4, -0.4}
    assert {v.dx for v in batch1} == {v.dy for v in batch1} == {0.0, 10.0, -10.0}
    assert {(v.zoom, v.angle, v.dx, v.dy) for v in batch2} == {(0.9, a, 0.0, 0.0) for a in (0.0, 0.15, -0.15)}
    assert sum(v.flip for v in batch2) == 3


def test_views_produce_60_different_images() -> None:
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 255
    out = make_views(x, paper_views())
    assert out.shape == (120, 3, 48, 48)
    torch.testing.assert_close(out[:2], x, rtol=0, atol=1e-4)    # identity view untouched
    flat = out.view(60, -1)
    distances = torch.cdist(flat, flat) + torch.eye(60) * 1e9
    assert distances.min() > 1.0


def test_central_crop_matches_tf() -> None:
    assert central_crop_box(224, 0.9) == (11, 202)
    assert central_crop_box(48, 0.9) == (2, 44)


@pytest.mark.parametrize("view", [
    View(dx=10, dy=-10),
    View(flip=True),
    View(angle=0.4),
    View(zoom=0.9),
    View(flip=True, dx=-10, dy=10, angle=-0.4),
    View(flip=True, zoom=0.9, angle=0.15),
])
def test_a_shifted_dot_lands_where_expected_at_224(view: View) -> None:
    x0, y0 = 131.0, 95.0
    out = make_views(blob(224, x0, y0), [view])
    ex, ey = expected_position(view, 224, x0, y0)
    cx, cy = centroid(out)
    assert abs(cx - ex) < 0.03 and abs(cy - ey) < 0.03, (view.describe(), (cx, cy), (ex, ey))


def test_integer_shift_at_224_is_an_exact_pixel_move() -> None:
    image = torch.zeros(1, 1, 224, 224)
    image[0, 0, 100, 60] = 255                     # row y=100, column x=60
    out = make_views(image, [View(dx=10, dy=-10)])
    moved = torch.zeros_like(image)
    moved[0, 0, 90, 70] = 255
    torch.testing.assert_close(out, moved, rtol=0, atol=0.01)


def test_shifts_scale_with_the_input_size() -> None:
    x0, y0 = 20.0, 26.0
    out = make_views(blob(48, x0, y0, sigma=2.0), [View(dx=10, dy=10)])
    cx, cy = centroid(out)
    assert abs(cx - (x0 + 10 * 48 / 224)) < 0.05 and abs(cy - (y0 + 10 * 48 / 224)) < 0.05


def test_translate_then_rotate_loses_what_left_the_frame() -> None:
    """Sequential steps (as the original): the 10 px pushed out by the shift do not come back."""
    image = torch.zeros(1, 1, 224, 224)
    image[..., :, :5] = 255                        # a bright band at the left edge
    shifted_out = make_views(image, [View(dx=-10)])
    assert shifted_out.max() == 0                 # border replicate of a now-black edge
    rotated = make_views(image, [View(dx=-10, angle=0.4)])
    assert rotated.max() == 0                      # one composed map would clamp to the band again


def test_select_views_subsets() -> None:
    assert select_views("paper") == paper_views()
    flip = select_views("flip")
    assert [v.describe() for v in flip] == ["identity", "flip"] and total_weight(flip) == 2
    ten = select_views("ten-crop")
    assert len(set(ten)) == 10 and total_weight(ten) == 10 and sum(v.flip for v in ten) == 5
    assert {v.crop for v in ten} == {"top-left", "top-right", "bottom-left", "bottom-right", "centre"}
    assert select_views("none") == (View(),)
    zoom = select_views("zoom")
    assert len(zoom) == 8 and sum(v.zoom != 1.0 for v in zoom) == 6
    ten = select_views(10)
    assert len(ten) == 10 and ten[0].weight == 3 and total_weight(ten) == 12
    assert select_views("1") == (View(weight=3.0),)
    with pytest.raises(ValueError):
        select_views(61)
    with pytest.raises(ValueError):
        select_views("heavy")


def test_tta_is_the_weighted_softmax_mean_in_one_forward() -> None:
    calls = []

    class Recorder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return x.mean(dim=(2, 3))[:, :2] / 10          # 2 "classes" that depend on the input

    x = torch.rand(3, 3, 48, 48) * 255
    views = paper_views()
    probs = tta_predict(Recorder(), x, views)
    assert calls == [60 * 3]
    per_view = torch.softmax(make_views(x, views).mean(dim=(2, 3))[:, :2] / 10, dim=1).view(60, 3, 2)
    expected = (3 * per_view[0] + per_view[1:].sum(0)) / 62
    torch.testing.assert_close(probs, expected)


def test_tta_equals_plain_evaluation_when_the_output_ignores_the_input() -> None:
    model = ConstantModel()
    faces = torch.randint(0, 256, (10, 48, 48), dtype=torch.uint8)
    labels = torch.randint(0, 7, (10,))
    plain = predict_probabilities(model, faces, batch_size=4)
    tta = predict_probabilities(model, faces, batch_size=120, views=paper_views())
    torch.testing.assert_close(tta, plain)
    classes = [str(i) for i in range(7)]
    with_tta = evaluate_models([("m", model)], faces, labels, classes, tta="paper")
    without = evaluate_models([("m", model)], faces, labels, classes)
    assert with_tta.models[0].metrics.confusion == without.models[0].metrics.confusion
    assert with_tta.models[0].metrics.accuracy == without.models[0].metrics.accuracy
    assert with_tta.tta == {"views": "paper", "count": 60, "total_weight": 62.0}
    assert without.tta is None
    assert compute_metrics(tta, labels, classes).accuracy == without.models[0].metrics.accuracy


class PixelModel(nn.Module):
    """Logits that depend on every pixel and on left vs right (a fixed random linear map)."""

    input_size = 48

    def __init__(self, size: int = 48, num_classes: int = 7, info: dict | None = None) -> None:
        super().__init__()
        self.input_size = size
        self.weight = nn.Parameter(torch.randn(num_classes, 3 * size * size,
                                               generator=torch.Generator().manual_seed(3)) / 2000)
        self.lhcnet_metadata = {"info": dict(info or {})}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_tta_evaluation_of_an_input_dependent_model_is_the_weighted_mean_of_its_views() -> None:
    """A model that sees every pixel: ``predict_probabilities`` with the 60 views (2 faces per
    forward, so faces and views are batched together) equals the weighted mean of the plain
    predictions of each view on its own, and differs from no TTA (the views reach the model)."""
    model = PixelModel()
    faces = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    views = paper_views()
    tta = predict_probabilities(model, faces, batch_size=130, views=views)
    x = to_model_input(faces, 48)
    with torch.no_grad():
        expected = sum(v.weight * torch.softmax(model(make_views(x, [v])), dim=1) for v in views) / 62
    torch.testing.assert_close(tta, expected, rtol=1e-5, atol=1e-6)
    plain = predict_probabilities(model, faces)
    assert (tta - plain).abs().max() > 0.01
    labels = torch.randint(0, 7, (5,), generator=torch.Generator().manual_seed(7))
    report = evaluate_models([("m", model)], faces, labels, [str(i) for i in range(7)], tta="paper")
    assert report.models[0].metrics.confusion == compute_metrics(expected, labels, [str(i) for i in range(7)]).confusion


def torchvision_ten_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """Reference: torchvision's ten_crop, each crop resized back to the input size (bilinear)."""
    size = x.shape[-1]
    crops = TF.ten_crop(x, [side, side])
    return torch.cat([TF.resize(c, [size, size], InterpolationMode.BILINEAR, antialias=False) for c in crops])


@pytest.mark.parametrize(("size", "crop", "side"), [(48, 44, 44), (48, 40, 40), (224, 40, 187)])
def test_ten_crop_views_equal_torchvision_ten_crop(size: int, crop: int, side: int) -> None:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(4)) * 255
    views = make_views(x, ten_crop_views(), crop)
    torch.testing.assert_close(views, torchvision_ten_crop(x, side), rtol=0, atol=1e-3)
    # and by hand at 48: the top-right crop is columns 48 - side.., rows ..side, upsampled to 48
    if size == 48:
        by_hand = F.interpolate(x[..., :side, size - side:], size=(size, size), mode="bilinear",
                                align_corners=False)
        torch.testing.assert_close(views[2:4], by_hand, rtol=0, atol=1e-3)


def test_flip_tta_is_the_mean_of_the_softmax_of_x_and_its_mirror() -> None:
    model = PixelModel()
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(5)) * 255
    by_hand = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1)) / 2
    got = tta_predict(model, x, select_views("flip"))
    torch.testing.assert_close(got, by_hand)
    assert (got - torch.softmax(model(x), 1)).abs().max() > 1e-3   # the mirror does change the output


def test_a_model_trained_on_crops_is_evaluated_on_its_centre_crop_and_ten_crops() -> None:
    model = PixelModel(info={"crop": 44, "tta": "ten-crop"})
    faces = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    x = faces.float()[:, None].expand(-1, 3, -1, -1)
    centre = F.interpolate(x[..., 2:46, 2:46], size=(48, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(predict_probabilities(model, faces), torch.softmax(model(centre), 1))
    ten = torch.softmax(model(torchvision_ten_crop(x, 44)), 1).view(10, 5, -1).mean(0)
    torch.testing.assert_close(predict_probabilities(model, faces, views=model_views(model, True)), ten)
    report = evaluate_models([("m", model)], faces, torch.zeros(5, dtype=torch.long), list("abcdefg"), tta=True)
    assert report.tta == {"views": "ten-crop", "count": 10, "total_weight": 10.0}
    assert report.models[0].info["crop"] == 44


def test_model_views_follow_the_model_file() -> None:
    plain, cropped = PixelModel(info={"tta": "flip"}), PixelModel(info={"crop": 40, "tta": "ten-crop"})
    assert model_views(plain, None) is None and model_views(cropped, None) == (View(),)
    assert model_views(plain, True) == select_views("flip")
    assert model_views(cropped, True) == ten_crop_views()
    assert model_views(PixelModel(), True) == paper_views()     # files that record no TTA
    assert model_views(cropped, "paper") == paper_views()       # a named set wins
    with pytest.raises(ValueError, match="records none"):
        make_views(torch.zeros(1, 3, 48, 48), ten_crop_views(), crop=0)
    with pytest.raises(ValueError, match="does not fit"):
        make_views(torch.zeros(1, 3, 48, 48), ten_crop_views(), crop=60)
