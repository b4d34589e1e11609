"""The ``lhcnet`` command line: thin argument parsing over the library's functions.

Each command group lives in its own module with ``register(subparsers)``, which adds its parser
and sets ``func`` (a function of the parsed args returning an exit code).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import importlib

# One module per command group, in help order.
COMMAND_MODULES = ["info", "data", "train", "distill", "convert", "evaluate", "analyze", "predict", "export",
                   "serve"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(prog="lhcnet", description="LHC-Net facial expression recognition")
    parser.add_argument("--version", action="version", version=f"lhcnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def is_user_error(exc: BaseException) -> bool:
    """Errors about the user's input or machine, shown as one line: an ``OSError`` (missing file,
    permission, disk full: it names the file), or a ``ValueError`` that lhcnet raised itself with
    its message (the innermost frame is a ``raise`` in the package). Any other exception, e.g. a
    ``ValueError`` from inside a library or from unpacking, is a bug: it keeps its traceback."""
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, ValueError) or exc.__traceback__ is None:
        return False
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    inside = Path(frame.filename).resolve().is_relative_to(_PACKAGE)
    return inside and (frame.line or "").startswith("raise")


_PACKAGE = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"lhcnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"lhcnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
