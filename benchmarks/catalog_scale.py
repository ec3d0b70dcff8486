"""Catalogs at corpus scale: compaction within a memory budget next to DuckDB doing the same sort,
the Dask engine against the embedded one, and fresh-process queries next to DuckDB, in one run.

One command (``python -m benchmarks.catalog_scale --chips 100000000 --cache DIR``):

1. builds (once, cached under ``DIR``) a synthetic catalog of per-item index files as
   ``stacchip index`` writes them: Sentinel-2-shaped items (109.8 km UTM tiles of 42 x 42 chips of
   2.56 km, chip polygons projected to lon/lat) on tiles over six regions of five continents
   (Europe, Africa, South America, North America, South Asia, Australia), revisited on random
   dates over three years (2022-2024), cloud and nodata per chip (rows only, no rasters);
2. compacts it with :func:`stacchip.catalog.compact` (the embedded DuckDB engine) within
   ``--memory`` (default 4 GiB) in a fresh process: seconds, peak RSS of that process;
3. has DuckDB do the same sort alone in a fresh process, with the same memory limit and threads:
   its own Parquet reader over the same per-item files, the same Hilbert key (computed in SQL;
   checked equal to stacchip's on a sample), ``ORDER BY`` platform, year, key, datetime, chip id,
   written partitioned by platform and year with zstd (``COPY ... PARTITION_BY``);
4. compacts the first ``--dask-chips`` chips (default 10^7) with the embedded engine and on a
   ``dask.distributed`` LocalCluster of 2 worker processes, and compares the two datasets file by
   file, row group by row group (the same rows in the same order);
5. runs selective queries (bbox + year + cloud, under 0.1 % of the rows) in fresh processes, the
   page cache of the files dropped first (``posix_fadvise(DONTNEED)`` on this benchmark's own
   files), whole process timed from before the interpreter starts: ``stacchip.index.query`` on the
   compacted index (an Arrow table of the chips whose polygon meets the box) next to DuckDB on the
   same files (``read_parquet('**/*.parquet')`` with the bbox/time/cloud predicate): rows as an
   Arrow table (the same result type), rows as Python tuples (``fetchall``), and a ``count(*)``;
   on the ``--dask-chips`` dataset and on the whole one; median of ``--repeats``.

The catalog stays in the cache (``--drop-catalog`` removes it at the end); compacted datasets and
DuckDB's output are removed after they are measured unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent
CHIPS = 42
CHIP_M = 2560.0
TILE_STEP = 100_000.0
ROWS_PER_ITEM = CHIPS * CHIPS
YEARS = (2022, 2023, 2024)
PLATFORM = "sentinel-2-l2a"
#: (name, UTM zones, latitude range): tiles are laid where their centre falls in the box.
REGIONS = [
    ("europe", range(29, 38), (36.0, 60.0)),
    ("africa", range(31, 38), (-30.0, 10.0)),
    ("south-america", range(18, 24), (-35.0, 5.0)),
    ("north-america", range(11, 18), (30.0, 50.0)),
    ("south-asia", range(43, 46), (10.0, 30.0)),
    ("australia", range(50, 56), (-38.0, -15.0)),
]
#: Selective queries: (name, filters); each must hit under 0.1 % of the rows. Two more are taken
#: from the data of the Dask-sized subset (a 1 x 1 degree box around one of its row groups).
QUERIES = [
    ("alps", {"bbox": (10.0, 46.0, 11.0, 47.0), "start": "2023-01-01", "end": "2023-12-31", "max_cloud": 0.5}),
    ("pampas", {"bbox": (-62.0, -34.0, -61.0, -33.0), "start": "2022-01-01", "end": "2022-12-31",
                "max_cloud": 0.3}),
]


def data_queries(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """Two queries where a compacted index holds rows: a 1 x 1 degree box around the middle row
    group of the first file of its two largest partitions, that partition's year, a cloud limit."""
    manifest = json.loads((root / "_manifest.json").read_text())
    parts = sorted(manifest["partitions"].values(), key=lambda p: -p["rows"])[:2]
    out = []
    for n, (part, cloud) in enumerate(zip(parts, (0.5, 0.3), strict=False)):
        groups = part["files"][0]["row_groups"]
        x0, y0, x1, y1 = groups[len(groups) // 2]["bbox"]
        cx, cy = round((x0 + x1) / 2, 2), round((y0 + y1) / 2, 2)
        out.append((f"subset-{n}", {"bbox": (cx - 0.5, cy - 0.5, cx + 0.5, cy + 0.5),
                                    "start": f"{part['year']}-01-01", "end": f"{part['year']}-12-31",
                                    "max_cloud": cloud}))
    return out
UTC = dt.timezone.utc


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _children_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# --------------------------------------------------------------------------- the catalog


def tiles() -> list[tuple[int, int, float, float]]:
    """``(epsg, zone, easting, northing)`` of the upper-left corners of the tiles of every region."""
    import numpy as np
    import pyproj

    out = []
    for _, zones, (lat0, lat1) in REGIONS:
        south = lat1 <= 0
        for zone in zones:
            epsg = (32700 if south else 32600) + zone
            to_ll = pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)
            to_utm = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
            _, n_lo = to_utm.transform(zone * 6 - 183, lat0)
            _, n_hi = to_utm.transform(zone * 6 - 183, lat1)
            es = np.arange(100_000.0, 900_000.0, TILE_STEP)
            ns = np.arange(np.floor(n_lo / TILE_STEP) * TILE_STEP, n_hi, TILE_STEP) + CHIPS * CHIP_M
            e, n = (a.ravel() for a in np.meshgrid(es, ns))
            lon, lat = to_ll.transform(e + CHIPS * CHIP_M / 2, n - CHIPS * CHIP_M / 2)
            lon_0 = zone * 6 - 186
            keep = (lon >= lon_0) & (lon < lon_0 + 6) & (lat >= lat0) & (lat <= lat1)
            out += [(epsg, zone, float(a), float(b)) for a, b in zip(e[keep], n[keep], strict=True)]
    return out


