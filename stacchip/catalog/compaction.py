"""Compaction: many per-item index files into one partitioned, curve-sorted GeoParquet dataset.

:func:`compact` reads per-item index files (``index/{platform}/{item_id}/index_{item_id}.parquet``,
or any index files, directories and ``s3://`` prefixes) and writes::

    {dest}/{platform}/year={year}/part-{run}-{n:05d}.parquet
    {dest}/_manifest.json                      (see stacchip.catalog.manifest)

``platform`` is the rows' ``platform`` (URI-escaped; see :func:`partition_key`) and
``year`` the UTC year of their ``datetime``. Within a partition, rows are sorted
along a Hilbert curve over their chip centres in lon/lat (then by ``datetime``), cut
into row groups of ``row_group_rows`` rows and part files of ``file_rows`` rows, so
each row group and each file covers a compact area and its ``bbox`` statistics let a
reader skip it. Files are GeoParquet 1.1 (WKB, OGC:CRS84, ``bbox`` covering), zstd,
with row-group statistics; every file and the manifest is written whole.

Re-runs (incremental). A source is skipped when the manifest already records it with
the same size and modification time (its rows are in the dataset); the part files of
the partitions kept are checked against the sizes the manifest records. Sources new or
changed since the last run are read; their items replace any earlier rows of the same
``item_id``. Then, per partition:

* partitions that receive nothing are left alone (their files are not rewritten);
* a partition receiving new items only, at most ``append_fraction`` of its rows and
  holding fewer than ``max_runs`` runs, gets new part files (a new sorted run) beside
  its existing ones, which are left unchanged;
* any other partition receiving or losing rows (items replaced, a large addition, too
  many runs, ``rewrite=True``, a damaged file) is rewritten whole: all its rows are
  re-sorted into new part files and the old files removed after the manifest is written.

Items never leave the dataset because a source is not given again: a run only adds and
replaces. ``rebuild=True`` compacts the given sources from scratch instead.

One compaction per destination at a time. Between writing a run's part files and its
manifest, a reader listing the directory itself (not through the manifest) can see both
old and new files; stacchip's readers go through the manifest and never do. Files a
crashed run left behind are removed by the next run.

Memory: one partition at a time is held, about 2.5x its Arrow size (~250 bytes a row).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import secrets
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from stacchip import storage
from stacchip import compacted as mf
from stacchip.catalog._io import FileEntry, arrow_filesystem, arrow_path, list_files, normalise, remove, under
from stacchip.catalog.hilbert import DEFAULT_ORDER, lonlat_hilbert
from stacchip.encodings import bbox_centres
from stacchip.errors import ConfigError, IndexFileError, StorageError, StorageNotFoundError

logger = logging.getLogger(__name__)

#: Rows per Parquet row group (the readers' unit of skipping): 50k-150k keeps a group's
#: bbox small while its column chunks stay large enough for object-store reads.
ROW_GROUP_ROWS = 100_000
#: Rows per part file (a multiple of ROW_GROUP_ROWS): ~100 MB files.
FILE_ROWS = 1_000_000
#: A partition's new rows up to this fraction of its rows are appended as a new run.
APPEND_FRACTION = 0.2
#: A partition with this many runs is rewritten (one run) when it next receives rows.
MAX_RUNS = 8
#: Threads reading source footers and item-layout checks.
THREADS = 8

PART_RE = re.compile(r"^[^/._][^/]*/year=-?\d+/part-[0-9A-Za-z]+-\d{5}\.parquet$")
_LAYOUT_RE = re.compile(r"^(?P<root>.*)/index/(?P<platform>[^/]+)/(?P<item>[^/]+)/index_(?P=item)\.parquet$")


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


@dataclass
class Source:
    """What one source index file holds (from its footer, or its rows when the footer cannot tell)."""

    entry: FileEntry
    rows: int = 0
    items: dict[str, str | None] = field(default_factory=dict)
    partitions: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (platform, year)
    native: bool = True  # stacchip's own schema: read with one dataset scan
    extra: list[pa.Field] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.entry.url

    def record(self) -> dict[str, Any]:
        return {"size": self.entry.size, "mtime_ns": self.entry.mtime_ns, "rows": self.rows,
                "partitions": sorted(self.partitions), "items": dict(sorted(self.items.items()))}


@dataclass
class CompactResult:
    """What a compaction did (counts of sources, items, rows; partition keys by outcome)."""

    dest: str
    manifest: str
    run: str
    sources_read: int = 0
    sources_skipped: int = 0
    items_added: int = 0
    items_replaced: int = 0
    rows_written: int = 0
    created: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    appended: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    files_written: list[str] = field(default_factory=list)
    rows: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.dest}: {self.rows} rows in {self.files} files ({self.bytes / 1e6:.1f} MB); this run read "
            f"{self.sources_read} sources (skipped {self.sources_skipped} already compacted), "
            f"added {self.items_added} items, replaced {self.items_replaced}, wrote {self.rows_written} rows in "
            f"{len(self.files_written)} files; partitions created {len(self.created)}, rewritten "
            f"{len(self.rewritten)}, appended "
            f"{len(self.appended)}, untouched {len(self.untouched)}; {self.seconds:.1f} s"
        )


# --- reading sources ---------------------------------------------------------------------------


def _schema_fields() -> dict[str, pa.DataType]:
    from stacchip.index import GEOMETRY_COLUMN, SCHEMA

    fields = {f.name: f.type for f in SCHEMA}
    fields[GEOMETRY_COLUMN] = pa.binary()
    return fields


def _is_native(schema: pa.Schema) -> bool:
    from stacchip.index import GEOMETRY_COLUMN

    for name, typ in _schema_fields().items():
        idx = schema.get_field_index(name)
        if idx < 0:
            return False
        have = schema.field(idx).type
        if isinstance(have, pa.ExtensionType):
            have = have.storage_type
        if name == GEOMETRY_COLUMN:
            if not (pa.types.is_binary(have) or pa.types.is_large_binary(have)):
                return False
        elif have != typ:
            return False
    return True


def _column_range(md: Any, path: str, raw: bool = False) -> tuple[Any, Any] | None:
    """(min, max) of a column over all row groups from the statistics, None when not all exact."""
    schema = md.schema
    col = next((i for i in range(len(schema)) if schema.column(i).path == path), None)
    if col is None:
        return None
    lo = hi = None
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(col).statistics
        if stats is None or not stats.has_min_max or stats.null_count:
            return None
        if not getattr(stats, "is_min_value_exact", True) or not getattr(stats, "is_max_value_exact", True):
            return None
        a, b = (stats.min_raw, stats.max_raw) if raw else (stats.min, stats.max)
        lo = a if lo is None or a < lo else lo
        hi = b if hi is None or b > hi else hi
    return (lo, hi) if lo is not None else None


def _read_error(exc: BaseException, what: str) -> Exception:
    """Bad content (not Parquet, wrong types) as IndexFileError; I/O failures as StorageError (retryable)."""
    if isinstance(exc, FileNotFoundError):
        return StorageNotFoundError(f"{what}: {exc}")
    if isinstance(exc, OSError):
        return StorageError(f"{what}: {exc}")
    return IndexFileError(f"{what}: {exc}")


def _years(micros: np.ndarray) -> np.ndarray:
    return np.asarray(micros, dtype=np.int64).astype("datetime64[us]").astype("datetime64[Y]").astype(np.int64) + 1970


def _read_foreign(url: str) -> pa.Table:
    """A source in another schema (e.g. upstream's), through the core reader's normalisation."""
    from stacchip.index import read_index, to_storage

    return to_storage(read_index(url))


def _groups(table: pa.Table, url: str) -> tuple[dict[str, str | None], dict[str, tuple[str, int]]]:
    """Items and partitions of a table's rows."""
    import pyarrow.compute as pc

    for name in ("item_id", "platform", "datetime"):
        if table.column(name).null_count:
            raise IndexFileError(f"{url}: rows without {name} cannot be compacted")
    micros = pc.cast(table.column("datetime"), pa.int64()).to_numpy()
    years = _years(micros)
    keyed = pa.table({"platform": table.column("platform"), "year": pa.array(years)})
    pairs = keyed.group_by(["platform", "year"]).aggregate([]).to_pylist()
    partitions = {partition_key(p["platform"], p["year"]): (p["platform"], int(p["year"])) for p in pairs}
    items: dict[str, str | None] = {str(i): None for i in pc.unique(table.column("item_id")).to_pylist()}
    return items, partitions


def _scan(entry: FileEntry) -> Source:
    """Items, partitions and schema of a source, from its footer when the statistics tell."""
    import pyarrow.parquet as pq

    from stacchip.index import SCHEMA, STACCHIP_METADATA_KEY

    fs, path = arrow_filesystem(entry.url)
    try:
        md = pq.read_metadata(path, filesystem=fs)
    except (pa.ArrowException, OSError) as exc:
        raise _read_error(exc, f"{entry.url}: not a readable Parquet index file") from exc
    schema = md.schema.to_arrow_schema()
    source = Source(entry=entry, rows=md.num_rows, native=_is_native(schema))
    source.extra = [f for f in schema if f.name not in SCHEMA.names]
    raw = (schema.metadata or {}).get(STACCHIP_METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    if md.num_rows == 0:
        return source
    single = None
    if source.native:
        ids, platforms = _column_range(md, "item_id"), _column_range(md, "platform")
        times = _column_range(md, "datetime", raw=True)
        if ids and platforms and times and ids[0] == ids[1] and platforms[0] == platforms[1]:
            y0, y1 = _years(np.array(times))
            if y0 == y1:
                single = (str(ids[0]), str(platforms[0]), int(y0))
    if single is not None:
        item, platform, year = single
        source.items = {item: None}
        source.partitions = {partition_key(platform, year): (platform, year)}
    else:
        if source.native:
            table = pq.read_table(path, filesystem=fs, columns=["item_id", "platform", "datetime"])
        else:
            table = _read_foreign(entry.url)
            source.extra = [f for f in table.schema if f.name not in SCHEMA.names]
        source.items, source.partitions = _groups(table, entry.url)
    href = meta.get("item_href") if isinstance(meta, dict) else None
    if href and len(source.items) == 1 and meta.get("item_id") in (None, *source.items):
        source.items = {item: str(href) for item in source.items}
    return source


def _layout_href(url: str, item_id: str) -> str | None:
    """``{root}/{platform}/{item_id}/stac_item.json`` for a source in the bucket layout, if it exists."""
    match = _LAYOUT_RE.match(url)
    if match is None or match.group("item") != item_id:
        return None
    candidate = f"{match.group('root')}/{match.group('platform')}/{item_id}/stac_item.json"
    try:
        return candidate if storage.exists(candidate) else None
    except StorageError:
        return None


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s column order and types, missing extra columns as nulls."""
    from stacchip.index import to_storage

    table = to_storage(table)
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _read_sources(sources: Sequence[Source], key: str, platform: str, year: int, schema: pa.Schema) -> list[pa.Table]:
    """The rows of partition ``key`` held by ``sources``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    tables: list[pa.Table] = []
    bulk: dict[bool, list[str]] = {}
    for s in sources:
        if s.native and len(s.partitions) == 1:
            bulk.setdefault(storage.is_s3(s.url), []).append(s.url)
    for urls in bulk.values():
        fs, _ = arrow_filesystem(urls[0])
        paths = [arrow_path(u) for u in urls]
        try:
            table = pads.dataset(paths, format="parquet", filesystem=fs, schema=schema).to_table()
        except (pa.ArrowException, OSError) as exc:
            raise _read_error(exc, f"cannot read source index files {urls[:3]}...") from exc
        tables.append(table)
    for s in sources:
        if s.native and len(s.partitions) == 1:
            continue
        if s.native:
            fs, path = arrow_filesystem(s.url)
            table = pq.read_table(path, filesystem=fs)
        else:
            table = _read_foreign(s.url)
        table = _conform(table, schema)
        if len(s.partitions) > 1:
            micros = pc.cast(table.column("datetime"), pa.int64()).to_numpy()
            keep = (_years(micros) == year) & (table.column("platform").to_numpy(zero_copy_only=False) == platform)
            table = table.filter(pa.array(keep))
        tables.append(table)
    return tables


# --- sorting and writing ------------------------------------------------------------------------


def curve_order(table: pa.Table, order: int = DEFAULT_ORDER) -> np.ndarray:
    """Row order along the Hilbert curve of the chip centres (then by ``datetime``)."""
    import pyarrow.compute as pc

    from stacchip.index import bbox_array

    lon, lat = bbox_centres(bbox_array(table))
    h = lonlat_hilbert(lon, lat, order)
    micros = pc.cast(table.column("datetime"), pa.int64()).to_numpy()
    return np.lexsort((micros, h))


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


def _merge_extents(entries: Iterable[Mapping[str, Any]]) -> tuple[list[float] | None, list[str] | None]:
    boxes = [e["bbox"] for e in entries if e.get("bbox")]
    times = [e["datetime"] for e in entries if e.get("datetime")]
    bbox = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
            if boxes else None)
    when = ([min(t[0] for t in times), max(t[1] for t in times)] if times else None)  # ISO Z strings sort in time order
    return bbox, when


def _part_bytes(table: pa.Table, row_group_rows: int, meta: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """GeoParquet bytes of one part file and its manifest entry (extents from its own statistics)."""
    import pyarrow.parquet as pq

    from stacchip.index import STACCHIP_METADATA_KEY, geo_metadata

    metadata = dict(table.schema.metadata or {})
    metadata[b"geo"] = json.dumps(geo_metadata(table)).encode()
    metadata[STACCHIP_METADATA_KEY] = json.dumps(dict(meta)).encode()
    table = table.replace_schema_metadata(metadata)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd", write_statistics=True)
    data = sink.getvalue()
    md = pq.read_metadata(pa.BufferReader(data))
    cols = {md.schema.column(i).path: i for i in range(len(md.schema))}
    groups = [_stats_extent(md, g, cols) for g in range(md.num_row_groups)]
    bbox, when = _merge_extents(groups)
    return data, {"rows": md.num_rows, "bytes": len(data), "bbox": bbox, "datetime": when, "row_groups": groups}


def _write_run(
    dest: str, key: str, table: pa.Table, run: str, row_group_rows: int, file_rows: int, sort_order: int
) -> list[dict[str, Any]]:
    """Sort ``table`` along the curve and write it as part files of partition ``key``."""
    order = curve_order(table, sort_order)
    table = table.take(pa.array(order))
    entries = []
    for n, first in enumerate(range(0, table.num_rows, file_rows)):
        rel = f"{key}/part-{run}-{n:05d}.parquet"
        data, entry = _part_bytes(
            table.slice(first, file_rows), row_group_rows, {"compacted": {"partition": key, "run": run}}
        )
        storage.write_bytes(storage.join(dest, rel), data)
        entries.append({"path": rel, "run": run, **entry})
    return entries


# --- the run -------------------------------------------------------------------------------------


def _union_schema(base: pa.Schema, extras: Iterable[tuple[str, pa.Field]]) -> pa.Schema:
    from stacchip.index import SCHEMA

    fields = {f.name: f for f in base}
    for where, f in extras:
        have = fields.get(f.name)
        if have is None:
            fields[f.name] = f.with_nullable(True)
        elif have.type != f.type:
            raise IndexFileError(f"{where}: column {f.name!r} is {f.type}, elsewhere {have.type}")
    extra = [fields[n] for n in fields if n not in SCHEMA.names]
    return pa.schema(list(SCHEMA) + extra)


def _map(func: Any, values: Sequence[Any], threads: int, desc: str) -> list[Any]:
    from tqdm import tqdm

    if not values:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(values)))) as pool:
        return list(tqdm(pool.map(func, values), total=len(values), desc=desc, unit="file", disable=None, leave=False))


