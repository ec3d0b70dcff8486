"""Reading index rows from Parquet files without ``pyarrow.dataset``: fragments, row-group
pruning by extents, two-phase row-group reads, and the dataset-like object
:func:`stacchip.index.open_index` returns.

An index is a list of :class:`Fragment` s: a Parquet file (all its row groups or some),
each row group with the extents it may be pruned by (from a compacted index's manifest,
or from the file's own statistics), or a table in memory (an upstream-written file,
normalised). A query (:meth:`IndexDataset.scan`) keeps the row groups whose extents may
hold passing rows, reads the filter columns of those, then only for row groups with
passing rows the other columns, and keeps the passing rows (then the exact geometry
test). Files are read with :class:`pyarrow.parquet.ParquetFile` through
:func:`stacchip.storage.open_input`, synchronously (``use_threads=False``,
``pre_buffer=False``): no Arrow thread pool runs, so no Arrow task can still be running
when the interpreter exits (an Arrow dataset scan can leave one, which aborts the process
with ``terminate called without an active exception``). Files are read in parallel by a
few Python threads, joined before a call returns.

Read failures: storage failures stay :class:`~stacchip.errors.StorageError` (worth
retrying); anything else (not Parquet, a damaged page, a wrong column type) is
:class:`~stacchip.errors.IndexFileError` naming the file.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import pyarrow as pa

from stacchip import storage
from stacchip.errors import IndexFileError, StorageError
from stacchip.filters import Selection
from stacchip.schema import GEOMETRY_COLUMN, compute, empty_table

if TYPE_CHECKING:
    import pyarrow.dataset as pads

logger = logging.getLogger(__name__)

#: Python threads reading the row groups of one query (they wait on I/O and decode outside the GIL).
READ_THREADS = max(2, min(8, os.cpu_count() or 2))


class Extent(NamedTuple):
    """What a row group holds, for pruning: ``bbox`` ``[xmin, ymin, xmax, ymax]`` (degrees),
    ``when`` ``[first, last]`` (ISO 8601 or microseconds), ``cloud``/``nodata`` ``[min, max]``
    fractions, ``rows``. A missing extent proves nothing. (A named tuple: a compacted
    index's manifest makes one per row group when it is opened, thousands at 10^8 chips.)"""

    rows: int | None = None
    bbox: Sequence[float] | None = None
    when: Sequence[Any] | None = None
    cloud: Sequence[float] | None = None
    nodata: Sequence[float] | None = None

    def may_hold(self, selection: Selection) -> bool:
        return selection.may_hold(self.bbox, self.when, self.cloud, self.nodata)


@dataclass(frozen=True)
class Fragment:
    """A Parquet file (``url``; ``row_groups`` None for all of them) or a ``table`` in memory.

    ``extents``: one :class:`Extent` per row group of the file (index = row group number),
    when known; ``name``: how errors name it (default ``url``).
    """

    url: str | None = None
    row_groups: tuple[int, ...] | None = None
    extents: tuple[Extent, ...] | None = None
    table: pa.Table | None = None
    name: str | None = None

    @property
    def shown(self) -> str:
        return self.name or self.url or "table in memory"

    def prune(self, selection: Selection) -> Fragment | None:
        """This fragment less the row groups ``selection`` cannot hit (None when none is left)."""
        if self.table is not None or self.extents is None or selection.empty:
            return self
        groups = range(len(self.extents)) if self.row_groups is None else self.row_groups
        kept = tuple(g for g in groups if self.extents[g].may_hold(selection))
        return replace(self, row_groups=kept) if kept else None

    @property
    def rows(self) -> int | None:
        """Rows of the chosen row groups, when the extents tell."""
        if self.table is not None:
            return self.table.num_rows
        if self.extents is None:
            return None
        groups = range(len(self.extents)) if self.row_groups is None else self.row_groups
        counts = [self.extents[g].rows for g in groups]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def _read_error(exc: BaseException, what: str) -> Exception:
    if isinstance(exc, StorageError):
        return exc
    return IndexFileError(f"{what}: {exc}")


def conform(table: pa.Table, schema: pa.Schema, columns: Sequence[str]) -> pa.Table:
    """``table`` with ``columns`` in that order and in ``schema``'s types: a column the file
    lacks is nulls, an extension-typed one its storage (geoarrow WKB as plain binary)."""
    arrays = []
    fields = []
    for name in columns:
        target = schema.field(name)
        if name in table.column_names:
            column = table.column(name)
            if isinstance(column.type, pa.ExtensionType):
                column = pa.chunked_array([c.storage for c in column.chunks], column.type.storage_type)
            if column.type != target.type:
                column = column.cast(target.type)
        else:
            column = pa.chunked_array([pa.nulls(table.num_rows, target.type)])
        arrays.append(column)
        fields.append(target)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


@dataclass(frozen=True)
class _Unit:
    """One row group of one file (or one table in memory) to read."""

    fragment: Fragment
    metadata: Any = None
    group: int | None = None


def _units(fragments: Sequence[Fragment], threads: int) -> list[_Unit]:
    """The row groups to read, in order; file footers read once each (in parallel)."""
    import pyarrow.parquet as pq

    files = [f for f in fragments if f.table is None]

    def footer(fragment: Fragment) -> Any:
        try:
            with storage.open_input(str(fragment.url)) as source:
                return pq.ParquetFile(source, pre_buffer=False).metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _read_error(exc, f"index file {fragment.shown!r} cannot be read") from exc

    footers = dict(zip([id(f) for f in files], _parallel(footer, files, threads), strict=True))
    units = []
    for fragment in fragments:
        if fragment.table is not None:
            units.append(_Unit(fragment))
            continue
        md = footers[id(fragment)]
        count = md.num_row_groups
        groups = list(range(count)) if fragment.row_groups is None else list(fragment.row_groups)
        bad = [g for g in groups if not 0 <= g < count]
        if bad:
            raise IndexFileError(f"index file {fragment.shown!r} has {count} row groups, row group {bad[0]} was asked")
        units += [_Unit(fragment, md, g) for g in groups]
    return units


def _read_unit(unit: _Unit, schema: pa.Schema, columns: Sequence[str]) -> pa.Table:
    """``columns`` of one unit, in ``schema``'s types (columns a file lacks as nulls)."""
    import pyarrow.parquet as pq

    if unit.fragment.table is not None:
        return conform(unit.fragment.table, schema, columns)
    fragment = unit.fragment
    try:
        with storage.open_input(str(fragment.url)) as source:
            pf = pq.ParquetFile(source, metadata=unit.metadata, pre_buffer=False)
            available = set(pf.schema_arrow.names)
            present = [c for c in columns if c in available]
            table = pf.read_row_group(int(unit.group or 0), columns=present, use_threads=False)
        return conform(table, schema, columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _read_error(exc, f"index file {fragment.shown!r} cannot be read") from exc


def _parallel(func: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``func`` over ``items`` in order, on a few Python threads (joined before returning)."""
    if len(items) <= 1 or threads <= 1:
        return [func(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(func, items))


def read_rows(
    fragments: Sequence[Fragment],
    schema: pa.Schema,
    selection: Selection,
    columns: Sequence[str],
    threads: int | None = None,
) -> pa.Table:
    """The rows of ``fragments`` passing ``selection``, as ``columns`` of ``schema``, in order.

    Each row group is one unit of work, read on a few Python threads: first the filter
    columns of every unit; then, of the units holding passing rows only, the other columns
    (the geometry apart from the rest, so they decode side by side); then the exact
    geometry test.
    """
    threads = threads or READ_THREADS
    names = list(columns)
    needed = names + ([GEOMETRY_COLUMN] if selection.boxes is not None and GEOMETRY_COLUMN not in names else [])
    fcols = [c for c in selection.columns() if c in schema.names]
    units = _units(fragments, threads)
    out_schema = pa.schema([schema.field(c) for c in names])
    if not units:
        return empty_table(out_schema)

    def first(unit: _Unit) -> tuple[pa.Table, pa.Array] | None:
        table = _read_unit(unit, schema, fcols)
        mask = selection.mask(table)
        if mask is None or not compute("any", mask).as_py():
            return None
        return compute("filter", table, mask), mask

    if fcols:
        firsts = _parallel(first, units, threads)
    else:
        firsts = [(None, None)] * len(units)
    kept = [(u, f) for u, f in zip(units, firsts, strict=True) if f is not None]
    rest = [c for c in needed if c not in fcols]
    groups = [g for g in ([c for c in rest if c == GEOMETRY_COLUMN], [c for c in rest if c != GEOMETRY_COLUMN]) if g]
    tasks = [(k, cols) for k in range(len(kept)) for cols in groups]

    def second(task: tuple[int, list[str]]) -> pa.Table:
        k, cols = task
        unit, (_, mask) = kept[k]
        table = _read_unit(unit, schema, cols)
        return compute("filter", table, mask) if mask is not None else table

    seconds = _parallel(second, tasks, threads)
    parts: dict[int, dict[str, Any]] = {k: {} for k in range(len(kept))}
    for k, (_, (table, _)) in enumerate(kept):
        if table is not None:
            for c in fcols:
                parts[k][c] = table.column(c)
    for (k, cols), table in zip(tasks, seconds, strict=True):
        for c in cols:
            parts[k][c] = table.column(c)
    tables = []
    for k in range(len(kept)):
        table = pa.Table.from_arrays([parts[k][c] for c in needed], schema=pa.schema([schema.field(c) for c in needed]))
        table = selection.exact(table).select(names)
        if table.num_rows:
            tables.append(table)
    return pa.concat_tables(tables) if tables else empty_table(out_schema)


def read_fragment(
    fragment: Fragment, schema: pa.Schema, selection: Selection, columns: Sequence[str]
) -> pa.Table:
    """The rows of one fragment passing ``selection`` (see :func:`read_rows`)."""
    return read_rows([fragment], schema, selection, columns)


@dataclass
class IndexDataset:
    """Index rows in Parquet files and tables, as :func:`stacchip.index.open_index` returns them.

    A small, dataset-like object: :attr:`schema`, :meth:`to_table`, :meth:`count_rows`,
    :meth:`head`, :attr:`files`; :func:`stacchip.index.query` scans it with its filters
    (:meth:`scan`). ``to_table``/``count_rows`` with a ``pyarrow.compute`` expression
    filter, and any other ``pyarrow.dataset.Dataset`` attribute (``get_fragments``,
    ``scanner``, ...), go through a ``pyarrow.dataset`` over the same files
    (:meth:`arrow_dataset`), built on first use.
    """

    fragments: list[Fragment]
    schema: pa.Schema
    description: str = "index"
    #: Fragments a selection may hit, when the dataset has a better plan than pruning each
    #: fragment's extents (a compacted index: its manifest's partitions, items).
    planner: Callable[[Selection], list[Fragment]] | None = None
    _arrow: Any = field(default=None, repr=False)

    # --- what stacchip reads --------------------------------------------------------------

    def plan(self, selection: Selection) -> list[Fragment]:
        """The fragments (with row groups) that may hold rows passing ``selection``."""
        if self.planner is not None:
            return self.planner(selection)
        kept = (f.prune(selection) for f in self.fragments)
        return [f for f in kept if f is not None]

    def scan(self, selection: Selection | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows passing ``selection`` (every row without one), ``columns`` of :attr:`schema`
        (all by default), in fragment order."""
        selection = selection or Selection()
        names = list(columns) if columns is not None else list(self.schema.names)
        unknown = [c for c in names if c not in self.schema.names]
        if unknown:
            raise IndexFileError(f"{self.description} has no column {unknown[0]!r} (columns: {self.schema.names})")
        return read_rows(self.plan(selection), self.schema, selection, names)

    @property
    def files(self) -> list[str]:
        """The files the dataset reads (tables in memory have none)."""
        return [f.url for f in self.fragments if f.url is not None]

    # --- the pyarrow.dataset.Dataset surface ------------------------------------------------

    def to_table(self, columns: Sequence[str] | None = None, filter: Any = None, **kwargs: Any) -> pa.Table:  # noqa: A002
        """Every row (``columns`` of them); an expression ``filter`` goes through :meth:`arrow_dataset`."""
        if filter is None and not kwargs:
            return self.scan(None, columns)
        return self.arrow_dataset().to_table(columns=columns, filter=filter, **kwargs)

    def count_rows(self, filter: Any = None, **kwargs: Any) -> int:  # noqa: A002
        """Rows of the dataset (from the recorded row counts when they are known)."""
        if filter is None and not kwargs:
            counts = [f.rows for f in self.fragments]
            if all(c is not None for c in counts):
                return sum(c for c in counts if c is not None)
            return self.scan(None, [self.schema.names[0]]).num_rows
        return int(self.arrow_dataset().count_rows(filter=filter, **kwargs))

    def head(self, num_rows: int, columns: Sequence[str] | None = None) -> pa.Table:
        """The first ``num_rows`` rows."""
        out: list[pa.Table] = []
        got = 0
        names = list(columns) if columns is not None else list(self.schema.names)
        for fragment in self.fragments:
            if got >= num_rows:
                break
            table = read_fragment(fragment, self.schema, Selection(), names)
            out.append(table.slice(0, num_rows - got))
            got += out[-1].num_rows
        return pa.concat_tables(out) if out else empty_table(pa.schema([self.schema.field(c) for c in names]))

    def to_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of every fragment in turn (one fragment in memory at a time)."""
        names = list(columns) if columns is not None else list(self.schema.names)
        for fragment in self.fragments:
            yield from read_fragment(fragment, self.schema, Selection(), names).to_batches()

    def arrow_dataset(self) -> pads.Dataset:
        """A ``pyarrow.dataset`` over the same rows (imports ``pyarrow.dataset``, ~0.3 s)."""
        if self._arrow is None:
            import pyarrow.dataset as pads

            parts: list[Any] = []
            files = [f for f in self.fragments if f.url is not None]
            tables = [f.table for f in self.fragments if f.table is not None]
            if files:
                fmt = pads.ParquetFileFormat()
                fragments = []
                for f in files:
                    filesystem, path = storage.arrow_filesystem(str(f.url))
                    fragments.append(fmt.make_fragment(
                        path, filesystem=filesystem, row_groups=None if f.row_groups is None else list(f.row_groups)))
                parts.append(pads.FileSystemDataset(fragments, schema=self.schema, format=fmt,
                                                    filesystem=fragments[0].filesystem))
            if tables:
                parts.append(pads.dataset(pa.concat_tables([conform(t, self.schema, self.schema.names)
                                                            for t in tables])))
            if not parts:
                parts.append(pads.dataset(empty_table(self.schema)))
            self._arrow = parts[0] if len(parts) == 1 else pads.dataset(parts)
        return self._arrow

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.arrow_dataset(), name)


def file_extents(metadata: Any) -> tuple[Extent, ...]:
    """One :class:`Extent` per row group of a Parquet file, from its column statistics
    (``bbox.*``, ``datetime``, cloud, nodata); extents the statistics do not give are None."""
    cols: dict[str, int] = {}
    for i in range(metadata.num_columns):
        cols[metadata.schema.column(i).path] = i
    out = []
    for g in range(metadata.num_row_groups):
        rg = metadata.row_group(g)

        def rng(name: str, raw: bool = False, rg: Any = rg) -> tuple[Any, Any] | None:
            index = cols.get(name)
            if index is None:
                return None
            stats = rg.column(index).statistics
            if stats is None or not stats.has_min_max:
                return None
            return (stats.min_raw, stats.max_raw) if raw else (stats.min, stats.max)

        xmin, ymin, xmax, ymax = (rng(f"bbox.{n}") for n in ("xmin", "ymin", "xmax", "ymax"))
        bbox = None
        if xmin is not None and ymin is not None and xmax is not None and ymax is not None:
            bbox = (float(xmin[0]), float(ymin[0]), float(xmax[1]), float(ymax[1]))
        when = rng("datetime", raw=True)
        out.append(Extent(rows=rg.num_rows, bbox=bbox,
                          when=(int(when[0]), int(when[1])) if when is not None else None,
                          cloud=rng("cloud_cover_percentage"), nodata=rng("nodata_percentage")))
    return tuple(out)


def read_footers(urls: Sequence[str], threads: int = 16) -> list[Any]:
    """The Parquet footers (``FileMetaData``) of ``urls``, read on a few Python threads;
    :class:`IndexFileError` naming a file that is not Parquet."""
    import pyarrow.parquet as pq

    def one(url: str) -> Any:
        try:
            with storage.open_input(url) as source:
                return pq.ParquetFile(source, pre_buffer=False).metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _read_error(exc, f"index file {url!r} is not a readable Parquet file") from exc

    if len(urls) <= 1:
        return [one(u) for u in urls]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        return list(pool.map(one, urls))

