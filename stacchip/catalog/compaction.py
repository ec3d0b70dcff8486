"""Compaction: many per-item index files into one partitioned, curve-sorted GeoParquet dataset.

:func:`compact` reads per-item index files (``index/{platform}/{item_id}/index_{item_id}.parquet``,
or any index files, directories and ``s3://`` prefixes) and writes::

    {dest}/{platform}/year={year}/part-{run}-{n:05d}.parquet
    {dest}/_manifest.json                      (see stacchip.compacted)
    {dest}/_items-{run}.pq                     (per-item provenance, Parquet)

``platform`` is the rows' ``platform`` (URI-escaped; see :func:`partition_key`) and
``year`` the UTC year of their ``datetime``. Within a partition, rows are sorted
along a Hilbert curve over their chip centres in lon/lat, then by ``datetime``, then by
``chipid`` (:data:`~stacchip.catalog.parts.SORT_KEY`), cut into row groups of
``row_group_rows`` rows and part files of ``file_rows`` rows, so each row group and
each file covers a compact area and its ``bbox`` statistics let a reader skip it. Files
are GeoParquet 1.1 (WKB, OGC:CRS84, ``bbox`` covering), zstd, with row-group statistics.

Engines. The sort runs out of core on an engine made for it:

* ``engine="duckdb"`` (default): DuckDB on this machine, within ``memory`` bytes (default
  4 GiB, whatever the catalog size; DuckDB's external sort spills to ``temp_directory``),
  one partition at a time (:mod:`stacchip.catalog.engine_duckdb`);
* ``engine="dask"``: the same compaction on a ``dask.distributed`` cluster (``client``, or
  a local cluster of ``workers`` processes): Dask sorts each partition across the workers
  (:mod:`stacchip.catalog.engine_dask`). The part files and row groups hold the same rows
  in the same order as the embedded engine's.

Re-runs (incremental). A source is skipped when the provenance records it with the same
fingerprint (size and modification time): its rows are in the dataset; the part files of
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

Commit protocol, one writer at a time (:mod:`stacchip.catalog.commit`): a run takes the
destination's lock (a second writer stops with exit status 2 naming the holder;
``break_lock`` for a dead holder), stages its files out of sight of directory readers,
writes the manifest (the commit point), then moves the files into place. A run that fails
before the commit leaves the destination as it was. A source that cannot be read as an
index (not Parquet, a damaged page, rows its statistics do not describe) stops the run
with :class:`~stacchip.errors.IndexFileError` naming that file (exit status 2); a storage
failure is a :class:`~stacchip.errors.StorageError` (exit status 1).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from stacchip import compacted as mf
from stacchip import storage
from stacchip.catalog import commit
from stacchip.catalog._io import list_files, normalise, under
from stacchip.catalog.hilbert import DEFAULT_ORDER
from stacchip.catalog.parts import (  # noqa: F401  (partition_key, PART_RE: importable here)
    PART_RE,
    Output,
    file_tables,
    merge_extents,
    partition_key,
    sort_order,
    write_part,
)
from stacchip.catalog.sources import Piece, Source, layout_href, scan
from stacchip.errors import ConfigError, IndexFileError, StorageNotFoundError
from stacchip.schema import SCHEMA
from stacchip.storage import FileInfo

logger = logging.getLogger(__name__)

#: Rows per Parquet row group (the readers' unit of skipping). 20k keeps what a selective
#: query reads small (a 1 degree box hitting a few hundred chips reads ~1 MB of each group it
#: touches, not ~6 MB) while a group's column chunks, contiguous and ~1 MB together, are still
#: one buffered ranged read on an object store.
ROW_GROUP_ROWS = 20_000
#: Rows per part file (a multiple of ROW_GROUP_ROWS): ~100 MB files.
FILE_ROWS = 1_000_000
#: A partition's new rows up to this fraction of its rows are appended as a new run.
APPEND_FRACTION = 0.2
#: A partition with this many runs is rewritten (one run) when it next receives rows.
MAX_RUNS = 8
#: Threads reading source footers and item-layout checks.
THREADS = 8
#: Memory budget of the embedded engine (bytes), whatever the catalog size.
MEMORY = 4 * 1024**3
#: Bytes of the budget kept outside DuckDB: the interpreter, Arrow, sources being read.
_BASE_RESERVE = 640 * 1024**2
#: Bytes per row of a part file held while it is gathered or written (Arrow rows, ~240 bytes for
#: Sentinel-2 rows, plus its Parquet bytes and the writer's buffers).
_ROW_BYTES = 400
#: Part files compressed and written at once, beside the sort (each holds a file's rows).
WRITERS = 2
ENGINES = ("duckdb", "dask")


def curve_order(table: pa.Table, order: int = DEFAULT_ORDER) -> Any:
    """Row order of ``table`` along the Hilbert curve of the chip centres, then by ``datetime``
    and ``chipid`` (the order of every run of part files)."""
    return sort_order(table, order)


def parse_bytes(value: int | float | str) -> int:
    """Bytes of ``4GB``, ``512MiB``, ``1e9`` or a number; :class:`ConfigError` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().upper().replace(" ", "")
        units = {"TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "TB": 1e12, "GB": 1e9,
                 "MB": 1e6, "KB": 1e3, "T": 1024**4, "G": 1024**3, "M": 1024**2, "K": 1024, "B": 1}
        factor = 1.0
        for unit, size in units.items():
            if text.endswith(unit):
                text, factor = text[: -len(unit)], float(size)
                break
        try:
            number = float(text) * factor
        except ValueError:
            raise ConfigError(f"memory {value!r} is not a size (e.g. 4GB, 512MiB)") from None
    if not number >= 256 * 1024**2:
        raise ConfigError(f"memory {value!r} is below 256 MiB, too little to compact in")
    return int(number)


