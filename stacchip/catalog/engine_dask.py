"""The distributed compaction engine: the same compaction on a Dask cluster (``dask.distributed``).

For one partition: Dask tasks read the pieces (groups of source files, ~``task_bytes`` each;
:func:`stacchip.catalog.sources.read_piece`) and give every row its Hilbert key; Dask's
own ``DataFrame.sort_values`` orders the rows by :data:`~stacchip.catalog.parts.SORT_KEY`
(sampled range partitioning and a shuffle between workers, spilling to their disks); the
sorted partitions stay on the workers while the client counts their rows; then one task
per part file gathers that file's rows (``file_rows`` of them, in order, from one or more
sorted partitions) and writes it to the staging area (:func:`stacchip.catalog.parts.write_part`).
The files and row groups hold the rows the embedded engine writes, in the same order.

Workers must reach the destination and the sources with the same storage settings as the
client (S3, or a file system they all mount). Needs the ``dask`` extra:
``pip install 'stacchip[dask]'``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from stacchip.catalog.parts import KEY_COLUMN, SORT_KEY, Output, with_key, write_part
from stacchip.catalog.sources import Piece, read_group
from stacchip.errors import ConfigError
from stacchip.schema import BBOX_FIELDS

logger = logging.getLogger(__name__)

#: Source bytes one read task takes (several small per-item files per task).
TASK_BYTES = 32 * 1024 * 1024
#: Rows per sorted Dask partition (a worker holds a few of them).
PARTITION_ROWS = 1_000_000
_FLAT = tuple(f"_bbox_{n}" for n in BBOX_FIELDS)


def _dtypes(typ: pa.DataType) -> Any:
    import pandas as pd

    if typ in (pa.uint64(), pa.float64()):
        return None  # numpy columns: the sort key and the flattened bbox
    return pd.ArrowDtype(typ)


def _flatten(table: pa.Table) -> pa.Table:
    """``bbox`` struct as four float64 columns (Dask's shuffle takes no struct columns)."""
    index = table.schema.get_field_index("bbox")
    box = table.column("bbox")
    box = box.combine_chunks() if box.num_chunks != 1 else box.chunk(0)
    table = table.remove_column(index)
    for i, name in enumerate(_FLAT):
        table = table.append_column(name, box.field(i))
    return table


def _unflatten(table: pa.Table, schema: pa.Schema) -> pa.Table:
    fields = [table.column(n).combine_chunks() if table.num_rows else pa.array([], pa.float64()) for n in _FLAT]
    box = pa.StructArray.from_arrays([f.cast(pa.float64()) for f in fields], names=list(BBOX_FIELDS))
    columns = [box if name == "bbox" else table.column(name) for name in schema.names]
    out = pa.Table.from_arrays(columns, names=schema.names)
    return out.cast(schema)


def _read_frame(pieces: Sequence[Piece], schema: pa.Schema, order: int) -> Any:
    """One read task: the rows of ``pieces`` with their key, as a pandas frame of Arrow columns."""
    table = with_key(read_group(pieces, schema), order)
    return _flatten(table).to_pandas(types_mapper=_dtypes)


def _meta(schema: pa.Schema, order: int) -> Any:
    return _flatten(with_key(schema.empty_table(), order)).to_pandas(types_mapper=_dtypes)


def _slice(frame: Any, start: int, stop: int) -> Any:
    return frame.iloc[start:stop]


def _write(frames: Sequence[Any], output: Output, key: str, n: int, schema: pa.Schema) -> dict[str, Any]:
    """One write task: the rows of part file ``n`` (slices of sorted partitions, in order)."""
    tables = [pa.Table.from_pandas(f, preserve_index=False) for f in frames]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    table = _unflatten(table.drop_columns([KEY_COLUMN]), schema)
    return write_part(output, key, n, table)


def _groups(pieces: Sequence[Piece], task_bytes: int) -> list[list[Piece]]:
    groups: list[list[Piece]] = []
    size = 0
    for piece in pieces:
        if not groups or size + piece.size > task_bytes:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece.size
    return groups


def _file_slices(lengths: Sequence[int], file_rows: int) -> list[list[tuple[int, int, int]]]:
    """For each part file, the ``(partition, start, stop)`` slices of the sorted partitions it holds."""
    total = int(sum(lengths))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    files = []
    for first in range(0, total, file_rows):
        last = min(total, first + file_rows)
        pieces = []
        for i, n in enumerate(lengths):
            a, b = max(first, starts[i]), min(last, starts[i] + n)
            if a < b:
                pieces.append((i, int(a - starts[i]), int(b - starts[i])))
        files.append(pieces)
    return files


def compact_partition(
    client: Any,
    key: str,
    pieces: Sequence[Piece],
    schema: pa.Schema,
    output: Output,
    *,
    rows: int,
    task_bytes: int = TASK_BYTES,
    partition_rows: int = PARTITION_ROWS,
) -> list[dict[str, Any]]:
    """Sort the rows of ``pieces`` (partition ``key``) on the cluster of ``client`` and write
    them as the part files of ``output``; returns their manifest entries in order."""
    try:
        import dask
        import dask.dataframe as dd
    except ImportError as exc:  # pragma: no cover - the extra is installed where this runs
        raise ConfigError("the dask engine needs dask[distributed]: pip install 'stacchip[dask]'") from exc
    groups = _groups(pieces, task_bytes)
    with dask.config.set({"dataframe.convert-string": False}):
        frame = dd.from_map(_read_frame, groups, schema=schema, order=output.order,
                            meta=_meta(schema, output.order), enforce_metadata=False)
        frame = frame.sort_values(list(SORT_KEY), npartitions=max(1, math.ceil(rows / partition_rows)))
        frame = client.persist(frame)
        try:
            lengths = [int(n) for n in client.compute(frame.map_partitions(len)).result()]
            parts = frame.to_delayed()
            writes = []
            for n, slices in enumerate(_file_slices(lengths, output.file_rows)):
                frames = [dask.delayed(_slice)(parts[i], a, b) for i, a, b in slices]
                writes.append(dask.delayed(_write)(frames, output, key, n, schema))
            futures = client.compute(writes) if writes else []
            try:
                entries = [f.result() for f in futures]
            except BaseException:
                client.cancel(futures)
                _quiesce(client)  # no write task may still be running when the run cleans up
                raise
        finally:
            del frame
    logger.info("%s: %d rows sorted on the cluster into %d file(s)", key, sum(lengths), len(entries))
    return entries


def _quiesce(client: Any, timeout: float = 120.0) -> None:
    """Wait (at most ``timeout`` seconds) until no task runs on the cluster."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not any(client.processing().values()):
                return
        except Exception:  # noqa: BLE001 - a cluster going away runs nothing
            return
        time.sleep(0.05)


def open_client(address: str | None = None, workers: int | None = None) -> Any:
    """A ``dask.distributed`` client: to the scheduler at ``address``, else a local cluster of
    ``workers`` worker processes (one thread each)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise ConfigError("the dask engine needs dask[distributed]: pip install 'stacchip[dask]'") from exc
    if address:
        return Client(address)
    cluster = LocalCluster(n_workers=max(1, int(workers or 2)), threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster)
