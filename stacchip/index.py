"""Index schema, GeoParquet write/read, merge and query.

One row per chip. Upstream columns keep their names and types; stacchip adds
``item_id``, ``platform``, ``datetime``, ``chip_size``, ``collection`` and a ``bbox``
struct. The columns and their types are tabled in :mod:`stacchip.schema`
(:data:`SCHEMA`, importable from here).

``platform`` is the canonical platform (:mod:`stacchip.platforms`), whatever
the catalog calls its collection; filters accept any alias.

Files are GeoParquet 1.1: WKB geometry, CRS OGC:CRS84 stated as PROJJSON,
bbox covering declared, zstd compression.

Index files written by upstream stacchip (its seven columns, geometry as a
native geoarrow polygon, saved with ``pyarrow.parquet.write_table`` under
``index/{platform}/{item_id}/index_{item_id}.parquet``) read everywhere:
:func:`normalize_table` brings any table with the upstream columns and a
geometry in any geoarrow encoding (WKB, WKT, native polygon or multipolygon)
to :data:`SCHEMA`, taking ``item_id`` and ``platform`` from the bucket layout
(else ``item_id`` from the chip id), ``datetime`` from ``date`` (midnight UTC)
and ``chip_size`` as 256 (upstream's only size) unless told otherwise.
:func:`upgrade_index_file` rewrites such files in place, idempotently.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import sys
from typing import Any, Iterable, Sequence, Unpack

import numpy as np
import pyarrow as pa

from stacchip import storage
from stacchip.compacted import open_compacted
from stacchip.errors import IndexFileError, StorageError
from stacchip.filters import (  # noqa: F401  (declared there, importable from here)
    FILTERS,
    QueryFilters,
    Selection,
    check_filters,
    check_fraction,
    fraction_problem,
)
from stacchip.scan import Fragment, IndexDataset, file_extents, read_footers
from stacchip.schema import (  # noqa: F401  (declared there, importable from here)
    BBOX_FIELDS,
    BBOX_TYPE,
    EPOCH,
    GEOMETRY_COLUMN,
    GEOPARQUET_VERSION,
    OPTIONAL_COLUMNS,
    SCHEMA,
    STACCHIP_METADATA_KEY,
    UPSTREAM_CHIP_SIZE,
    UPSTREAM_COLUMNS,
    is_current,
)

logger = logging.getLogger(__name__)


def _geometry_type() -> pa.DataType:
    """geoarrow.wkb extension type with CRS84 when geoarrow is available."""
    try:
        import geoarrow.pyarrow as ga

        return ga.wkb().with_crs(ga.OGC_CRS84)
    except Exception:  # pragma: no cover - geoarrow is a dependency
        return pa.binary()


# Arrays are built from buffers: ``pa.array`` on numpy or Python input imports
# pandas (~45 MB of RSS) inside pyarrow, which an indexing job never needs.
def _fixed_array(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """Arrow array of a fixed-width type over a contiguous numpy array (no nulls)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(values)])


def _binary_array(items: list[bytes], typ: pa.DataType) -> pa.Array:
    """Arrow binary/string array from a list of bytes (no nulls)."""
    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, items), np.int64, len(items)), out=offsets[1:])
    return pa.Array.from_buffers(typ, len(items), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items))])


