"""Carry a training run to another machine: pack its checkpoint small, unpack it there, resume.

    python3 scripts/run_snapshot.py pack runs/long-seed1 docs/runs/long-seed1/snapshot.safetensors
    python3 scripts/run_snapshot.py unpack docs/runs/long-seed1/snapshot.safetensors runs/long-seed1
    lhcnet train --out runs/long-seed1 --data fer2013.csv.gz --resume --bf16 --channels-last

``pack`` stores float16 tensors without the optimizer state (``--exact``: float32 and the optimizer
state, a bit-exact continuation at the checkpoint's size); ``lhcnet.train.snapshot`` says what a
compact snapshot changes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lhcnet.train.snapshot import pack_snapshot, unpack_snapshot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="RUN_DIR's checkpoint.pt and text files into one file")
    pack.add_argument("run_dir", type=Path)
    pack.add_argument("out", type=Path)
    pack.add_argument("--exact", action="store_true", help="float32 and the optimizer state (no rounding)")
    unpack = commands.add_parser("unpack", help="a snapshot back into RUN_DIR (checkpoint.pt, config.toml, ...)")
    unpack.add_argument("snapshot", type=Path)
    unpack.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    try:
        if args.command == "pack":
            out = pack_snapshot(args.run_dir, args.out, dtype=torch.float32 if args.exact else torch.float16,
                                optimizer_state=args.exact)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        else:
            out = unpack_snapshot(args.snapshot, args.run_dir)
            print(f"wrote {out}; continue with: lhcnet train --out {args.run_dir} --data DATA --resume [the run's options]")
    except (OSError, ValueError) as exc:
        print(f"run_snapshot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
