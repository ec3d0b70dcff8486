"""The ``stacchip`` command: ``index``, ``chip``, ``demo`` (and training-side tools).

Nothing in the library imports this module: it sits on top. The training-side
subcommands (``croissant``, ``preview``) live in :mod:`stacchip.ml` and are
imported only when they are the subcommand that runs, so ``stacchip index``
loads neither :mod:`stacchip.ml` nor :mod:`stacchip.processors`. Exit statuses
and error lines follow :mod:`stacchip.console` (0 done, 1 worth retrying,
2 bad input or configuration).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from stacchip import storage
from stacchip.console import MAX_CHIP_SIZE, ArgumentParser, echo, run_main
from stacchip.errors import ConfigError, IndexFileError, StacchipError  # noqa: F401  (StacchipError: old import path)

__all__ = ["MAX_CHIP_SIZE", "build_parser", "echo", "main"]

logger = logging.getLogger("stacchip.cli")

#: Subcommands implemented outside the core: name -> (module with ``add_cli``, help line).
#: The module is imported only when its subcommand runs.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "croissant": (
        "stacchip.ml.croissant",
        "write croissant.json (Croissant 1.1 + GeoCroissant + RAI) describing an index",
    ),
    "preview": (
        "stacchip.ml.preview",
        "quicklook PNG of an index (chips coloured by cloud/nodata) and a mosaic of sample chips",
    ),
    "compact": (
        "stacchip.catalog.cli",
        "merge per-item index files into one dataset partitioned by platform/year, Hilbert-sorted, "
        "with a manifest (re-runs add new items)",
    ),
}


def _check_int(flag: str, value: int, minimum: int, maximum: int | None = None) -> int:
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{flag} {value} must be {bound}")
    return value


def _check_fraction(flag: str, value: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} {value} must be a fraction between 0 and 1")
    return value


def _item_source(path: str) -> str:
    if storage.is_s3(path) or "://" in path:
        return path
    return str(Path(path).resolve())


def cmd_index(args: argparse.Namespace) -> int:
    from stacchip.catalog import bulk

    if bulk.wants_bulk(args):  # many items, or --out a directory: stacchip.catalog.bulk
        return bulk.command(args)
    args.item = args.sources[0]
    from stacchip.index import write_index
    from stacchip.indexer import guess_indexer, indexer_class
    from stacchip.utils import load_item

    _check_int("--chip-size", args.chip_size, 1, MAX_CHIP_SIZE)
    _check_fraction("--max-nodata", args.max_nodata)
    item = load_item(args.item)
    cls = guess_indexer(item) if args.indexer == "auto" else indexer_class(args.indexer)
    kwargs: dict[str, Any] = {"chip_size": args.chip_size, "chip_max_nodata": args.max_nodata}
    if args.platform:
        kwargs["platform"] = args.platform
    if args.edge != "drop":
        kwargs["edge"] = args.edge
    indexer = cls(item, **kwargs)
    if not indexer.has_stats():
        raise ConfigError(
            f"indexer {args.indexer!r} ({cls.__name__}) computes no cloud/nodata statistics; "
            "choose a source indexer or 'nostats'"
        )
    table = indexer.create_full_index()
    meta = {
        "item_href": _item_source(args.item),
        "item_id": item.id,
        "platform": indexer.platform,
        "indexer": cls.__name__,
        "chip_size": indexer.chip_size,
    }
    from stacchip.tiles.layouts import INDEX_METADATA_KEY, index_layouts

    meta[INDEX_METADATA_KEY] = index_layouts(item)  # COG headers: chip reads need not read them again
    write_index(table, args.out, extra_metadata=meta)
    echo(
        f"{item.id}: {table.num_rows}/{indexer.size} chips of {indexer.chip_size} px "
        f"({indexer.x_size} x {indexer.y_size}) written to {args.out} with {cls.__name__}"
    )
    return 0


def _find_item_for_chip(index_path: str, row: dict[str, Any], explicit: str | None) -> str:
    from stacchip.index import read_metadata

    if explicit:
        return explicit
    one_file = Path(index_path).is_file() if not storage.is_s3(index_path) else index_path.endswith(".parquet")
    if one_file:
        href = read_metadata(index_path).get("item_href")
        if href and (storage.is_s3(href) or storage.exists(href)):
            return href
    # Bucket layout: {root}/index/{platform}/{item_id}/index_{item_id}.parquet
    text = str(index_path)
    marker = "/index/"
    if marker in text:
        root = text[: text.rindex(marker)]
        candidate = storage.join(root, row["platform"], row["item_id"], "stac_item.json")
        if storage.exists(candidate):
            return candidate
    raise ConfigError(
        f"cannot find the STAC item {row['item_id']!r} for index {index_path!r}; pass --item"
    )


def _recorded_item(index_path: str) -> Any:
    """The STAC item a bulk-written index file carries in its metadata, else None."""
    from stacchip.index import read_metadata
    from stacchip.indexer import as_item

    recorded = read_metadata(index_path).get("item") if str(index_path).endswith(".parquet") else None
    return as_item(recorded) if isinstance(recorded, dict) else None


def cmd_chip(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow.compute as pc

    from stacchip.chipper import Chipper
    from stacchip.grid import ChipGrid
    from stacchip.index import index_files, open_index
    from stacchip.utils import load_item

    files = index_files(args.index)
    wanted = pc.field("chipid") == args.chipid
    table = open_index(files).to_table(filter=wanted)
    if table.num_rows == 0:
        raise IndexFileError(f"chip id {args.chipid!r} is not in index {args.index!r}")
    row = table.slice(0, 1).to_pylist()[0]
    # The one file holding the chip (its metadata names the item), also when
    # INDEX is a directory or prefix; bucket-layout names carry the item id.
    named = [f for f in files if row["item_id"] in Path(str(f)).name] or files
    source = next(f for f in [*named, *files] if open_index([f]).count_rows(filter=wanted))
    item = _recorded_item(source) if not args.item else None
    item = item or load_item(_find_item_for_chip(source, row, args.item))
    # "keep" covers every chip an index can hold (also those of `--edge keep`);
    # whole chips read the same under either edge rule.
    grid = ChipGrid.of(item, int(row["chip_size"]), edge="keep")
    assets = args.assets.split(",") if args.assets else None
    with Chipper(grid, assets=assets, native=args.native, layouts=str(source)) as chipper:
        chip = chipper.chip(int(row["chip_index_x"]), int(row["chip_index_y"]))
    buffer = io.BytesIO()
    save: Any = np.savez_compressed  # numpy's stub types **kwds as its allow_pickle flag
    save(buffer, **chip)
    storage.write_bytes(args.out, buffer.getvalue())
    shapes = ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in chip.items())
    echo(f"{args.chipid}: {shapes} written to {args.out}")
    return 0


def cmd_upgrade_index(args: argparse.Namespace) -> int:
    from stacchip.index import index_files, upgrade_index_file

    if args.chip_size is not None and not 0 < args.chip_size <= 65535:
        raise ConfigError(f"--chip-size {args.chip_size} must be a chip size in pixels (1-65535)")
    files = index_files(args.sources)
    done = 0
    for path in files:
        if upgrade_index_file(path, platform=args.platform, chip_size=args.chip_size):
            done += 1
            echo(f"upgraded {path}")
    echo(f"{done} of {len(files)} index files rewritten in the current schema "
         f"({len(files) - done} were already current)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from stacchip.chipper import Chipper
    from stacchip.demo import build_demo_scene
    from stacchip.index import read_index, write_index
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.utils import load_item

    _check_int("--chip-size", args.chip_size, 1, MAX_CHIP_SIZE)
    if args.size < args.chip_size:
        raise ConfigError(
            f"demo: --size {args.size} must be at least --chip-size {args.chip_size} (pixels) "
            "for the scene to hold a chip"
        )
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="stacchip-demo-"))
    t0 = time.perf_counter()
    item_path = build_demo_scene(workdir, size=args.size)
    t1 = time.perf_counter()
    item = load_item(item_path)
    indexer = Sentinel2Indexer(item, chip_size=args.chip_size)
    table = indexer.create_full_index()
    index_path = workdir / f"index_{item.id}.parquet"
    write_index(table, index_path, extra_metadata={"item_href": str(item_path), "item_id": item.id})
    t2 = time.perf_counter()
    back = read_index(index_path)
    chipper = Chipper(indexer)
    n = min(3, len(chipper))
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n):
        x, y, chip = chipper[i]
        shapes = {k: v.shape for k, v in chip.items()}
    chipper.close()
    t3 = time.perf_counter()
    cloud = np.asarray(back.column("cloud_cover_percentage"))
    nodata = np.asarray(back.column("nodata_percentage"))
    echo(f"demo scene:   {item_path} (built in {t1 - t0:.2f} s)")
    echo(f"chip grid:    {indexer.x_size} x {indexer.y_size} chips of {indexer.chip_size} px")
    echo(f"index:        {index_path}: {back.num_rows}/{indexer.size} chips kept "
          f"(nodata <= {indexer.chip_max_nodata}), indexed in {t2 - t1:.2f} s")
    echo(f"cloud:        mean {cloud.mean():.3f}, max {cloud.max():.3f} (fraction)")
    echo(f"nodata:       mean {nodata.mean():.3f}, max {nodata.max():.3f} (fraction)")
    echo(f"chips read:   {n} in {t3 - t2:.2f} s, {len(shapes)} assets, e.g. "
          + ", ".join(f"{k} {v}" for k, v in list(shapes.items())[:3]))
    return 0


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the subcommand too (``stacchip index ... -v``)."""
    try:
        parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                            help="more logging; tracebacks on errors")
    except argparse.ArgumentError:  # the subcommand has its own -v
        pass


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``stacchip`` parser.

    ``command`` names the subcommand about to run: a training-side subcommand
    (:data:`LAZY_COMMANDS`) gets its full flags only then (its module is
    imported); otherwise it is listed with its help line and nothing imported.
    """
    from stacchip.catalog import bulk  # its flags; the work is imported when it runs

    parser = ArgumentParser(prog="stacchip", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv debug); tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="index STAC items into GeoParquet chip indexes (one, or many as array tasks)")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="STAC item JSON, ItemCollection JSON, ndjson, or stac-geoparquet file or prefix "
                   "(path, file:// or s3://)")
    p.add_argument("--out", required=True,
                   help="output .parquet for one item; else a directory or s3:// prefix, filled as "
                   "OUT/index/{platform}/{item_id}/index_{item_id}.parquet")
    p.add_argument("--indexer", default="auto",
                   help="auto, sentinel-2, landsat, modis, sentinel-1, naip, linz, nostats")
    p.add_argument("--chip-size", type=int, default=256,
                   help=f"chip size in pixels, 1-{MAX_CHIP_SIZE} (default 256)")
    p.add_argument("--max-nodata", type=float, default=0.5,
                   help="drop chips with a larger nodata fraction (0-1, default 0.5)")
    p.add_argument("--platform", default=None, help="platform name stored in the index")
    p.add_argument("--edge", choices=["drop", "keep"], default="drop",
                   help="drop (default, upstream) or keep the partial chips at the right/bottom edges")
    bulk.add_arguments(p)
    p.set_defaults(func=cmd_index)
    _verbose_flag(p)

    p = sub.add_parser("chip", help="read one chip of an index into an .npz file")
    p.add_argument("index", help="index .parquet file, directory or s3:// prefix")
    p.add_argument("--chipid", required=True, help="chip id, {item_id}-{x}-{y}")
    p.add_argument("--out", required=True, help="output .npz (path or s3://)")
    p.add_argument("--item", default=None, help="STAC item JSON (default: from the index)")
    p.add_argument("--assets", default=None, help="comma-separated asset keys")
    p.add_argument("--native", action="store_true", help="keep each asset's own resolution")
    p.set_defaults(func=cmd_chip)
    _verbose_flag(p)

    p = sub.add_parser(
        "upgrade-index",
        help="rewrite upstream-format index files in the current schema (idempotent)",
        description="Rewrite index files written by upstream stacchip (seven columns, native "
        "geoarrow geometry) in place in the current schema. item_id and platform come from the "
        "bucket layout index/{platform}/{item_id}/index_{item_id}.parquet (else the chip ids); "
        "files already current are left untouched.",
    )
    p.add_argument("sources", nargs="+", help="index .parquet files, directories or s3:// prefixes")
    p.add_argument("--platform", default=None, help="platform to store (default: from the bucket layout)")
    p.add_argument("--chip-size", type=int, default=None,
                   help="chip size in pixels of these indexes (default 256, upstream's only size)")
    p.set_defaults(func=cmd_upgrade_index)
    _verbose_flag(p)

    p = sub.add_parser("demo", help="build a small Sentinel-2-shaped scene offline, index it, read chips")
    p.add_argument("--dir", default=None, help="where to write the scene (default: a temp dir)")
    p.add_argument("--size", type=int, default=1098, help="10 m band size in pixels (default 1098)")
    p.add_argument("--chip-size", type=int, default=256, help="chip size in pixels (default 256)")
    p.set_defaults(func=cmd_demo)
    _verbose_flag(p)

    for name, (module, help_text) in LAZY_COMMANDS.items():
        if name == command:
            _add_lazy(sub, name, module)
        else:
            # listed in `stacchip --help`; main() builds the real one when it runs
            sub.add_parser(name, help=help_text)
    return parser


def _add_lazy(sub: Any, name: str, module: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if not module.startswith("stacchip.ml"):
            raise
        raise ConfigError(
            f"stacchip {name} needs the training extra ({exc}); install it with: pip install 'stacchip[ml]'"
        ) from exc
    p = mod.add_cli(sub)
    if isinstance(p, argparse.ArgumentParser):
        _verbose_flag(p)


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv``: the first word that is not a flag (the top-level flags take no value)."""
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stacchip`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(words)
    known = command in {"index", "chip", "demo", *LAZY_COMMANDS}
    prog = f"stacchip {command}" if known else "stacchip"

    def body() -> int:
        args = build_parser(command if known else None).parse_args(words)
        verbose = getattr(args, "verbose", 0) or 0
        level = logging.WARNING - 10 * min(verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        return int(args.func(args) or 0)

    return run_main(body, prog, words)


if __name__ == "__main__":
    sys.exit(main())