def index_table(
    *,
    item_id: str,
    platform: str,
    datetime: dt.datetime,
    chip_size: int,
    xs: np.ndarray,
    ys: np.ndarray,
    cloud: np.ndarray,
    nodata: np.ndarray,
    polygons: np.ndarray,
    collection: str | None = None,
) -> pa.Table:
    """Build an index table from per-chip arrays (vectorised, no per-chip loop)."""
    import shapely

    n = len(xs)
    xs_u16 = np.asarray(xs).astype(np.uint16)
    ys_u16 = np.asarray(ys).astype(np.uint16)
    chipids = np.strings.add(
        np.strings.add(f"{item_id}-", xs_u16.astype(np.str_)),
        np.strings.add("-", ys_u16.astype(np.str_)),
    )
    when = datetime if datetime.tzinfo else datetime.replace(tzinfo=dt.timezone.utc)
    when = when.astimezone(dt.timezone.utc)
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    bounds = shapely.bounds(polygons) if n else np.zeros((0, 4))
    wkb = _binary_array(list(shapely.to_wkb(polygons)) if n else [], pa.binary())
    geom_type = _geometry_type()
    geometry = geom_type.wrap_array(wkb) if geom_type != pa.binary() else wkb
    columns = {
        "chipid": _binary_array([c.encode() for c in chipids.tolist()], pa.string()),
        "date": _fixed_array(np.full(n, (when.date() - EPOCH).days, dtype=np.int32), pa.date32()),
        "chip_index_x": _fixed_array(xs_u16, pa.uint16()),
        "chip_index_y": _fixed_array(ys_u16, pa.uint16()),
        "cloud_cover_percentage": _fixed_array(np.asarray(cloud, dtype=np.float32), pa.float32()),
        "nodata_percentage": _fixed_array(np.asarray(nodata, dtype=np.float32), pa.float32()),
        GEOMETRY_COLUMN: geometry,
        "item_id": _binary_array([item_id.encode()] * n, pa.string()),
        "platform": _binary_array([platform.encode()] * n, pa.string()),
        "datetime": _fixed_array(np.full(n, micros, dtype=np.int64), pa.timestamp("us", tz="UTC")),
        "chip_size": _fixed_array(np.full(n, chip_size, dtype=np.uint16), pa.uint16()),
        "bbox": pa.StructArray.from_arrays(
            [_fixed_array(np.ascontiguousarray(bounds[:, i], dtype=np.float64), pa.float64()) for i in range(4)],
            names=list(BBOX_FIELDS),
        ),
        "collection": (
            pa.nulls(n, pa.string()) if collection is None
            else _binary_array([collection.encode()] * n, pa.string())
        ),
    }
    return pa.table(columns)


def upstream_table(table: pa.Table) -> pa.Table:
    """The seven upstream columns of an index table, geometry as a native
    geoarrow polygon (what upstream's ``create_index()`` returned)."""
    import geoarrow.pyarrow as ga

    wkb = geometry_wkb(table.column(GEOMETRY_COLUMN))
    polygons = ga.as_geoarrow(ga.wkb().wrap_array(wkb.combine_chunks()))
    upstream = table.select(list(UPSTREAM_COLUMNS[:-1]))
    return upstream.append_column(GEOMETRY_COLUMN, polygons)


# --- geometry in any geoarrow encoding ---------------------------------------------


def _storage(array: pa.Array) -> pa.Array:
    return array.storage if isinstance(array.type, pa.ExtensionType) else array


def _native_geometries(array: pa.Array, where: str) -> np.ndarray:
    """Shapely geometries of a native geoarrow polygon/multipolygon array
    (separated ``struct<x, y[, z]>`` or interleaved ``fixed_size_list`` coordinates)."""
    import shapely

    offsets: list[np.ndarray] = []
    level = array
    while pa.types.is_list(level.type) or pa.types.is_large_list(level.type):
        lengths = level.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        offsets.append(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
        level = level.flatten()
    if pa.types.is_struct(level.type):
        names = [level.type.field(i).name for i in range(level.type.num_fields)]
        if names[:2] != ["x", "y"]:
            raise IndexFileError(f"{where}: geometry coordinates have fields {names}, expected x, y")
        coords = np.column_stack(
            [level.field(i).to_numpy(zero_copy_only=False) for i in range(min(3, len(names)))]
        )
    elif pa.types.is_fixed_size_list(level.type):
        size = level.type.list_size
        coords = level.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)[:, :3]
    else:
        raise IndexFileError(f"{where}: geometry column of type {array.type} is not a geoarrow encoding")
    kinds = {2: shapely.GeometryType.POLYGON, 3: shapely.GeometryType.MULTIPOLYGON}
    if len(offsets) not in kinds:
        raise IndexFileError(
            f"{where}: geometry column of type {array.type} is not a polygon or multipolygon"
        )
    return shapely.from_ragged_array(kinds[len(offsets)], coords.astype(np.float64), tuple(reversed(offsets)))