@functools.lru_cache(maxsize=None)
def _to_lonlat(epsg: int) -> Any:
    import pyproj

    return pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)


def tile_polygons(epsg: int, e0: float, n0: float) -> Any:
    """The 42 x 42 chip polygons of a tile in lon/lat (row-major: x fastest), one pyproj call."""
    import numpy as np
    import shapely

    i = np.arange(CHIPS + 1)
    ex, ny = np.meshgrid(e0 + i * CHIP_M, n0 - i * CHIP_M)
    lon, lat = _to_lonlat(epsg).transform(ex, ny)
    corners = np.stack([lon, lat], axis=-1)
    ring = np.stack([corners[:-1, :-1], corners[1:, :-1], corners[1:, 1:], corners[:-1, 1:], corners[:-1, :-1]],
                    axis=2)
    return shapely.polygons(ring.reshape(CHIPS * CHIPS, 5, 2))


def w_generate(root: str, items: int, shard: int, shards: int, seed: int = 0) -> dict[str, Any]:
    """Write the items of tiles ``shard::shards`` (of ``items`` over all tiles) under ``root/index``.

    The first item of a tile goes through :func:`stacchip.index.index_table` and
    :func:`~stacchip.index.write_index`; the tile's other items reuse its geometry, bbox column and
    ``geo`` metadata (the same for every date of a tile), written with the same Parquet settings.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stacchip.index import STACCHIP_METADATA_KEY, index_table, to_storage, write_index

    t0 = time.perf_counter()
    base = Path(root)
    rng = np.random.default_rng(seed)
    every = tiles()
    per_tile = np.full(len(every), items // len(every))
    per_tile[rng.choice(len(every), items - int(per_tile.sum()), replace=False)] += 1
    xs, ys = (a.ravel() for a in np.meshgrid(np.arange(CHIPS), np.arange(CHIPS)))
    suffix = np.strings.add(np.strings.add("-", xs.astype(np.str_)), np.strings.add("-", ys.astype(np.str_)))
    first = dt.datetime(YEARS[0], 1, 1, tzinfo=UTC)
    days = (dt.datetime(YEARS[-1] + 1, 1, 1, tzinfo=UTC) - first).days
    rows = 0
    for t, ((epsg, zone, e0, n0), count) in enumerate(zip(every, per_tile, strict=True)):
        if t % shards != shard or not count:
            continue
        tile_rng = np.random.default_rng([seed, t])
        polygons = tile_polygons(epsg, e0, n0)
        tile = f"{zone:02d}{'NS'[epsg // 100 % 10 == 7]}{int(e0 // 100_000)}{int(n0 // 100_000) % 100:02d}"
        template = None
        for day in np.sort(tile_rng.choice(days, int(count), replace=False)):
            when = first + dt.timedelta(days=int(day), minutes=600 + int(tile_rng.integers(0, 60)))
            item_id = f"S2{'AB'[int(day) % 2]}_{tile}_{when:%Y%m%d}_0_L2A"
            scene = tile_rng.beta(0.5, 0.7)
            cloud = np.clip(scene + tile_rng.normal(0, 0.15, len(xs)), 0, 1).astype(np.float32)
            nodata = np.zeros(len(xs), np.float32)
            if tile_rng.random() < 0.3:
                edge = int(tile_rng.integers(0, CHIPS))
                nodata[xs >= edge] = tile_rng.uniform(0, 0.5, int((xs >= edge).sum()))
            meta = {"item_id": item_id, "platform": PLATFORM, "chip_size": 256,
                    "item_href": str(base / PLATFORM / item_id / "stac_item.json")}
            path = base / "index" / PLATFORM / item_id / f"index_{item_id}.parquet"
            if template is None:
                table = index_table(item_id=item_id, platform=PLATFORM, datetime=when, chip_size=256,
                                    xs=xs, ys=ys, cloud=cloud, nodata=nodata, polygons=polygons)
                write_index(table, path, extra_metadata=meta)
                template = pq.read_table(path)
                geo = template.schema.metadata[b"geo"]
            else:
                micros = int((when - dt.datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1e6)
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
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path, compression="zstd", write_statistics=True)
            rows += table.num_rows
    return {"rows": rows, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- workers (fresh processes)


def _drop_cache(roots: list[str]) -> int:
    """Evict this benchmark's own files under ``roots`` from the page cache; returns bytes."""
    total = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    total += os.fstat(fd).st_size
                finally:
                    os.close(fd)
    return total


