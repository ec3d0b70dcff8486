"""Queries over a compacted catalog index, next to full scans of the same data, in one run.

One command (``python -m benchmarks.catalog_bench --cache DIR``):

1. builds (once, cached under ``DIR``) a synthetic catalog of per-item index files as
   ``stacchip index`` writes them (``index/{platform}/{item_id}/index_{item_id}.parquet``,
   :func:`stacchip.index.index_table` + :func:`~stacchip.index.write_index`), rows only, no
   rasters: Sentinel-2-like items on 109.8 km UTM tiles of 42 x 42 chips of 2.56 km (the
   100 km MGRS-like grid of UTM zones 29-37, 36-60 N: Europe), chip polygons projected from
   UTM to lon/lat, each tile revisited on random dates over four years, cloud fractions
   drawn per item and chip, some nodata. Default 5,670 items, 10,001,880 chips. Geometry is
   computed once per tile, so generation is vectorised and needs no per-chip Python loop;
2. compacts it with :func:`stacchip.catalog.compact` (seconds, peak RSS, bytes, files);
3. runs the same bbox + time + cloud query (about 0.1 % of the rows), each case in a
   fresh process with the OS page cache of the files it reads dropped first
   (``posix_fadvise(DONTNEED)`` on this benchmark's own files only), so every read is cold,
   ``--repeats`` times (median reported; the machine is shared, so single runs are noisy):

   * ``compacted``: :func:`stacchip.index.query` on the compacted root (manifest, files and
     row groups pruned by their extents);
   * ``full scan, compacted files``: every part file read whole, then the same filters;
   * ``full scan, per-item files``: :func:`stacchip.index.query` over the per-item files
     (what the index directory offers without compaction: every file opened);

   and checks the three return the same chips;
4. runs ``geoparquet-validator check`` on the compacted files and reads them with DuckDB
   and geopandas (``bbox=``).

Other processes on the machine are reported (load average) next to the figures.
Run once; the catalog is reused from the cache by later runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent

CHIPS = 42  # chips per tile side
CHIP_M = 2560.0  # 256 px at 10 m
TILE_STEP = 100_000.0  # MGRS-like tile origins every 100 km; tiles are 42 * 2.56 = 107.5 km (S2: 109.8 km)
ZONES = range(29, 38)  # UTM zones 29-37 N: 12 W - 42 E
LAT_RANGE = (36.0, 60.0)
YEARS = (2021, 2022, 2023, 2024)
PLATFORM = "sentinel-2-l2a"
QUERY = {"bbox": (9.0, 46.0, 12.0, 49.0), "start": "2022-01-01", "end": "2022-12-31", "max_cloud": 0.5}


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- the catalog


def utm_tiles() -> list[tuple[int, float, float]]:
    """``(zone, easting, northing)`` of the upper-left corners of the tiles over the region."""
    import numpy as np
    import pyproj

    tiles = []
    for zone in ZONES:
        to_ll = pyproj.Transformer.from_crs(32600 + zone, 4326, always_xy=True)
        to_utm = pyproj.Transformer.from_crs(4326, 32600 + zone, always_xy=True)
        _, n_lo = to_utm.transform(zone * 6 - 183, LAT_RANGE[0])
        _, n_hi = to_utm.transform(zone * 6 - 183, LAT_RANGE[1])
        es = np.arange(100_000.0, 900_000.0, TILE_STEP)
        ns = np.arange(np.floor(n_lo / TILE_STEP) * TILE_STEP, n_hi, TILE_STEP) + CHIPS * CHIP_M
        e, n = (a.ravel() for a in np.meshgrid(es, ns))
        lon, lat = to_ll.transform(e + CHIPS * CHIP_M / 2, n - CHIPS * CHIP_M / 2)
        lon0 = zone * 6 - 186
        keep = (lon >= lon0) & (lon < lon0 + 6) & (lat >= LAT_RANGE[0]) & (lat <= LAT_RANGE[1])
        tiles += [(zone, float(a), float(b)) for a, b in zip(e[keep], n[keep])]
    return tiles


@functools.lru_cache(maxsize=None)
def _to_lonlat(zone: int) -> Any:
    import pyproj

    return pyproj.Transformer.from_crs(32600 + zone, 4326, always_xy=True)


def tile_polygons(zone: int, e0: float, n0: float) -> Any:
    """The 42 x 42 chip polygons of a tile in lon/lat (row-major: x fastest), one pyproj call."""
    import numpy as np
    import shapely

    i = np.arange(CHIPS + 1)
    ex, ny = np.meshgrid(e0 + i * CHIP_M, n0 - i * CHIP_M)
    lon, lat = _to_lonlat(zone).transform(ex, ny)
    corners = np.stack([lon, lat], axis=-1)  # (43, 43, 2), [row, col]
    ring = np.stack([corners[:-1, :-1], corners[1:, :-1], corners[1:, 1:], corners[:-1, 1:], corners[:-1, :-1]], axis=2)
    return shapely.polygons(ring.reshape(CHIPS * CHIPS, 5, 2))


def generate(root: Path, n_items: int, seed: int = 0) -> dict[str, Any]:
    """Write ``n_items`` per-item index files under ``root/index``; returns counts and seconds.

    Files are what :func:`stacchip.index.write_index` writes (the first item of every tile
    goes through it and :func:`~stacchip.index.index_table`); the tile's other items reuse
    its geometry, bbox column and ``geo`` metadata (the same for every date of a tile) and
    are written with the same Parquet settings, without the per-file fsync.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from stacchip.index import SCHEMA, STACCHIP_METADATA_KEY, index_table, to_storage, write_index

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    tiles = utm_tiles()
    per_tile = np.full(len(tiles), n_items // len(tiles))
    per_tile[rng.choice(len(tiles), n_items - per_tile.sum(), replace=False)] += 1
    xs, ys = (a.ravel() for a in np.meshgrid(np.arange(CHIPS), np.arange(CHIPS)))
    suffix = np.strings.add(np.strings.add("-", xs.astype(np.str_)), np.strings.add("-", ys.astype(np.str_)))
    first = dt.datetime(YEARS[0], 1, 1, tzinfo=dt.timezone.utc)
    days = (dt.datetime(YEARS[-1] + 1, 1, 1, tzinfo=dt.timezone.utc) - first).days
    rows = 0
    seen: set[str] = set()
    for (zone, e0, n0), count in tqdm(list(zip(tiles, per_tile)), desc="tiles", unit="tile", disable=None):
        if not count:
            continue
        polygons = tile_polygons(zone, e0, n0)
        tile = f"{zone}{chr(ord('S') + int((n0 - 4_000_000) // 800_000))}{int(e0 // 100_000)}{int(n0 // 100_000) % 100:02d}"
        template = None
        for day in np.sort(rng.choice(days, count, replace=False)):
            when = first + dt.timedelta(days=int(day), minutes=600 + int(rng.integers(0, 60)))
            item_id = f"S2{'AB'[int(day) % 2]}_{tile}_{when:%Y%m%d}_0_L2A"
            assert item_id not in seen, item_id
            seen.add(item_id)
            scene = rng.beta(0.5, 0.7)  # scene cloudiness, then chips around it
            cloud = np.clip(scene + rng.normal(0, 0.15, len(xs)), 0, 1).astype(np.float32)
            nodata = np.zeros(len(xs), np.float32)
            if rng.random() < 0.3:  # swath edge: a band of chips partly without data
                edge = int(rng.integers(0, CHIPS))
                nodata[xs >= edge] = rng.uniform(0, 0.5, int((xs >= edge).sum()))
            meta = {"item_id": item_id, "platform": PLATFORM, "chip_size": 256,
                    "item_href": str(root / PLATFORM / item_id / "stac_item.json")}
            path = root / "index" / PLATFORM / item_id / f"index_{item_id}.parquet"
            if template is None:
                table = index_table(item_id=item_id, platform=PLATFORM, datetime=when, chip_size=256,
                                    xs=xs, ys=ys, cloud=cloud, nodata=nodata, polygons=polygons)
                write_index(table, path, extra_metadata=meta)
                template = pq.read_table(path)
                geo = template.schema.metadata[b"geo"]
            else:
                micros = int((when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds() * 1e6)
                n = len(xs)
                table = template.set_column(0, "chipid", pa.array(np.strings.add(item_id, suffix), pa.string()))
                for name, values in (
                    ("date", pa.array(np.full(n, (when.date() - dt.date(1970, 1, 1)).days, np.int32), pa.date32())),
                    ("cloud_cover_percentage", pa.array(cloud)), ("nodata_percentage", pa.array(nodata)),
                    ("item_id", pa.array(np.full(n, item_id), pa.string())),
                    ("datetime", pa.array(np.full(n, micros, np.int64), pa.timestamp("us", tz="UTC"))),
                ):
                    table = table.set_column(table.schema.get_field_index(name), name, values)
                table = to_storage(table).replace_schema_metadata(
                    {b"geo": geo, STACCHIP_METADATA_KEY: json.dumps(meta).encode()})
                assert table.schema.equals(SCHEMA, check_metadata=False)
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path, compression="zstd", write_statistics=True)
            rows += table.num_rows
    return {"tiles": len(tiles), "items": int(per_tile.sum()), "rows": rows, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- workers
# Each runs in its own process and prints one JSON line.


def _drop_cache(root: Path) -> int:
    """Evict this benchmark's own files under ``root`` from the page cache; returns bytes."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def w_compact(index: str, dest: str) -> dict[str, Any]:
    from stacchip.catalog import compact

    t0 = time.perf_counter()
    result = compact(index, dest, rebuild=True)
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb(), "rows": result.rows,
            "files": result.files, "bytes": result.bytes}


def _summary(table: Any, t_import: float, t0: float) -> dict[str, Any]:
    ids = sorted(table.column("chipid").to_pylist())
    import hashlib

    return {"seconds": time.perf_counter() - t0, "imports": t_import, "rows": table.num_rows,
            "digest": hashlib.sha1("\n".join(ids).encode()).hexdigest(), "rss_mb": _rss_mb()}


def w_query_compacted(dest: str, started: float) -> dict[str, Any]:
    t_import0 = time.perf_counter()
    import pyarrow.compute  # noqa: F401  (imports are timed apart from the query, alike in every case)
    import pyarrow.dataset  # noqa: F401
    import shapely  # noqa: F401
    from stacchip.catalog import manifest as mf
    from stacchip.index import query

    t0 = time.perf_counter()
    table = query(dest, **QUERY)
    out = _summary(table, t0 - t_import0, t0)
    manifest = mf.load(f"{dest}/_manifest.json")
    plan = mf.plan(manifest, **QUERY)
    out["files_read"] = len(plan)
    out["row_groups_read"] = sum(len(g) for _, g in plan)
    out["rows_read"] = sum(
        f["row_groups"][i]["rows"] for part in manifest["partitions"].values() for f in part["files"]
        for path, groups in plan if path == f["path"] for i in groups
    )
    out["files"] = sum(len(p["files"]) for p in manifest["partitions"].values())
    out["row_groups"] = sum(len(f["row_groups"]) for p in manifest["partitions"].values() for f in p["files"])
    t1 = time.perf_counter()
    query(dest, **QUERY)
    out["warm_seconds"] = time.perf_counter() - t1
    out["process_seconds"] = time.time() - started
    return out


def w_scan_compacted(dest: str, started: float) -> dict[str, Any]:
    t_import0 = time.perf_counter()
    import pyarrow.compute  # noqa: F401  (imports are timed apart from the query, alike in every case)
    import pyarrow.dataset  # noqa: F401
    import shapely  # noqa: F401
    import pyarrow.dataset as pads

    from stacchip.index import open_index, query

    t0 = time.perf_counter()
    whole = open_index(dest).to_table()  # every part file, whole
    table = query(pads.dataset(whole), **QUERY)
    out = _summary(table, t0 - t_import0, t0)
    out["rows_read"] = whole.num_rows
    out["process_seconds"] = time.time() - started
    return out


def w_scan_items(index: str, started: float) -> dict[str, Any]:
    t_import0 = time.perf_counter()
    import pyarrow.compute  # noqa: F401  (imports are timed apart from the query, alike in every case)
    import pyarrow.dataset  # noqa: F401
    import shapely  # noqa: F401
    from stacchip.index import query

    t0 = time.perf_counter()
    table = query(index, **QUERY)
    out = _summary(table, t0 - t_import0, t0)
    out["process_seconds"] = time.time() - started
    return out


WORKERS = {f.__name__: f for f in (w_compact, w_query_compacted, w_scan_compacted, w_scan_items)}


def run_worker(name: str, drop: list[str] | None = None, timeout: float = 3600, **kwargs: Any) -> dict[str, Any]:
    for root in drop or []:
        _drop_cache(Path(root))
    if name != "w_compact":
        kwargs["started"] = time.time()
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.catalog_bench", "--worker", name, "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- other readers


def validate(dest: Path) -> dict[str, Any]:
    exe = shutil.which("geoparquet-validator")
    if exe is None:
        return {"skipped": "geoparquet-validator not installed (pip install geoparquet-validator)"}
    t0 = time.perf_counter()
    proc = subprocess.run([exe, "check", "--max-files", "1000", str(dest)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "fails": [ln for ln in lines if "FAIL" in ln], "summary": (proc.stderr.strip().splitlines() or [""])[-1],
            "files": [ln.split("  ", 1)[1] if "  " in ln else ln for ln in lines[:3]] + (["..."] if len(lines) > 3 else [])}


def validate_detail(path: Path) -> str:
    exe = shutil.which("geoparquet-validator")
    if exe is None:
        return ""
    proc = subprocess.run([exe, "check", str(path)], capture_output=True, text=True)
    return proc.stdout


def other_readers(dest: Path) -> dict[str, Any]:
    import duckdb
    import geopandas as gpd

    x0, y0, x1, y1 = QUERY["bbox"]
    t0 = time.perf_counter()
    n = duckdb.sql(
        f"select count(*) from read_parquet('{dest}/**/*.parquet') where bbox.xmin <= {x1} and bbox.xmax >= {x0} "
        f"and bbox.ymin <= {y1} and bbox.ymax >= {y0} and year = 2022 and cloud_cover_percentage <= 0.5"
    ).fetchall()[0][0]
    t1 = time.perf_counter()
    part = next(p for p in sorted(dest.glob("*/year=2022")))
    gdf = gpd.read_parquet(part, bbox=QUERY["bbox"], columns=["chipid", "geometry", "cloud_cover_percentage"])
    t2 = time.perf_counter()
    return {"duckdb_rows": int(n), "duckdb_seconds": t1 - t0, "geopandas_rows": len(gdf), "geopandas_seconds": t2 - t1}


# --------------------------------------------------------------------------- report


def _fmt(result: dict[str, Any]) -> str:
    return "/".join(f"{v:.2f}" for v in result["all_seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(HERE / ".cache" / "catalog"), help="catalog cache directory")
    parser.add_argument("--items", type=int, default=5670, help="items (1764 chips each; default 5670 = 10.0 M chips)")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="cold runs per query case (median)")
    args = parse_with_worker(parser, argv)
    if args.worker:
        return serve_worker(WORKERS, args)

    cache = Path(args.cache).resolve()
    root = cache / f"items-{args.items}"
    marker = root / "catalog.json"
    if marker.exists():
        built = json.loads(marker.read_text())
        print(f"catalog: {built['items']} items, {built['rows']:,} chips on {built['tiles']} tiles (cached, {root})")
    else:
        shutil.rmtree(root, ignore_errors=True)
        built = generate(root, args.items)
        marker.write_text(json.dumps(built))
        print(f"catalog: {built['items']} items, {built['rows']:,} chips on {built['tiles']} tiles, "
              f"generated in {built['seconds']:.0f} s ({built['rows'] / built['seconds']:,.0f} rows/s)")
    index, dest = root / "index", root / "compacted"
    index_bytes = sum(p.stat().st_size for p in index.rglob("*.parquet"))
    print(f"per-item files: {built['items']} files, {index_bytes / 1e9:.2f} GB")
    print(f"load average: {', '.join(f'{v:.1f}' for v in os.getloadavg())} (2 cores shared)")

    results: dict[str, Any] = {"catalog": built, "index_bytes": index_bytes, "query": QUERY}
    results["compact"] = c = run_worker("w_compact", drop=[str(index)], index=str(index), dest=str(dest))
    print(f"compact:  {c['seconds']:.1f} s, peak RSS {c['rss_mb']:.0f} MB -> {c['files']} files, "
          f"{c['bytes'] / 1e9:.2f} GB ({c['rows']:,} rows)")

    def median(name: str, root: Path, **kwargs: Any) -> dict[str, Any]:
        runs = sorted((run_worker(name, drop=[str(root)], **kwargs) for _ in range(args.repeats)),
                      key=lambda r: r["seconds"])
        return {**runs[len(runs) // 2], "all_seconds": [r["seconds"] for r in runs]}

    q = median("w_query_compacted", dest, dest=str(dest))
    s = median("w_scan_compacted", dest, dest=str(dest))
    i = median("w_scan_items", index, index=str(index))
    results.update(query_compacted=q, scan_compacted=s, scan_items=i)
    same = q["digest"] == s["digest"] == i["digest"]
    frac = q["rows"] / built["rows"]
    print(f"query {QUERY}: {q['rows']:,} rows ({frac:.3%} of all); same chips in all three: {same}")
    print(f"cold runs, median of {args.repeats} (all: compacted {_fmt(q)}, full compacted {_fmt(s)}, "
          f"per-item {_fmt(i)})")
    print(f"  compacted (cold):          {q['seconds']:.3f} s  (+{q['imports']:.2f} s imports; process "
          f"{q['process_seconds']:.2f} s; warm {q['warm_seconds']:.3f} s); read {q['files_read']}/{q['files']} files, "
          f"{q['row_groups_read']}/{q['row_groups']} row groups, {q['rows_read']:,} rows")
    print(f"  full scan, compacted files: {s['seconds']:.3f} s  ({s['rows_read']:,} rows read)  "
          f"ratio {s['seconds'] / q['seconds']:.0f}x")
    print(f"  full scan, per-item files:  {i['seconds']:.3f} s  ({built['items']} files)  "
          f"ratio {i['seconds'] / q['seconds']:.0f}x")

    v = validate(dest)
    results["validator"] = v
    if "skipped" in v:
        print(f"validator: {v['skipped']}")
    else:
        print(f"validator: exit {v['returncode']}, {v['summary']}, {len(v['fails'])} FAIL lines, {v['seconds']:.1f} s")
        for line in v["files"]:
            print(f"  {line}")
        biggest = max(dest.rglob("*.parquet"), key=lambda p: p.stat().st_size)
        detail = validate_detail(biggest)
        results["validator_detail"] = detail
        print("\n".join("  " + ln for ln in detail.splitlines() if "distribution" in ln or "spatial" in ln
                        or "=>" in ln))
    o = other_readers(dest)
    results["readers"] = o
    print(f"duckdb: {o['duckdb_rows']:,} rows (bbox struct + year + cloud, before exact intersection) in "
          f"{o['duckdb_seconds']:.2f} s; geopandas bbox= on one partition: {o['geopandas_rows']:,} rows in "
          f"{o['geopandas_seconds']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
