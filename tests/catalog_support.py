"""Shared builders of the catalog tests: per-item index files in the bucket layout, the
36 + 2 items of the compaction tests, snapshots of a compacted destination."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import json

from stacchip.index import SCHEMA, index_table, write_index

RG = 20  # rows per row group in these tests
FILE_ROWS = 100
S2, LS = "sentinel-2-l2a", "landsat-c2l2-sr"
UTC = dt.timezone.utc


def write_item(root, item_id, platform, when, lon0, lat0, *, n=5, step=0.05, seed=0, href=True,
               extra=None, antimeridian=False):
    """One per-item index file in the bucket layout: n x n chips of ``step`` degrees from (lon0, lat0)."""
    rng = np.random.default_rng(seed)
    xs, ys = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n)))
    polys = shapely.box(lon0 + xs * step, lat0 - (ys + 1) * step, lon0 + (xs + 1) * step, lat0 - ys * step)
    if antimeridian:  # the last chip straddles 180 degrees: corners at +-179.99 (a box wider than 180)
        polys[-1] = shapely.Polygon([(179.99, lat0 - step), (-179.99, lat0 - step), (-179.99, lat0), (179.99, lat0)])
    table = index_table(
        item_id=item_id, platform=platform, datetime=when, chip_size=256, xs=xs, ys=ys,
        cloud=rng.random(n * n).astype(np.float32), nodata=(rng.random(n * n) * 0.4).astype(np.float32),
        polygons=polys,
    )
    for name, value in (extra or {}).items():
        table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
    meta = {"item_id": item_id}
    if href:
        meta["item_href"] = f"/data/{platform}/{item_id}/stac_item.json"
    path = root / "index" / platform / item_id / f"index_{item_id}.parquet"
    write_index(table, path, extra_metadata=meta)
    return path


def item_specs():
    """36 items: 12 tiles x 3 years, two platforms, plus two items at the antimeridian."""
    specs = []
    for k in range(12):
        lon0, lat0 = -10 + (k % 4) * 3.0, 40 + (k // 4) * 3.0
        for year in (2021, 2022, 2023):
            platform = LS if k % 3 == 0 else S2
            when = dt.datetime(year, 1 + (k * 5 + year) % 12, 1 + k, 10, 30, tzinfo=UTC)
            specs.append(dict(item_id=f"T{k:02d}-{year}", platform=platform, when=when, lon0=lon0, lat0=lat0,
                              seed=k * 10 + year, href=k % 4 != 3))
    specs.append(dict(item_id="AM-E", platform=S2, when=dt.datetime(2022, 6, 1, tzinfo=UTC), lon0=179.74,
                      lat0=1.0, seed=1, antimeridian=True))
    specs.append(dict(item_id="AM-W", platform=S2, when=dt.datetime(2022, 6, 2, tzinfo=UTC), lon0=-179.99,
                      lat0=1.0, seed=2))
    return specs


def build(root, specs):
    return [write_item(root, s.pop("item_id"), s.pop("platform"), s.pop("when"), s.pop("lon0"), s.pop("lat0"), **s)
            for s in (dict(x) for x in specs)]


def tmp_root(dest):
    return dest.parent


def manifest_of(dest):
    return json.loads((dest / "_manifest.json").read_text())


def part_files(dest):
    return sorted(p for p in dest.rglob("*.parquet"))


def snapshot(dest):
    return {str(p.relative_to(dest)): (p.stat().st_mtime_ns, p.read_bytes()) for p in part_files(dest)}


def by_chip(table):
    return table.select(SCHEMA.names).sort_by("chipid")


def all_rows(dest):
    return pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in part_files(dest)])


def damage_data_page(path, column: str = "geometry") -> None:
    """Scramble bytes inside a column chunk's first data page; the footer stays intact."""
    md = pq.read_metadata(path)
    index = [md.schema.column(i).path for i in range(md.num_columns)].index(column)
    chunk = md.row_group(0).column(index)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset + 2
    for i in range(start, start + min(64, chunk.total_compressed_size - 4)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    pq.read_metadata(path)  # the footer still reads
