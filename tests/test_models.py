"""Backbones, LHC insertion, the registry and model files."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import save_file

import lhcnet
from lhcnet.models import (COMPACT_BLOCKS, PAPER_BLOCKS, PAPER_GATES, LHCBlock, create_model,
                           freeze_except_gates, gate_parameters, insert_lhc, lhc_blocks, list_models,
                           load_backbone_weights, load_model, model_spec, read_model_metadata,
                           replace_lhc_block, save_model, switch_off_lhc)
from lhcnet.models.backbones import PreActResNet


def learnable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def with_bn_statistics(model: torch.nn.Module) -> int:
    """Keras counts BatchNorm moving mean/variance as (non-trainable) weights."""
    stats = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return learnable(model) + stats


def tiny_backbone() -> PreActResNet:
    return PreActResNet(layers=(1, 1), widths=(4, 8), num_classes=3, stem_kernel=3, stem_stride=1,
                        head_hidden=(6,), input_size=16)


# The paper's counts (spec §3): 27,606,224 and 32,411,668 with BN statistics, as Keras counts.
@pytest.mark.parametrize("name, params, keras_params", [
    ("resnet34v2", 27_590_858, 27_606_224),
    ("lhcnet_resnet34v2", 32_396_302, 32_411_668),
])
def test_paper_parameter_counts(name: str, params: int, keras_params: int) -> None:
    model = create_model(name)
    assert learnable(model) == params
    assert with_bn_statistics(model) == keras_params


def test_lhc_block_parameter_counts_match_spec() -> None:
    model = create_model("lhcnet_resnet34v2")
    counts = [learnable(block) for _, block in lhc_blocks(model)]
    assert counts == [657_312, 657_312, 208_392, 658_714, 2_623_714]
    assert sum(counts) == 4_805_444


def test_paper_lhc_settings() -> None:
    blocks = model_spec("lhcnet_resnet34v2").blocks
    assert [b.place for b in blocks] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert [b.heads for b in blocks] == [8, 8, 7, 7, 1]
    assert [b.embed_dim for b in blocks] == [196, 196, 56, 14, 25]
    assert {(b.pool_size, b.kernel_size, b.scale_c) for b in blocks} == {(3, 3, 1.0)}


def test_lhc_blocks_see_the_expected_feature_maps() -> None:
    """Each block's (C, H, W) must be what its place produces at 224 px (checked by a forward)."""
    model = create_model("lhcnet_resnet34v2").eval()
    shapes = {}

    def record(place: str):
        def hook(module, args) -> None:
            shapes[place] = tuple(args[0].shape[1:])
        return hook

    for place, block in lhc_blocks(model):
        block.register_forward_pre_hook(record(place))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224) * 255)
    assert out.shape == (1, 7)
    assert shapes == {b.place: (b.channels, b.resolution, b.resolution) for b in PAPER_BLOCKS}


def test_compact_model_runs_at_48_pixels() -> None:
    model = create_model("lhcnet_resnet18v2_48", num_classes=8).eval()
    assert model.input_size == 48
    with torch.no_grad():
        assert model(torch.rand(2, 3, 48, 48) * 255).shape == (2, 8)
    assert [b.place for b in COMPACT_BLOCKS] == ["stem", "stage1", "stage2", "stage3", "stage4"]


@pytest.mark.parametrize("name", ["lhcnet_tv_resnet18"])
def test_torchvision_backbone_takes_lhc_blocks(name: str) -> None:
    model = create_model(name).eval()
    assert len(lhc_blocks(model)) == 5
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224) * 255).shape == (1, 7)


def test_lhcnetc_gates_start_at_paper_values() -> None:
    model = create_model("lhcnetc_resnet34v2")
    gates = torch.stack([g.detach() for g in gate_parameters(model)])
    expected = 1 + torch.tanh(torch.tensor(PAPER_GATES))
    torch.testing.assert_close(1 + torch.tanh(gates), expected)
    torch.testing.assert_close(expected, torch.tensor([1, 1, 1, 0.2384, 0.5379]), atol=1e-4, rtol=0)