@dataclass
class CompactResult:
    """What a compaction did (counts of sources, items, rows; partition keys by outcome)."""

    dest: str
    manifest: str
    run: str
    engine: str = "duckdb"
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
            f"{len(self.appended)}, untouched {len(self.untouched)}; {self.seconds:.1f} s ({self.engine})"
        )


# --- provenance ---------------------------------------------------------------------------------


@dataclass
class Record:
    """What the provenance says about one compacted source."""

    fingerprint: str
    rows: int
    partitions: set[str] = field(default_factory=set)
    items: dict[str, str | None] = field(default_factory=dict)


def _records(root: str, manifest: Mapping[str, Any]) -> dict[str, Record]:
    """``{source URL: Record}`` of a compacted index (its provenance)."""
    if not manifest.get("partitions") and not manifest.get("items") and not manifest.get("sources"):
        return {}
    table = mf.provenance(root, manifest)
    out: dict[str, Record] = {}
    cols = [table.column(n).to_pylist() for n in ("source", "item_id", "partition", "fingerprint",
                                                  "source_rows", "item_href")]
    for source, item_id, key, fingerprint, rows, href in zip(*cols, strict=True):
        if source is None:
            raise IndexFileError(f"{root}: a provenance row names no source")
        rec = out.get(source)
        if rec is None:
            rec = out[source] = Record(str(fingerprint), int(rows or 0))
        if key is not None:
            rec.partitions.add(key)
        if item_id is not None:
            rec.items[item_id] = href
    return out


def _provenance_bytes(records: Mapping[str, Record]) -> bytes:
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {n: [] for n in mf.provenance_schema().names}
    for source in sorted(records):
        rec = records[source]
        items: list[tuple[str | None, str | None]] = list(sorted(rec.items.items())) or [(None, None)]
        keys: list[str | None] = list(sorted(rec.partitions)) or [None]
        for key in keys:
            for item_id, href in items:
                columns["item_id"].append(item_id)
                columns["partition"].append(key)
                columns["source"].append(source)
                columns["fingerprint"].append(rec.fingerprint)
                columns["source_rows"].append(rec.rows)
                columns["item_href"].append(href)
    table = pa.table(columns, schema=mf.provenance_schema())
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=100_000)
    return sink.getvalue()


# --- planning -------------------------------------------------------------------------------------


def _union_schema(base: pa.Schema, extras: Iterable[tuple[str, pa.Field]]) -> pa.Schema:
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


