"""Part files of a compacted index: partition keys, the sort key, GeoParquet bytes of one part
file with its manifest entry, and cutting a sorted stream into part files and row groups.

Every engine (:mod:`stacchip.catalog.engine_duckdb`, :mod:`stacchip.catalog.engine_dask`)
orders a partition's rows by :data:`SORT_KEY` and hands the sorted rows to :func:`part_bytes`
``file_rows`` rows at a time, so the files and row groups they write hold the same rows in
the same order whatever the engine.
"""

from __future__ import annotations

import io
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from stacchip import compacted as mf
from stacchip import storage
from stacchip.catalog.hilbert import DEFAULT_ORDER, lonlat_hilbert
from stacchip.errors import IndexFileError

#: Column holding a row's Hilbert position while it is sorted (never written).
KEY_COLUMN = "_stacchip_hilbert"
#: Row order within a run of a partition: Hilbert position of the chip centre, then time,
#: then chip id (unique within a partition), so the order is total and the same everywhere.
SORT_KEY = (KEY_COLUMN, "datetime", "chipid")

PART_RE = re.compile(r"^[^/._][^/]*/year=-?\d+/part-[0-9A-Za-z]+-\d{5}\.parquet$")


def partition_key(platform: str, year: int) -> str:
    """``{platform}/year={year}``: the platform URI-escaped (no ``/`` left), a leading ``.`` or ``_``
    escaped too (readers skip such directories), the year as Hive partitioning writes it.

    The platform is a plain directory, not ``platform=...``: a Hive key named like a column
    the files hold makes pyarrow's (and so geopandas') directory discovery fail.
    """
    text = urllib.parse.quote(str(platform), safe="")
    if not text:
        raise IndexFileError("rows with an empty platform cannot be partitioned")
    if text[0] in "._":
        text = f"%{ord(text[0]):02X}{text[1:]}"
    return f"{text}/year={int(year)}"


def part_name(key: str, run: str, n: int) -> str:
    """The path of part file ``n`` of ``run`` in partition ``key``, relative to the index root."""
    return f"{key}/part-{run}-{n:05d}.parquet"


def hilbert_keys(table: pa.Table, order: int = DEFAULT_ORDER) -> np.ndarray:
    """Hilbert positions (uint64) of the rows' chip centres (:func:`~stacchip.encodings.bbox_centres`
    of the ``bbox`` column: boxes wider than 180 degrees straddle the antimeridian)."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.uint64)
    box = table.column("bbox")
    box = box.combine_chunks() if isinstance(box, pa.ChunkedArray) else box
    xmin, ymin, xmax, ymax = (np.asarray(box.field(i).to_numpy(zero_copy_only=False), dtype=np.float64)
                              for i in range(4))
    lon = (xmin + xmax) * 0.5
    lat = (ymin + ymax) * 0.5
    wrap = (xmax - xmin) > 180
    if wrap.any():
        lon = np.where(wrap, (lon + 360.0) % 360.0 - 180.0, lon)
    return lonlat_hilbert(lon, lat, order)


def with_key(table: pa.Table, order: int = DEFAULT_ORDER) -> pa.Table:
    """``table`` with its Hilbert positions appended as :data:`KEY_COLUMN`."""
    keys = hilbert_keys(table, order)
    return table.append_column(pa.field(KEY_COLUMN, pa.uint64(), nullable=False), pa.array(keys, pa.uint64()))


def sort_order(table: pa.Table, order: int = DEFAULT_ORDER) -> np.ndarray:
    """Indices putting ``table``'s rows in :data:`SORT_KEY` order (what every engine yields)."""
    import pyarrow.compute as pc

    keyed = pa.table({KEY_COLUMN: pa.array(hilbert_keys(table, order), pa.uint64()),
                      "datetime": table.column("datetime"), "chipid": table.column("chipid")})
    return pc.sort_indices(keyed, sort_keys=[(k, "ascending") for k in SORT_KEY]).to_numpy()


# --- one part file -------------------------------------------------------------------------


def _stats_extent(md: Any, group: int, cols: Mapping[str, int]) -> dict[str, Any]:
    rg = md.row_group(group)

    def rng(name: str, raw: bool = False) -> tuple[Any, Any] | None:
        stats = rg.column(cols[name]).statistics
        if stats is None or not stats.has_min_max:
            return None
        return (stats.min_raw, stats.max_raw) if raw else (stats.min, stats.max)

    xmin, ymin, xmax, ymax = (rng(f"bbox.{n}") for n in ("xmin", "ymin", "xmax", "ymax"))
    when = rng("datetime", raw=True)
    cloud, nodata = rng("cloud_cover_percentage"), rng("nodata_percentage")
    bbox = None
    if xmin is not None and ymin is not None and xmax is not None and ymax is not None:
        bbox = [xmin[0], ymin[0], xmax[1], ymax[1]]
    return {
        "rows": rg.num_rows,
        "bbox": bbox,
        "datetime": [mf.iso_from_micros(when[0]), mf.iso_from_micros(when[1])] if when else None,
        "cloud": [float(cloud[0]), float(cloud[1])] if cloud else None,
        "nodata": [float(nodata[0]), float(nodata[1])] if nodata else None,
    }