def w_compact(sources: list[str] | str, dest: str, memory: str, engine: str = "duckdb",
              workers: int = 2) -> dict[str, Any]:
    """Compact ``sources`` (paths, or a JSON file listing them) into ``dest`` with ``engine``."""
    from stacchip.catalog import compact

    if isinstance(sources, str):
        sources = json.loads(Path(sources).read_text())
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"memory": memory, "engine": engine}
    if engine == "dask":
        kw["workers"] = workers
    result = compact(sources, dest, rebuild=True, **kw)
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb(), "rows": result.rows, "files": result.files,
            "bytes": result.bytes, "children_rss_mb": _children_rss_mb()}


def hilbert_sql(lon: str, lat: str, order: int = 20) -> str:
    """A DuckDB SQL query fragment giving ``_k``, the Hilbert position of (lon, lat) degrees on a
    ``2**order`` grid -- the same integer :func:`stacchip.catalog.hilbert.lonlat_hilbert` gives."""
    n = 1 << order
    full = n - 1
    x = f"least(greatest(floor((((({lon}) + 180.0) % 360.0 + 360.0) % 360.0) / 360.0 * {n})::BIGINT, 0), {full})"
    y = f"least(greatest(floor((least(greatest({lat}, -90.0), 90.0) + 90.0) / 180.0 * {n})::BIGINT, 0), {full})"
    return x, y