@dataclass(frozen=True)
class Job:
    """One sorted run to write: partition ``key`` from ``pieces`` (about ``rows`` rows)."""

    key: str
    platform: str
    year: int
    pieces: tuple[Piece, ...]
    rows: int


def _source_pieces(source: Source, key: str) -> Piece:
    platform, year = source.partitions[key]
    return Piece(url=source.url, size=source.size, key=key, platform=platform, year=year, kind="source",
                 native=source.native, spans=len(source.partitions) > 1,
                 items=frozenset(source.items) if source.native else None)


def _part_pieces(dest: str, key: str, part: Mapping[str, Any], drop: set[str]) -> list[Piece]:
    return [Piece(url=mf.file_url(dest, f["path"], f"manifest of {dest}"), size=int(f.get("bytes") or 0),
                  key=key, platform=str(part["platform"]), year=int(part["year"]), kind="part",
                  drop=frozenset(drop)) for f in part["files"]]


# --- running the engines ----------------------------------------------------------------------------


def _run_duckdb(jobs: Sequence[Job], schema: pa.Schema, output: Output, memory: int, threads: int,
                temp_directory: str | None) -> dict[str, list[dict[str, Any]]]:
    from collections import deque
    from concurrent.futures import Future

    from tqdm import tqdm

    from stacchip.catalog.engine_duckdb import default_temp_directory, sorted_batches

    limit = duckdb_limit(memory, output.file_rows)
    futures: dict[str, list[Future[dict[str, Any]]]] = {}
    # Part files are compressed on WRITERS threads while DuckDB goes on sorting and streaming;
    # at most WRITERS files wait or are being written, so memory stays bounded.
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        pending: deque[Future[dict[str, Any]]] = deque()
        for job in tqdm(jobs, desc="partitions", unit="partition", disable=None, leave=False):
            batches = sorted_batches(job.pieces, schema, memory_limit=limit, threads=threads,
                                     read_threads=min(4, max(1, threads)), order=output.order,
                                     temp_directory=temp_directory or default_temp_directory())
            futures[job.key] = []
            for n, table in enumerate(file_tables(batches, schema, output.file_rows)):
                while len(pending) >= WRITERS:
                    pending.popleft().result()
                future = pool.submit(write_part, output, job.key, n, table)
                del table
                pending.append(future)
                futures[job.key].append(future)
        return {key: [f.result() for f in fs] for key, fs in futures.items()}


def duckdb_limit(memory: int, file_rows: int) -> int:
    """DuckDB's ``memory_limit`` (bytes) within a budget of ``memory`` bytes: the budget less what
    this process holds besides (the interpreter and Arrow, :data:`_BASE_RESERVE`; the part files
    gathered and being written, ``WRITERS + 1`` of ``file_rows`` rows)."""
    return max(256 * 1024**2, memory - _BASE_RESERVE - (WRITERS + 1) * _ROW_BYTES * file_rows)


def _run_dask(jobs: Sequence[Job], schema: pa.Schema, output: Output, client: Any,
              workers: int | None) -> dict[str, list[dict[str, Any]]]:
    from stacchip.catalog.engine_dask import compact_partition, open_client

    own = client is None or isinstance(client, str)
    client = open_client(client if isinstance(client, str) else None, workers) if own else client
    try:
        return {job.key: compact_partition(client, job.key, job.pieces, schema, output, rows=job.rows)
                for job in jobs}
    finally:
        if own:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()


# --- the run ------------------------------------------------------------------------------------------


def _check_settings(row_group_rows: int, file_rows: int, append_fraction: float, max_runs: int,
                    engine: str) -> tuple[int, int]:
    if int(row_group_rows) < 1:
        raise ConfigError(f"row_group_rows must be >= 1, got {row_group_rows}")
    if int(file_rows) < int(row_group_rows):
        raise ConfigError(f"file_rows ({file_rows}) must be at least row_group_rows ({row_group_rows})")
    if not 0 <= float(append_fraction):
        raise ConfigError(f"append_fraction must be >= 0, got {append_fraction}")
    if int(max_runs) < 1:
        raise ConfigError(f"max_runs must be >= 1, got {max_runs}")
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    return int(row_group_rows), int(file_rows) // int(row_group_rows) * int(row_group_rows)


