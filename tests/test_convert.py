"""The ImageNet converters (spec §10): qubvel's Keras .h5 and torchvision's .pth -> safetensors.

The .h5 files are written the way Keras ``save_weights`` writes them (a group per layer with a
``weight_names`` attribute, datasets ``<layer>/<weight>:0``), with qubvel's layer names and random
weights. A NumPy re-implementation of the Keras graph (NHWC, HWIO kernels, ZeroPadding + 'valid'
convs) computes the reference forward pass from the same arrays. The .pth stand-ins are random
torchvision ResNets saved with ``torch.save``, as torchvision publishes them; the reference is
torchvision's own forward pass.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from lhcnet.cli import main as lhcnet_main
from lhcnet.convert import (QUBVEL_RESNET34_MD5, convert_weights, keras_to_state_dict, read_keras_weights,
                            read_torchvision_weights)
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
    assert not summary["verified"] and summary["checksum"].startswith("md5 ")
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


def test_without_the_imagenet_file_one_line_names_qubvels_h5_its_md5_and_the_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        create_model("lhcnet_resnet34v2", pretrained="imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert "'resnet34_imagenet_1000_no_top.h5' (https://github.com/qubvel/classification_models/releases/" \
           "download/0.0.1/resnet34_imagenet_1000_no_top.h5, md5 8caaa0ad39d927cb8ba5385bf945d582)" in message
    assert QUBVEL_RESNET34_MD5 == "8caaa0ad39d927cb8ba5385bf945d582"  # spec §10
    target = tmp_path / "weights" / "resnet34v2_imagenet.safetensors"
    assert f"run 'lhcnet convert-weights resnet34_imagenet_1000_no_top.h5 -o {target}'" in message


# --- torchvision's .pth (tv_* models) ---------------------------------------------------------

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255  # torchvision's transforms
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def torchvision_standin(arch: str, path, seed: int = 0):
    """A random torchvision ResNet with non-trivial BatchNorm statistics, saved as torchvision does."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), path)
    return net.eval()


def test_torchvision_weights_convert_via_the_cli_and_reproduce_torchvisions_forward(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "resnet34-b627a593.pth"
    reference = torchvision_standin("resnet34", path)
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))
    assert lhcnet_main(["convert-weights", str(path), "--model", "tv_resnet34"]) == 0
    out = capsys.readouterr().out
    # torchvision's 21,797,672 parameters - fc's 513,000 + 2 x 8,512 BatchNorm statistics; 36 convs + 36 x 5 BN
    assert "tv_resnet34_imagenet.safetensors: 216 tensors, 21,301,696 weights" in out
    assert "note: sha256" in out and "is not that of torchvision's resnet34-b627a593.pth" in out  # a stand-in
    plain = create_model("tv_resnet34", pretrained="imagenet").eval()
    plain.net.fc, reference.fc = torch.nn.Identity(), torch.nn.Identity()  # compare the 512 features
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        torch.testing.assert_close(plain(x), reference((x - IMAGENET_MEAN) / IMAGENET_STD), rtol=1e-4, atol=1e-4)
    lhc = create_model("lhcnet_tv_resnet34", pretrained="imagenet")  # the LHC version loads it too
    assert torch.equal(lhc.net.layer3[5].bn2.running_var, reference.layer3[5].bn2.running_var)


def test_torchvision_file_is_never_unpickled_beyond_tensors(tmp_path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv1.weight": torch.zeros(1), "trap": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth: not a PyTorch weights file that loads safely"):
        read_torchvision_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        read_torchvision_weights(tmp_path / "list.pth")
    resnet18 = tmp_path / "resnet18-f37072fd.pth"
    torchvision_standin("resnet18", resnet18)
    with pytest.raises(ValueError, match=r"does not fit tv_resnet34: missing \['net.layer1.2.bn1.bias'"):
        convert_weights(resnet18, tmp_path / "out.safetensors", model="tv_resnet34")
    assert not (tmp_path / "out.safetensors").exists()


def test_without_torchvisions_file_one_line_names_it_and_the_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        create_model("lhcnet_tv_resnet34", pretrained="imagenet")
    message = str(error.value)
    assert "\n" not in message and "ImageNet weights for tv_resnet34 not found" in message
    assert "'resnet34-b627a593.pth' (https://download.pytorch.org/models/resnet34-b627a593.pth, " \
           "sha256 starting b627a593)" in message
    assert "lhcnet convert-weights resnet34-b627a593.pth --model tv_resnet34 -o" in message