def duckdb_keyed_sql(files: str, order: int = 20) -> str:
    """The rows of ``read_parquet(files)`` with ``_k`` (the Hilbert key, in SQL) and ``year``."""
    full = (1 << order) - 1
    lon = ("CASE WHEN bbox.xmax - bbox.xmin > 180 THEN ((bbox.xmin + bbox.xmax) / 2 + 360.0) % 360.0 - 180.0 "
           "ELSE (bbox.xmin + bbox.xmax) / 2 END")
    lat = "(bbox.ymin + bbox.ymax) / 2"
    x, y = hilbert_sql(lon, lat, order)
    sql = f"SELECT *, {x} AS _x0, {y} AS _y0, 0::UBIGINT AS _d0 FROM read_parquet({files})"
    for level, bit in enumerate(range(order - 1, -1, -1)):
        a, b = level, level + 1
        rx, ry = f"((_x{a} >> {bit}) & 1)", f"((_y{a} >> {bit}) & 1)"
        flip_x = f"CASE WHEN {rx} = 1 THEN {full} - _y{a} ELSE _y{a} END"
        flip_y = f"CASE WHEN {rx} = 1 THEN {full} - _x{a} ELSE _x{a} END"
        sql = (f"SELECT * EXCLUDE (_x{a}, _y{a}, _d{a}), "
               f"CASE WHEN {ry} = 0 THEN ({flip_x}) ELSE _x{a} END AS _x{b}, "
               f"CASE WHEN {ry} = 0 THEN ({flip_y}) ELSE _y{a} END AS _y{b}, "
               f"(_d{a} << 2) | (xor(3 * {rx}, {ry})::UBIGINT) AS _d{b} FROM ({sql})")
    return f"SELECT * EXCLUDE (_x{order}, _y{order}) RENAME (_d{order} AS _k), year(datetime) AS year FROM ({sql})"


def duckdb_sort_sql(files: str, out: str, platform: str, year: int, order: int = 20) -> str:
    """``COPY``: the rows of one partition (platform, year) of the per-item files sorted by Hilbert
    key, datetime, chip id (stacchip's order), written as zstd Parquet with 100k-row row groups."""
    keyed = duckdb_keyed_sql(files, order)
    when = (f"datetime >= TIMESTAMPTZ '{year}-01-01 00:00:00+00' AND "
            f"datetime < TIMESTAMPTZ '{year + 1}-01-01 00:00:00+00'")  # pruned by the files' statistics
    return (f"COPY (SELECT * EXCLUDE (_k, year) FROM ({keyed}) WHERE platform = '{platform}' AND {when} "
            f"ORDER BY _k, datetime, chipid) TO '{out}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 100000)")


def w_duckdb_sort(index: str, out: str, memory: str, threads: int, temp: str,
                  partitions: list[list[Any]]) -> dict[str, Any]:
    """DuckDB sorts the same partitions, one after the other (as stacchip does: the spill then
    holds one partition), reading the per-item files with its own Parquet reader."""
    import duckdb

    t0 = time.perf_counter()
    con = duckdb.connect(config={"memory_limit": memory, "threads": threads, "temp_directory": temp})
    con.execute("SET enable_progress_bar = false")
    con.execute("SET TimeZone = 'UTC'")
    for platform, year in partitions:
        target = Path(out, platform, f"year={year}")
        target.mkdir(parents=True, exist_ok=True)
        con.execute(duckdb_sort_sql(f"'{index}/**/*.parquet'", str(target / "part-0.parquet"), platform, year))
    seconds = time.perf_counter() - t0
    rows = con.sql(f"select count(*) from read_parquet('{out}/**/*.parquet')").fetchall()[0][0]
    return {"seconds": seconds, "rss_mb": _rss_mb(), "rows": int(rows)}


def w_check_key(index: str) -> dict[str, Any]:
    """DuckDB's SQL Hilbert key equals stacchip's on the rows of a few files."""
    import duckdb
    import numpy as np
    import pyarrow.parquet as pq

    from stacchip.catalog.parts import hilbert_keys

    files = sorted(str(p) for p in Path(index).rglob("*.parquet"))[:5]
    import pyarrow as pa

    con = duckdb.connect()
    got = con.sql(f"SELECT chipid, _k FROM ({duckdb_keyed_sql(str(files))}) ORDER BY chipid").fetchnumpy()

    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("chipid")
    want = hilbert_keys(table)
    return {"equal": bool(np.array_equal(np.asarray(got["_k"], dtype=np.uint64), want)), "rows": len(want)}