def _given(sources: str | Iterable[str], dest: str) -> dict[str, FileInfo]:
    if isinstance(sources, (str, bytes)) or hasattr(sources, "__fspath__"):
        sources = [str(sources)]
    entries: dict[str, FileInfo] = {}
    for given in sources:
        text = normalise(given)
        try:
            found = [e for e in list_files(text) if not under(e.url, [dest])]
        except StorageNotFoundError as exc:  # bad input; other storage errors stay storage errors (retry)
            raise IndexFileError(f"cannot list index files under {str(given)!r}: {exc}") from exc
        if not found:
            raise IndexFileError(f"no .parquet index files under {str(given)!r} (outside {dest})")
        entries.update((e.url, e) for e in found)
    return entries


def compact(  # noqa: C901 - one pass over sources, partitions and the commit; each step is a helper
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
    engine: str = "duckdb",
    memory: int | str = MEMORY,
    temp_directory: str | None = None,
    client: Any = None,
    workers: int | None = None,
    break_lock: bool = False,
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
    ``engine``: ``"duckdb"`` (this machine, within ``memory`` bytes or a size such as
    ``"4GB"``; spills to ``temp_directory``, default ``$STACCHIP_TMPDIR`` or the system
    temp directory) or ``"dask"`` (``client``: a ``dask.distributed.Client`` or a scheduler
    address; else a local cluster of ``workers`` processes). ``break_lock``: remove the lock
    a dead writer left (see :mod:`stacchip.catalog.commit`).
    """
    started = time.perf_counter()
    row_group_rows, file_rows = _check_settings(row_group_rows, file_rows, append_fraction, max_runs, engine)
    budget = parse_bytes(memory)
    dest = normalise(dest)
    manifest_url = storage.join(dest, mf.MANIFEST_NAME)
    now = dt.datetime.now(dt.timezone.utc)
    run = now.strftime("%Y%m%dT%H%M%SZ") + secrets.token_hex(3)
    result = CompactResult(dest=dest, manifest=manifest_url, run=run, engine=engine)
    entries = _given(sources, dest)  # bad sources are named before anything is locked or written

    lock = commit.acquire(dest, run, break_lock)
    output = Output(dest=dest, run=run, row_group_rows=row_group_rows, file_rows=file_rows, order=int(sort_order))
    progress = {"committed": False}  # set once the manifest (the commit point) is written
    done = False
    try:
        try:
            current = mf.load(manifest_url)
        except StorageNotFoundError:
            current = None
        if current is not None and current.get("pending"):
            logger.warning("%s: finishing the commit of an earlier run", dest)
            result.removed += commit.finish(dest, current)
        commit.clean_staging(dest)
        old = mf.empty_manifest() if rebuild or current is None else current
        old_records = {} if rebuild or current is None else _records(dest, old)
        _compact_into(dest, entries, old, old_records, current, result, output, rewrite=rewrite, rebuild=rebuild,
                      append_fraction=float(append_fraction), max_runs=int(max_runs), threads=threads,
                      engine=engine, budget=budget, temp_directory=temp_directory, client=client,
                      workers=workers, lock=lock, now=now, progress=progress)
        done = True
    finally:
        if not done and not progress["committed"]:
            try:  # this run's staged files (and any an earlier killed run left: the lock is ours)
                commit.clean_staging(dest)
            except Exception:  # noqa: BLE001 - the run's own error is what the caller needs
                logger.warning("could not remove the staging directory of run %s", run, exc_info=True)
        lock.release()
    result.seconds = time.perf_counter() - started
    logger.info("%s", result.summary())
    return result


def _compact_into(  # noqa: C901 - the incremental rules, step by step
    dest: str,
    entries: dict[str, FileInfo],
    old: dict[str, Any],
    old_records: dict[str, Record],
    current: dict[str, Any] | None,
    result: CompactResult,
    output: Output,
    *,
    rewrite: bool,
    rebuild: bool,
    append_fraction: float,
    max_runs: int,
    threads: int,
    engine: str,
    budget: int,
    temp_directory: str | None,
    client: Any,
    workers: int | None,
    lock: commit.Lock,
    now: dt.datetime,
    progress: dict[str, bool],
) -> None:
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
    old_parts: dict[str, dict[str, Any]] = old["partitions"]

    # Partitions whose files are not all there as recorded: rebuilt from their sources.
    damaged = {
        key for key, part in old_parts.items()
        if any((e := present.get(mf.file_url(dest, f["path"], f"manifest of {dest}"))) is None
               or e.size != f.get("bytes") for f in part["files"])
    }
    for key in sorted(damaged):
        logger.warning("%s: part files missing or changed; rebuilding the partition from its sources", key)
        for url, rec in old_records.items():
            if key in rec.partitions and url not in entries:
                try:
                    listed = list_files(url)
                except StorageNotFoundError as exc:
                    raise IndexFileError(
                        f"partition {key} of {dest} is damaged and its source {url} is gone ({exc}); "
                        "compact again with rebuild"
                    ) from exc
                entries.update((e.url, e) for e in listed)

    def unchanged(url: str, e: FileInfo) -> bool:
        rec = old_records.get(url)
        return (rec is not None and rec.fingerprint == f"{e.size}:{e.mtime_ns}"
                and not (rec.partitions & damaged))

    to_read = [e for url, e in sorted(entries.items()) if not unchanged(url, e)]
    result.sources_skipped = len(entries) - len(to_read)
    scanned: list[Source] = _map(scan, to_read, threads, "scanning sources")
    result.sources_read = len(scanned)

    # New items: latest source wins over earlier rows; two new sources may not share one.
    new_items: dict[str, str] = {}
    for s in scanned:
        for item in s.items:
            if item in new_items:
                raise IndexFileError(f"item {item!r} is in two sources: {new_items[item]} and {s.url}")
            new_items[item] = s.url
    missing_href = [(s, i) for s in scanned for i, h in s.items.items() if h is None]
    layout_hrefs = _map(lambda p: layout_href(p[0].url, p[1]), missing_href, threads, "finding items")
    for (s, item), href in zip(missing_href, layout_hrefs, strict=True):
        s.items[item] = href

    # Rows that go: those of re-read sources as recorded before, and earlier rows of new items.
    dropped: dict[str, set[str]] = {}  # partition -> items whose old rows are removed
    records: dict[str, Record] = {}
    reread = {s.url for s in scanned}
    replaced: set[str] = set()
    for url, rec in old_records.items():
        items = set(rec.items)
        gone = items if url in reread else items & new_items.keys()
        for key in rec.partitions:
            if gone:
                dropped.setdefault(key, set()).update(gone)
        replaced |= gone & new_items.keys()
        if url in reread:
            continue
        if gone:
            rec = Record(rec.fingerprint, rec.rows, set(rec.partitions),
                         {k: v for k, v in rec.items.items() if k not in gone})
            if not rec.items:
                continue
        records[url] = rec
    for s in scanned:
        records[s.url] = Record(s.fingerprint, s.rows, set(s.partitions), dict(s.items))
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

    # --- jobs: which rows each touched partition's new run holds
    jobs: list[Job] = []
    kept_files: dict[str, list[dict[str, Any]]] = {}
    obsolete: list[str] = []
    touched = sorted(set(incoming) | set(dropped) | damaged)
    for key in touched:
        platform, year = where[key]
        before = old_parts.get(key)
        fresh = [_source_pieces(s, key) for s in incoming.get(key, [])]
        fresh_rows = sum(s.rows if len(s.partitions) == 1 else s.rows // max(1, len(s.partitions))
                         for s in incoming.get(key, []))
        runs = {f["run"] for f in before["files"]} if before else set()
        append = before is not None and (
            not rewrite and key not in damaged and not dropped.get(key)
            and fresh_rows <= append_fraction * before["rows"] and len(runs) < max_runs
        )
        pieces = list(fresh)
        if append and before is not None:
            kept_files[key] = list(before["files"])
            result.appended.append(key)
        else:
            kept_files[key] = []
            if before is not None and key not in damaged:
                pieces = _part_pieces(dest, key, before, dropped.get(key, set())) + pieces
                fresh_rows += before["rows"]
            if before is not None:
                obsolete += [f["path"] for f in before["files"]]
            (result.rewritten if before is not None else result.created).append(key)
        if pieces:
            jobs.append(Job(key, platform, year, tuple(pieces), fresh_rows))

    # --- the sort and the staged part files
    if jobs:
        if engine == "dask":
            written = _run_dask(jobs, schema, output, client, workers)
        else:
            written = _run_duckdb(jobs, schema, output, budget, max(1, min(threads, 2)), temp_directory)
    else:
        written = {}

    parts_out: dict[str, dict[str, Any]] = {k: v for k, v in old_parts.items()}
    for key in touched:
        platform, year = where[key]
        files = kept_files.get(key, []) + written.get(key, [])
        new = written.get(key, [])
        result.files_written += [f["path"] for f in new]
        result.rows_written += sum(f["rows"] for f in new)
        if files:
            bbox, when = merge_extents(files)
            parts_out[key] = {"platform": platform, "year": year, "rows": sum(f["rows"] for f in files),
                              "bbox": bbox, "datetime": when, "files": files}
        else:
            parts_out.pop(key, None)
    result.untouched = sorted(set(parts_out) - set(touched))
    for key in parts_out:
        mf.check_relative(key, "partition")

    changed = bool(result.files_written) or old_parts.keys() != parts_out.keys() or rebuild or bool(scanned) \
        or set(records) != set(old_records) or (current or {}).get(mf.FORMAT_KEY) != mf.FORMAT_VERSION
    if not changed and current is not None:
        manifest = current
    else:
        manifest = _manifest(old, parts_out, schema, records, output, now)
        items_rel = manifest["items"]["path"]
        storage.write_bytes(storage.join(dest, items_rel), _provenance_bytes(records))
        old_items = (current or {}).get("items", {}) or {}
        named = {f["path"] for p in parts_out.values() for f in p["files"]}
        leftovers = [url[len(dest) + 1:] for url in present
                     if url.startswith(dest + "/") and PART_RE.match(url[len(dest) + 1:])]
        remove = sorted((set(obsolete) | set(leftovers)) - named)
        if old_items.get("path") and old_items["path"] != items_rel:
            remove.append(old_items["path"])
        manifest["pending"] = {"staging": commit.staging_dir(output.run),
                               "files": list(result.files_written), "remove": remove}
        lock.check(dest)
        commit.write_manifest(dest, manifest)  # the commit point
        progress["committed"] = True  # from here a failure leaves the moves to the next run
        result.removed += commit.finish(dest, manifest)
    named = {f["path"] for p in manifest["partitions"].values() for f in p["files"]}
    result.rows = int(manifest["rows"])
    result.files = len(named)
    result.bytes = sum(int(f.get("bytes") or 0) for p in manifest["partitions"].values() for f in p["files"])


def _manifest(old: Mapping[str, Any], parts_out: dict[str, dict[str, Any]], schema: pa.Schema,
              records: Mapping[str, Record], output: Output, now: dt.datetime) -> dict[str, Any]:
    parts_out = dict(sorted(parts_out.items()))
    bbox, when = merge_extents(parts_out.values())
    items = {r for rec in records.values() for r in rec.items}
    return {
        mf.FORMAT_KEY: mf.FORMAT_VERSION,
        "created": old.get("created") or now.isoformat().replace("+00:00", "Z"),
        "updated": now.isoformat().replace("+00:00", "Z"),
        "rows": sum(p["rows"] for p in parts_out.values()),
        "file_count": sum(len(p["files"]) for p in parts_out.values()),
        "bbox": bbox,
        "datetime": when,
        "layout": "{platform}/year={year}/part-{run}-{n:05d}.parquet",
        "sort": {"curve": "hilbert", "order": int(output.order), "point": "bbox centre (lon, lat), degrees",
                 "then": ["datetime", "chipid"], "scope": "each run of part files in a partition"},
        "row_group_rows": output.row_group_rows,
        "file_rows": output.file_rows,
        "arrow_schema": mf.encode_schema(schema),
        "partitions": parts_out,
        "items": {"path": mf.PROVENANCE_NAME.format(run=output.run), "items": len(items), "sources": len(records)},
    }
