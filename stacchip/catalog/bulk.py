"""Bulk indexing: many STAC items indexed at their own asset hrefs, as array-job tasks.

Sources (any mix, read in full by every task):

* a **stac-geoparquet** file, or a directory / ``s3://`` prefix of them (every
  ``.parquet`` / ``.geoparquet`` file below it): one item per row, ``id``,
  ``collection``, ``geometry`` (WKB or any geoarrow encoding), ``bbox`` (struct or
  list), ``assets`` (struct), ``links``, ``stac_extensions`` and the properties
  as top-level columns. Read with pyarrow alone; nulls left by the union schema
  (an asset or property one item lacks) are dropped, timestamps become ISO 8601.
* an **ndjson** file (one item per line), an **ItemCollection** /
  FeatureCollection JSON, or a **single item** JSON (local path, ``file://`` or
  ``s3://``). Files are told apart by their content (Parquet magic, JSON shape),
  not their names.
* a **STAC API search** (:class:`Search`: collections, bbox, datetime, Query
  extension rules, limit) through :class:`stacchip.catalog.stac_api.Catalog`
  (retries, conformance, rules also applied client-side).

Relative asset hrefs are made absolute against the file they were read from.
Nothing is copied: every index reads the QA asset at its own href. With
``sign=True`` hrefs are signed for the Planetary Computer
(:func:`stacchip.catalog.stac_api.sign_item`) just before each item is read;
the item recorded in the index keeps its unsigned hrefs.

Output, one file per item, written whole by :func:`stacchip.index.write_index`::

    {out}/index/{platform}/{item_id}/index_{item_id}.parquet

the bucket layout of the processors (``out`` may be the bucket they fill), so
``stacchip.index.open_index(out + "/index/")`` reads the lot. ``platform`` is
the canonical platform of the item's collection (or ``--platform``). The
``stacchip`` file metadata records ``item_id``, ``platform``, ``indexer``,
``chip_size``, ``max_nodata``, ``edge``, ``chips`` (rows), ``source`` (where the
item was read), ``item_href`` (the item's own location: its JSON file or its URL
in the STAC API; an item without one, such as a stac-geoparquet row, is written
to ``out/{platform}/{item_id}/stac_item.json`` first) and ``item``: the STAC item itself
(unsigned), so readers (``stacchip chip``) need nothing else to find it.

Tasks: task ``i`` of ``T`` indexes the items whose id hashes to ``i``
(:func:`task_of`: the first 8 bytes of the SHA-1 of the id, modulo ``T``), in
id order. The share of an item depends on its id alone, so tasks that see
slightly different listings (a STAC API answering at different moments) never
skip or double an item, and re-runs give every task the same items. An item
whose index already exists, is readable and was made with the same settings
(item id, platform, indexer, chip size, max nodata, edge rule, row count) is
skipped; any other file there is rewritten. A killed task re-run therefore
finishes with every item indexed once. An item listed twice (same id, same
platform) is indexed once. Each source file is fetched whole and a task holds
its share of the items in memory; every task runs the STAC API search itself.

Failures are per item: the other items are still indexed. A failed item is
reported with its id and the reason, and with :func:`failure_code` the exit
status it calls for: 1 when a re-run may succeed (storage, network, a service,
an unexpected error), 2 for bad input (an item that is not valid STAC, lacks
its QA asset or projection, names a missing file, an unsafe id). A run ends
with 0 when every item is indexed or skipped, 2 when every failure is bad
input, else 1.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from stacchip import storage
from stacchip.catalog.stac_items import structure_problem
from stacchip.console import echo
from stacchip.errors import (
    AssetReadError,
    ConfigError,
    ItemError,
    StacchipError,
    StorageError,
    StorageNotFoundError,
)

logger = logging.getLogger(__name__)

#: Exit status of a run whose failures may go away on a re-run.
EXIT_RETRY = 1
#: Exit status of bad input or configuration.
EXIT_INPUT = 2

#: File names a directory or prefix source is scanned for (stac-geoparquet parts).
GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet")
#: Rows converted to item dicts at a time when reading stac-geoparquet.
BATCH_ROWS = 512
#: Environment variable with the number of tasks sharing the items (``--tasks``).
TASKS_VAR = "STACCHIP_TASKS"
#: Signing modes of ``--sign``.
SIGN_MODES = ("auto", "planetary-computer", "none")

#: Top-level keys of a STAC item; every other stac-geoparquet column is a property.
_TOP_LEVEL = frozenset(
    {"type", "stac_version", "stac_extensions", "id", "geometry", "bbox", "collection", "links", "assets"}
)
_PARQUET_MAGIC = b"PAR1"
_MISSING_FILE = re.compile(
    r"no such file|does not exist|not found|\b404\b|not recognized as being in a supported file format"
    r"|not a supported file format|nosuchkey|nosuchbucket",
    re.IGNORECASE,
)


# --- records: what a source yields ----------------------------------------------------------


@dataclass
class Record:
    """One entry of a source: a STAC item dict, or why the entry is not one.

    ``key`` is the item id (the label of the entry when it has no usable id);
    ``source`` where it was read; ``href`` the item's own JSON location when it
    is a file of its own; ``error`` a bad-input reason for entries that are no
    item at all (reported, never indexed).
    """

    key: str
    item: dict[str, Any] | None
    source: str
    href: str | None = None
    error: str | None = None


def _absolute(source: str) -> str:
    if storage.is_s3(source) or "://" in source:
        return source
    return str(storage.local_path(source).resolve())


def _absolute_hrefs(item: dict[str, Any], base: str) -> None:
    """Make relative asset hrefs absolute against ``base`` (the file the item came from)."""
    from pystac.utils import make_absolute_href

    for asset in (item.get("assets") or {}).values():
        href = asset.get("href") if isinstance(asset, dict) else None
        if isinstance(href, str) and href and "://" not in href and not href.startswith("/"):
            asset["href"] = make_absolute_href(href, base)


def _record(entry: Any, source: str, label: str, href: str | None = None) -> Record:
    """A record from one decoded entry (``label`` names it when it has no id); an entry that is
    no item, or not structurally one, is a record with its error (it fails alone)."""
    if not isinstance(entry, dict):
        return Record(label, None, source, error=f"{label} is a JSON {type(entry).__name__}, not a STAC item")
    item_id = entry.get("id")
    if not isinstance(item_id, str) or not item_id:
        return Record(label, None, source, error=f"{label} has no string 'id': not a STAC item")
    if entry.get("type", "Feature") != "Feature":
        kind = entry.get("type")
        return Record(item_id, None, source, error=f"{label} (id {item_id!r}) is a {kind!r}, not a STAC item")
    problem = structure_problem(entry)
    if problem is not None:
        return Record(item_id, None, source, error=f"item {item_id!r} ({label}) is not a valid STAC item: {problem}")
    _absolute_hrefs(entry, source)
    return Record(item_id, entry, source, href=href)


def _json_records(data: bytes, source: str) -> Iterator[Record]:
    """Records of a JSON source: one item, an ItemCollection / FeatureCollection, a list, or ndjson."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source!r} is neither stac-geoparquet nor UTF-8 JSON: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError:  # not one JSON document: newline-delimited items
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            label = f"{source} line {lineno}"
            try:
                entry = json.loads(line)
            except ValueError as exc:
                yield Record(label, None, source, error=f"{label} is not JSON: {exc}")
                continue
            yield _record(entry, source, label)
        return
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        yield _record(doc, source, source, href=source)
        return
    if isinstance(doc, dict) and isinstance(doc.get("features"), list):
        features = doc["features"]
    elif isinstance(doc, list):
        features = doc
    else:
        kind = doc.get("type") if isinstance(doc, dict) else None
        raise ConfigError(
            f"{source!r} is JSON but neither a STAC item, an ItemCollection nor ndjson "
            f"(a {type(doc).__name__} of type {kind!r})"
        )
    for n, feature in enumerate(features):
        yield _record(feature, source, f"{source} feature {n}")