def w_compare(a: str, b: str) -> dict[str, Any]:
    """Two compacted datasets: the same partitions, part files, row groups and rows in the same order."""
    import pyarrow.parquet as pq

    ma = json.loads(Path(a, "_manifest.json").read_text())
    mb = json.loads(Path(b, "_manifest.json").read_text())
    if ma["partitions"].keys() != mb["partitions"].keys():
        return {"equal": False, "why": "partitions differ"}
    files = groups = rows = 0
    for key, part in ma["partitions"].items():
        other = mb["partitions"][key]["files"]
        if len(part["files"]) != len(other):
            return {"equal": False, "why": f"{key}: {len(part['files'])} files against {len(other)}"}
        for fa, fb in zip(part["files"], other, strict=True):
            pa_, pb_ = pq.ParquetFile(Path(a, fa["path"])), pq.ParquetFile(Path(b, fb["path"]))
            if pa_.metadata.num_row_groups != pb_.metadata.num_row_groups:
                return {"equal": False, "why": f"{fa['path']}: row groups differ"}
            for g in range(pa_.metadata.num_row_groups):
                ta, tb = pa_.read_row_group(g), pb_.read_row_group(g)
                if not ta.equals(tb):
                    return {"equal": False, "why": f"{fa['path']} row group {g} differs"}
                groups += 1
                rows += ta.num_rows
            files += 1
    return {"equal": True, "files": files, "row_groups": groups, "rows": rows}


QUERY_OURS = """
import sys, json, time
t0 = time.perf_counter()
from stacchip.index import query
table = query(sys.argv[1], **json.loads(sys.argv[2]))
import hashlib
print(json.dumps({"rows": table.num_rows, "seconds": time.perf_counter() - t0,
                  "digest": hashlib.sha1("\\n".join(sorted(table.column("chipid").to_pylist())).encode()).hexdigest()}))
"""

QUERY_DUCK = """
import sys, json, time
t0 = time.perf_counter()
import duckdb
root, filters, how = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
x0, y0, x1, y1 = filters["bbox"]
where = (f"bbox.xmin <= {x1} and bbox.xmax >= {x0} and bbox.ymin <= {y1} and bbox.ymax >= {y0} "
         f"and datetime >= '{filters['start']}'::TIMESTAMPTZ "
         f"and datetime < '{filters['end']}'::TIMESTAMPTZ + INTERVAL 1 DAY "
         f"and cloud_cover_percentage <= {filters['max_cloud']}")
what = "count(*)" if how == "count" else "*"
rel = duckdb.sql(f"select {what} from read_parquet('{root}/**/*.parquet') where {where}")
if how == "count":
    rows = rel.fetchall()[0][0]
elif how == "tuples":
    rows = len(rel.fetchall())
else:
    table = rel.fetch_arrow_table() if hasattr(rel, "fetch_arrow_table") else rel.arrow()
    rows = (table.read_all() if hasattr(table, "read_all") else table).num_rows
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}))
"""


def run_query(kind: str, root: str, filters: dict[str, Any], how: str = "") -> dict[str, Any]:
    """One query in a fresh interpreter, its files' page cache dropped; the whole process timed."""
    _drop_cache([root])
    script, args = (QUERY_OURS, [root, json.dumps(filters)]) if kind == "stacchip" else (
        QUERY_DUCK, [root, json.dumps(filters), how])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=HERE.parent,
                          timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {how} query failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = wall
    return out


WORKERS = {f.__name__: f for f in (w_generate, w_compact, w_duckdb_sort, w_check_key, w_compare)}


