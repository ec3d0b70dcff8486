"""Index schema, GeoParquet write/read, merge and query.

One row per chip. Upstream columns keep their names and types; stacchip adds
``item_id``, ``platform``, ``datetime``, ``chip_size`` and a ``bbox`` struct:

============================  =========================================
``chipid``                    string, ``{item_id}-{x}-{y}``
``date``                      date32 (UTC date of the item)
``chip_index_x/_y``           uint16, chip position in the grid
``cloud_cover_percentage``    float32, a *fraction* 0-1 despite the name
``nodata_percentage``         float32, a *fraction* 0-1 despite the name
``geometry``                  chip polygon in lon/lat, WKB
``item_id``                   string
``platform``                  string
``datetime``                  timestamp[us, UTC]
``chip_size``                 uint16, pixels of the finest grid
``bbox``                      struct<xmin, ymin, xmax, ymax: double>, degrees
============================  =========================================

Files are GeoParquet 1.1: WKB geometry, CRS OGC:CRS84 stated as PROJJSON,
bbox covering declared, zstd compression.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyproj
import shapely

from stacchip import storage
from stacchip.errors import ConfigError, IndexFileError, StorageError

if TYPE_CHECKING:  # pyarrow.dataset costs ~50 MB of RSS; imported where used
    import pyarrow.dataset as pads

GEOPARQUET_VERSION = "1.1.0"
GEOMETRY_COLUMN = "geometry"
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
STACCHIP_METADATA_KEY = b"stacchip"

EPOCH = dt.date(1970, 1, 1)
BBOX_TYPE = pa.struct([(name, pa.float64()) for name in BBOX_FIELDS])

#: Arrow schema of an index table as written to Parquet.
SCHEMA = pa.schema(
    [
        ("chipid", pa.string()),
        ("date", pa.date32()),
        ("chip_index_x", pa.uint16()),
        ("chip_index_y", pa.uint16()),
        ("cloud_cover_percentage", pa.float32()),
        ("nodata_percentage", pa.float32()),
        (GEOMETRY_COLUMN, pa.binary()),
        ("item_id", pa.string()),
        ("platform", pa.string()),
        ("datetime", pa.timestamp("us", tz="UTC")),
        ("chip_size", pa.uint16()),
        ("bbox", BBOX_TYPE),
    ]
)


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
) -> pa.Table:
    """Build an index table from per-chip arrays (vectorised, no per-chip loop)."""
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
    }
    return pa.table(columns)


def crs84_projjson() -> dict[str, Any]:
    """PROJJSON of OGC:CRS84 (longitude, latitude on WGS 84)."""
    return pyproj.CRS.from_user_input("OGC:CRS84").to_json_dict()


def to_storage(table: pa.Table) -> pa.Table:
    """The table with plain WKB geometry, in the column order of :data:`SCHEMA`."""
    geom = table.column(GEOMETRY_COLUMN)
    if isinstance(geom.type, pa.ExtensionType):
        geom = pa.chunked_array([c.storage for c in geom.chunks], geom.type.storage_type)
        table = table.set_column(table.schema.get_field_index(GEOMETRY_COLUMN), GEOMETRY_COLUMN, geom)
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise IndexFileError(f"index table lacks columns {missing}")
    extra = [n for n in table.column_names if n not in SCHEMA.names]
    ordered = table.select(SCHEMA.names + extra)
    return ordered.cast(pa.schema(list(SCHEMA) + [ordered.schema.field(n) for n in extra]))


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


def index_bytes(table: pa.Table, extra_metadata: dict[str, Any] | None = None) -> bytes:
    """GeoParquet bytes of an index table."""
    table = to_storage(table)
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
    under the ``stacchip`` key of the file metadata. Returns ``dest``.
    """
    data = index_bytes(table, extra_metadata)
    storage.write_bytes(dest, data)
    return str(dest)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``stacchip`` file metadata of one index file (``{}`` when absent)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(pa.BufferReader(storage.read_bytes(path)))
    raw = (schema.metadata or {}).get(STACCHIP_METADATA_KEY)
    return json.loads(raw) if raw else {}


def _filesystem(paths: Sequence[str]) -> tuple[Any, list[str]]:
    if not paths:
        raise IndexFileError("no index files given")
    if all(storage.is_s3(p) for p in paths):
        from pyarrow import fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme, _, rest = endpoint.partition("://")
            kwargs["endpoint_override"] = rest or scheme
            kwargs["scheme"] = scheme if rest else "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return fs.S3FileSystem(**kwargs), [p[len("s3://"):] for p in paths]
    if any(storage.is_s3(p) for p in paths):
        raise IndexFileError("cannot mix s3:// and local index files in one dataset")
    return None, [str(storage.local_path(p)) for p in paths]


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