# --- stac-geoparquet, with pyarrow alone -------------------------------------------------------


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _plain(value: Any, key: str = "") -> Any:
    """A JSON value from what pyarrow's ``to_pylist`` gives (nulls dropped from objects)."""
    if isinstance(value, dict):
        return {k: _plain(v, k) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v, key) for v in value]
    if isinstance(value, dt.datetime):
        return _iso(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return _geojson(bytes(value), key)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _geojson(wkb: bytes, key: str) -> Any:
    """GeoJSON of a WKB value (``geometry``, ``proj:geometry``)."""
    import shapely
    import shapely.geometry

    try:
        geom = shapely.from_wkb(wkb)
    except Exception as exc:  # shapely raises GEOSException and others for bad bytes
        raise ItemError(f"field {key!r} holds bytes that are not WKB: {exc}") from exc
    return json.loads(json.dumps(shapely.geometry.mapping(geom)))


def _geometry_wkb(column: Any, where: str) -> list[bytes | None]:
    import pyarrow as pa

    array = column.storage if isinstance(column.type, pa.ExtensionType) else column
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        return array.to_pylist()
    from stacchip.index import geometry_wkb  # WKT or native geoarrow encodings

    return [v.as_py() for v in geometry_wkb(column, where).combine_chunks()]


def _bbox(value: Any) -> Any:
    if isinstance(value, dict):
        names = (("xmin", "ymin", "zmin", "xmax", "ymax", "zmax") if "zmin" in value
                 else ("xmin", "ymin", "xmax", "ymax"))
        return [value.get(n) for n in names]
    return value


def _row_item(row: dict[str, Any], geometry: bytes | None) -> dict[str, Any]:
    """A STAC item dict from one stac-geoparquet row (as ``to_pylist`` gives it)."""
    properties = _plain(row.pop("properties", None) or {})
    item: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("geometry", "bbox"):
            continue
        if key in _TOP_LEVEL:
            if value is not None:
                item[key] = _plain(value, key)
        elif value is not None:
            properties[key] = _plain(value, key)
    item["geometry"] = None if geometry is None else _geojson(geometry, "geometry")
    if row.get("bbox") is not None:
        item["bbox"] = _bbox(row["bbox"])
    item["properties"] = properties
    item.setdefault("type", "Feature")
    item.setdefault("stac_version", "1.0.0")
    item.setdefault("stac_extensions", [])
    item.setdefault("links", [])
    item.setdefault("assets", {})
    return item


def _row_records(batch: Any, keep: list[bool], source: str) -> Iterator[Record]:
    """Records of the kept rows of one batch; a row that cannot be made an item fails alone."""
    import numpy as np
    import pyarrow as pa

    from stacchip.schema import bool_array

    sub = batch.filter(bool_array(np.asarray(keep, dtype=bool))) if not all(keep) else batch
    try:
        geometries = (_geometry_wkb(sub.column("geometry"), source) if "geometry" in sub.schema.names
                      else [None] * sub.num_rows)
        rows = sub.to_pylist()
    except (pa.ArrowException, StacchipError) as exc:
        raise ConfigError(f"{source!r} cannot be read as stac-geoparquet: {exc}") from exc
    for values, geometry in zip(rows, geometries, strict=True):
        item_id = values["id"]
        try:
            item = _row_item(values, geometry)
            problem = structure_problem(item)
        except StacchipError as exc:
            yield Record(item_id, None, source, error=f"item {item_id!r} in {source}: {exc}")
            continue
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a row of the wrong shape
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            error = f"item {item_id!r} in {source} is not a valid STAC item: {problem}"
            yield Record(item_id, None, source, error=error)
            continue
        _absolute_hrefs(item, source)
        yield Record(item_id, item, source)


def _geoparquet_records(source: str, wanted: Callable[[str], bool], tally: Tally) -> Iterator[Record]:
    """Records of one stac-geoparquet file, streamed by row group: the ``id`` column of each
    row group first, then the whole row group only when it holds an item ``wanted`` accepts
    (the file is never held whole; ranged reads through :func:`stacchip.storage.open_input`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_input(source) as handle:
        try:
            parquet = pq.ParquetFile(handle, pre_buffer=False)
        except StorageError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ConfigError(f"{source!r} is not a readable Parquet file: {exc}") from exc
        names = parquet.schema_arrow.names
        if "id" not in names:
            raise ConfigError(
                f"{source!r} is not stac-geoparquet: it has no 'id' column (columns: {', '.join(names[:12])})"
            )
        row = 0
        for group in range(parquet.metadata.num_row_groups):
            try:
                ids = parquet.read_row_group(group, columns=["id"], use_threads=False).column("id").to_pylist()
            except StorageError:
                raise
            except (pa.ArrowException, OSError) as exc:
                raise ConfigError(f"{source!r} row group {group} cannot be read as stac-geoparquet: {exc}") from exc
            tally.entries += len(ids)
            tally.row_groups += 1
            keep = [isinstance(i, str) and bool(i) and wanted(i) for i in ids]
            for n, i in enumerate(ids):
                if not (isinstance(i, str) and i) and wanted(f"{source} row {row + n}"):
                    label = f"{source} row {row + n}"
                    yield Record(label, None, source, error=f"{label} has no string 'id': not a STAC item")
            if any(keep):
                tally.row_groups_read += 1
                start = 0
                try:
                    batches = list(parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], use_threads=False))
                except StorageError:
                    raise
                except (pa.ArrowException, OSError) as exc:
                    raise ConfigError(f"{source!r} row group {group} cannot be read as stac-geoparquet: {exc}") from exc
                for batch in batches:
                    part = keep[start:start + batch.num_rows]
                    start += batch.num_rows
                    if any(part):
                        yield from _row_records(batch, part, source)
            row += len(ids)


# --- sources ---------------------------------------------------------------------------------


def _is_directory(source: str) -> bool:
    if storage.is_s3(source):
        if source.endswith("/"):
            return True
        return not storage.exists(source)
    return storage.local_path(source).is_dir()


def _parts(prefix: str) -> list[str]:
    """The stac-geoparquet files under a directory or ``s3://`` prefix, sorted."""
    listed = prefix.rstrip("/") + "/" if storage.is_s3(prefix) else prefix
    try:
        every = list(storage.list_files(listed))
    except StorageNotFoundError as exc:
        raise ConfigError(f"source {prefix!r}: no such file, directory or prefix") from exc
    if not every:
        raise ConfigError(f"source {prefix!r}: no such file or object, and no files under it")
    found = sorted(p for p in every if p.lower().endswith(GEOPARQUET_SUFFIXES))
    if not found:
        raise ConfigError(
            f"source {prefix!r} is a directory or prefix without stac-geoparquet files "
            f"({' or '.join(GEOPARQUET_SUFFIXES)})"
        )
    return found


@dataclass
class Tally:
    """Entries a source held, also those of other tasks (not yielded); for stac-geoparquet the
    row groups it held and those decoded whole (they hold an item the task wants)."""

    entries: int = 0
    row_groups: int = 0
    row_groups_read: int = 0


def read_source(
    source: str | os.PathLike[str],
    wanted: Callable[[str], bool] | None = None,
    tally: Tally | None = None,
) -> Iterator[Record]:
    """The records of one source: a stac-geoparquet file or prefix, ndjson, an
    ItemCollection or a single item (local path, ``file://`` or ``s3://``).

    ``wanted(key)`` may skip decoding rows of other tasks (stac-geoparquet only;
    every record is yielded otherwise); ``tally`` counts every entry read. A
    missing or unreadable source raises (:class:`ConfigError`, :class:`StorageError`).
    """
    accept = wanted or (lambda _key: True)
    tally = tally if tally is not None else Tally()
    text = _absolute(str(source))
    if text.startswith("file://"):
        text = str(storage.local_path(text))
    files = _parts(text) if _is_directory(text) else [text]
    for path in files:
        try:
            with storage.open_input(path) as handle:
                magic = handle.read(4)
            if magic == _PARQUET_MAGIC:
                yield from _geoparquet_records(path, accept, tally)
                continue
            data = storage.read_bytes_retry(path)
        except StorageNotFoundError as exc:
            raise ConfigError(f"source {path!r}: no such file or object") from exc
        for record in _json_records(data, path):
            tally.entries += 1
            yield record


@dataclass(frozen=True)
class Search:
    """A STAC API search: ``collections``, ``bbox`` (W, S, E, N degrees),
    ``datetime`` (a STAC interval), ``query`` (Query extension JSON, also applied
    client-side) and ``limit`` (most items; None for all)."""

    url: str
    collections: tuple[str, ...]
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None
    query: Mapping[str, Mapping[str, Any]] | None = None
    limit: int | None = None
    #: most result pages followed (``--max-pages``); paging also stops on a repeated ``next`` link
    max_pages: int = 10_000

    def describe(self) -> str:
        return f"STAC API {self.url} collection(s) {', '.join(self.collections)}"


def _intersects(bbox: tuple[float, float, float, float]) -> dict[str, Any]:
    west, south, east, north = bbox

    def ring(w: float, e: float) -> list[list[float]]:
        return [[w, south], [e, south], [e, north], [w, north], [w, south]]

    if west <= east:
        return {"type": "Polygon", "coordinates": [ring(west, east)]}
    return {"type": "MultiPolygon", "coordinates": [[ring(west, 180.0)], [ring(-180.0, east)]]}  # antimeridian


def search_records(search: Search) -> list[Record]:
    """The items of a STAC API search as records (unsigned; sorted by id)."""
    from stacchip.catalog import stac_api as catalog_mod

    rules = [
        catalog_mod.Rule(name, op, value) for name, ops in (search.query or {}).items() for op, value in ops.items()
    ]
    api = catalog_mod.Catalog(search.url, sign="none")
    if rules and not (api.can_filter or api.can_query):
        logger.warning(
            "STAC API %s offers neither the Filter nor the Query extension: --query is applied "
            "client-side over at most %d items", search.url, catalog_mod.MAX_FETCH,
        )
    try:
        items = api.search(
            search.collections,
            datetime=search.datetime,
            intersects=_intersects(search.bbox) if search.bbox else None,
            rules=rules,
            limit=search.limit if search.limit is not None else sys.maxsize,
            max_pages=search.max_pages,
        )
    except catalog_mod._Rejected as exc:  # noqa: SLF001 - the API refused the request (HTTP 4xx)
        raise ConfigError(f"{search.describe()}: the API refused the search: {exc}") from exc
    where = search.describe()
    records = [Record(label, None, where, error=f"item {label!r} of {where} is not a valid STAC item: {why}")
               for label, why in api.rejected]
    for item in items:
        data = item.to_dict(include_self_link=False, transform_hrefs=False)
        records.append(Record(item.id, data, where, href=item.get_self_href()))
    return records


# --- tasks -----------------------------------------------------------------------------------


def task_of(key: str, tasks: int) -> int:
    """The task (0 .. ``tasks`` - 1) that indexes the item with id ``key``."""
    if tasks <= 1:
        return 0
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % tasks


def record_platform(record: Record, platform: str | None = None) -> str:
    """The canonical platform an item is filed under (``platform`` overrides)."""
    from stacchip.platforms import canonical_platform

    if platform:
        return canonical_platform(platform)
    item = record.item or {}
    props = item.get("properties") or {}
    return canonical_platform(item.get("collection") or str(props.get("platform") or ""))


def select(records: Iterable[Record], index: int | None, tasks: int, platform: str | None = None) -> list[Record]:
    """The records of task ``index`` of ``tasks`` (all when ``index`` is None), in id order.

    An item listed more than once (the same id filed under the same platform: a
    listing that pages twice, two sources of one catalog) is indexed once, from
    the first listing in (id, collection, source) order; a warning says when the
    listings differ.
    """
    mine = [r for r in records if index is None or task_of(r.key, tasks) == index]
    mine.sort(key=lambda r: (r.key, r.item is None, (r.item or {}).get("collection") or "", r.source))
    out: list[Record] = []
    seen: dict[tuple[str, str], Record] = {}
    for record in mine:
        if record.item is None:
            out.append(record)
            continue
        where = (record_platform(record, platform), record.key)
        first = seen.get(where)
        if first is None:
            seen[where] = record
            out.append(record)
        elif first.item == record.item:
            logger.info("item %s is listed twice (%s, %s); indexed once", record.key, first.source, record.source)
        else:
            logger.warning(
                "item %s is listed twice with different content (%s, %s); indexing the first",
                record.key, first.source, record.source,
            )
    return out


# --- one item ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How every item is indexed and where its index goes (see :func:`index_record`)."""

    out: str
    indexer: str = "auto"
    chip_size: int = 256
    max_nodata: float = 0.5
    platform: str | None = None
    edge: str = "drop"
    overwrite: bool = False
    sign: bool = False


@dataclass
class Outcome:
    """What happened to one item: ``status`` is ``indexed``, ``skipped`` or ``failed``.

    ``times`` holds seconds spent on ``check`` (is it indexed already?),
    ``metadata`` (item parse, grid, chip table), ``qa`` (reading the QA band)
    and ``write``.
    """

    key: str
    status: str
    path: str | None = None
    chips: int = 0
    code: int = 0
    error: str | None = None
    trace: str | None = None
    times: dict[str, float] = field(default_factory=dict)
    #: True for a source entry that is no item at all (``key`` is then its label)
    entry: bool = False
    #: why an index file found at ``path`` was rewritten
    note: str | None = None


def _safe_segment(name: str, what: str) -> str:
    """``name`` if it is one safe path segment (else :class:`ItemError`)."""
    check = getattr(storage, "safe_segment", None)
    if check is not None:  # the storage module's rule, where it has one
        try:
            return str(check(name, what))
        except StacchipError as exc:
            raise ItemError(str(exc)) from exc
    from urllib.parse import unquote

    for form in {name, unquote(name)}:
        if (
            not form or form in (".", "..") or "/" in form or "\\" in form
            or any(ord(c) < 32 or ord(c) == 127 for c in form)
        ):
            raise ItemError(f"{what} {name!r} is not a safe path segment; refused as a file name")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise ItemError(f"{what} {name[:40]!r}... is too long for a path segment")
    return name


def output_path(out: str, platform: str, item_id: str) -> str:
    """``{out}/index/{platform}/{item_id}/index_{item_id}.parquet`` (segments checked; on a
    local file system the file name must fit NAME_MAX, 255 bytes: ids up to 241 bytes)."""
    if not platform:
        raise ItemError(f"item {item_id!r} names no collection or platform: pass --platform")
    _safe_segment(platform, "platform")
    _safe_segment(item_id, "item id")
    name = f"index_{item_id}.parquet"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > storage.MAX_SEGMENT_BYTES and not storage.is_s3(out):
        raise ItemError(
            f"item id {item_id[:40]!r}... makes the index file name {size} bytes long; a local file name holds "
            f"at most {storage.MAX_SEGMENT_BYTES} (ids up to {storage.MAX_SEGMENT_BYTES - 14} bytes; an s3:// "
            "destination takes longer ones)")
    return storage.join(out, "index", platform, item_id, name)


def _expected(settings: Settings, cls_name: str, item_id: str, platform: str) -> dict[str, Any]:
    return {
        "item_id": item_id,
        "platform": platform,
        "indexer": cls_name,
        "chip_size": settings.chip_size,
        "max_nodata": settings.max_nodata,
        "edge": settings.edge,
    }


def existing_index(path: str, expected: Mapping[str, Any]) -> str | None:
    """None when ``path`` holds a readable index made with ``expected`` settings,
    else why it does not (``"absent"`` when there is no file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stacchip.index import STACCHIP_METADATA_KEY

    try:
        data = storage.read_bytes_retry(path)
    except StorageNotFoundError:
        return "absent"
    try:
        # ParquetFile, not read_table (whose dataset scan starts an I/O thread pool), and no
        # threads: a pool still alive at exit can abort the interpreter after the work is done
        # ("terminate called without an active exception", apache/arrow#34314)
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    raw = (table.schema.metadata or {}).get(STACCHIP_METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return "its stacchip metadata is not JSON"
    for key, value in expected.items():
        if meta.get(key) != value:
            return f"made with {key}={meta.get(key)!r}, not {value!r}"
    if meta.get("chips") != table.num_rows:
        return f"holds {table.num_rows} rows, its metadata says {meta.get('chips')!r}"
    return None


def _remove_stale_temps(path: str) -> None:
    """Remove temp files a killed write of ``path`` left beside it (local outputs)."""
    if storage.is_s3(path):
        return
    target = storage.local_path(path)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    prefixes = (f".{target.name}.", f".{storage.temp_stem(target.name)}.")
    for name in names:
        if name.startswith(prefixes) and name.endswith(".part"):
            try:
                (target.parent / name).unlink()
                logger.info("removed %s, left by an interrupted write", target.parent / name)
            except OSError:
                pass


def failure_code(exc: BaseException) -> int:
    """Exit status a failure calls for: 2 for bad input, 1 when a re-run may succeed
    (the contract of :func:`stacchip.console.classify`: a stacchip error's own status --
    :class:`~stacchip.errors.ServiceError`, e.g. HTTP 5xx from a STAC API, is 1 -- HTTP 4xx 2,
    5xx 1, connection failures 1; an unexpected error 1)."""
    from stacchip.console import classify

    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) and not isinstance(
            exc, StacchipError):
        return EXIT_INPUT
    if isinstance(exc, AssetReadError) and type(exc) is AssetReadError:
        # a missing or non-raster file is bad input; anything else (network, 5xx) may pass later
        return EXIT_INPUT if _MISSING_FILE.search(str(exc)) else EXIT_RETRY
    return classify(exc).code


def index_record(record: Record, settings: Settings) -> Outcome:
    """Index one record into its bulk-layout file, unless an index made with the
    same settings is there already. Never raises: failures are outcomes."""
    times: dict[str, float] = {}
    started = time.perf_counter()
    path: str | None = None
    try:
        if record.item is None:
            return Outcome(record.key, "failed", code=EXIT_INPUT, error=record.error or "not a STAC item", entry=True)
        from stacchip.index import write_index
        from stacchip.indexer import as_item, guess_indexer, indexer_class

        item = as_item(copy.deepcopy(record.item))
        platform = record_platform(record, settings.platform)
        path = output_path(settings.out, platform, item.id)
        cls = guess_indexer(item) if settings.indexer == "auto" else indexer_class(settings.indexer)
        expected = _expected(settings, cls.__name__, item.id, platform)
        t0 = time.perf_counter()
        times["metadata"] = t0 - started
        if not settings.overwrite:
            why = existing_index(path, expected)
            times["check"] = time.perf_counter() - t0
            if why is None:
                return Outcome(record.key, "skipped", path=path, times=times)
        note = None if settings.overwrite or why == "absent" else f"rewriting {path}: {why}"
        t1 = time.perf_counter()
        if settings.sign:
            from stacchip.catalog.stac_api import sign_item

            sign_item(item)
        kwargs: dict[str, Any] = {"chip_size": settings.chip_size, "chip_max_nodata": settings.max_nodata,
                                  "platform": platform}
        if settings.edge != "drop":
            kwargs["edge"] = settings.edge
        indexer = cls(item, **kwargs)
        if not indexer.has_stats():
            raise ConfigError(f"indexer {settings.indexer!r} ({cls.__name__}) computes no cloud/nodata statistics")
        t2 = time.perf_counter()
        indexer.stats  # noqa: B018 - reads the QA band (cached on the indexer)
        t3 = time.perf_counter()
        table = indexer.create_full_index()
        t4 = time.perf_counter()
        times["metadata"] += (t2 - t1) + (t4 - t3)
        times["qa"] = t3 - t2
        meta = {
            **expected,
            "chips": table.num_rows,
            "source": record.source,
            "item": record.item,
        }
        if record.href:
            meta["item_href"] = record.href
        else:
            # an item with no location of its own (a stac-geoparquet row, an ndjson line) is
            # kept in the bucket layout beside its index, so every reader finds it by href
            from stacchip.utils import item_url

            href = item_url(settings.out, platform, item.id)
            storage.write_bytes(href, json.dumps(record.item).encode())
            meta["item_href"] = href
        _remove_stale_temps(path)
        write_index(table, path, extra_metadata=meta)
        times["write"] = time.perf_counter() - t4
        return Outcome(record.key, "indexed", path=path, chips=table.num_rows, times=times, note=note)
    except Exception as exc:  # noqa: BLE001 - one item's failure must not stop the others
        reason = str(exc) or type(exc).__name__
        if not isinstance(exc, StacchipError):
            reason = f"{type(exc).__name__}: {reason}"
        return Outcome(
            record.key, "failed", path=path, code=failure_code(exc), error=reason,
            trace=traceback.format_exc(), times=times,
        )


def _index_payload(payload: tuple[Record, Settings]) -> Outcome:
    return index_record(*payload)


def _warm() -> None:
    """Import what indexing needs up front, so per-item times hold no import time."""
    import pyarrow.parquet  # noqa: F401

    import stacchip.index  # noqa: F401
    import stacchip.indexer  # noqa: F401

    try:
        import geoarrow.pyarrow  # noqa: F401  (the index's geometry type)
    except ImportError:  # pragma: no cover - a dependency
        pass


# --- running ---------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Outcomes of one bulk run (one task, or all with ``--all``)."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def chips(self) -> int:
        return sum(o.chips for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed; 2 when every failure is bad input; else 1."""
        failed = self.failed
        if not failed:
            return 0
        return EXIT_INPUT if all(o.code == EXIT_INPUT for o in failed) else EXIT_RETRY

    def mean_times(self) -> dict[str, float]:
        """Mean seconds per indexed item of each phase (``check``, ``metadata``, ``qa``, ``write``)."""
        done = [o for o in self.outcomes if o.status == "indexed"]
        return {
            phase: (sum(o.times.get(phase, 0.0) for o in done) / len(done)) if done else 0.0
            for phase in ("check", "metadata", "qa", "write")
        }


def run(
    records: Sequence[Record],
    settings: Settings,
    workers: int = 1,
    progress: bool | None = None,
    desc: str = "index",
) -> Summary:
    """Index every record (a spawn process pool when ``workers > 1``), with a
    tqdm bar on stderr (shown on a terminal unless ``progress`` says otherwise)."""
    from tqdm import tqdm

    summary = Summary()
    started = time.perf_counter()
    bar = tqdm(
        total=len(records), desc=desc, unit="item", file=sys.stderr,
        disable=(None if progress is None else not progress), dynamic_ncols=True,
    )

    def note(outcome: Outcome) -> None:
        summary.outcomes.append(outcome)
        if outcome.note:
            logger.warning("item %s: %s", outcome.key, outcome.note)
        if outcome.status == "failed":
            logger.info("item %s failed:\n%s", outcome.key, outcome.trace or "")
        bar.update(1)
        bar.set_postfix(chips=summary.chips, failed=len(summary.failed), refresh=False)

    try:
        if workers <= 1 or len(records) <= 1:
            _warm()
            for record in records:
                note(index_record(record, settings))
        else:
            import multiprocessing

            # spawn: GDAL, boto3 and thread pools in the parent are not fork-safe
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(processes=min(workers, len(records)), initializer=_warm) as pool:
                for outcome in pool.imap_unordered(_index_payload, [(r, settings) for r in records]):
                    note(outcome)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - started
    order = {r.key: n for n, r in enumerate(records)}
    summary.outcomes.sort(key=lambda o: order.get(o.key, len(order)))
    return summary


def describe(summary: Summary, task: str) -> str:
    """The summary line of a run."""
    n = len(summary.outcomes)
    rate = summary.count("indexed") / summary.seconds if summary.seconds > 0 else 0.0
    times = summary.mean_times()
    line = (
        f"{task}: {n} item(s): {summary.count('indexed')} indexed ({summary.chips} chips), "
        f"{summary.count('skipped')} already indexed, {len(summary.failed)} failed "
        f"in {summary.seconds:.1f} s ({rate:.2f} items/s)"
    )
    if summary.count("indexed"):
        line += (
            f"; per item: metadata {times['metadata']:.3f} s, QA read {times['qa']:.3f} s, "
            f"write {times['write']:.3f} s, check {times['check']:.3f} s"
        )
    return line


# --- the command-line side (``stacchip index``) --------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bulk flags of ``stacchip index`` (sources are its positional arguments)."""
    g = parser.add_argument_group(
        "many items",
        "with --out a directory or s3:// prefix, every item of the sources (and of --stac-api) is "
        "indexed into OUT/index/{platform}/{item_id}/index_{item_id}.parquet",
    )
    g.add_argument("--stac-api", default=None, metavar="URL", help="also index the items of a STAC API search")
    g.add_argument("--collection", action="append", default=None, metavar="C",
                   help="collection(s) to search (repeat or comma-separate; needed with --stac-api)")
    g.add_argument("--bbox", default=None, metavar="W,S,E,N",
                   help="search area in degrees (write --bbox=W,S,E,N when W is negative)")
    g.add_argument("--datetime", default=None, metavar="INTERVAL", help="search interval, e.g. 2024-01-01/2024-03-31")
    g.add_argument("--query", default=None, metavar="JSON",
                   help='Query extension rules, e.g. \'{"eo:cloud_cover": {"lt": 20}}\' (also applied client-side)')
    g.add_argument("--max-items", "--limit", dest="limit", type=int, default=None, metavar="N",
                   help="at most N items from the search (paging stops there)")
    g.add_argument("--max-pages", type=int, default=None, metavar="N",
                   help="at most N result pages followed (default 10000); paging also stops when a page's "
                   "next link repeats one already followed")
    g.add_argument("--sign", choices=SIGN_MODES, default="auto",
                   help="sign asset hrefs for the Planetary Computer before reading: auto (for its STAC API "
                   "only), planetary-computer (every source) or none")
    g.add_argument("--index", type=int, default=None, metavar="N",
                   help="task to run (default: AWS_BATCH_JOB_ARRAY_INDEX, JOB_COMPLETION_INDEX or "
                   "SLURM_ARRAY_TASK_ID, plus STACCHIP_INDEX_OFFSET)")
    g.add_argument("--tasks", type=int, default=None, metavar="T",
                   help=f"how many tasks share the items (env {TASKS_VAR}; default 1); task i indexes the items "
                   "whose id hashes to i")
    g.add_argument("--all", action="store_true", help="index the items of every task here")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (env STACCHIP_POOL_SIZE; default 1)")
    g.add_argument("--overwrite", action="store_true", help="re-index items already indexed")


def wants_bulk(args: argparse.Namespace) -> bool:
    """False for today's one-item form: ``stacchip index ITEM --out FILE.parquet`` with
    ITEM one STAC item JSON (or a file that cannot be read: that form reports it)."""
    single_form = (
        len(args.sources) == 1
        and str(args.out).lower().endswith(".parquet")
        and not args.stac_api
        and args.index is None
        and args.tasks is None
        and not args.all
        and args.workers is None
        and not args.overwrite
    )
    return not (single_form and _one_item_or_unreadable(args.sources[0]))


def _one_item_or_unreadable(source: str) -> bool:
    try:
        data = storage.read_bytes(source)
    except Exception:  # noqa: BLE001 - the one-item form reads it again and reports the error
        return True
    if data[:4] == _PARQUET_MAGIC:
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        try:  # ndjson: several items
            first = next(line for line in data.decode("utf-8-sig").splitlines() if line.strip())
            return not isinstance(json.loads(first), dict)
        except (ValueError, StopIteration):
            return True
    # many items: a non-empty list (or ItemCollection) of objects; anything else is one
    # item's file, which the one-item form reads and reports on ("a JSON list, not an object")
    items = doc if isinstance(doc, list) else doc.get("features") if isinstance(doc, dict) else None
    return not (isinstance(items, list) and len(items) > 0 and all(isinstance(i, dict) for i in items))


def _parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--bbox {text!r} is not W,S,E,N (four numbers, degrees)")
    west, south, east, north = values
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
        raise ConfigError(f"--bbox {text!r}: longitudes must lie in [-180, 180], latitudes in [-90, 90], S <= N")
    return values


def _parse_query(text: str) -> dict[str, dict[str, Any]]:
    try:
        query = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--query is not JSON: {exc}") from None
    if not isinstance(query, dict) or not all(isinstance(v, dict) and v for v in query.values()):
        raise ConfigError('--query must be a JSON object of {"property": {"op": value}}')
    return query


def search_from_args(args: argparse.Namespace) -> Search | None:
    """The :class:`Search` the flags describe (None without ``--stac-api``)."""
    search_flags = [f for f, v in (("--collection", args.collection), ("--bbox", args.bbox),
                                   ("--datetime", args.datetime), ("--query", args.query),
                                   ("--max-items", args.limit), ("--max-pages", args.max_pages))
                    if v is not None]
    if not args.stac_api:
        if search_flags:
            raise ConfigError(f"{search_flags[0]} filters a STAC API search: give --stac-api URL too")
        return None
    if not args.stac_api.startswith(("http://", "https://")):
        raise ConfigError(f"--stac-api {args.stac_api!r} is not an http(s) URL")
    collections = tuple(c.strip() for value in (args.collection or []) for c in value.split(",") if c.strip())
    if not collections:
        raise ConfigError("--stac-api needs --collection C (the collection(s) to search)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--max-items {args.limit} must be >= 1")
    if args.max_pages is not None and args.max_pages < 1:
        raise ConfigError(f"--max-pages {args.max_pages} must be >= 1")
    return Search(
        url=args.stac_api.rstrip("/"),
        collections=collections,
        bbox=_parse_bbox(args.bbox) if args.bbox else None,
        datetime=args.datetime,
        query=_parse_query(args.query) if args.query else None,
        limit=args.limit,
        max_pages=args.max_pages or 10_000,
    )


def settings_from_args(args: argparse.Namespace, search: Search | None) -> Settings:
    """The :class:`Settings` of the flags, checked (``ConfigError`` naming the flag)."""
    from stacchip.indexer import ChipIndexer, indexer_class
    from stacchip.processors.jobs import output_root

    out = str(args.out)
    if out.lower().endswith(".parquet"):
        raise ConfigError(
            f"--out {out!r} is one .parquet file, but many items are indexed: give a directory or "
            "s3:// prefix (the indexes go to OUT/index/{platform}/{item_id}/index_{item_id}.parquet)"
        )
    if out.startswith("s3://") or out.startswith("file://") or "://" in out:
        out = output_root(out)
    elif not out.strip():
        raise ConfigError("--out is empty")
    else:
        out = str(Path(out).expanduser().resolve())
    if args.indexer != "auto":
        cls = indexer_class(args.indexer)
        if cls is ChipIndexer:
            raise ConfigError(
                f"--indexer {args.indexer!r} computes no cloud/nodata statistics; choose a source indexer or 'nostats'"
            )
    if isinstance(args.chip_size, bool) or not 0 < args.chip_size <= 65535:
        raise ConfigError(f"--chip-size {args.chip_size} must be a chip size in pixels (1-65535)")
    if not (math.isfinite(args.max_nodata) and 0.0 <= args.max_nodata <= 1.0):
        raise ConfigError(f"--max-nodata {args.max_nodata} must be a fraction between 0 and 1")
    if args.sign == "planetary-computer":
        sign = True
    elif args.sign == "none":
        sign = False
    else:
        sign = search is not None and "planetarycomputer.microsoft.com" in search.url
    return Settings(
        out=out, indexer=args.indexer, chip_size=int(args.chip_size), max_nodata=float(args.max_nodata),
        platform=args.platform, edge=args.edge, overwrite=bool(args.overwrite), sign=sign,
    )


def task_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> tuple[int | None, int]:
    """``(task index, tasks)`` from ``--index``/``--tasks``/``--all`` and the scheduler's
    variables; the index is None with ``--all``."""
    from stacchip.processors import jobs

    env = os.environ if environ is None else environ
    tasks = jobs.env_int(args.tasks, TASKS_VAR, None, flag="--tasks", minimum=1, environ=env)
    if args.all:
        if args.index is not None:
            raise ConfigError("--all runs every task: drop --index")
        return None, tasks or 1
    scheduled = jobs.env_array_index(env)
    if args.index is None and scheduled is None:
        if tasks not in (None, 1):
            raise ConfigError(
                f"--tasks {tasks}: pick this task with --index N (or the scheduler's "
                f"{', '.join(jobs.ARRAY_INDEX_VARS)}), or run them all with --all"
            )
        return 0, 1
    index = jobs.resolve_indices(args.index, None, environ=env)[0]
    origin = "--index" if args.index is not None else scheduled[0] if scheduled else "--index"
    if tasks is None:
        raise ConfigError(
            f"task {index} (from {origin}) of how many? set --tasks T (or {TASKS_VAR}), the number of "
            "tasks that share the items"
        )
    if index >= tasks:
        raise ConfigError(f"task {index} (from {origin}) is not below --tasks {tasks} (tasks are 0..{tasks - 1})")
    return index, tasks


def command(args: argparse.Namespace, prog: str = "stacchip index") -> int:
    """``stacchip index`` over many items: exit status 0, 1 (retry) or 2 (bad input)."""
    from stacchip.processors import jobs

    try:
        search = search_from_args(args)
        if not args.sources and search is None:
            raise ConfigError("nothing to index: give SOURCE files/prefixes or --stac-api URL --collection C")
        settings = settings_from_args(args, search)
        index, tasks = task_from_args(args)
        workers = jobs.resolve_workers(args.workers)
        wanted = (lambda key: True) if index is None else (lambda key: task_of(key, tasks) == index)
        records: list[Record] = []
        for source in args.sources:
            tally = Tally()
            records.extend(read_source(source, wanted, tally))
            if not tally.entries:
                raise ConfigError(f"source {source!r} holds no STAC items")
        if search is not None:
            found = search_records(search)
            if not found:
                raise ConfigError(f"{search.describe()}: the search found no items")
            records.extend(found)
    except Exception as exc:  # noqa: BLE001 - one line, the status the error calls for
        logger.info("traceback", exc_info=True)
        echo(f"{prog}: error: {exc}", err=True)
        return failure_code(exc)
    share = select(records, index, tasks, settings.platform)
    task = "all tasks" if index is None else f"task {index} of {tasks}"
    summary = run(share, settings, workers=workers, desc=f"index {task}")
    for outcome in summary.failed:
        if outcome.entry:
            echo(f"{prog}: {outcome.error}", err=True)
        else:
            echo(f"{prog}: item {outcome.key!r} failed: {outcome.error}", err=True)
    echo(f"{prog}: {describe(summary, task)}")
    return summary.exit_code


__all__ = [
    "Outcome",
    "Record",
    "Search",
    "Settings",
    "Summary",
    "add_arguments",
    "command",
    "describe",
    "existing_index",
    "failure_code",
    "index_record",
    "output_path",
    "read_source",
    "record_platform",
    "run",
    "search_records",
    "select",
    "task_of",
    "wants_bulk",
]
