"""``lhcnet data prepare SRC -o CACHE`` and ``lhcnet data stats SRC``."""
from __future__ import annotations

import argparse
import time

from ..data import SPLITS, FaceDataset, dataset_stats, format_stats, format_table, load_dataset, save_cache
from ..data.stats import split_summary, without_training_duplicates

_SHOWN_BAD_ROWS = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare and inspect data sets",
                                   description="FER2013 (.csv/.csv.gz/.tar.gz), FER+ and image folders")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prepare = sub.add_parser("prepare", help="convert a source into a memory-mappable cache file")
    _source_arguments(prepare)
    prepare.add_argument("-o", "--output", required=True, metavar="CACHE",
                         help="cache file to write (.npz)")
    prepare.add_argument("--image-size", type=int, default=48,
                         help="square size images are stored at (default: 48)")
    prepare.set_defaults(func=_prepare)

    stats = sub.add_parser("stats", help="split x class table, blank images, duplicates")
    _source_arguments(stats)
    stats.add_argument("--cache-dir", default=None,
                       help="where raw sources are cached (default: $LHCNET_HOME/data)")
    stats.add_argument("--no-cache", action="store_true", help="read the raw source, write no cache")
    stats.add_argument("--dedup", action="store_true",
                       help="also the table without the PublicTest/PrivateTest faces whose pixels "
                            "occur in Training")
    stats.set_defaults(func=_stats)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="fer2013.csv[.gz], fer2013.tar.gz, a cache file or an image folder")
    parser.add_argument("--labels", choices=("fer2013", "ferplus"), default=None,
                        help="label set (default: the source's own)")
    parser.add_argument("--ferplus-csv", default=None, metavar="CSV",
                        help="FER+ votes (fer2013new.csv) for --labels ferplus")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip malformed CSV rows (and report them) instead of stopping")


def _report_bad_rows(dataset: FaceDataset) -> None:
    if not dataset.bad_rows:
        return
    print(f"skipped {len(dataset.bad_rows)} bad rows:")
    for record in dataset.bad_rows[:_SHOWN_BAD_ROWS]:
        print(f"  {record}")
    if len(dataset.bad_rows) > _SHOWN_BAD_ROWS:
        print(f"  ... and {len(dataset.bad_rows) - _SHOWN_BAD_ROWS} more")


def _prepare(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    dataset = load_dataset(args.src, labels=args.labels, ferplus_csv=args.ferplus_csv,
                           cache_dir=False, skip_bad=args.skip_bad, image_size=args.image_size)
    path = save_cache(dataset, args.output)
    print(f"wrote {path}: {len(dataset)} images {dataset.image_size}x{dataset.image_size} "
          f"({split_summary(dataset.counts())}); classes {','.join(dataset.classes)}; {time.perf_counter() - start:.1f} s")
    _report_bad_rows(dataset)
    return 0


def _stats(args: argparse.Namespace) -> int:
    cache_dir = False if args.no_cache else args.cache_dir
    dataset = load_dataset(args.src, labels=args.labels, ferplus_csv=args.ferplus_csv,
                           cache_dir=cache_dir, skip_bad=args.skip_bad)
    print(format_stats(dataset_stats(dataset)))
    if args.dedup:
        kept = without_training_duplicates(dataset)
        removed = dataset.counts().sum(1) - kept.counts().sum(1)
        print(f"\nwithout the faces whose pixels also occur in Training (--dedup; removed "
              f"{', '.join(f'{SPLITS[s]} {n}' for s, n in enumerate(removed) if s)}):")
        print(format_table(kept.counts(), kept.classes))
        print(f"images: {len(kept)} ({split_summary(kept.counts())})")
    _report_bad_rows(dataset)
    return 0
