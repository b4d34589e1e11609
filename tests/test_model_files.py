"""Model files: checksum, non-finite weights, crafted metadata, umask (lhcnet.models.registry)."""
from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import save_file

from lhcnet.files import atomic_write_text
from lhcnet.models import create_model, load_model, read_model_metadata, save_model
from lhcnet.models.registry import load_weights, weights_checksum
from lhcnet.predict import bundled_model_path
from lhcnet.train.checkpoint import load_checkpoint, save_checkpoint

import tiny_models  # noqa: F401  (registers "tiny")


def tiny_file(tmp_path, name: str = "m.safetensors"):
    return save_model(create_model("tiny"), tmp_path / name)


def header_length(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def rewrite_metadata(path, change) -> None:
    """Rewrite the lhcnet JSON of a model file in place, keeping its tensors (a crafted file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lhcnet"])
    save_file(load_file(str(path)), str(path), metadata={"lhcnet": json.dumps(change(meta))})


def test_checksum_is_over_names_dtypes_shapes_and_bytes() -> None:
    a = {"w": torch.arange(4.0), "b": torch.zeros(2, dtype=torch.int64)}
    assert weights_checksum(a) == weights_checksum(dict(reversed(a.items())))  # order-free
    for changed in ({"w": torch.arange(4.0).reshape(2, 2), "b": a["b"]},      # shape
                    {"w": torch.arange(4.0).double(), "b": a["b"]},            # dtype
                    {"v": torch.arange(4.0), "b": a["b"]},                     # name
                    {"w": torch.tensor([0.0, 1.0, 2.0, 3.0000002]), "b": a["b"]}):  # one bit
        assert weights_checksum(changed) != weights_checksum(a)


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path) -> None:
    path = tiny_file(tmp_path)
    assert "sha256" in read_model_metadata(path)
    data = bytearray(path.read_bytes())
    data[8 + header_length(path) + 100] ^= 0x04  # one bit of some weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m\.safetensors: damaged model file"):
        load_model(path)


def test_non_finite_weights_are_refused_with_the_tensor_name(tmp_path) -> None:
    model = create_model("tiny")
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    path = save_model(model, tmp_path / "nan.safetensors")  # a valid checksum over NaN weights
    with pytest.raises(ValueError, match=r"nan\.safetensors: weight 'stem.*non-finite"):
        load_model(path)
    save_file({"w": torch.tensor([1.0, float("inf")])}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="non-finite"):
        load_weights(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda m: {**m, "name": "resnet99"}, "unknown model 'resnet99'"),
    (lambda m: {**m, "num_classes": "seven"}, "does not describe an lhcnet model"),
    (lambda m: {**m, "settings": {"no_such_option": 1}}, "does not describe an lhcnet model"),
    (lambda m: {**m, "settings": [1, 2]}, "does not describe an lhcnet model"),
    (lambda m: {k: v for k, v in m.items() if k != "name"}, "does not describe an lhcnet model"),
    (lambda m: {**m, "num_classes": 3}, "the weights do not fit 'tiny'"),
    (lambda m: {**m, "format_version": 99}, "format 99; this lhcnet reads up to 2"),
    (lambda m: [1], "damaged model metadata"),
])
def test_crafted_metadata_is_one_clear_error_naming_the_file(tmp_path, change, message) -> None:
    path = tiny_file(tmp_path)
    rewrite_metadata(path, change)
    with pytest.raises(ValueError, match=message) as error:
        load_model(path)
    assert str(path) in str(error.value)


def test_files_of_format_1_without_checksum_still_load(tmp_path) -> None:
    """The bundled model predates checksums: it loads, and so does any format-1 file."""
    assert read_model_metadata(bundled_model_path())["format_version"] in (1, 2)
    load_model(bundled_model_path())
    path = tiny_file(tmp_path)
    rewrite_metadata(path, lambda m: {**{k: v for k, v in m.items() if k != "sha256"}, "format_version": 1})
    assert load_model(path).lhcnet_config["name"] == "tiny"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        written = [tiny_file(tmp_path), save_checkpoint(tmp_path / "checkpoint.pt", {"a": 1}),
                   atomic_write_text(tmp_path / "config.toml", "x = 1\n")]
    finally:
        os.umask(old)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(mode) for p in written}


def test_checkpoint_checksum_refuses_damage(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"w": torch.arange(1000.0), "n": 3})
    assert load_checkpoint(path)["n"] == 3
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checkpoint\.pt: damaged checkpoint \(checksum mismatch"):
        load_checkpoint(path)
    path.write_bytes(bytes(data[:len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="damaged checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 a zip of some other program")
    with pytest.raises(ValueError, match="not an lhcnet checkpoint"):
        load_checkpoint(path)
