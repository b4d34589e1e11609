"""``lhcnet analyze blocks|heads|contribution|attention``: analyses of a trained LHC-Net."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_text
from ..train.distributed import resolve_device
from .evaluate import add_data_arguments, load_faces, load_models

__all__ = ["register", "run_blocks", "run_heads", "run_contribution", "run_attention"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="LHC block ablation, head correlation, attention maps",
                       description="The paper's analyses of a trained LHC-Net model file.")
    groups = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    blocks = groups.add_parser(
        "blocks", help="accuracy with LHC blocks switched off / de-trained",
        description="For each LHC block: switched off (output = input) and de-trained (weights reset "
                    "to their Keras initialisation with --seed), one at a time and cumulatively from "
                    "the last block backwards. Prints the accuracy table; writes ablation.png/.json.")
    blocks.add_argument("model", metavar="MODEL_FILE")
    add_data_arguments(blocks)
    blocks.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation (default 0)")
    blocks.add_argument("--out", default=".", metavar="DIR",
                        help="where to write ablation.png and ablation.json (default: here)")
    blocks.add_argument("--json", action="store_true", help="print JSON instead of the table")
    blocks.set_defaults(func=run_blocks)

    heads = groups.add_parser(
        "heads", help="mean |Pearson r| between the outputs of different heads, per block",
        description="The paper's head-correlation measure over a random sample of the split's faces. "
                    "Prints one value per block; writes head_correlation.png/.json.")
    _add_sample_arguments(heads, "head_correlation.png/.json")
    heads.set_defaults(func=run_heads, batch_size=64)

    contribution = groups.add_parser(
        "contribution", help="how much each LHC block changes its input, ||y - x|| / ||x||",
        description="Per LHC block, ||y - x|| / ||x|| (x its input, y its output) per face, averaged "
                    "over a random sample of the split's faces: near 0, the block is close to the "
                    "identity. Prints one value per block; writes contribution.json.")
    _add_sample_arguments(contribution, "contribution.json")
    contribution.set_defaults(func=run_contribution, batch_size=64)

    attention = groups.add_parser(
        "attention", help="one block's per-head channel-attention maps for a face image",
        description="Read IMAGE (any Pillow format; converted to grey and resized to 48x48 as "
                    "FER2013), run the model and plot the C x C attention map of every head of one block.")
    attention.add_argument("model", metavar="MODEL_FILE")
    attention.add_argument("image", metavar="IMAGE", help="a face image file (cropped to the face)")
    attention.add_argument("--block", default="1",
                           help="block number in forward order (1 = first, default) or place name")
    attention.add_argument("-o", "--output", default="attention.png", metavar="FILE.png",
                           help="picture to write (default attention.png)")
    attention.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    attention.set_defaults(func=run_attention)


def _add_sample_arguments(parser: argparse.ArgumentParser, writes: str) -> None:
    """MODEL_FILE, the data options and --samples/--seed/--out/--json of an analysis of a sample."""
    parser.add_argument("model", metavar="MODEL_FILE")
    add_data_arguments(parser, limit_help="draw the sample from the first N images of the split only")
    parser.add_argument("--samples", type=int, default=256, metavar="N", help="faces in the sample (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--out", default=".", metavar="DIR", help=f"where to write {writes}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _load_one(args: argparse.Namespace,
              classes: tuple[str, ...] | None) -> tuple[torch.nn.Module, torch.device]:
    device = resolve_device(args.device)
    if classes is None:
        from ..models import load_model
        return load_model(args.model, device=device), device
    return load_models([args.model], classes, device)[0][1], device


def _report(args: argparse.Namespace, name: str, report: dict, table: str,
            plot: Callable[[Path], Path] | None = None) -> int:
    """Write ``--out``/``name``.json (and the plot, if any); print the table or, with --json, the JSON."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2) + "\n")]
    if plot is not None:
        written.append(plot(out / f"{name}.png"))
    print(json.dumps(report, indent=2) if args.json else table)
    if not args.json:
        print(f"\nwrote {', '.join(str(path) for path in written)}")
    return 0


def run_blocks(args: argparse.Namespace) -> int:
    from ..analysis import block_ablation, format_ablation, plot_ablation
    from ..models import lhc_blocks

    images, labels, classes = load_faces(args)
    model, device = _load_one(args, classes)
    places = [place for place, _ in lhc_blocks(model)]
    rows = block_ablation(model, images, labels, seed=args.seed, batch_size=args.batch_size, device=device)
    report = {"model": args.model, "split": args.split, "count": len(labels), "seed": args.seed,
              "places": places, "rows": [asdict(r) for r in rows]}
    title = f"{Path(args.model).name}: LHC block ablation ({args.split}, {len(labels)} images)"
    return _report(args, "ablation", report, format_ablation(rows, places),
                   lambda path: plot_ablation(rows, places, path, title))


def _model_and_sample(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device, torch.Tensor]:
    """The model and ``--samples`` faces of the split drawn with ``--seed`` (in the split's order)."""
    if args.samples < 1:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    images, _, classes = load_faces(args)
    model, device = _load_one(args, classes)
    generator = torch.Generator().manual_seed(args.seed)
    return model, device, images[torch.randperm(len(images), generator=generator)[:args.samples].sort().values]


def run_heads(args: argparse.Namespace) -> int:
    from ..analysis import format_head_correlation, head_correlation, plot_head_correlation

    model, device, sample = _model_and_sample(args)
    results = head_correlation(model, sample, batch_size=args.batch_size, device=device)
    report = {"model": args.model, "split": args.split, "count": len(sample), "seed": args.seed,
              "blocks": [asdict(r) for r in results]}
    title = f"{Path(args.model).name}: head correlation ({args.split}, {len(sample)} images)"
    return _report(args, "head_correlation", report, format_head_correlation(results, len(sample)),
                   lambda path: plot_head_correlation(results, path, title))


def run_contribution(args: argparse.Namespace) -> int:
    from ..analysis import block_contribution, format_block_contribution

    model, device, sample = _model_and_sample(args)
    results = block_contribution(model, sample, batch_size=args.batch_size, device=device)
    report = {"model": args.model, "split": args.split, "count": len(sample), "seed": args.seed,
              "blocks": [asdict(r) for r in results]}
    return _report(args, "contribution", report, format_block_contribution(results, len(sample)))


def run_attention(args: argparse.Namespace) -> int:
    from ..analysis import attention_maps, plot_attention, resolve_block
    from ..data import read_grey_image, to_model_input

    model, device = _load_one(args, None)
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image not found: {args.image}")
    try:
        face = torch.from_numpy(read_grey_image(args.image, 48).copy())[None]   # (1, 48, 48) uint8
    except OSError as exc:  # Pillow: not an image it can decode
        raise ValueError(f"{args.image}: cannot read this image ({exc})") from None
    place, _ = resolve_block(model, args.block)
    x = to_model_input(face.to(device), int(getattr(model, "input_size", 224)))
    attention = attention_maps(model, x, place)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)[0]
    classes = model.lhcnet_metadata.get("info", {}).get("classes")
    top = int(probs.argmax())
    guess = f"{classes[top] if classes else top} {100 * float(probs[top]):.0f}%"
    title = (f"{Path(args.model).name}: block {args.block} ({place}), {attention.shape[0]} heads; "
             f"prediction {guess}")
    path = plot_attention(face[0], attention, args.output, title)
    print(f"block {place}: {attention.shape[0]} heads x {attention.shape[1]}x{attention.shape[2]} "
          f"channel attention; prediction {guess}; wrote {path}")
    return 0
