"""The ``lhcnet`` command line: thin argument parsing over the library's functions.

Each command group lives in its own module with ``register(subparsers)``, which adds its parser
and sets ``func`` (a function of the parsed args returning an exit code).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import importlib

# One module per command group, in help order.
COMMAND_MODULES = ["info", "data", "train", "convert", "evaluate", "analyze", "predict", "export",
                   "serve"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(prog="lhcnet", description="LHC-Net facial expression recognition")
    parser.add_argument("--version", action="version", version=f"lhcnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:  # user errors: one clear line, no traceback
        print(f"lhcnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lhcnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