def run_worker(name: str, timeout: float = 24 * 3600, **kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.catalog_scale", "--worker", name,
           "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run


def _queries(root: str, total_rows: int, repeats: int,
             queries: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for name, filters in queries:
        cases: dict[str, list[dict[str, Any]]] = {"stacchip": [], "duckdb arrow": [], "duckdb tuples": [],
                                                  "duckdb count": []}
        for _ in range(repeats):  # interleaved, so load on the shared machine falls on all cases alike
            cases["stacchip"].append(run_query("stacchip", root, filters))
            for how in ("arrow", "tuples", "count"):
                cases[f"duckdb {how}"].append(run_query("duckdb", root, filters, how))
        summary = {k: {"median": statistics.median(r["process_seconds"] for r in v),
                       "all": [round(r["process_seconds"], 3) for r in v], "rows": v[0]["rows"]}
                   for k, v in cases.items()}
        summary["stacchip"]["fraction"] = summary["stacchip"]["rows"] / total_rows
        out.append({"name": name, "filters": filters, "cases": summary})
    return out


def _print_queries(label: str, results: list[dict[str, Any]]) -> None:
    for q in results:
        c = q["cases"]
        ours = c["stacchip"]["median"]
        print(f"  {label} query {q['name']} {q['filters']}: {c['stacchip']['rows']:,} chips "
              f"({c['stacchip']['fraction']:.4%} of the rows)")
        for case, r in c.items():
            ratio = "" if case == "stacchip" else f"  stacchip/this {ours / r['median']:.2f}x"
            print(f"    {case:14s} {r['median']:.3f} s (all {r['all']}; {r['rows']:,} rows){ratio}")


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one report, step by step
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(HERE / ".cache" / "catalog_scale"), help="catalog cache directory")
    parser.add_argument("--chips", type=float, default=1e8, help="chips in the catalog (default 1e8)")
    parser.add_argument("--dask-chips", type=float, default=1e7, help="chips of the Dask-against-embedded run")
    parser.add_argument("--memory", default="4GB", help="memory budget of the compactions (default 4GB)")
    parser.add_argument("--repeats", type=int, default=5, help="cold runs per query case (median)")
    parser.add_argument("--temp", default=None, help="spill directory (default: under --cache)")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the compacted datasets")
    parser.add_argument("--drop-catalog", action="store_true", help="remove the generated catalog at the end")
    parser.add_argument("--skip", default="",
                        help="comma-separated steps to skip: duckdb,dask,queries; compact reuses a kept dataset")
    args = parse_with_worker(parser, argv)
    if args.worker:
        return serve_worker(WORKERS, args)
    skip = set(filter(None, args.skip.split(",")))

    cache = Path(args.cache).resolve()
    items = int(round(args.chips / ROWS_PER_ITEM))
    root = cache / f"items-{items}"
    index = root / "index"
    temp = Path(args.temp or cache / "tmp")
    temp.mkdir(parents=True, exist_ok=True)
    os.environ["STACCHIP_TMPDIR"] = str(temp)
    results: dict[str, Any] = {"items": items, "memory": args.memory, "cpus": os.cpu_count()}
    marker = root / "catalog.json"
    if marker.exists():
        built = json.loads(marker.read_text())
        print(f"catalog: {items} items, {built['rows']:,} chips on {len(tiles())} tiles (cached, {root})")
    else:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        shards = 2
        procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-m", "benchmarks.catalog_scale", "--worker",
                                   "w_generate", "--args", json.dumps({"root": str(root), "items": items,
                                                                       "shard": s, "shards": shards})],
                                  stdout=subprocess.PIPE, text=True, cwd=HERE.parent) for s in range(shards)]
        parts = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        built = {"items": items, "rows": sum(p["rows"] for p in parts), "seconds": time.perf_counter() - t0}
        marker.write_text(json.dumps(built))
        print(f"catalog: {items} items, {built['rows']:,} chips on {len(tiles())} tiles, generated in "
              f"{built['seconds']:.0f} s")
    results["catalog"] = built
    index_bytes = sum(p.stat().st_size for p in index.rglob("*.parquet"))
    print(f"per-item files: {items} files, {index_bytes / 1e9:.2f} GB; years {YEARS[0]}-{YEARS[-1]}, "
          f"regions {', '.join(r[0] for r in REGIONS)}")
    print(f"machine: {os.cpu_count()} cores, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
          "(shared)")

    # --- compaction at full size, next to DuckDB's sort
    dest = root / "compacted"
    if "compact" in skip and (dest / "_manifest.json").exists():  # measured before (--keep): reused
        c = {"rows": json.loads((dest / "_manifest.json").read_text())["rows"]}
        print(f"compacted index reused from an earlier run: {dest}")
    else:
        shutil.rmtree(dest, ignore_errors=True)
        _drop_cache([str(index)])
        c = run_worker("w_compact", sources=[str(index)], dest=str(dest), memory=args.memory)
        results["compact"] = c
        print(f"compact (stacchip, DuckDB engine, budget {args.memory}): {c['seconds']:.0f} s, peak RSS "
              f"{c['rss_mb']:.0f} MB -> {c['files']} files, {c['bytes'] / 1e9:.2f} GB ({c['rows']:,} rows)")
    if "duckdb" not in skip and "compact" in results:
        check = run_worker("w_check_key", index=str(index))
        peer = root / "duckdb-sorted"
        shutil.rmtree(peer, ignore_errors=True)
        _drop_cache([str(index)])
        keys = [[p["platform"], p["year"]] for p in
                json.loads((dest / "_manifest.json").read_text())["partitions"].values()]
        d = run_worker("w_duckdb_sort", index=str(index), out=str(peer), memory=args.memory,
                       threads=os.cpu_count() or 2, temp=str(temp), partitions=keys)
        d["key_check"] = check
        results["duckdb_sort"] = d
        print(f"DuckDB sort alone (same files, same Hilbert key: equal on {check['rows']} rows: {check['equal']}; "
              f"memory_limit {args.memory}): {d['seconds']:.0f} s, peak RSS {d['rss_mb']:.0f} MB ({d['rows']:,} rows)"
              f"  stacchip/DuckDB {c['seconds'] / d['seconds']:.2f}x")
        shutil.rmtree(peer, ignore_errors=True)

    # --- Dask against the embedded engine
    sub_items = min(items, int(round(args.dask_chips / ROWS_PER_ITEM)))
    sources = sorted(str(p) for p in index.rglob("*.parquet"))[:sub_items]
    small, spread = root / "compacted-sub", root / "compacted-sub-dask"
    if "dask" not in skip:
        list_file = root / "dask-sources.json"
        list_file.write_text(json.dumps(sources))
        shutil.rmtree(small, ignore_errors=True)
        shutil.rmtree(spread, ignore_errors=True)
        e = run_worker("w_compact", sources=str(list_file), dest=str(small), memory=args.memory)
        k = run_worker("w_compact", sources=str(list_file), dest=str(spread), memory=args.memory, engine="dask",
                       workers=2)
        same = run_worker("w_compare", a=str(small), b=str(spread))
        results["dask"] = {"embedded": e, "dask": k, "compare": same}
        print(f"{e['rows']:,} chips: embedded {e['seconds']:.0f} s (peak RSS {e['rss_mb']:.0f} MB); Dask, 2 worker "
              f"processes: {k['seconds']:.0f} s; equal in content: {same['equal']} "
              f"({same.get('files')} files, {same.get('row_groups')} row groups, {same.get('rows', 0):,} rows)"
              + ("" if same["equal"] else f" -- {same['why']}"))

    # --- queries
    if "queries" not in skip:
        queries = list(QUERIES)
        if small.exists():
            queries = data_queries(small) + queries
            sub_rows = json.loads((small / "_manifest.json").read_text())["rows"]
            results["queries_sub"] = _queries(str(small), sub_rows, args.repeats, queries[:2])
            _print_queries(f"{sub_rows / 1e6:.0f}M", results["queries_sub"])
        results["queries"] = _queries(str(dest), c["rows"], args.repeats, queries)
        _print_queries(f"{c['rows'] / 1e6:.0f}M", results["queries"])

    if not args.keep:
        for path in (dest, small, spread):
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(temp, ignore_errors=True)
    if args.drop_catalog:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = results.get("dask", {}).get("compare", {}).get("equal", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