def test_freeze_except_gates_trains_only_the_five_gates() -> None:
    model = create_model("lhcnetc_resnet18v2_48")
    freeze_except_gates(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 5 and all(name.endswith(".gate") for name in trainable)
    with pytest.raises(ValueError, match="no LHC-NetC gates"):
        freeze_except_gates(create_model("lhcnet_resnet18v2_48"))


def test_backbone_weights_load_into_lhc_model_by_name() -> None:
    """Stage-4 handover: only the lhc.* tensors are new."""
    backbone = create_model("resnet18v2_48")
    lhc_model = create_model("lhcnet_resnet18v2_48")
    result = lhc_model.load_state_dict(backbone.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("lhc.") for k in result.missing_keys)
    assert set(result.missing_keys) == {k for k in lhc_model.state_dict() if k.startswith("lhc.")}


def test_insertion_is_a_residual_plug_in() -> None:
    """With zero value convs every LHC block is the identity: outputs equal the plain backbone's."""
    torch.manual_seed(0)
    plain = tiny_backbone().eval()
    model = insert_lhc(copy.deepcopy(plain), [LHCBlock("stem", 4, 8, heads=2, embed_dim=3),
                                              LHCBlock("stage2", 8, 4, heads=4, embed_dim=2)]).eval()
    x = torch.rand(2, 3, 16, 16) * 255
    assert not torch.allclose(model(x), plain(x))
    for _, block in lhc_blocks(model):
        torch.nn.init.zeros_(block.value_conv.weight)
        torch.nn.init.zeros_(block.value_conv.bias)
    torch.testing.assert_close(model(x), plain(x))


def test_deepcopy_keeps_blocks_attached_to_the_copy() -> None:
    model = insert_lhc(tiny_backbone(), [LHCBlock("stage1", 4, 8, heads=2, embed_dim=3)]).eval()
    clone = copy.deepcopy(model)
    x = torch.rand(1, 3, 16, 16) * 255
    torch.testing.assert_close(clone(x), model(x))
    with torch.no_grad():
        clone.lhc["stage1"].value_conv.bias.add_(1.0)
    assert not torch.allclose(clone(x), model(x))  # the copy uses its own block


def tiny_lhc_net(**lhc_options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain tiny backbone, the same weights with two LHC blocks), both in eval mode."""
    torch.manual_seed(0)
    plain = tiny_backbone().eval()
    model = insert_lhc(copy.deepcopy(plain), [LHCBlock("stem", 4, 8, heads=2, embed_dim=3),
                                              LHCBlock("stage2", 8, 4, heads=4, embed_dim=2)], **lhc_options)
    return plain, model.eval()


def test_placement_api_lists_switches_off_and_replaces_blocks() -> None:
    plain, model = tiny_lhc_net()
    x = torch.rand(2, 3, 16, 16) * 255
    full = model(x)
    stem_block, stage2_block = model.lhc["stem"], model.lhc["stage2"]
    assert lhc_blocks(model) == [("stem", stem_block), ("stage2", stage2_block)]
    taken = switch_off_lhc(model)  # all blocks: the plain backbone's output
    assert taken == {"stem": stem_block, "stage2": stage2_block}
    torch.testing.assert_close(model(x), plain(x))
    assert replace_lhc_block(model, "stem", stem_block) is not stem_block  # the identity comes out
    only_stem = model(x)
    assert not torch.allclose(only_stem, plain(x)) and not torch.allclose(only_stem, full)
    replace_lhc_block(model, "stage2", stage2_block)
    torch.testing.assert_close(model(x), full)
    with pytest.raises(ValueError, match=r"no LHC block at 'stage1'; this model's blocks are at \['stem', 'stage2'\]"):
        replace_lhc_block(model, "stage1", torch.nn.Identity())
    with pytest.raises(TypeError, match="must be an nn.Module"):
        replace_lhc_block(model, "stem", lambda t: t)


def test_switching_off_a_copy_leaves_the_original_alone() -> None:
    _, model = tiny_lhc_net()
    x = torch.rand(1, 3, 16, 16) * 255
    full = model(x)
    clone = copy.deepcopy(model)
    switch_off_lhc(clone, ["stem"])
    torch.testing.assert_close(model(x), full)
    assert not torch.allclose(clone(x), full)


def test_print_shows_where_the_blocks_run() -> None:
    _, model = tiny_lhc_net()
    text = str(model)
    stem = text[text.index("(stem):"):text.index("(stage1):")]
    assert "(output -> lhc['stem'])" in stem and "lhc['stage2']" not in stem
    assert "(output -> lhc['stage2'])" in text[text.index("(stage2):"):]
    assert "(lhc): ModuleDict" in text  # and the blocks themselves, with their settings
    assert "4, resolution=(8, 8), heads=2, embed_dim=3" in text


def test_layer_scale_zero_starts_as_the_host_network() -> None:
    """ReZero/LayerScale option at 0: at initialisation the LHC-Net computes its host's function."""
    plain, model = tiny_lhc_net(layer_scale_init=0.0)
    x = torch.rand(3, 3, 16, 16) * 255
    assert torch.equal(model(x), plain(x))
    _, paper = tiny_lhc_net()
    assert not torch.allclose(paper(x), plain(x))  # default: the paper's block perturbs at once
    small = tiny_lhc_net(layer_scale_init=1e-4)[1]
    assert 0 < (small(x) - plain(x)).abs().max() < 1e-2 * plain(x).abs().max()


def test_layer_scale_is_a_model_setting_saved_with_the_model(tmp_path) -> None:
    model = create_model("lhcnet_resnet18v2_48", head_hidden=(8,), lhc_layer_scale_init=1e-4)
    assert all(block.layer_scale_init == 1e-4 and block.layer_scale.shape == (block.channels,)
               for _, block in lhc_blocks(model))
    with torch.no_grad():
        model.lhc["stage3"].layer_scale.fill_(0.5)
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert torch.equal(loaded.lhc["stage3"].layer_scale, model.lhc["stage3"].layer_scale)
    assert "layer_scale" not in str(create_model("lhcnet_resnet18v2_48").lhc["stem"])  # default: paper
    with pytest.raises(ValueError, match="resnet18v2_48 has no LHC blocks for the options"):
        create_model("resnet18v2_48", lhc_layer_scale_init=0.0)


@pytest.mark.parametrize("blocks, message", [
    ([LHCBlock("nowhere", 4, 8, heads=2, embed_dim=3)], "no sub-module named 'nowhere'"),
    ([LHCBlock("stem", 4, 8, heads=2, embed_dim=3)] * 2, "two LHC blocks at the same place"),
])
def test_insertion_errors(blocks: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        insert_lhc(tiny_backbone(), blocks)


def test_block_settings_that_do_not_fit_the_map_fail_at_forward() -> None:
    model = insert_lhc(tiny_backbone(), [LHCBlock("stem", 4, 10, heads=2, embed_dim=3)])
    with pytest.raises(ValueError, match=r"LHC expects input \(B, 4, 10, 10\), got \(1, 4, 8, 8\)"):
        model(torch.rand(1, 3, 16, 16))


def test_registry_lists_and_rejects_names() -> None:
    names = list_models()
    for expected in ("resnet34v2", "lhcnet_resnet34v2", "lhcnetc_resnet34v2", "lhcnet_resnet18v2_48",
                     "lhcnet_tv_resnet18", "lhcnet_tv_resnet34"):
        assert expected in names
    with pytest.raises(ValueError, match="unknown model 'resnet35'; available: "):
        create_model("resnet35")


def test_save_and_load_round_trip(tmp_path) -> None:
    model = create_model("lhcnetc_resnet18v2_48", num_classes=8, head_hidden=(32,), dropout=0.1).eval()
    path = save_model(model, tmp_path / "m.safetensors", extra={"classes": list("abcdefgh")})
    meta = read_model_metadata(path)
    assert meta["name"] == "lhcnetc_resnet18v2_48" and meta["num_classes"] == 8
    assert meta["info"]["classes"] == list("abcdefgh")
    loaded = load_model(path)
    x = torch.rand(3, 3, 48, 48) * 255
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left behind


def calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Set BatchNorm statistics from one batch, as training would (random init has mean 0, var 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch gives its exact statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_fp16_file_is_half_the_size_and_close(tmp_path) -> None:
    x = torch.rand(8, 3, 48, 48) * 255
    model = calibrated(create_model("lhcnet_resnet18v2_48"), x)
    full = save_model(model, tmp_path / "fp32.safetensors")
    half = save_model(model, tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.51 * full.stat().st_size
    with torch.no_grad():
        torch.testing.assert_close(load_model(half)(x), model(x), atol=2e-2, rtol=2e-2)


def test_bad_model_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a safetensors model file"):
        load_model(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="without lhcnet metadata"):
        load_model(tmp_path / "plain.safetensors")


def test_imagenet_weights_offline_error_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"resnet34_imagenet_1000_no_top\.h5.*lhcnet convert-weights"):
        create_model("lhcnet_resnet34v2", pretrained="imagenet")


def test_backbone_weights_from_a_local_file(tmp_path, monkeypatch) -> None:
    """The ImageNet path without network: a converted file in LHCNET_HOME is found and loaded."""
    source = create_model("resnet18v2_48")
    weights = tmp_path / "weights" / "resnet18v2_48_imagenet.safetensors"
    weights.parent.mkdir()
    save_file({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, str(weights))
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path))
    model = create_model("lhcnet_resnet18v2_48", pretrained="imagenet")
    torch.testing.assert_close(model.stem.conv0.weight, source.stem.conv0.weight)
    torch.testing.assert_close(model.stage4.unit2.bn2.running_var, source.stage4.unit2.bn2.running_var)
    assert not torch.equal(model.head.logits.weight, source.head.logits.weight)  # head stays fresh

    bad = tmp_path / "bad.safetensors"
    save_file({"stem.conv0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="backbone weights lack"):
        load_backbone_weights(create_model("resnet18v2_48"), bad)


def test_top_level_api() -> None:
    assert lhcnet.LHC is lhcnet.nn.LHC
    assert callable(lhcnet.create_model) and callable(lhcnet.load_model)
    assert math.isclose(lhcnet.LHC(4, 4, heads=2, embed_dim=2).scale_c, 1.0)


def test_save_model_unwraps_parallel_wrappers(tmp_path) -> None:
    model = create_model("resnet18v2_48", head_hidden=(8,)).eval()
    path = save_model(torch.nn.DataParallel(model), tmp_path / "wrapped.safetensors")
    assert read_model_metadata(path)["name"] == "resnet18v2_48"
    x = torch.rand(1, 3, 48, 48) * 255
    torch.testing.assert_close(load_model(path)(x), model(x), rtol=0, atol=0)
