"""ONNX and TorchScript exports (lhcnet.export, ``lhcnet export``): parity with PyTorch, metadata."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import requires_shared_data
from predict_helpers import PHOTO, fer2013_faces, synthetic_faces, tiny_model_file
from predict_helpers import one_thread  # noqa: F401  (autouse fixture)

from lhcnet.cli import main
from lhcnet.data import to_model_input
from lhcnet.export import export_torchscript
from lhcnet.models import load_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lhcnet.export import OnnxModel, export_onnx  # noqa: E402
from lhcnet.predict import Predictor  # noqa: E402

TOLERANCE = 1e-4


CLASSES = ["w", "x", "y", "z", "u", "v", "t"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("model"), extra={"classes": CLASSES})


@pytest.fixture(scope="module")
def model(model_file) -> torch.nn.Module:
    return load_model(model_file)


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")  # exported once


@pytest.fixture(scope="module")
def onnx_model(onnx_file) -> OnnxModel:
    return OnnxModel(onnx_file)


def _parity(model, onnx_model, faces48: np.ndarray) -> None:
    """ONNX Runtime vs PyTorch on a batch of faces, logits and probabilities, <= 1e-4."""
    x = to_model_input(torch.from_numpy(faces48), model.input_size)
    with torch.no_grad():
        expected = model(x)
    got = onnx_model(x)
    assert got.shape == expected.shape == (len(faces48), 7)
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (got.softmax(1) - expected.softmax(1)).abs().max().item() <= TOLERANCE


@requires_shared_data
def test_onnx_parity_on_fer2013_faces(model, onnx_model) -> None:
    _parity(model, onnx_model, fer2013_faces(64))


def test_onnx_parity_on_synthetic_faces(model, onnx_model) -> None:
    _parity(model, onnx_model, synthetic_faces(37, seed=1))  # batch 37: not the export's batch


def test_onnx_graph_contains_the_lhc_blocks(onnx_file) -> None:
    proto = onnx.load(str(onnx_file))
    ops = [node.op_type for node in proto.graph.node]
    # The backbone has no softmax; each of the five LHC blocks has one (eq. 15).
    assert ops.count("Softmax") == 5
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis


def test_onnx_metadata_carries_classes_and_input_size(onnx_model) -> None:
    assert onnx_model.input_size == 48 and onnx_model.lhcnet_metadata["info"]["classes"] == CLASSES


def test_predictor_on_an_onnx_file_matches_pytorch(model_file, onnx_file) -> None:
    onnx_predictor = Predictor(onnx_file)  # an .onnx file implies the ONNX backend
    assert onnx_predictor.backend == "onnx" and onnx_predictor.classes == CLASSES
    onnx_faces = onnx_predictor.predict(PHOTO)
    torch_faces = Predictor(model_file, device="cpu").predict(PHOTO)
    assert len(onnx_faces) == 1 and onnx_faces[0]["box"] == torch_faces[0]["box"]
    assert onnx_faces[0]["scores"] == pytest.approx(torch_faces[0]["scores"], abs=TOLERANCE)


def test_not_an_onnx_file(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        OnnxModel(bad)
    with pytest.raises(FileNotFoundError):
        OnnxModel(tmp_path / "missing.onnx")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export(model, tmp_path) -> None:
    path = export_torchscript(model, tmp_path / "m.pt")
    extra = {"lhcnet.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["lhcnet.json"])["input_size"] == 48
    x = to_model_input(torch.from_numpy(synthetic_faces(5)), 48)   # traced at batch 2
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-5
    assert model.training is False


def test_cli_export(model_file, tmp_path, capsys) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(model_file.read_bytes())
    assert main(["export", str(path), "--format", "onnx", "-o", str(tmp_path / "a.onnx")]) == 0
    out = capsys.readouterr().out
    assert "a.onnx" in out and float(out.rsplit(":", 1)[1]) <= 1e-3   # random 0..255 input
    assert OnnxModel(tmp_path / "a.onnx").input_size == 48
    assert main(["export", str(path), "--format", "torchscript"]) == 0
    assert (tmp_path / "tiny.pt").is_file()
