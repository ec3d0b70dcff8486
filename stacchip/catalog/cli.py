"""``stacchip compact``: merge per-item index files into a compacted, partitioned index.

Registered by :mod:`stacchip.cli`; importing this module costs only argparse,
the work is imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stacchip compact`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "compact",
        help="merge per-item index files into one dataset partitioned by platform/year, Hilbert-sorted, "
        "with a manifest (re-runs add new items)",
        description="Merge per-item index files into one dataset partitioned by platform and year, rows "
        "sorted along a Hilbert curve, with a _manifest.json; a re-run adds new and changed items.",
    )
    p.add_argument("sources", nargs="+", help="index .parquet files, directories or s3:// prefixes")
    p.add_argument("--out", required=True, help="compacted index root (directory or s3:// prefix)")
    p.add_argument("--row-group-rows", type=int, default=None,
                   help="rows per Parquet row group (default 100000)")
    p.add_argument("--file-rows", type=int, default=None, help="rows per part file (default 1000000)")
    p.add_argument("--append-fraction", type=float, default=None,
                   help="append new items to a partition as a new run while they are at most this "
                   "fraction of its rows (default 0.2); otherwise it is rewritten")
    p.add_argument("--rewrite", action="store_true",
                   help="rewrite every partition that receives items (one sorted run each)")
    p.add_argument("--rebuild", action="store_true",
                   help="ignore what --out holds and compact SOURCES from scratch")
    p.add_argument("--threads", type=int, default=None, help="threads reading source footers (default 8)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    from stacchip.catalog.compaction import compact
    from stacchip.console import echo

    options = {
        name: value for name, value in (
            ("row_group_rows", args.row_group_rows), ("file_rows", args.file_rows),
            ("append_fraction", args.append_fraction), ("threads", args.threads),
        ) if value is not None
    }
    result = compact(args.sources, args.out, rewrite=args.rewrite, rebuild=args.rebuild, **options)
    echo(result.summary())
    return 0