def geometry_wkb(column: pa.Array | pa.ChunkedArray, where: str = "index") -> pa.ChunkedArray:
    """A geometry column in any geoarrow encoding (WKB, WKT, native polygon or
    multipolygon; extension type or plain storage) as plain WKB (``binary``).

    Raises :class:`IndexFileError` naming ``where`` for nulls or other types.
    """
    import shapely

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = []
    for chunk in chunks:
        array = _storage(chunk)
        if array.null_count:
            raise IndexFileError(f"{where}: {array.null_count} rows have no geometry")
        typ = array.type
        if pa.types.is_binary(typ):
            out.append(array)
        elif pa.types.is_large_binary(typ):
            out.append(array.cast(pa.binary()))
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
            try:
                geoms = shapely.from_wkt(array.to_numpy(zero_copy_only=False))
            except shapely.errors.GEOSException as exc:
                raise IndexFileError(f"{where}: geometry column holds invalid WKT: {exc}") from exc
            out.append(_binary_array(list(shapely.to_wkb(geoms)), pa.binary()))
        else:
            geoms = _native_geometries(array, where)
            out.append(_binary_array(list(shapely.to_wkb(geoms)) if len(geoms) else [], pa.binary()))
    return pa.chunked_array(out, pa.binary())


# --- tables and files of other layouts (upstream) ------------------------------------

_LAYOUT_FILE = re.compile(r"^index_(?P<item>.+)\.parquet$")
_CHIPID_SUFFIX = r"-[0-9]+-[0-9]+$"


