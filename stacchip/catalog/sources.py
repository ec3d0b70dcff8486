"""Sources of a compaction: what each index file holds (from its footer), and reading the rows
one partition needs from it, checked against what the footer claimed.

Reads go through :mod:`stacchip.storage` (a small file whole, a large one by ranges through
:func:`~stacchip.storage.open_input`), so a storage failure stays a
:class:`~stacchip.errors.StorageError` (exit status 1, worth retrying) and anything the
Parquet reader makes of the bytes -- not Parquet, a damaged page, a footer that lies, rows
of another partition -- is an :class:`~stacchip.errors.IndexFileError` naming the file
(exit status 2).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from stacchip import storage
from stacchip.catalog.parts import partition_key
from stacchip.errors import IndexFileError, StorageError
from stacchip.schema import GEOMETRY_COLUMN, SCHEMA, STACCHIP_METADATA_KEY, is_current

logger = logging.getLogger(__name__)

#: Files up to this size (bytes) are read whole in one request; larger ones by ranges.
WHOLE_READ_BYTES = 64 * 1024 * 1024


@dataclass
class Source:
    """What one source index file holds (from its footer, or its rows when the footer cannot tell).

    ``items``: ``item_id -> item href`` (None when unknown); ``partitions``: ``key ->
    (platform, year)``; ``native``: stacchip's own schema (read as it is, else normalised).
    """

    url: str
    size: int
    mtime_ns: int
    rows: int = 0
    items: dict[str, str | None] = field(default_factory=dict)
    partitions: dict[str, tuple[str, int]] = field(default_factory=dict)
    native: bool = True
    extra: list[pa.Field] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """``"{size}:{mtime_ns}"``: a re-run reads the source again when it changes."""
        return f"{self.size}:{self.mtime_ns}"


@dataclass(frozen=True)
class Piece:
    """Rows one partition takes from one file: a source index file (``kind="source"``; only the
    rows of ``platform``/``year`` when it spans partitions) or a part file of the index being
    rewritten (``kind="part"``; less the rows of ``drop`` items)."""

    url: str
    size: int
    key: str
    platform: str
    year: int
    kind: str = "source"
    native: bool = True
    #: the file holds rows of other partitions too (they are left out); else every row must be ours
    spans: bool = False
    drop: frozenset[str] = frozenset()
    #: items the footer promised (checked when the rows are read); None: not checked
    items: frozenset[str] | None = None


def _damaged(url: str, exc: BaseException) -> IndexFileError:
    return IndexFileError(f"{url}: damaged or not a Parquet index file ({type(exc).__name__}: {exc})")


@contextlib.contextmanager
def guarded(url: str) -> Iterator[None]:
    """Storage failures pass as they are; any other failure reading ``url`` is an
    :class:`IndexFileError` naming it."""
    try:
        yield
    except StorageError:
        raise
    except (pa.ArrowException, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        if isinstance(exc, IndexFileError):
            raise
        raise _damaged(url, exc) from exc


@contextlib.contextmanager
def parquet(url: str, size: int) -> Iterator[Any]:
    """A ``pyarrow.parquet.ParquetFile`` over ``url`` (read whole up to :data:`WHOLE_READ_BYTES`,
    else by ranges), inside :func:`guarded`."""
    import pyarrow.parquet as pq

    if size <= WHOLE_READ_BYTES:
        data = storage.read_bytes(url)
        with guarded(url):
            yield pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
        return
    with storage.open_input(url) as source, guarded(url):
        yield pq.ParquetFile(source, pre_buffer=False)


# --- footers ------------------------------------------------------------------------------


def _years(micros: np.ndarray) -> np.ndarray:
    return np.asarray(micros, dtype=np.int64).astype("datetime64[us]").astype("datetime64[Y]").astype(np.int64) + 1970


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


def _is_native(schema: pa.Schema) -> bool:
    """True when the file holds every :data:`SCHEMA` column with its type (geometry any binary)."""
    if not is_current(schema):
        return False
    geom = schema.field(GEOMETRY_COLUMN).type
    if isinstance(geom, pa.ExtensionType):
        geom = geom.storage_type
    return pa.types.is_binary(geom) or pa.types.is_large_binary(geom)


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


def read_foreign(url: str, size: int) -> pa.Table:
    """A source in another schema (e.g. upstream's), normalised to :data:`SCHEMA`
    (``item_id``/``platform`` from the bucket layout of its name)."""
    from stacchip.index import layout_ids, normalize_table, to_storage

    with parquet(url, size) as pf, guarded(url):
        table = pf.read(use_threads=False)
    platform, item_id = layout_ids(url)
    return to_storage(normalize_table(table, item_id=item_id, platform=platform, where=f"index file {url!r}"))


def scan(entry: storage.FileInfo) -> Source:
    """Items, partitions and schema of a source, from its footer when the statistics tell
    (else from its ``item_id``/``platform``/``datetime`` columns)."""
    url = entry.url
    source = Source(url=url, size=entry.size, mtime_ns=entry.mtime_ns)
    with parquet(url, entry.size) as pf:
        md = pf.metadata
        schema = pf.schema_arrow
        source.rows = md.num_rows
        source.native = _is_native(schema)
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
        elif source.native:
            table = pf.read(columns=["item_id", "platform", "datetime"], use_threads=False)
            source.items, source.partitions = _groups(table, url)
    if md.num_rows and not source.native:
        table = read_foreign(url, entry.size)
        source.extra = [f for f in table.schema if f.name not in SCHEMA.names]
        source.items, source.partitions = _groups(table, url)
    href = meta.get("item_href") if isinstance(meta, dict) else None
    if isinstance(href, str) and href and len(source.items) == 1 and meta.get("item_id") in (None, *source.items):
        source.items = {item: href for item in source.items}
    return source


def layout_href(url: str, item_id: str) -> str | None:
    """``{root}/{platform}/{item_id}/stac_item.json`` for a source in the bucket layout
    (``{root}/index/{platform}/{item_id}/index_{item_id}.parquet``), if that file exists."""
    import re

    match = re.match(r"^(?P<root>.*)/index/(?P<platform>[^/]+)/(?P<item>[^/]+)/index_(?P=item)\.parquet$", url)
    if match is None or match.group("item") != item_id:
        return None
    candidate = f"{match.group('root')}/{match.group('platform')}/{item_id}/stac_item.json"
    try:
        return candidate if storage.exists(candidate) else None
    except StorageError:
        return None


# --- rows -----------------------------------------------------------------------------------


def _conform(table: pa.Table, schema: pa.Schema, url: str) -> pa.Table:
    from stacchip.scan import conform

    with guarded(url):
        return conform(table, schema, schema.names)


def _load(piece: Piece, schema: pa.Schema) -> pa.Table:
    """The rows of ``piece``'s file in ``schema``: a spanning source's rows of its partition only,
    a rewritten partition's part file less the rows of ``drop`` items."""
    import pyarrow.compute as pc

    from stacchip.schema import bool_array, string_array

    url = piece.url
    if piece.kind == "source" and not piece.native:
        table = read_foreign(url, piece.size)
    else:
        with parquet(url, piece.size) as pf, guarded(url):
            present = [n for n in schema.names if n in pf.schema_arrow.names]
            table = pf.read(columns=present, use_threads=False)
    table = _conform(table, schema, url)
    if table.num_rows and piece.spans:
        with guarded(url):
            table = table.filter(bool_array(_mine(table, piece)))
    if table.num_rows and piece.drop:
        with guarded(url):
            keep = pc.invert(pc.is_in(table.column("item_id"), value_set=string_array(sorted(piece.drop))))
            table = table.filter(keep)
    return table


def _mine(table: pa.Table, piece: Piece) -> np.ndarray:
    """Which rows of ``table`` are of ``piece``'s platform and year."""
    import pyarrow.compute as pc

    from stacchip.schema import string_array

    years = _years(pc.cast(table.column("datetime"), pa.int64()).to_numpy())
    platform = pc.equal(table.column("platform"), string_array([piece.platform])[0])
    return (years == piece.year) & np.asarray(platform.to_numpy(zero_copy_only=False), dtype=bool)


def _check(piece: Piece, table: pa.Table) -> None:
    """:class:`IndexFileError` naming ``piece``'s file when its rows are not what it was said to hold."""
    import pyarrow.compute as pc

    url = piece.url
    for name in ("item_id", "platform", "datetime"):
        if table.column(name).null_count:
            raise IndexFileError(f"{url}: rows without {name} cannot be compacted")
    mine = _mine(table, piece)
    if not mine.all():
        n = int((~mine).sum())
        raise IndexFileError(
            f"{url}: {n} of its {table.num_rows} rows are not of {piece.platform} in {piece.year}, "
            "which its statistics (or the manifest) say it holds")
    if piece.items is not None:
        stray = sorted(set(pc.unique(table.column("item_id")).to_pylist()) - piece.items)
        if stray:
            raise IndexFileError(f"{url}: holds rows of item {stray[0]!r}, which its statistics do not name")


def read_group(pieces: Sequence[Piece], schema: pa.Schema) -> pa.Table:
    """The rows ``pieces`` (of one partition) give it, in ``schema`` (missing extra columns as
    nulls), checked: every row belongs to the partition and a source holds only the items its
    footer promised -- the first file that breaks this is named (:class:`IndexFileError`).

    The checks run once over the group's rows; only a group that fails is checked file by file.
    """
    import pyarrow.compute as pc

    from stacchip.schema import empty_table, string_array

    tables = [_load(p, schema) for p in pieces]
    kept = [(p, t) for p, t in zip(pieces, tables, strict=True) if t.num_rows]
    if not kept:
        return empty_table(schema)
    table = pa.concat_tables([t for _, t in kept]) if len(kept) > 1 else kept[0][1]
    try:
        first = kept[0][0]
        ok = not any(table.column(n).null_count for n in ("item_id", "platform", "datetime"))
        ok = ok and bool(_mine(table, first).all()) and all(
            (p.platform, p.year) == (first.platform, first.year) for p, _ in kept)
        promised = [p for p, _ in kept if p.items is not None]
        if ok and promised:
            allowed = string_array(sorted(set().union(*(p.items or frozenset() for p in promised))))
            checked = pa.concat_tables([t.select(["item_id"]) for p, t in kept if p.items is not None])
            ok = bool(pc.all(pc.is_in(checked.column("item_id"), value_set=allowed)).as_py())
    except (pa.ArrowException, ValueError, TypeError) as exc:
        ok = False
        logger.debug("group check failed (%s); checking file by file", exc)
    if not ok:
        for piece, part in kept:
            with guarded(piece.url):
                _check(piece, part)
    return table


def read_piece(piece: Piece, schema: pa.Schema) -> pa.Table:
    """The rows ``piece`` gives its partition (:func:`read_group` of one piece)."""
    return read_group([piece], schema)


def groups_of(pieces: Sequence[Piece], max_bytes: int = 32 * 1024 * 1024, max_files: int = 64) -> list[list[Piece]]:
    """``pieces`` in order, in groups of at most ``max_files`` files or about ``max_bytes`` bytes
    (a group is read, checked and keyed at once: per-file overheads shared)."""
    groups: list[list[Piece]] = []
    size = 0
    for piece in pieces:
        if not groups or len(groups[-1]) >= max_files or size + piece.size > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece.size
    return groups
