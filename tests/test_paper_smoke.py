"""Smoke tests of the paper-scale path: every stage of ``recipes/paper.toml`` (1-4 and C) and of
``recipes/standalone.toml`` on the real 224-px models, through the ``train()`` the CLI calls, on a
dozen synthetic faces (one epoch per stage, batch 8), on the CPU; one stage of each under
``torchrun`` with two CPU processes. The converted ImageNet file is a random stand-in under a
temporary ``LHCNET_HOME``, where ``pretrained = "imagenet"`` looks for it.

Overrides (nothing else of the recipes changes): ``--max-epochs 1``, ``--limit-train 7``,
``--limit-val 7``, ``batch_size = 8``, and stage 4's ``on_reject = "continue"`` so that stage C
runs whatever one epoch of random LHC blocks does to the training loss.

Time on the 2-core VM (load ~2, one thread): paper 25 s, standalone 19 s, the two torchrun
stages 15 s each (2 threads were 3-8x slower on these shared cores).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from lhcnet.cli import main as lhcnet_main
from lhcnet.data import BatchLoader, paper_jpeg
from lhcnet.models import create_model, load_model, save_model
from lhcnet.train import Recipe, TrainOptions, load_recipe, recipe_to_toml, train

REPO = Path(__file__).resolve().parents[1]
PAPER, STANDALONE = REPO / "recipes" / "paper.toml", REPO / "recipes" / "standalone.toml"
TRAIN, VAL, BATCH = 7, 7, 8   # one face per class to train on (one step per stage), one to validate on
ADAM_STEP_BOUND = 1e-3        # Adam's first step moves a weight by lr * |g| / (|g| + eps) <= lr = 1e-4



@pytest.fixture(scope="module")
def imagenet_home(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """LHCNET_HOME holding a random stand-in for the converted qubvel ResNet-34 ImageNet file."""
    home = tmp_path_factory.mktemp("lhcnet-home")
    torch.manual_seed(1234)
    backbone = {k: v for k, v in create_model("resnet34v2").state_dict().items() if not k.startswith("head.")}
    (home / "weights").mkdir()
    save_file(backbone, str(home / "weights" / "resnet34v2_imagenet.safetensors"))
    return home, backbone


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> tuple:
    dataset = tm.synthetic_faces(n_train=TRAIN, n_val=VAL, seed=3)
    return dataset, tm.write_fer2013_csv(dataset, tmp_path_factory.mktemp("faces") / "faces.csv")


def tiny(path: Path) -> Recipe:
    """The recipe with the overrides of the module docstring."""
    recipe = load_recipe(path).with_overrides(max_epochs=1, limit_train=TRAIN, limit_val=VAL)
    stages = tuple(dataclasses.replace(
        s, batch_size=BATCH,
        acceptance=None if s.acceptance is None else dataclasses.replace(s.acceptance, on_reject="continue"))
        for s in recipe.stages)
    return dataclasses.replace(recipe, stages=stages)


def run_in_process(recipe: Recipe, dataset, out: Path, home: Path, monkeypatch):
    monkeypatch.setenv("LHCNET_HOME", str(home))  # (one thread, conftest: on 2 shared cores, 2 threads
    return train(recipe, dataset, out, TrainOptions(device="cpu", progress=False, plot_every_s=0))  # ran 3-8x slower)


def run_torchrun(recipe: Recipe, csv: Path, out: Path, home: Path) -> str:
    """One stage under ``torchrun --nproc_per_node=2`` (gloo), through the command line."""
    recipe_file = out.parent / f"{out.name}.toml"
    recipe_file.write_text(recipe_to_toml(recipe))
    return tm.torchrun_train(["--recipe", str(recipe_file), "--data", str(csv), "--out", str(out)], home,
                             timeout=180)


def max_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], key: str) -> float:
    return float((a[key].float() - b[key].float()).abs().max())


@pytest.mark.slow  # the four 224-px runs: see the module docstring for their time
def test_paper_recipe_every_stage_at_224(imagenet_home, faces, tmp_path, monkeypatch) -> None:
    home, standin = imagenet_home
    result = run_in_process(tiny(PAPER), faces[0], tmp_path / "paper", home, monkeypatch)
    assert result.status == "finished", result.message
    assert [(r["stage"], r["model"], r["epochs"]) for r in result.stages] == [
        ("stage1", "resnet34v2", 1), ("stage2", "resnet34v2", 1), ("stage3", "resnet34v2", 1),
        ("stage4", "lhcnet_resnet34v2", 1), ("stageC", "lhcnetc_resnet34v2", 1)]
    log = (result.out_dir / "train.log").read_text()
    assert f"paper_jpeg: {TRAIN} training images -> 224 px" in log and log.count("paper_jpeg:") == 1

    # stage 1 started from the ImageNet file: one Adam step at lr 1e-4 (a fresh init is ~0.05 away)
    stage1 = load_file(str(result.out_dir / "stage1-best.safetensors"))
    assert max_change(stage1, standin, "stem.conv0.weight") < ADAM_STEP_BOUND
    assert max_change(stage1, standin, "stage4.unit3.conv2.weight") < ADAM_STEP_BOUND
    # stage 4: the acceptance rule measured both training losses on the 224-px JPEG set
    acceptance = result.stages[3]["acceptance"]
    assert acceptance["start_train_loss"] > 0 and acceptance["final_train_loss"] > 0
    # stage C: only the five gates moved; every other weight and BatchNorm statistic stayed frozen
    stage4 = load_file(str(result.out_dir / "stage4-best.safetensors"))
    final = load_file(str(result.final))
    changed = {k for k in final if k not in stage4 or not torch.equal(final[k], stage4[k])}
    assert changed == {f"lhc.{place}.gate" for place in ("stem", "stage1", "stage2", "stage3", "stage4")}
    model = load_model(result.final)
    assert model.lhcnet_metadata["name"] == "lhcnetc_resnet34v2" and model.input_size == 224
    assert len((result.out_dir / "metrics.csv").read_text().splitlines()) == 1 + 5


@pytest.mark.slow
def test_standalone_recipe_every_stage_at_224(imagenet_home, faces, tmp_path, monkeypatch) -> None:
    home, standin = imagenet_home
    result = run_in_process(tiny(STANDALONE), faces[0], tmp_path / "standalone", home, monkeypatch)
    assert result.status == "finished", result.message
    assert [(r["stage"], r["model"]) for r in result.stages] == [
        ("stage1", "lhcnet_resnet34v2"), ("stage2", "lhcnet_resnet34v2"), ("stage3", "lhcnet_resnet34v2")]
    stage1 = load_file(str(result.out_dir / "stage1-best.safetensors"))
    assert max_change(stage1, standin, "stem.conv0.weight") < ADAM_STEP_BOUND  # the backbone: ImageNet
    assert any(k.startswith("lhc.") for k in stage1) and not any(k.startswith("lhc.") for k in standin)
    assert load_model(result.final).lhcnet_metadata["name"] == "lhcnet_resnet34v2"


@pytest.mark.slow
def test_paper_stage4_under_torchrun_two_processes(imagenet_home, faces, tmp_path) -> None:
    """Stage 4 (LHC-Net, the acceptance rule's passes split over the processes) from a ResNet34v2 file."""
    home, _ = imagenet_home
    torch.manual_seed(5)
    start = save_model(create_model("resnet34v2"), tmp_path / "stage3-best.safetensors")
    recipe = tiny(PAPER)
    stage4 = next(s for s in recipe.stages if s.name == "stage4")
    recipe = dataclasses.replace(recipe, stages=(dataclasses.replace(stage4, start="file", init_file=str(start)),))
    run_torchrun(recipe, faces[1], tmp_path / "ddp", home)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["stage4"]
    assert {"start_train_loss", "final_train_loss", "accepted"} <= set(summary["stages"][0]["acceptance"])
    assert len((tmp_path / "ddp" / "metrics.csv").read_text().splitlines()) == 2  # rank 0 alone wrote
    assert load_model(tmp_path / "ddp" / "final.safetensors").lhcnet_metadata["name"] == "lhcnet_resnet34v2"


@pytest.mark.slow
def test_standalone_stage1_under_torchrun_two_processes(imagenet_home, faces, tmp_path) -> None:
    home, standin = imagenet_home
    recipe = tiny(STANDALONE)
    run_torchrun(dataclasses.replace(recipe, stages=recipe.stages[:1]), faces[1], tmp_path / "ddp", home)
    stage1 = load_file(str(tmp_path / "ddp" / "stage1-best.safetensors"))
    assert max_change(stage1, standin, "stem.conv0.weight") < ADAM_STEP_BOUND


def test_paper_recipe_without_the_imagenet_file_stops_at_once(faces, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LHCNET_HOME", str(tmp_path / "empty-home"))
    out = tmp_path / "run"
    assert lhcnet_main(["train", "--recipe", str(PAPER), "--data", str(faces[1]), "--out", str(out),
                        "--device", "cpu", "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lhcnet train: error: ImageNet weights for resnet34v2 not found")
    assert "resnet34_imagenet_1000_no_top.h5" in lines[0] and "md5 8caaa0ad39d927cb8ba5385bf945d582" in lines[0]
    assert "lhcnet convert-weights resnet34_imagenet_1000_no_top.h5" in lines[0]
    assert not out.exists() and captured.out == ""  # before the run folder, the JPEG set or any model


# --- the GPU options' plumbing, on the CPU with the tiny models -------------------------------

def test_gpu_options_reach_the_training_forward_and_loaders_share_one_jpeg_set(tmp_path, monkeypatch) -> None:
    """--compile wraps the training model of every stage, --bf16 autocasts its forward, --channels-last
    lays out its batches; every loader of a run reads the one paper_jpeg set (on the device)."""
    seen, loaders = [], []

    class CompiledSpy(torch.nn.Module):  # stands in for torch.compile's wrapper
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu")))
            return self.inner(x)

    class RecordingLoader(BatchLoader):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            loaders.append(self)

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: CompiledSpy(module))
    monkeypatch.setattr("lhcnet.train.setup.BatchLoader", RecordingLoader)
    path = tm.two_stage_recipe(tmp_path / "recipe.toml", max_epochs=1)
    path.write_text("paper_jpeg = true\n" + path.read_text())  # stage 2 has an acceptance rule
    dataset = tm.synthetic_faces(n_train=40, n_val=14)
    result = train(load_recipe(path), dataset, tmp_path / "run", TrainOptions(
        device="cpu", progress=False, bf16=True, channels_last=True, compile=True, plot_every_s=0))
    assert result.status == "finished", result.message
    assert len(seen) == 4 and all(layout and autocast for layout, autocast in seen)  # 2 stages x 2 batches
    shuffled = [loader for loader in loaders if loader.shuffle]
    jpeg = [loader for loader in loaders if loader.images.shape[1:] == (16, 16)]  # tiny models: 16 px
    assert len(shuffled) == 2 and len(jpeg) == 3  # both training loaders + stage 2's acceptance loader
    assert len({loader.images.data_ptr() for loader in jpeg}) == 1
    np_jpeg = paper_jpeg(dataset.split("Training").images, 16)
    assert torch.equal(jpeg[0].images, torch.from_numpy(np_jpeg))


def test_compile_without_a_cpp_compiler_stops_before_the_run(faces, tmp_path, monkeypatch, capsys) -> None:
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    recipe = tm.two_stage_recipe(tmp_path / "recipe.toml", max_epochs=1)
    out = tmp_path / "run"
    assert lhcnet_main(["train", "--recipe", str(recipe), "--data", str(faces[1]), "--out", str(out),
                        "--device", "cpu", "--compile"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX)" in lines[0]
    assert lines[0].endswith("train without --compile") and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(faces, tmp_path, capsys) -> None:
    recipe = tm.two_stage_recipe(tmp_path / "recipe.toml", max_epochs=1)
    assert lhcnet_main(["train", "--recipe", str(recipe), "--data", str(faces[1]), "--out",
                        str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("lhcnet train: error: --device cuda was asked for but CUDA is "
                                               "not available here (use --device cpu)")