def open_index(sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> "pads.Dataset":
    """Open index files, directories or ``s3://`` prefixes as one pyarrow dataset.

    A compacted index (:mod:`stacchip.catalog`, its root or ``_manifest.json``) opens
    as the files its manifest names.
    """
    import pyarrow.dataset as pads

    from stacchip.catalog.manifest import open_compacted

    compacted = open_compacted(sources)
    if compacted is not None:
        return compacted
    files = index_files(sources)
    filesystem, paths = _filesystem(files)
    try:
        return pads.dataset(paths, format="parquet", filesystem=filesystem, schema=SCHEMA)
    except (pa.ArrowException, OSError) as exc:
        raise IndexFileError(f"cannot open index files {files[:3]}...: {exc}") from exc


def read_index(sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> pa.Table:
    """Read index files, directories or prefixes into one table."""
    return query(sources)


def _as_datetime(value: Any, field: str) -> dt.datetime | dt.date:
    """A datetime, or a date for a whole day (date objects, ``YYYY-MM-DD``)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return dt.date.fromisoformat(text)
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"{field} = {value!r} is not an ISO 8601 date or datetime") from exc
    if isinstance(value, dt.date):
        return value
    raise ConfigError(f"{field} = {value!r} is not a date, datetime or ISO 8601 string")


def _timestamp(value: dt.datetime | dt.date) -> pa.Scalar:
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return pa.scalar(value, pa.timestamp("us", tz="UTC"))


def _fraction(value: Any, field: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field} = {value!r} is not a fraction (0-1)") from exc


def query(
    sources: Any,
    *,
    bbox: Sequence[float] | None = None,
    start: Any = None,
    end: Any = None,
    max_cloud: float | None = None,
    max_nodata: float | None = None,
    platform: str | Sequence[str] | None = None,
    item_id: str | Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Chips matching every given filter.

    ``sources`` is a dataset from :func:`open_index` or anything it accepts.
    ``bbox`` is ``(minx, miny, maxx, maxy)`` in degrees (chips intersecting it;
    ``minx > maxx`` crosses the antimeridian);
    ``start``/``end`` bound ``datetime`` inclusively (ISO strings, dates or
    datetimes, naive meaning UTC; a date ``end`` includes that whole UTC
    day); ``max_cloud``/``max_nodata`` are fractions.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    dataset = sources if isinstance(sources, pads.Dataset) else None
    if dataset is None:  # a compacted index: only the files and row groups the filters may hit
        from stacchip.catalog.manifest import open_compacted

        dataset = open_compacted(sources, bbox=bbox, start=start, end=end, max_cloud=max_cloud,
                                 max_nodata=max_nodata, platform=platform, item_id=item_id)
    if dataset is None:
        dataset = open_index(sources)
    expr = None

    def add(e: pc.Expression) -> None:
        nonlocal expr
        expr = e if expr is None else expr & e

    if bbox is not None:
        try:
            minx, miny, maxx, maxy = (float(v) for v in bbox)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bbox = {bbox!r} is not (minx, miny, maxx, maxy) in degrees") from exc
        if miny > maxy:
            raise ConfigError(f"bbox = {bbox!r} has miny above maxy")
        # minx > maxx is a box crossing the antimeridian (STAC convention): two boxes.
        boxes = [(minx, maxx)] if minx <= maxx else [(minx, 180.0), (-180.0, maxx)]
        in_x = [(pc.field("bbox", "xmin") <= x1) & (pc.field("bbox", "xmax") >= x0) for x0, x1 in boxes]
        add(
            (in_x[0] if len(in_x) == 1 else in_x[0] | in_x[1])
            & (pc.field("bbox", "ymin") <= maxy)
            & (pc.field("bbox", "ymax") >= miny)
        )
        query_area = shapely.union_all([shapely.box(x0, miny, x1, maxy) for x0, x1 in boxes])
    if start is not None:
        add(pc.field("datetime") >= _timestamp(_as_datetime(start, "start")))
    if end is not None:
        last = _as_datetime(end, "end")
        if isinstance(last, dt.datetime):
            add(pc.field("datetime") <= _timestamp(last))
        else:  # a date ends with its last instant (UTC)
            add(pc.field("datetime") < _timestamp(last + dt.timedelta(days=1)))
    # Limits compared in the columns' float32: float32(0.05) > 0.05, so a float64
    # comparison would drop a chip stored at exactly the limit.
    if max_cloud is not None:
        add(pc.field("cloud_cover_percentage") <= pa.scalar(_fraction(max_cloud, "max_cloud"), pa.float32()))
    if max_nodata is not None:
        add(pc.field("nodata_percentage") <= pa.scalar(_fraction(max_nodata, "max_nodata"), pa.float32()))
    if platform is not None:
        values = [platform] if isinstance(platform, str) else list(platform)
        add(pc.field("platform").isin(values))
    if item_id is not None:
        values = [item_id] if isinstance(item_id, str) else list(item_id)
        add(pc.field("item_id").isin(values))
    try:
        table = dataset.to_table(filter=expr)
    except (pa.ArrowException, OSError) as exc:
        raise IndexFileError(f"cannot read index: {exc}") from exc
    if bbox is not None and table.num_rows:
        geoms = shapely.from_wkb(table.column(GEOMETRY_COLUMN).to_numpy(zero_copy_only=False))
        hit = shapely.intersects(geoms, query_area)
        table = table.filter(pa.array(hit))
    if columns is not None:
        table = table.select(list(columns))
    return table


def merge_indexes(
    sources: Any, dest: str | os.PathLike[str]
) -> str:
    """Merge many index files into one GeoParquet file at ``dest``."""
    table = read_index(sources)
    return write_index(table, dest)