def bbox_array(rows: pa.Table | pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``(N, 4)`` float64 ``xmin, ymin, xmax, ymax`` (degrees) of index rows: a table with a
    ``bbox`` column, or that struct column itself."""
    column = rows.column("bbox") if isinstance(rows, pa.Table) else rows
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], BBOX_TYPE)
    if len(column) == 0:
        return np.zeros((0, 4))
    return np.column_stack(
        [np.asarray(column.field(name).to_numpy(zero_copy_only=False), dtype=np.float64) for name in BBOX_FIELDS]
    )


def layout_ids(path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """``(platform, item_id)`` from the bucket layout
    ``.../{platform}/{item_id}/index_{item_id}.parquet``, else ``(None, None)``."""
    parts = str(path).replace("\\", "/").rstrip("/").split("/")
    if len(parts) >= 3:
        match = _LAYOUT_FILE.match(parts[-1])
        if match and match.group("item") == parts[-2] and parts[-3]:
            return parts[-3], parts[-2]
    return None, None


def normalize_table(
    table: pa.Table,
    *,
    item_id: str | None = None,
    platform: str | None = None,
    chip_size: int | None = None,
    where: str = "index table",
) -> pa.Table:
    """Any index table (this package's, or upstream's seven columns) in :data:`SCHEMA`.

    Missing columns are derived: ``item_id`` from the argument, else from
    ``chipid`` (``{item_id}-{x}-{y}``); ``platform`` from the argument, else
    ``""``; ``datetime`` from ``date`` (midnight UTC) and ``date`` from
    ``datetime``; ``chip_size`` from the argument, else
    :data:`UPSTREAM_CHIP_SIZE`; ``bbox`` from the geometry. Geometry in any
    geoarrow encoding becomes WKB. Extra columns are kept after the schema's.
    Raises :class:`IndexFileError` naming ``where`` when a needed column is
    missing or has the wrong type.
    """
    import pyarrow.compute as pc
    import shapely

    names = table.column_names
    needed = [c for c in ("chipid", "chip_index_x", "chip_index_y", "cloud_cover_percentage",
                          "nodata_percentage", GEOMETRY_COLUMN) if c not in names]
    if "date" not in names and "datetime" not in names:
        needed.append("date")
    if needed:
        raise IndexFileError(f"{where}: not an index table, it lacks columns {needed}")
    n = table.num_rows
    wkb = geometry_wkb(table.column(GEOMETRY_COLUMN), where)
    columns: dict[str, Any] = {}
    try:
        chipid = table.column("chipid").cast(pa.string())
        if "datetime" in names:
            when = table.column("datetime").cast(pa.timestamp("us", tz="UTC"))
        else:
            when = table.column("date").cast(pa.date32()).cast(pa.timestamp("us")).cast(
                pa.timestamp("us", tz="UTC")
            )
        date = table.column("date").cast(pa.date32()) if "date" in names else _utc_dates(when)
        if "item_id" in names:
            item_ids = table.column("item_id").cast(pa.string())
        elif item_id is not None:
            item_ids = pa.chunked_array([_binary_array([item_id.encode()] * n, pa.string())])
        else:
            item_ids = pc.replace_substring_regex(chipid, _CHIPID_SUFFIX, "")
        if "platform" in names:
            platforms = table.column("platform").cast(pa.string())
        else:
            platforms = pa.chunked_array([_binary_array([(platform or "").encode()] * n, pa.string())])
        if "chip_size" in names:
            sizes = table.column("chip_size").cast(pa.uint16())
        else:
            size = chip_size or UPSTREAM_CHIP_SIZE
            sizes = pa.chunked_array([_fixed_array(np.full(n, size, np.uint16), pa.uint16())])
        columns = {
            "chipid": chipid,
            "date": date,
            "chip_index_x": table.column("chip_index_x").cast(pa.uint16()),
            "chip_index_y": table.column("chip_index_y").cast(pa.uint16()),
            "cloud_cover_percentage": table.column("cloud_cover_percentage").cast(pa.float32()),
            "nodata_percentage": table.column("nodata_percentage").cast(pa.float32()),
            GEOMETRY_COLUMN: wkb,
            "item_id": item_ids,
            "platform": platforms,
            "datetime": when,
            "chip_size": sizes,
        }
        if "collection" in names:
            columns["collection"] = table.column("collection").cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise IndexFileError(f"{where}: a column has the wrong type: {exc}") from exc
    if "bbox" in names and table.schema.field("bbox").type == BBOX_TYPE:
        columns["bbox"] = table.column("bbox")
    else:
        bounds = shapely.bounds(shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))) if n else np.zeros((0, 4))
        columns["bbox"] = pa.StructArray.from_arrays(
            [_fixed_array(np.ascontiguousarray(bounds[:, i], dtype=np.float64), pa.float64()) for i in range(4)],
            names=list(BBOX_FIELDS),
        )
    if "collection" not in columns:
        columns["collection"] = pa.nulls(n, pa.string())
    ordered = {name: columns[name] for name in SCHEMA.names}
    for name in names:
        if name not in ordered:
            ordered[name] = table.column(name)
    return pa.table(ordered)


def _utc_dates(when: pa.ChunkedArray) -> pa.ChunkedArray:
    micros = when.cast(pa.int64()).to_numpy(zero_copy_only=False)
    days = np.floor_divide(micros, 86_400_000_000).astype(np.int32)
    return pa.chunked_array([_fixed_array(days, pa.date32())])


def crs84_projjson() -> dict[str, Any]:
    """PROJJSON of OGC:CRS84 (longitude, latitude on WGS 84)."""
    import pyproj

    return pyproj.CRS.from_user_input("OGC:CRS84").to_json_dict()


def to_storage(table: pa.Table, *, item_id: str | None = None, platform: str | None = None,
               where: str = "index table") -> pa.Table:
    """The table with plain WKB geometry, in the column order of :data:`SCHEMA`.

    Tables in another layout (upstream's seven columns, native geometry) are
    brought to the schema first with :func:`normalize_table`.
    """
    geom_type = table.schema.field(GEOMETRY_COLUMN).type if GEOMETRY_COLUMN in table.column_names else None
    storage_type = geom_type.storage_type if isinstance(geom_type, pa.ExtensionType) else geom_type
    if storage_type != pa.binary() or any(
        f.name not in table.column_names for f in SCHEMA if f.name not in OPTIONAL_COLUMNS
    ):
        table = normalize_table(table, item_id=item_id, platform=platform, where=where)
    geom = table.column(GEOMETRY_COLUMN)
    if isinstance(geom.type, pa.ExtensionType):
        geom = pa.chunked_array([c.storage for c in geom.chunks], geom.type.storage_type)
        table = table.set_column(table.schema.get_field_index(GEOMETRY_COLUMN), GEOMETRY_COLUMN, geom)
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    extra = [n for n in table.column_names if n not in SCHEMA.names]
    ordered = table.select(SCHEMA.names + extra)
    try:
        return ordered.cast(pa.schema(list(SCHEMA) + [ordered.schema.field(n) for n in extra]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise IndexFileError(f"{where}: a column has the wrong type: {exc}") from exc


def geo_metadata(table: pa.Table) -> dict[str, Any]:
    """The GeoParquet 1.1 ``geo`` metadata for an index table."""
    if table.num_rows:
        bbox = table.column("bbox").combine_chunks()
        extent = [
            float(np.min(bbox.field("xmin").to_numpy())),
            float(np.min(bbox.field("ymin").to_numpy())),
            float(np.max(bbox.field("xmax").to_numpy())),
            float(np.max(bbox.field("ymax").to_numpy())),
        ]
    else:
        extent = []
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": crs84_projjson(),
        "edges": "planar",
        "covering": {"bbox": {name: ["bbox", name] for name in BBOX_FIELDS}},
    }
    if extent:
        column["bbox"] = extent
    return {"version": GEOPARQUET_VERSION, "primary_column": GEOMETRY_COLUMN, "columns": {GEOMETRY_COLUMN: column}}


def index_bytes(
    table: pa.Table,
    extra_metadata: dict[str, Any] | None = None,
    *,
    item_id: str | None = None,
    platform: str | None = None,
) -> bytes:
    """GeoParquet bytes of an index table (any layout :func:`to_storage` takes)."""
    table = to_storage(table, item_id=item_id, platform=platform)
    metadata = dict(table.schema.metadata or {})
    metadata[b"geo"] = json.dumps(geo_metadata(table)).encode()
    if extra_metadata:
        metadata[STACCHIP_METADATA_KEY] = json.dumps(extra_metadata).encode()
    table = table.replace_schema_metadata(metadata)
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


def write_index(
    table: pa.Table, dest: str | os.PathLike[str], extra_metadata: dict[str, Any] | None = None
) -> str:
    """Write one index as GeoParquet 1.1 to a local path, ``file://`` or ``s3://``.

    The file appears whole or not at all. ``extra_metadata`` (JSON-able) is kept
    under the ``stacchip`` key of the file metadata. ``table`` may be the full
    table (:meth:`~stacchip.indexer.ChipIndexer.create_full_index`) or upstream's
    seven columns (:meth:`~stacchip.indexer.ChipIndexer.create_index`); for the
    latter ``platform`` and ``item_id`` come from ``dest`` when it follows the
    bucket layout ``index/{platform}/{item_id}/index_{item_id}.parquet``.
    Returns ``dest``.
    """
    platform, item_id = layout_ids(dest)
    data = index_bytes(table, extra_metadata, item_id=item_id, platform=platform)
    storage.write_bytes(dest, data)
    return str(dest)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``stacchip`` file metadata of one index file (``{}`` when absent)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(pa.BufferReader(storage.read_bytes(path)))
    raw = (schema.metadata or {}).get(STACCHIP_METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise IndexFileError(f"index file {str(path)!r}: its stacchip metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise IndexFileError(f"index file {str(path)!r}: its stacchip metadata is {type(meta).__name__}, "
                             "not an object")
    return meta


def index_files(sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """Expand files, directories and ``s3://`` prefixes into index file paths."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[str] = []
    for source in sources:
        text = str(source)
        if text.endswith(".parquet") and (storage.is_s3(text) or storage.local_path(text).is_file()):
            files.append(text)
            continue
        try:
            found = list(storage.list_files(text, ".parquet"))
        except StorageError as exc:
            raise IndexFileError(f"cannot list index files under {text!r}: {exc}") from exc
        if not found:
            raise IndexFileError(f"no .parquet index files under {text!r}")
        files.extend(found)
    return files


#: Parallel footer reads when opening many index files (they wait on I/O).
FOOTER_THREADS = 16


def _read_other(url: str) -> pa.Table:
    """An index file of another layout (upstream's), normalised to :data:`SCHEMA`."""
    import pyarrow.parquet as pq

    try:
        with storage.open_input(url) as source:
            table = pq.ParquetFile(source, pre_buffer=False).read(use_threads=False)
    except StorageError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IndexFileError(f"index file {url!r} cannot be read: {exc}") from exc
    platform, item_id = layout_ids(url)
    return to_storage(normalize_table(table, item_id=item_id, platform=platform, where=f"index file {url!r}"))


def open_index(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | IndexDataset,
    *,
    extra_columns: bool = False,
) -> IndexDataset:
    """Open index files, directories, ``s3://`` prefixes or a compacted index as one dataset.

    Returns an :class:`~stacchip.scan.IndexDataset`: ``schema``, ``to_table(columns=,
    filter=)``, ``count_rows()``, ``head()``, ``files``, and through a ``pyarrow.dataset``
    built on first use every other ``pyarrow.dataset.Dataset`` attribute; :func:`query`
    reads it without ``pyarrow.dataset``. A compacted index (a root holding
    ``_manifest.json``, or the manifest itself) is read through its manifest. Files in the
    current schema are read lazily, row groups pruned by their statistics; files of another
    layout (upstream-written indexes) are read and normalised (:func:`normalize_table`)
    here, so old and new files mix in one dataset. With ``extra_columns`` the dataset also
    has the columns beyond :data:`SCHEMA` that current files hold (e.g. ``split``; null
    where a file lacks one). Unreadable, empty or truncated files raise
    :class:`IndexFileError` naming the file.
    """
    if isinstance(sources, IndexDataset):
        return sources
    compacted = open_compacted(sources)
    if compacted is not None:
        return compacted
    files = index_files(sources)
    if any(storage.is_s3(f) for f in files) and not all(storage.is_s3(f) for f in files):
        raise IndexFileError("cannot mix s3:// and local index files in one dataset")
    footers = read_footers(files, FOOTER_THREADS)
    schemas = [md.schema.to_arrow_schema() for md in footers]
    current = [i for i, sch in enumerate(schemas) if is_current(sch)]
    chosen = set(current)
    other = [i for i in range(len(files)) if i not in chosen]
    schema = SCHEMA
    if extra_columns:
        extra: dict[str, pa.Field] = {}
        for i in current:
            for f in schemas[i]:
                if f.name not in SCHEMA.names and f.name not in extra:
                    extra[f.name] = f
        schema = pa.schema(list(SCHEMA) + list(extra.values()))
    fragments = [Fragment(url=files[i], extents=file_extents(footers[i])) for i in current]
    del footers
    if other:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(FOOTER_THREADS, len(other)))) as pool:
            tables = list(pool.map(lambda i: _read_other(files[i]), other))
        fragments += [Fragment(table=t, name=files[i]) for i, t in zip(other, tables, strict=True)]
        logger.info("read %d index file(s) of another layout (upstream) and normalised them", len(other))
    shown = files[0] if len(files) == 1 else f"{len(files)} index files under {files[0]!r}..."
    return IndexDataset(fragments, schema, description=shown)


