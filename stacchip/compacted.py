"""The manifest of a compacted index, and reading a compacted index through it.

Core: :func:`stacchip.index.open_index` / :func:`~stacchip.index.query` and the
training side read compacted indexes through this module; the catalog package
writes them (:func:`stacchip.catalog.compact`) and re-exports it as
:mod:`stacchip.catalog.manifest`.

A compacted index (written by :func:`stacchip.catalog.compact`) is a directory or
``s3://`` prefix holding one directory per platform and year and one ``_manifest.json``::

    {dest}/_manifest.json
    {dest}/{platform}/year={year}/part-{run}-{n:05d}.parquet

The manifest is the commit point of a compaction and the table of contents of
the dataset: readers take the file list from it (never from a listing, which
may hold files of an unfinished run) and choose files and row groups by the
extents it records, before opening any Parquet footer. Its keys:

``stacchip_compacted_index``  format version (``1``)
``created`` / ``updated``      ISO 8601 UTC times of the first and the last run
``rows``, ``bbox``, ``datetime`` rows, ``[xmin, ymin, xmax, ymax]`` (degrees) and
                              ``[first, last]`` (ISO 8601 UTC) of the whole dataset
``sort``                      how rows are ordered within a run of part files
``row_group_rows``, ``file_rows``  the size settings of the last run (rows)
``arrow_schema``              base64 of the Arrow IPC schema of the files
                              (:data:`stacchip.index.SCHEMA` plus extra columns)
``partitions``                ``{"{platform}/year={year}": {"platform", "year", "rows",
                              "bbox", "datetime", "files": [...]}}``; each file
                              ``{"path" (relative to the root), "run", "rows",
                              "bytes", "bbox", "datetime", "row_groups": [{"rows",
                              "bbox", "datetime", "cloud": [min, max],
                              "nodata": [min, max]}]}``
``sources``                   ``{source index URL: {"size", "mtime_ns", "rows",
                              "partitions": [...], "items": {item_id: item href or
                              null}}}``: what was compacted from where; item hrefs
                              come from the source files' ``stacchip`` metadata
                              (``item_href``) or, in the bucket layout, the
                              ``stac_item.json`` beside the assets when it exists

bbox extents are those of the rows' ``bbox`` covering column (min of ``xmin``
... max of ``ymax``), the same values the Parquet row-group statistics hold.

"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from stacchip import storage
from stacchip.errors import IndexFileError, StorageError

if TYPE_CHECKING:
    from typing import Unpack

    import pyarrow as pa
    import pyarrow.dataset as pads

    from stacchip.index import QueryFilters

MANIFEST_NAME = "_manifest.json"
FORMAT_KEY = "stacchip_compacted_index"
FORMAT_VERSION = 1
#: Time pruning widens the asked range by this much on both sides, so a reader
#: never skips a row group over how a bare date or a time zone is understood.
TIME_MARGIN = dt.timedelta(days=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


# --- times --------------------------------------------------------------------------------


def iso_from_micros(micros: int) -> str:
    """ISO 8601 UTC (``...Z``) of microseconds since the epoch."""
    return (_EPOCH + dt.timedelta(microseconds=int(micros))).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> dt.datetime:
    """Aware UTC datetime of an ISO 8601 string (``Z``, offsets, or naive meaning UTC)."""
    when = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00").replace("z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _loose_time(value: Any) -> dt.datetime | None:
    """A datetime for pruning, or None when the value is not understood (then nothing is pruned;
    :func:`stacchip.index.query` reports the bad value itself)."""
    try:
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        if isinstance(value, dt.date):
            return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
        text = str(value).strip()
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
        return parse_time(text)
    except (TypeError, ValueError, OverflowError):
        return None


# --- finding and loading --------------------------------------------------------------------


def manifest_url(source: Any) -> str | None:
    """The manifest URL of ``source`` when it names a compacted index, else None.

    ``source`` is the index root (directory, ``file://`` or ``s3://`` prefix),
    the ``_manifest.json`` itself, or a one-element list of either. Lists of
    several sources and ``.parquet`` files are never a compacted index. On S3
    this costs one HEAD request.
    """
    if isinstance(source, (list, tuple)) and len(source) == 1:
        source = source[0]
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = str(source).rstrip("/")
    if not text or text.endswith(".parquet"):
        return None
    if text.endswith(MANIFEST_NAME):
        return text
    if not storage.is_s3(text) and not storage.local_path(text).is_dir():
        return None
    candidate = storage.join(text, MANIFEST_NAME)
    try:
        return candidate if storage.exists(candidate) else None
    except StorageError:
        return None


def root_of(url: str) -> str:
    """The index root of a manifest URL."""
    text = str(url)
    return text[: -len(MANIFEST_NAME)].rstrip("/") or "."


def empty_manifest() -> dict[str, Any]:
    """A manifest with no rows (what a first compaction starts from)."""
    return {FORMAT_KEY: FORMAT_VERSION, "rows": 0, "bbox": None, "datetime": None,
            "partitions": {}, "sources": {}}


def check_relative(path: str, what: str) -> str:
    """``path`` if it is a plain relative path inside the root (no ``..``, no absolute path)."""
    text = str(path)
    parts = text.split("/")
    if (not text or text.startswith("/") or "\\" in text or "://" in text
            or any(p in ("", ".", "..") for p in parts)):
        raise IndexFileError(f"{what}: file path {text!r} is not a relative path inside the index root")
    return text


def load(url: str) -> dict[str, Any]:
    """The manifest at ``url``, checked (format version, relative file paths)."""
    raw = storage.read_bytes(url)  # StorageNotFoundError when there is none
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise IndexFileError(f"{url}: not a JSON manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get(FORMAT_KEY) != FORMAT_VERSION:
        raise IndexFileError(f"{url}: not a stacchip compacted-index manifest (version {FORMAT_VERSION})")
    if not isinstance(manifest.get("partitions"), dict) or not isinstance(manifest.get("sources"), dict):
        raise IndexFileError(f"{url}: manifest lacks 'partitions' or 'sources'")
    for key, part in manifest["partitions"].items():
        check_relative(key, url)
        for entry in part.get("files", []):
            check_relative(entry["path"], url)
    return manifest


def schema_of(manifest: Mapping[str, Any]) -> "pa.Schema":
    """Arrow schema of a compacted index: :data:`stacchip.index.SCHEMA` plus the extra columns it holds."""
    import pyarrow as pa

    from stacchip.index import SCHEMA

    encoded = manifest.get("arrow_schema")
    if not encoded:
        return SCHEMA
    stored = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))
    extra = [f for f in stored if f.name not in SCHEMA.names]
    return pa.schema(list(SCHEMA) + extra)


def encode_schema(schema: "pa.Schema") -> str:
    """base64 of the Arrow IPC serialisation of ``schema`` (without metadata)."""
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


def item_hrefs(manifest: Mapping[str, Any]) -> dict[str, str]:
    """``item_id -> item href`` for every item whose STAC item location is known."""
    hrefs: dict[str, str] = {}
    for source in manifest.get("sources", {}).values():
        for item_id, href in source.get("items", {}).items():
            if href:
                hrefs[item_id] = href
    return hrefs


def hrefs_for(index: Any) -> dict[str, str] | None:
    """``item_id -> item href`` from the manifest when ``index`` names a compacted index, else None."""
    url = manifest_url(index)
    return None if url is None else item_hrefs(load(url))


# --- choosing files and row groups ------------------------------------------------------------


def _boxes(bbox: Sequence[float] | None) -> tuple[list[tuple[float, float]], float, float] | None:
    if bbox is None:
        return None
    try:
        minx, miny, maxx, maxy = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    boxes = [(minx, maxx)] if minx <= maxx else [(minx, 180.0), (-180.0, maxx)]
    return boxes, miny, maxy


def _values(value: str | Sequence[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else {str(v) for v in value}


def plan(manifest: Mapping[str, Any], **filters: Unpack[QueryFilters]) -> list[tuple[str, list[int]]]:
    """Files (relative paths) and row groups that may hold rows passing the filters.

    Filters mean what they mean in :func:`stacchip.index.query`
    (:class:`~stacchip.index.QueryFilters`: ``bbox`` in degrees, ``minx > maxx``
    across the antimeridian; ``start``/``end`` inclusive; cloud and nodata
    fractions; platforms; item ids). Pruning is conservative: a row group
    is left out only when its recorded extents prove no row in it can pass (time
    ranges widened by :data:`TIME_MARGIN`); the rows of the kept ones still go
    through the exact filters of the query.
    """
    from stacchip.index import check_filters

    active = check_filters(filters, "plan")
    boxes = _boxes(active.get("bbox"))
    start, end = active.get("start"), active.get("end")
    t0 = _loose_time(start) if start is not None else None
    t1 = _loose_time(end) if end is not None else None
    lo = t0 - TIME_MARGIN if t0 is not None else None
    hi = t1 + 2 * TIME_MARGIN if t1 is not None else None  # a date end covers its whole day
    platforms = _values(active.get("platform"))
    wanted_items = _values(active.get("item_id"))
    cloud_limit = _limit(active.get("max_cloud"))
    nodata_limit = _limit(active.get("max_nodata"))

    partition_items = _partition_items(manifest) if wanted_items is not None else None

    def time_ok(extent: Sequence[str] | None) -> bool:
        if not extent or (lo is None and hi is None):
            return True
        first, last = parse_time(extent[0]), parse_time(extent[1])
        return not ((lo is not None and last < lo) or (hi is not None and first > hi))

    def box_ok(extent: Sequence[float] | None) -> bool:
        if boxes is None or not extent:
            return True
        xs, miny, maxy = boxes
        x0, y0, x1, y1 = extent
        if y0 > maxy or y1 < miny:
            return False
        return any(x0 <= bx1 and x1 >= bx0 for bx0, bx1 in xs)

    def range_ok(extent: Sequence[float] | None, limit: float | None) -> bool:
        return limit is None or not extent or not (extent[0] > limit)

    selection: list[tuple[str, list[int]]] = []
    for key, part in manifest.get("partitions", {}).items():
        if platforms is not None and part.get("platform") not in platforms:
            continue
        if (partition_items is not None and wanted_items is not None
                and not partition_items.get(key, set()) & wanted_items):
            continue
        if not (box_ok(part.get("bbox")) and time_ok(part.get("datetime"))):
            continue
        for entry in part.get("files", []):
            if not (box_ok(entry.get("bbox")) and time_ok(entry.get("datetime"))):
                continue
            groups = [
                i for i, rg in enumerate(entry.get("row_groups", []))
                if box_ok(rg.get("bbox")) and time_ok(rg.get("datetime"))
                and range_ok(rg.get("cloud"), cloud_limit) and range_ok(rg.get("nodata"), nodata_limit)
            ]
            if groups:
                selection.append((entry["path"], groups))
    return selection


def _partition_items(manifest: Mapping[str, Any]) -> dict[str, set[str]]:
    """``{partition key: ids of the items of its sources}``."""
    items: dict[str, set[str]] = {}
    for source in manifest.get("sources", {}).values():
        for key in source.get("partitions", []):
            items.setdefault(key, set()).update(source.get("items", {}))
    return items


def _limit(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value) + 1e-6  # the columns are float32: never prune at the limit itself
    except (TypeError, ValueError):
        return None


# --- datasets ---------------------------------------------------------------------------------


def dataset(
    root: str,
    manifest: Mapping[str, Any],
    selection: Iterable[tuple[str, Sequence[int] | None]] | None = None,
    filesystem: Any = None,
) -> "pads.Dataset":
    """A pyarrow dataset over a compacted index: every file, or only ``selection``'s row groups.

    ``selection`` is what :func:`plan` returns (``None`` row groups meaning the
    whole file). ``filesystem`` overrides the pyarrow filesystem (paths are then
    ``root``-relative paths joined onto ``root`` as that filesystem sees it).
    Note: ``count_rows()`` without a filter counts whole files in pyarrow; use
    ``to_table().num_rows`` or a filter on a row-group selection.
    """
    import pyarrow.dataset as pads

    fs, base = storage.arrow_filesystem(root)
    if filesystem is not None:
        fs = filesystem
    if selection is None:
        selection = [(f["path"], None) for part in manifest["partitions"].values() for f in part["files"]]
    fmt = pads.ParquetFileFormat()
    fragments = [
        fmt.make_fragment(f"{base.rstrip('/')}/{check_relative(path, root)}", filesystem=fs,
                          row_groups=None if groups is None else list(groups))
        for path, groups in selection
    ]
    return pads.FileSystemDataset(fragments, schema=schema_of(manifest), format=fmt, filesystem=fs)


def open_compacted(sources: Any, **filters: Unpack[QueryFilters]) -> "pads.Dataset | None":
    """The compacted index named by ``sources`` as a dataset, pruned by ``filters`` (see :func:`plan`);
    None when ``sources`` is not a compacted index.

    Used by :func:`stacchip.index.open_index` (no filters: every file) and
    :func:`stacchip.index.query` (the files and row groups its filters may hit).
    """
    url = manifest_url(sources)
    if url is None:
        return None
    manifest = load(url)
    root = root_of(url)
    selection = plan(manifest, **filters) if any(v is not None for v in filters.values()) else None
    return dataset(root, manifest, selection)