def compact(  # noqa: C901 - one pass over sources, partitions and the manifest; split is follow-up work
    sources: str | Iterable[str],
    dest: str,
    *,
    row_group_rows: int = ROW_GROUP_ROWS,
    file_rows: int = FILE_ROWS,
    append_fraction: float = APPEND_FRACTION,
    max_runs: int = MAX_RUNS,
    rewrite: bool = False,
    rebuild: bool = False,
    threads: int = THREADS,
    sort_order: int = DEFAULT_ORDER,
) -> CompactResult:
    """Merge index files into (or into an existing) compacted index at ``dest``; see the module doc.

    ``sources``: index files, directories or ``s3://`` prefixes (files under
    ``dest`` are left out). ``dest``: a directory or ``s3://`` prefix.
    ``row_group_rows``/``file_rows``: rows per row group and per part file
    (``file_rows`` is rounded down to a multiple of ``row_group_rows``).
    ``rewrite``: rewrite every partition receiving rows instead of appending
    runs. ``rebuild``: ignore what ``dest`` holds and compact ``sources`` from
    scratch (old files are removed after the new manifest is written).
    ``sort_order``: bits per axis of the Hilbert grid over lon/lat.
    """
    started = time.perf_counter()
    if int(row_group_rows) < 1:
        raise ConfigError(f"row_group_rows must be >= 1, got {row_group_rows}")
    if int(file_rows) < int(row_group_rows):
        raise ConfigError(f"file_rows ({file_rows}) must be at least row_group_rows ({row_group_rows})")
    if not 0 <= float(append_fraction):
        raise ConfigError(f"append_fraction must be >= 0, got {append_fraction}")
    if int(max_runs) < 1:
        raise ConfigError(f"max_runs must be >= 1, got {max_runs}")
    row_group_rows = int(row_group_rows)
    file_rows = int(file_rows) // row_group_rows * row_group_rows
    dest = normalise(dest)
    manifest_url = storage.join(dest, mf.MANIFEST_NAME)
    now = dt.datetime.now(dt.timezone.utc)
    run = now.strftime("%Y%m%dT%H%M%SZ") + secrets.token_hex(3)
    result = CompactResult(dest=dest, manifest=manifest_url, run=run)

    # --- what is there already
    try:
        old = mf.empty_manifest() if rebuild else mf.load(manifest_url)
    except StorageNotFoundError:
        old = mf.empty_manifest()
    try:
        present = {e.url: e for e in list_files(dest)}
    except StorageNotFoundError:
        present = {}
    strays = sorted(u for u in present if PART_RE.match(u[len(dest) + 1:]))
    if strays and not old["partitions"] and not rebuild:
        raise IndexFileError(
            f"{dest} holds part files ({strays[0]}, ...) but no manifest naming them (another "
            "dataset, or a first run that did not finish); compact with rebuild to replace them"
        )

    # --- what is given
    if isinstance(sources, (str, bytes)) or hasattr(sources, "__fspath__"):
        sources = [str(sources)]
    entries: dict[str, FileEntry] = {}
    for given in sources:
        text = normalise(given)
        try:
            found = [e for e in list_files(text) if not under(e.url, [dest])]
        except StorageNotFoundError as exc:  # bad input; other storage errors stay storage errors (retry)
            raise IndexFileError(f"cannot list index files under {str(given)!r}: {exc}") from exc
        if not found:
            raise IndexFileError(f"no .parquet index files under {str(given)!r} (outside {dest})")
        entries.update((e.url, e) for e in found)

    old_sources: dict[str, dict[str, Any]] = old["sources"]
    old_parts: dict[str, dict[str, Any]] = old["partitions"]

    # Partitions whose files are not all there as recorded: rebuilt from their sources.
    damaged = {
        key for key, part in old_parts.items()
        if any((e := present.get(storage.join(dest, f["path"]))) is None or e.size != f["bytes"] for f in part["files"])
    }
    for key in sorted(damaged):
        logger.warning("%s: part files missing or changed; rebuilding the partition from its sources", key)
        for url, rec in old_sources.items():
            if key in rec.get("partitions", []) and url not in entries:
                try:
                    listed = list_files(url)
                except StorageNotFoundError as exc:
                    raise IndexFileError(
                        f"partition {key} of {dest} is damaged and its source {url} is gone ({exc}); "
                        "compact again with rebuild"
                    ) from exc
                entries.update((e.url, e) for e in listed)

    to_read = [
        e for url, e in sorted(entries.items())
        if not (url in old_sources and old_sources[url].get("size") == e.size
                and old_sources[url].get("mtime_ns") == e.mtime_ns
                and not (set(old_sources[url].get("partitions", [])) & damaged))
    ]
    result.sources_skipped = len(entries) - len(to_read)
    scanned: list[Source] = _map(_scan, to_read, threads, "scanning sources")
    result.sources_read = len(scanned)

    # New items: latest source wins over earlier rows; two new sources may not share one.
    new_items: dict[str, str] = {}
    for s in scanned:
        for item in s.items:
            if item in new_items:
                raise IndexFileError(f"item {item!r} is in two sources: {new_items[item]} and {s.url}")
            new_items[item] = s.url
    missing_href = [(s, i) for s in scanned for i, h in s.items.items() if h is None]
    layout_hrefs = _map(lambda p: _layout_href(p[0].url, p[1]), missing_href, threads, "finding items")
    for (s, item), href in zip(missing_href, layout_hrefs, strict=True):
        s.items[item] = href

    # Rows that go: those of re-read sources as recorded before, and earlier rows of new items.
    dropped: dict[str, set[str]] = {}  # partition -> items whose old rows are removed
    sources_out: dict[str, dict[str, Any]] = {}
    reread = {s.url for s in scanned}
    replaced: set[str] = set()
    for url, rec in old_sources.items():
        items = set(rec.get("items", {}))
        gone = items if url in reread else items & new_items.keys()
        for key in rec.get("partitions", []):
            if gone:
                dropped.setdefault(key, set()).update(gone)
        replaced |= gone & new_items.keys()
        if url in reread:
            continue
        if gone:
            rec = {**rec, "items": {k: v for k, v in rec["items"].items() if k not in gone}}
            if not rec["items"]:
                continue
        sources_out[url] = rec
    for s in scanned:
        sources_out[s.url] = s.record()
    result.items_added = len(new_items.keys() - replaced)
    result.items_replaced = len(replaced)

    incoming: dict[str, list[Source]] = {}
    where: dict[str, tuple[str, int]] = {}
    for s in scanned:
        for key, pair in s.partitions.items():
            incoming.setdefault(key, []).append(s)
            where[key] = pair
    for key, part in old_parts.items():
        where.setdefault(key, (part["platform"], int(part["year"])))

    old_schema = mf.schema_of(old) if old_parts else _union_schema(pa.schema([]), [])
    schema = _union_schema(old_schema, [(s.url, f) for s in scanned for f in s.extra])

    parts_out: dict[str, dict[str, Any]] = {k: v for k, v in old_parts.items()}
    obsolete: list[str] = []
    touched = sorted(set(incoming) | set(dropped) | damaged)
    from tqdm import tqdm

    for key in tqdm(touched, desc="partitions", unit="partition", disable=None, leave=False):
        platform, year = where[key]
        before = old_parts.get(key)
        fresh = _read_sources(incoming.get(key, []), key, platform, year, schema)
        fresh_rows = sum(t.num_rows for t in fresh)
        runs = {f["run"] for f in before["files"]} if before else set()
        append = before is not None and (
            not rewrite and key not in damaged and not dropped.get(key)
            and fresh_rows <= float(append_fraction) * before["rows"] and len(runs) < int(max_runs)
        )
        if append and before is not None:
            files = list(before["files"])
            table = pa.concat_tables(fresh) if fresh else None
            result.appended.append(key)
        else:
            files = []
            kept = []
            if before is not None and key not in damaged:
                kept = [_read_existing(dest, before, schema, dropped.get(key, set()))]
                obsolete += [f["path"] for f in before["files"]]
            table = pa.concat_tables(kept + fresh) if kept or fresh else None
            (result.rewritten if before is not None else result.created).append(key)
        if table is not None and table.num_rows:
            written = _write_run(dest, key, table, run, row_group_rows, file_rows, sort_order)
            files += written
            result.files_written += [f["path"] for f in written]
            result.rows_written += table.num_rows
        del table, fresh
        if files:
            bbox, when = _merge_extents(files)
            parts_out[key] = {"platform": platform, "year": year, "rows": sum(f["rows"] for f in files),
                              "bbox": bbox, "datetime": when, "files": files}
        else:
            parts_out.pop(key, None)
    result.untouched = sorted(set(parts_out) - set(touched))

    # --- commit: the manifest, then removal of what it no longer names
    parts_out = dict(sorted(parts_out.items()))
    for key in parts_out:
        mf.check_relative(key, manifest_url)
    bbox, when = _merge_extents(parts_out.values())
    manifest = {
        mf.FORMAT_KEY: mf.FORMAT_VERSION,
        "created": old.get("created") or now.isoformat().replace("+00:00", "Z"),
        "updated": now.isoformat().replace("+00:00", "Z"),
        "rows": sum(p["rows"] for p in parts_out.values()),
        "file_count": sum(len(p["files"]) for p in parts_out.values()),
        "bbox": bbox,
        "datetime": when,
        "layout": "{platform}/year={year}/part-{run}-{n:05d}.parquet",
        "sort": {"curve": "hilbert", "order": int(sort_order), "point": "bbox centre (lon, lat), degrees",
                 "then": "datetime", "scope": "each run of part files in a partition"},
        "row_group_rows": row_group_rows,
        "file_rows": file_rows,
        "arrow_schema": mf.encode_schema(schema),
        "partitions": parts_out,
        "sources": dict(sorted(sources_out.items())),
    }
    if result.files_written or old_parts.keys() != parts_out.keys() or sources_out != old_sources or rebuild:
        storage.write_bytes(manifest_url, json.dumps(manifest, separators=(",", ":")).encode())
    else:
        manifest = old
    named = {f["path"] for p in manifest["partitions"].values() for f in p["files"]}
    leftovers = [
        url[len(dest) + 1:] for url in present
        if url.startswith(dest + "/") and PART_RE.match(url[len(dest) + 1:])
    ]
    for rel in sorted(set(obsolete) | set(leftovers)):
        if rel not in named:
            remove(storage.join(dest, mf.check_relative(rel, manifest_url)))
            result.removed.append(rel)
    result.rows = manifest["rows"]
    result.files = len(named)
    result.bytes = sum(f["bytes"] for p in manifest["partitions"].values() for f in p["files"])
    result.seconds = time.perf_counter() - started
    logger.info("%s", result.summary())
    return result


def _read_existing(dest: str, part: Mapping[str, Any], schema: pa.Schema, drop: set[str]) -> pa.Table:
    """The rows of a partition's current files, less those of ``drop`` items."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, base = arrow_filesystem(dest)
    paths = [f"{base.rstrip('/')}/{f['path']}" for f in part["files"]]
    flt = ~pc.field("item_id").isin(sorted(drop)) if drop else None
    try:
        return pads.dataset(paths, format="parquet", filesystem=fs, schema=schema).to_table(filter=flt)
    except (pa.ArrowException, OSError) as exc:
        raise _read_error(exc, f"cannot read the compacted files of {part.get('platform')}/{part.get('year')}") from exc
