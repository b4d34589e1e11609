"""``lhcnet info NAME|MODEL_FILE``: parameters, FLOPs and LHC blocks of a model."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..models import create_model, list_models, load_model
from ..summary import format_summary, measure_latency, summarize


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and per-block LHC table of a model",
                       description="Print total and per-LHC-block parameters and FLOPs of a registered "
                                   "model or a model file.")
    p.add_argument("model", nargs="?", help=f"a registered name ({', '.join(list_models())}) or a "
                                            ".safetensors file")
    p.add_argument("--latency", action="store_true", help="also time a batch-1 forward on the CPU")
    p.add_argument("--list", action="store_true", help="list the registered models (no MODEL needed)")
    p.set_defaults(func=run, parser=p)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.model is None:
        args.parser.error("MODEL is required (a registered name or a .safetensors file), or use --list")
    if args.model.endswith(".safetensors") or Path(args.model).is_file():
        model = load_model(args.model)
        name = model.lhcnet_metadata["name"] + f" ({args.model})"
    else:
        model, name = create_model(args.model), args.model
    summary = summarize(model, name)
    print(format_summary(summary, measure_latency(model) if args.latency else None))
    return 0
