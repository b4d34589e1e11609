"""Block ablation, head correlation, block contribution and attention maps; the ``lhcnet analyze`` commands end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lhcnet.analysis import (_pairwise_abs_correlation, ablation_plan, attention_maps, block_contribution,
                             head_outputs, lhc_detrained, lhc_switched_off)
from lhcnet.cli import main
from lhcnet.data import to_model_input
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import create_model, lhc_blocks, load_model

import tiny_fer
from tiny_fer import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    return tiny_fer.trained_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "home"))


def faces(count: int = 6) -> torch.Tensor:
    return torch.from_numpy(tiny_fer.synthetic_faces(1, seed=3)[0][:count])


def bare_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The same network without its LHC blocks (same weights)."""
    bare = tiny_fer._backbone()
    missing, unexpected = bare.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("lhc.") for k in unexpected)
    return bare.eval()


def test_switching_every_block_off_gives_the_bare_backbone() -> None:
    model = create_model(tiny_fer.NAME).eval()
    x = to_model_input(faces(), 48)
    with torch.no_grad():
        before = model(x)
        places = [place for place, _ in lhc_blocks(model)]
        with lhc_switched_off(model, places):
            off = model(x)
        with lhc_switched_off(model, places[:1]):
            one_off = model(x)
        after = model(x)
        bare = bare_backbone(model)(x)
    torch.testing.assert_close(off, bare)
    assert not torch.allclose(off, before) and not torch.allclose(one_off, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)          # restored on exit


def test_detrained_blocks_get_the_seeded_initialisation_and_come_back() -> None:
    model = create_model(tiny_fer.NAME).eval()
    blocks = dict(lhc_blocks(model))
    with torch.no_grad():
        for block in blocks.values():                                   # stand-in for training
            for p in block.parameters():
                p.add_(1.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_rng = torch.rand(3)
    torch.manual_seed(5)
    with lhc_detrained(model, ["stem", "stage2"], seed=11):
        state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(torch.rand(3), expected_rng)                      # global RNG untouched
    reference = tiny_fer.BLOCKS[0].build()
    torch.manual_seed(11)
    reference.reset_parameters()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[f"lhc.stem.{key}"], value)
    reference = tiny_fer.BLOCKS[2].build()
    torch.manual_seed(11)
    reference.reset_parameters()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[f"lhc.stage2.{key}"], value)
    untouched = [k for k in state if not k.startswith(("lhc.stem.", "lhc.stage2."))]
    assert all(torch.equal(state[k], trained[k]) for k in untouched)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_ablation_plan_is_single_then_cumulative_from_the_last_block() -> None:
    assert ablation_plan(["a", "b", "c"]) == [
        ("single", ["a"]), ("single", ["b"]), ("single", ["c"]),
        ("cumulative", ["c"]), ("cumulative", ["b", "c"]), ("cumulative", ["a", "b", "c"])]


def test_pairwise_correlation_by_hand() -> None:
    x, y = torch.randn(6, 5), torch.randn(6, 5)                          # (C, r) per head
    r = _pairwise_abs_correlation(torch.stack([x, -x, 2 * x + 1, y])[None])[0]  # (4, 4)
    torch.testing.assert_close(r[:3, :3], torch.ones(3, 3, dtype=torch.float64))
    pearson = np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1]
    assert r[0, 3].item() == pytest.approx(abs(pearson))


def test_head_outputs_reassemble_into_the_block_output() -> None:
    model = create_model(tiny_fer.NAME).eval()
    x = to_model_input(faces(2), 48)
    inputs, outputs = {}, {}

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs[module], outputs[module] = args[0], output

    for _, block in lhc_blocks(model):
        block.register_forward_hook(record)
    heads = head_outputs(model, x)
    for place, block in lhc_blocks(model):
        o = heads[place]
        assert o.shape == (2, block.heads, block.channels, block.head_len)
        reassembled = o.transpose(1, 2).reshape(inputs[block].shape)   # eq. (17)
        torch.testing.assert_close(inputs[block] + reassembled, outputs[block])


def by_hand_contribution(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """||O|| / ||x|| per face from each block's captured input and its heads' O (eq. 17), averaged."""
    inputs = {}
    for place, block in lhc_blocks(model):
        block.register_forward_pre_hook(lambda m, a, place=place: inputs.__setitem__(place, a[0]))
    heads = head_outputs(model, to_model_input(images, 48))
    result = {}
    for place, block in lhc_blocks(model):
        x = inputs[place].double()
        o = heads[place].double().transpose(1, 2).reshape(x.shape)
        result[place] = float((o.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean())
    return result


def test_block_contribution_by_hand_and_under_a_scaled_value_path() -> None:
    model = create_model(tiny_fer.NAME).eval()
    images = faces(5)
    measured = {r.place: r.relative for r in block_contribution(model, images, batch_size=2)}
    expected = by_hand_contribution(model, images)
    assert measured.keys() == expected.keys()
    for place in expected:
        assert 0 < measured[place] == pytest.approx(expected[place], rel=1e-4)
    # V = BoxMean(Conv(x)) is linear in the conv's weights and bias and A does not depend on them:
    # doubling them doubles O, and so the stage-3 block's contribution; zeroing them gives 0.
    block = dict(lhc_blocks(model))["stage3"]
    with torch.no_grad():
        block.value_conv.weight.mul_(2)
        block.value_conv.bias.mul_(2)
    doubled = {r.place: r.relative for r in block_contribution(model, images)}
    assert doubled["stage3"] == pytest.approx(2 * measured["stage3"], rel=1e-4)
    with torch.no_grad():
        block.value_conv.weight.zero_()
        block.value_conv.bias.zero_()
    assert {r.place: r.relative for r in block_contribution(model, images)}["stage3"] == 0


def test_attention_maps_are_the_blocks_row_stochastic_attention() -> None:
    model = create_model(tiny_fer.NAME).eval()
    x = to_model_input(faces(1), 48)
    maps = attention_maps(model, x, block=2)
    assert maps.shape == (4, 8, 8)
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 8))
    captured = []
    block = dict(lhc_blocks(model))["stage1"]
    block.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(x)
    torch.testing.assert_close(maps, block.attention(captured[0])[0])