def upgrade_index_file(
    path: str | os.PathLike[str],
    *,
    platform: str | None = None,
    item_id: str | None = None,
    chip_size: int | None = None,
) -> bool:
    """Rewrite one index file of another layout (upstream's) in the current schema.

    ``platform``/``item_id`` default to the bucket layout of ``path`` (else the
    chip ids); ``chip_size`` to :data:`UPSTREAM_CHIP_SIZE`. Files already in the
    current schema are left as they are. Returns True when the file was
    rewritten. The new file replaces the old one whole (temp + rename).
    """
    import pyarrow.parquet as pq

    text = str(path)
    try:
        with storage.open_input(text) as source:
            pf = pq.ParquetFile(source, pre_buffer=False)
            if is_current(pf.schema_arrow):
                return False
            table = pf.read(use_threads=False)
    except StorageError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IndexFileError(f"index file {text!r} cannot be read: {exc}") from exc
    lay_platform, lay_item = layout_ids(text)
    normal = normalize_table(
        table,
        item_id=item_id or lay_item,
        platform=platform if platform is not None else lay_platform,
        chip_size=chip_size,
        where=f"index file {text!r}",
    )
    storage.write_bytes(text, index_bytes(normal))
    return True


def read_index(sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> pa.Table:
    """Read index files, directories or prefixes (or a compacted index) into one table."""
    return query(sources)


def _is_arrow_dataset(value: Any) -> bool:
    """True for a ``pyarrow.dataset.Dataset`` (checked without importing ``pyarrow.dataset``:
    none can exist before it is imported)."""
    module = sys.modules.get("pyarrow.dataset")
    return module is not None and isinstance(value, module.Dataset)


def _expression(selection: Selection) -> Any:
    """The ``pyarrow.dataset`` filter expression of ``selection`` (bbox on the covering column);
    for datasets the caller made (the exact geometry test follows)."""
    import pyarrow.compute as pc

    parts = []
    if selection.boxes is not None:
        in_x = [(pc.field("bbox", "xmin") <= x1) & (pc.field("bbox", "xmax") >= x0) for x0, x1 in selection.boxes]
        parts.append((in_x[0] if len(in_x) == 1 else in_x[0] | in_x[1])
                     & (pc.field("bbox", "ymin") <= selection.maxy) & (pc.field("bbox", "ymax") >= selection.miny))
    ts = pa.timestamp("us", tz="UTC")
    if selection.first is not None:
        parts.append(pc.field("datetime") >= pa.scalar(selection.first, pa.int64()).cast(ts))
    if selection.last is not None:
        parts.append(pc.field("datetime") <= pa.scalar(selection.last, pa.int64()).cast(ts))
    for limit, column in ((selection.max_cloud, "cloud_cover_percentage"),
                          (selection.max_nodata, "nodata_percentage")):
        if limit is not None:
            parts.append(pc.field(column) <= pa.scalar(limit, pa.float32()))
    if selection.platforms is not None:
        parts.append(pc.field("platform").isin(sorted(selection.platforms)))
    if selection.item_ids is not None:
        parts.append(pc.field("item_id").isin(sorted(selection.item_ids)))
    expr = None
    for part in parts:
        expr = part if expr is None else expr & part
    return expr


def query(
    sources: Any,
    *,
    columns: Sequence[str] | None = None,
    **filters: Unpack[QueryFilters],
) -> pa.Table:
    """Chips matching every given filter (:class:`QueryFilters`: ``bbox`` in degrees,
    ``start``/``end``, ``max_cloud``/``max_nodata`` fractions, ``platform``, ``item_id``).

    ``sources``: anything :func:`open_index` takes, what it returns, a ``pyarrow.Table``
    or a ``pyarrow.dataset.Dataset``; ``columns`` picks the columns returned. Filter values
    are checked before anything is read. A compacted index is read through its manifest:
    only the files and row groups whose extents may hold matching rows, and of those the
    other columns only for row groups holding matching rows. Neither this nor
    ``import stacchip.index`` imports ``pyarrow.dataset`` or pandas (a
    ``pyarrow.dataset.Dataset`` given is read through its own scanner).
    """
    selection = Selection.of(filters)
    if _is_arrow_dataset(sources):
        try:
            table = sources.to_table(filter=_expression(selection))
        except (pa.ArrowException, OSError) as exc:
            raise IndexFileError(f"cannot read index: {exc}") from exc
        table = selection.exact(table)
        return table.select(list(columns)) if columns is not None else table
    if isinstance(sources, pa.Table):
        dataset = IndexDataset([Fragment(table=sources)], sources.schema, description="index table")
    elif isinstance(sources, IndexDataset):
        dataset = sources
    else:
        dataset = open_index(sources)
    return dataset.scan(selection, columns)


def merge_indexes(
    sources: Any, dest: str | os.PathLike[str]
) -> str:
    """Merge many index files into one GeoParquet file at ``dest``."""
    table = read_index(sources)
    return write_index(table, dest)
