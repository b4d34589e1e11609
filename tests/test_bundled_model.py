"""The model shipped inside the package: loads offline, and scores what its card states."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FER2013_CSV_GZ, REPO, requires_shared_data
from lhcnet.data import load_dataset
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import load_model
from lhcnet.predict import bundled_model_path


def bundled() -> torch.nn.Module:
    try:
        return load_model(bundled_model_path())
    except FileNotFoundError:
        pytest.skip("src/lhcnet/weights/default.safetensors is not there yet (train-and-ship issue)")


def test_bundled_model_is_small_and_describes_itself() -> None:
    model = bundled()
    path = bundled_model_path()
    info = model.lhcnet_metadata["info"]
    assert path.stat().st_size <= 25 * 2**20
    assert info["classes"] == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    check = info["reference_check"]
    assert check["split"] == "PublicTest" and check["images"] >= 500
    if model.lhcnet_metadata["name"].startswith("lhcnet_"):
        assert len(model.lhc) == 5  # an LHC-Net: the five blocks at the paper's places


def test_model_card_names_the_bundled_architecture() -> None:
    card = (REPO / "docs" / "model-card.md").read_text()
    stated = re.search(r"^\| architecture \| `([a-z0-9_]+)`", card, re.MULTILINE)
    assert stated, "docs/model-card.md: no '| architecture | `name`' row"
    assert stated.group(1) == bundled().lhcnet_metadata["name"]


def test_model_card_states_the_bundled_models_figures() -> None:
    """docs/model-card.md quotes the fixed check and the PrivateTest accuracy stored in the file."""
    info = bundled().lhcnet_metadata["info"]
    card = (REPO / "docs" / "model-card.md").read_text()
    stated = re.search(r"first ([\d,]+) PublicTest faces, ([\d.]+) % accuracy", card)
    assert stated, "docs/model-card.md: no 'first N PublicTest faces, X % accuracy' sentence"
    check = info["reference_check"]
    assert int(stated.group(1).replace(",", "")) == check["images"]
    assert float(stated.group(2)) == pytest.approx(100 * check["accuracy"], abs=0.05)
    assert f"**{100 * info['privatetest_accuracy']:.2f} %**" in card


@requires_shared_data
def test_bundled_model_accuracy_on_a_fixed_publictest_subset() -> None:
    """The first N PublicTest faces: the accuracy stored with the model (and in docs/model-card.md)."""
    model = bundled()
    check = model.lhcnet_metadata["info"]["reference_check"]
    data = load_dataset(FER2013_CSV_GZ, cache_dir=False).split(check["split"])
    images = torch.from_numpy(data.images[:check["images"]].copy())
    labels = torch.from_numpy(data.labels[:check["images"]])
    probs = predict_probabilities(model, images)
    accuracy = (probs.argmax(1) == labels).double().mean().item()
    assert abs(accuracy - check["accuracy"]) <= 0.01
    assert accuracy > 0.6  # far above chance (1/7) and the majority class (25 %)
    # the same numbers from the preprocessing written out by hand (no lhcnet.data code)
    torch.testing.assert_close(probs, by_hand(model, data.images[:check["images"]]), rtol=0, atol=1e-4)


def by_hand(model: torch.nn.Module, faces: np.ndarray, batch: int = 500) -> torch.Tensor:
    """Softmax of ``model`` on uint8 48x48 faces, preprocessed as the model card states: the grey
    value repeated in R, G and B, float 0..255, NCHW (the model's input is 48 px); for a model
    trained on c-px crops (``info.crop``), the centre c x c window (offset round((48 - c) / 2), as
    torchvision's ``center_crop``) resized back to 48 bilinearly with half-pixel centres."""
    assert model.input_size == 48 == faces.shape[1] == faces.shape[2]
    rgb = torch.from_numpy(np.repeat(faces[:, None, :, :], 3, axis=1).astype(np.float32))  # (N, 3, 48, 48)
    crop = int(model.lhcnet_metadata["info"].get("crop", 0))
    if crop:
        top = round((48 - crop) / 2)
        rgb = F.interpolate(rgb[:, :, top:top + crop, top:top + crop], size=(48, 48), mode="bilinear",
                            align_corners=False)
    with torch.no_grad():
        return torch.cat([torch.softmax(model.eval()(rgb[i:i + batch]), dim=1) for i in range(0, len(rgb), batch)])


def test_bundled_model_preprocessing_matches_an_independent_path() -> None:
    """``predict_probabilities`` (shared preprocessing, channels-last) equals the hand-written path
    on random faces; a model file run through a different preprocessing would not."""
    model = bundled()
    faces = np.random.default_rng(0).integers(0, 256, (16, 48, 48), dtype=np.uint8)
    probs = predict_probabilities(model, torch.from_numpy(faces))
    torch.testing.assert_close(probs, by_hand(model, faces), rtol=0, atol=1e-4)
    shifted = by_hand(model, np.roll(faces, 1, axis=2))  # one pixel off: clearly different
    assert (probs - shifted).abs().max() > 1e-3
