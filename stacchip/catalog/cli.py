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
                   help="rows per Parquet row group (default 20000)")
    p.add_argument("--file-rows", type=int, default=None, help="rows per part file (default 1000000)")
    p.add_argument("--append-fraction", type=float, default=None,
                   help="append new items to a partition as a new run while they are at most this "
                   "fraction of its rows (default 0.2); otherwise it is rewritten")
    p.add_argument("--rewrite", action="store_true",
                   help="rewrite every partition that receives items (one sorted run each)")
    p.add_argument("--rebuild", action="store_true",
                   help="ignore what --out holds and compact SOURCES from scratch")
    p.add_argument("--threads", type=int, default=None, help="threads reading source footers (default 8)")
    p.add_argument("--engine", choices=("duckdb", "dask"), default="duckdb",
                   help="duckdb: sort on this machine within --memory (default); dask: sort on a Dask "
                   "cluster (--scheduler ADDRESS, else a local cluster of --workers processes)")
    p.add_argument("--memory", default=None,
                   help="memory budget of the duckdb engine, e.g. 4GB (default 4GiB, whatever the catalog size)")
    p.add_argument("--temp-dir", default=None,
                   help="where the duckdb engine spills (default $STACCHIP_TMPDIR or the system temp directory)")
    p.add_argument("--scheduler", default=None, help="dask engine: address of the Dask scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=int, default=None,
                   help="dask engine without --scheduler: worker processes of a local cluster (default 2)")
    p.add_argument("--break-lock", action="store_true",
                   help="remove the lock a dead compaction left on --out before taking it (only when the "
                   "writer it names is known to be gone)")
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
    if args.memory is not None:
        options["memory"] = args.memory
    if args.engine == "dask":
        options["client"] = args.scheduler
        options["workers"] = args.workers
    elif args.scheduler or args.workers:
        from stacchip.errors import ConfigError

        raise ConfigError("--scheduler and --workers go with --engine dask")
    result = compact(args.sources, args.out, rewrite=args.rewrite, rebuild=args.rebuild, engine=args.engine,
                     temp_directory=args.temp_dir, break_lock=args.break_lock, **options)
    echo(result.summary())
    return 0