def merge_extents(entries: Iterable[Mapping[str, Any]]) -> tuple[list[float] | None, list[str] | None]:
    """bbox and datetime extents over manifest entries (row groups, files, partitions)."""
    entries = list(entries)
    boxes = [e["bbox"] for e in entries if e.get("bbox")]
    times = [e["datetime"] for e in entries if e.get("datetime")]
    bbox = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
            if boxes else None)
    when = ([min(t[0] for t in times), max(t[1] for t in times)] if times else None)  # ISO Z strings sort in time order
    return bbox, when


def column_encodings(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """Parquet encodings of a part file's columns: ``(dictionary, byte_stream_split)`` column paths.

    Floating-point columns (the bbox covering, cloud and nodata fractions) are nearly all
    distinct values: a dictionary only grows until the writer gives it up, while
    BYTE_STREAM_SPLIT lets zstd see their exponent bytes together (a third smaller, and
    faster to decode, which is what a query reads first). The geometry (distinct WKB) is
    plain; ids, names, dates and sizes repeat and stay dictionary-encoded. Every Parquet
    reader in use (Arrow, DuckDB, GDAL, polars) reads both encodings.
    """
    dictionary: list[str] = []
    split: list[str] = []

    def walk(prefix: str, field: pa.Field) -> None:
        path = f"{prefix}{field.name}"
        if pa.types.is_struct(field.type):
            for child in field.type:
                walk(f"{path}.", child)
        elif pa.types.is_floating(field.type):
            split.append(path)
        elif not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
            dictionary.append(path)

    for field in schema:
        walk("", field)
    return dictionary, split


def part_bytes(table: pa.Table, row_group_rows: int, meta: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """GeoParquet bytes of one part file (row groups of ``row_group_rows`` rows, zstd, statistics,
    ``geo`` metadata with the bbox covering) and its manifest entry (extents from its own
    statistics)."""
    import pyarrow.parquet as pq

    from stacchip.index import geo_metadata
    from stacchip.schema import STACCHIP_METADATA_KEY

    metadata = dict(table.schema.metadata or {})
    metadata[b"geo"] = json.dumps(geo_metadata(table)).encode()
    metadata[STACCHIP_METADATA_KEY] = json.dumps(dict(meta)).encode()
    table = table.replace_schema_metadata(metadata)
    sink = io.BytesIO()
    dictionary, split = column_encodings(table.schema)
    pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd", write_statistics=True,
                   use_dictionary=dictionary, use_byte_stream_split=split)
    data = sink.getvalue()
    md = pq.read_metadata(pa.BufferReader(data))
    cols = {md.schema.column(i).path: i for i in range(len(md.schema))}
    groups = [_stats_extent(md, g, cols) for g in range(md.num_row_groups)]
    bbox, when = merge_extents(groups)
    return data, {"rows": md.num_rows, "bytes": len(data), "bbox": bbox, "datetime": when, "row_groups": groups}


def file_tables(batches: Iterable[pa.RecordBatch], schema: pa.Schema, file_rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``file_rows`` rows (the last one fewer) of a sorted stream of batches,
    in ``schema`` (columns and types; the sort key column dropped)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if KEY_COLUMN in batch.schema.names:
            batch = batch.drop_columns([KEY_COLUMN])
        while batch.num_rows:
            take = min(batch.num_rows, file_rows - count)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == file_rows:
                yield _table(pending, schema)
                pending, count = [], 0
    if count:
        yield _table(pending, schema)


def _table(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Table:
    table = pa.Table.from_batches(batches) if batches else schema.empty_table()
    if not table.schema.equals(schema, check_metadata=False):
        table = table.select(schema.names).cast(schema)
    return table


# --- writing a run's part files ---------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """Where and how a run writes part files: the index root, the run id, rows per row group
    and per file, the Hilbert order (bits per axis)."""

    dest: str
    run: str
    row_group_rows: int
    file_rows: int
    order: int = DEFAULT_ORDER

    def staged(self, rel: str) -> str:
        """Where this run stages the part file ``rel``."""
        return storage.join(self.dest, mf.STAGING_DIR, self.run, mf.staged_name(rel))


def write_part(output: Output, key: str, n: int, table: pa.Table) -> dict[str, Any]:
    """Write part file ``n`` of partition ``key`` (sorted rows) to the staging area; returns its
    manifest entry (``path`` relative to the root, where it goes once committed)."""
    rel = part_name(key, output.run, n)
    data, entry = part_bytes(table, output.row_group_rows, {"compacted": {"partition": key, "run": output.run}})
    storage.write_bytes(output.staged(rel), data)
    return {"path": rel, "run": output.run, **entry}
