"""The qubvel Keras .h5 -> safetensors converter (spec §10), on synthetic HDF5 files.

The files are written the way Keras ``save_weights`` writes them (a group per layer with a
``weight_names`` attribute, datasets ``<layer>/<weight>:0``), with qubvel's layer names and random
weights. A NumPy re-implementation of the Keras graph (NHWC, HWIO kernels, ZeroPadding + 'valid'
convs) computes the reference forward pass from the same arrays.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from lhcnet.cli import main as lhcnet_main
from lhcnet.convert import convert_weights, keras_to_state_dict, read_keras_weights
from lhcnet.models import create_model
from lhcnet.models.backbones import PreActResNet

h5py = pytest.importorskip("h5py")


def keras_layers(layers=(1, 1), widths=(8, 16), stem_kernel=7, seed=0) -> dict[str, dict[str, np.ndarray]]:
    """Random weights under qubvel's layer names (Keras shapes: kernels HWIO)."""
    rng = np.random.default_rng(seed)

    def kernel(k: int, cin: int, cout: int) -> dict[str, np.ndarray]:
        scale = np.float32(np.sqrt(2 / (k * k * cin)))
        return {"kernel": rng.standard_normal((k, k, cin, cout), dtype=np.float32) * scale}

    def bn(c: int, scale: bool = True) -> dict[str, np.ndarray]:
        weights = {"gamma": rng.uniform(0.5, 1.5, c)} if scale else {}
        weights.update(beta=rng.normal(0, 0.2, c), moving_mean=rng.normal(0, 0.5, c),
                       moving_variance=rng.uniform(0.5, 2.0, c))
        return {k: v.astype(np.float32) for k, v in weights.items()}

    out = {"bn_data": bn(3, scale=False), "conv0": kernel(stem_kernel, 3, widths[0]), "bn0": bn(widths[0])}
    cin = widths[0]
    for s, (count, width) in enumerate(zip(layers, widths), start=1):
        for u in range(1, count + 1):
            name = f"stage{s}_unit{u}_"
            out[name + "bn1"] = bn(cin)
            if u == 1:
                out[name + "sc"] = kernel(1, cin, width)
            out.update({name + "conv1": kernel(3, cin, width), name + "bn2": bn(width),
                        name + "conv2": kernel(3, width, width)})
            cin = width
    out["bn1"] = bn(cin)
    return out


def write_keras_h5(path, layers: dict[str, dict[str, np.ndarray]]) -> None:
    """Keras ``save_weights`` HDF5 layout, including weight-less layers (relu0, pooling0)."""
    names = ["data", *layers, "relu0", "pooling0"]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.4.0"
        for name in names:
            group = f.create_group(name)
            weights = layers.get(name, {})
            group.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w in weights])
            for w, array in weights.items():
                group.create_dataset(f"{name}/{w}:0", data=array)


# --- the Keras graph in NumPy (qubvel's ResNet34 "v2", spec §3) -----------------------------

def conv(x: np.ndarray, kernel: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """ZeroPadding2D(pad) + Conv2D(strides=stride, padding='valid', use_bias=False), NHWC."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    windows = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]  # (N, H', W', C, k, k)
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel, optimize=True)


def batch_norm(x: np.ndarray, w: dict[str, np.ndarray], eps: float = 2e-5) -> np.ndarray:
    return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + eps) * w.get("gamma", 1.0) + w["beta"]


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def keras_features(image: np.ndarray, w: dict[str, dict[str, np.ndarray]], layers=(1, 1)) -> np.ndarray:
    x = batch_norm(image, w["bn_data"])
    x = relu(batch_norm(conv(x, w["conv0"]["kernel"], 2, 3), w["bn0"]))
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # ZeroPadding2D(1) + MaxPool 3x3/2 'valid'
    x = sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))
    for s, count in enumerate(layers, start=1):
        for u in range(1, count + 1):
            p, stride = f"stage{s}_unit{u}_", 2 if (u == 1 and s > 1) else 1
            act = relu(batch_norm(x, w[p + "bn1"]))
            shortcut = conv(act, w[p + "sc"]["kernel"], stride) if u == 1 else x
            y = relu(batch_norm(conv(act, w[p + "conv1"]["kernel"], stride, 1), w[p + "bn2"]))
            x = conv(y, w[p + "conv2"]["kernel"], 1, 1) + shortcut
    return relu(batch_norm(x, w["bn1"]))


def test_converted_weights_reproduce_the_keras_forward(tmp_path) -> None:
    weights = keras_layers()
    path = tmp_path / "small.h5"
    write_keras_h5(path, weights)
    model = PreActResNet(layers=(1, 1), widths=(8, 16), head_hidden=(6,), input_size=32).eval()
    model.lhcnet_config = {"name": "small", "num_classes": 7, "settings": {}}
    summary = convert_weights(path, tmp_path / "small.safetensors", model=model)
    assert not summary["md5_matches_qubvel_resnet34"]
    from safetensors.torch import load_file
    state = load_file(str(summary["output"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.startswith("head.") for k in missing)

    image = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = keras_features(image.astype(np.float64), weights)                    # (2, 4, 4, 16)
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(image).permute(0, 3, 1, 2))   # (2, 16, 4, 4)
    assert expected.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_full_resnet34_names_convert_via_the_cli_and_load_as_imagenet(tmp_path, monkeypatch, capsys) -> None:
    weights = keras_layers(layers=(3, 4, 6, 3), widths=(64, 128, 256, 512))
    path = tmp_path / "resnet34_imagenet_1000_no_top.h5"
    write_keras_h5(path, weights)
    assert set(read_keras_weights(path)) == set(weights)  # weight-less layers are skipped
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))
    assert lhcnet_main(["convert-weights", str(path)]) == 0
    out = capsys.readouterr().out
    assert "resnet34v2_imagenet.safetensors" in out and "21,302,473 weights" in out  # spec §3: the backbone, Keras count
    model = create_model("lhcnet_resnet34v2", pretrained="imagenet")
    conv0 = torch.from_numpy(weights["conv0"]["kernel"]).permute(3, 2, 0, 1)
    assert torch.equal(model.stem.conv0.weight.detach(), conv0)
    assert torch.equal(model.stage3.unit6.bn2.running_var, torch.from_numpy(weights["stage3_unit6_bn2"]["moving_variance"]))
    assert torch.equal(model.stem.bn_data.bias.detach(), torch.from_numpy(weights["bn_data"]["beta"]))


def test_converter_errors_name_the_problem(tmp_path) -> None:
    not_h5 = tmp_path / "weights.h5"
    not_h5.write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        convert_weights(not_h5, tmp_path / "out.safetensors")
    weights = keras_layers()
    with pytest.raises(ValueError, match="not part of qubvel's pre-activation ResNet: \\['attention_1'\\]"):
        keras_to_state_dict({**weights, "attention_1": {"kernel": np.zeros((1, 1, 1, 1), np.float32)}})
    small = tmp_path / "small.h5"
    write_keras_h5(small, weights)
    with pytest.raises(ValueError, match="does not fit resnet34v2: missing \\['stage1.unit2.bn1.bias'"):
        convert_weights(small, tmp_path / "out.safetensors", model="resnet34v2")
    with pytest.raises(FileNotFoundError, match="Keras weights file not found"):
        convert_weights(tmp_path / "missing.h5", tmp_path / "out.safetensors")