def test_analyze_blocks_end_to_end(trained: tuple[Path, Path, dict[str, int]], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    model_file, csv, _ = trained
    out = tmp_path / "blocks"
    assert main(["analyze", "blocks", str(model_file), "--data", str(csv), "--out", str(out),
                 "--limit", "35", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "baseline (all blocks on)" in printed and "cumulative blocks 1-4" in printed
    report = json.loads((out / "ablation.json").read_text())
    rows = report["rows"]
    assert report["count"] == 35 and len(rows) == 1 + 2 * (4 + 4)
    model = load_model(model_file)
    images, labels = tiny_fer.split_faces("PrivateTest")
    images, labels = torch.from_numpy(images[:35]), torch.from_numpy(labels[:35])
    baseline = (predict_probabilities(model, images).argmax(1) == labels).double().mean()
    bare = (predict_probabilities(bare_backbone(model), images).argmax(1) == labels).double().mean()
    by_key = {(r["mode"], r["scope"], tuple(r["places"])): r["accuracy"] for r in rows}
    assert by_key[("none", "baseline", ())] == pytest.approx(float(baseline))
    all_places = ("stem", "stage1", "stage2", "stage3")
    assert by_key[("off", "cumulative", all_places)] == pytest.approx(float(bare))
    assert by_key[("off", "single", ("stage3",))] == by_key[("off", "cumulative", ("stage3",))]
    png = out / "ablation.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


def test_analyze_heads_end_to_end(trained: tuple[Path, Path, dict[str, int]], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    model_file, csv, _ = trained
    out = tmp_path / "heads"
    assert main(["analyze", "heads", str(model_file), "--data", str(csv), "--samples", "20",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "mean |Pearson r|" in capsys.readouterr().out
    report = json.loads((out / "head_correlation.json").read_text())
    assert report["count"] == 20
    blocks = report["blocks"]
    assert [b["heads"] for b in blocks] == [4, 4, 3, 1]
    assert blocks[-1]["mean_abs"] is None                                 # one head: no pairs
    for b in blocks[:3]:
        matrix = np.array(b["matrix"])
        assert np.allclose(np.diag(matrix), 1) and np.allclose(matrix, matrix.T)
        assert 0 <= b["mean_abs"] <= 1
        assert b["mean_abs"] == pytest.approx(matrix[~np.eye(len(matrix), dtype=bool)].mean())
    assert (out / "head_correlation.png").stat().st_size < 200_000


def test_analyze_attention_end_to_end(trained: tuple[Path, Path, dict[str, int]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_file, _, _ = trained
    face = tmp_path / "face.png"
    big = Image.fromarray(faces(1)[0].numpy()).convert("RGB").resize((96, 96))  # colour, not 48 px
    big.save(face)
    png = tmp_path / "attention.png"
    args = ["analyze", "attention", str(model_file), str(face), "--block", "stage2", "-o", str(png)]
    assert main(args) == 0
    assert "3 heads x 16x16" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000
    assert main(["analyze", "attention", str(model_file), str(face), "--block", "9"]) == 2


def test_analyze_contribution_end_to_end(trained: tuple[Path, Path, dict[str, int]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    model_file, csv, _ = trained
    out = tmp_path / "contribution"
    assert main(["analyze", "contribution", str(model_file), "--data", str(csv), "--samples", "12",
                 "--seed", "4", "--out", str(out), "--device", "cpu"]) == 0
    assert "||y - x|| / ||x||" in capsys.readouterr().out
    report = json.loads((out / "contribution.json").read_text())
    assert report["count"] == 12 and [b["place"] for b in report["blocks"]] == ["stem", "stage1", "stage2", "stage3"]
    images = torch.from_numpy(tiny_fer.split_faces("PrivateTest")[0])
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(4))[:12].sort().values
    expected = by_hand_contribution(load_model(model_file).float(), images[pick])
    for b in report["blocks"]:
        assert b["relative"] == pytest.approx(expected[b["place"]], rel=1e-4)
    assert main(["analyze", "contribution", str(model_file), "--data", str(csv), "--samples", "0"]) == 2
