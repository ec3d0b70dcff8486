"""The embedded compaction engine: DuckDB sorts a partition out of core within a memory limit.

The rows of a partition are read from their files by a few Python threads (through
:mod:`stacchip.storage`; see :func:`stacchip.catalog.sources.read_piece`), given their
Hilbert key (:func:`stacchip.catalog.parts.with_key`, numpy) and streamed into DuckDB as
Arrow record batches; DuckDB orders them by :data:`~stacchip.catalog.parts.SORT_KEY` with
its external sort -- spilling to ``temp_directory`` beyond ``memory_limit`` -- and the
sorted rows stream back as Arrow batches, cut into part files by the caller. DuckDB reads
no file itself (its own S3 support is an extension that needs a download): every byte
goes through the one configured storage layer.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa

from stacchip.catalog.hilbert import DEFAULT_ORDER
from stacchip.catalog.parts import KEY_COLUMN, SORT_KEY, with_key
from stacchip.catalog.sources import Piece, groups_of, read_group
from stacchip.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Rows per Arrow batch handed back by DuckDB.
BATCH_ROWS = 65_536


def prefetch(func: Callable[[T], R], items: Iterable[T], threads: int, ahead: int) -> Iterator[R]:
    """``func`` over ``items`` in order, on ``threads`` Python threads, at most ``ahead`` results
    held ahead of the consumer (memory stays bounded). The pool is joined when the iterator
    ends or is closed."""
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        queue: deque[Future[R]] = deque()
        try:
            for item in iterator:
                queue.append(pool.submit(func, item))
                if len(queue) >= max(1, ahead):
                    break
            while queue:
                result = queue.popleft().result()
                for item in iterator:
                    queue.append(pool.submit(func, item))
                    break
                yield result
        finally:
            for future in queue:
                future.cancel()


class _Feed:
    """The record batches DuckDB pulls; an exception raised while producing them is kept, so
    the caller re-raises it (DuckDB reports only its text)."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self.batches = batches
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.batches
        except BaseException as exc:
            self.error = exc
            raise


def connect(memory_limit: int, threads: int, temp_directory: str) -> Any:
    """A DuckDB connection for one sort: ``memory_limit`` bytes, ``threads``, spilling to
    ``temp_directory``; UTC, insertion order not kept (less memory)."""
    import duckdb

    con = duckdb.connect(config={
        "memory_limit": f"{max(64, memory_limit // (1024 * 1024))}MB",
        "threads": max(1, int(threads)),
        "temp_directory": temp_directory,
        "preserve_insertion_order": False,
    })
    con.execute("SET TimeZone = 'UTC'")  # timestamps come back as UTC (ICU is built in; loaded here)
    con.execute("SET enable_progress_bar = false")
    return con


def sorted_batches(
    pieces: Sequence[Piece],
    schema: pa.Schema,
    *,
    memory_limit: int,
    threads: int = 2,
    read_threads: int = 2,
    temp_directory: str | None = None,
    order: int = DEFAULT_ORDER,
) -> Iterator[pa.RecordBatch]:
    """The rows of ``pieces`` (one partition) in :data:`~stacchip.catalog.parts.SORT_KEY` order,
    as record batches of ``schema`` plus the key column.

    ``memory_limit``: bytes DuckDB may hold (beyond it, its sort spills to ``temp_directory``,
    a fresh directory under the system temp directory by default). An error reading a
    piece is raised as it was raised (e.g. :class:`~stacchip.errors.IndexFileError` naming
    the file).
    """
    keyed = schema.append(pa.field(KEY_COLUMN, pa.uint64(), nullable=False))

    def read(group: list[Piece]) -> pa.Table:
        return with_key(read_group(group, schema), order).cast(keyed)

    def batches() -> Iterator[pa.RecordBatch]:
        for table in prefetch(read, groups_of(pieces), read_threads, ahead=max(1, read_threads)):
            yield from table.to_batches()

    feed = _Feed(batches())
    if temp_directory is not None:
        try:
            os.makedirs(temp_directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--temp-dir {temp_directory!r}: cannot make the spill folder ({exc})") from exc
    with tempfile.TemporaryDirectory(prefix="stacchip-sort-", dir=temp_directory) as spill:
        con = connect(memory_limit, threads, spill)
        try:
            reader = pa.RecordBatchReader.from_batches(keyed, iter(feed))
            con.register("rows", reader)
            order_by = ", ".join(f'"{k}"' for k in SORT_KEY)
            result = con.sql(f'SELECT * FROM rows ORDER BY {order_by}')
            stream = (result.to_arrow_reader(BATCH_ROWS) if hasattr(result, "to_arrow_reader")
                      else result.fetch_record_batch(BATCH_ROWS))
            while True:
                try:
                    batch = stream.read_next_batch()
                except StopIteration:
                    break
                yield batch
        except Exception as exc:
            if feed.error is not None and feed.error is not exc:
                raise feed.error from None
            raise
        finally:
            con.close()
            logger.debug("DuckDB sort done (spill directory %s)", spill)


def default_temp_directory() -> str:
    """Where DuckDB spills: ``STACCHIP_TMPDIR``, else the system temp directory."""
    return os.environ.get("STACCHIP_TMPDIR") or tempfile.gettempdir()
