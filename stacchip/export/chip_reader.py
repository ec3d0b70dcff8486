"""Reading the chips of many items: read tasks, a process pool, and the per-process chipper cache.

:func:`plan_reads` cuts index rows into :class:`ReadTask` s (the chips of one
item, in row order, at most :data:`TASK_CHIPS` each); :class:`ChipReader`
runs them inline or over a spawned process pool and yields :class:`ReadResult` s
(pixels ``(n, C, H, W)`` in the platform's band order, from
:mod:`stacchip.platforms`, and their nodata masks). Within a task an item's
chips are read in COG block order, so blocks are decoded once; each worker
keeps the items it opened (:data:`CHIPPER_CACHE` of them) for the next tasks.

:class:`ChipperCache` is the one place chippers (and their open rasters) are
kept per process: :data:`CHIPPERS` serves the export's read tasks (prechip,
stats) and every :class:`~stacchip.ml.ChipDataset`. Each user owns its entries
and bounds them itself (``limit``: its least recently used entry is closed
first), forked children start empty, and nothing in it crosses a process
boundary.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import numpy as np
import pyarrow as pa
import rasterio
from tqdm import tqdm

from stacchip.chipper import Chipper
from stacchip.errors import AssetNotFoundError, IndexFileError, ItemError
from stacchip.grid import ChipGrid
from stacchip.platforms import PlatformBands, asset_nodata, is_nodata, platform_bands
from stacchip.reader import gdal_env
from stacchip.utils import load_item_under

#: Largest number of chips one worker task reads (one item's chips are split
#: into tasks of at most this many, in row order).
TASK_CHIPS = 64
#: Items whose chipper a worker keeps open for the export's read tasks.
CHIPPER_CACHE = 8

class Closable(Protocol):
    """What :class:`ChipperCache` keeps: anything that closes."""

    def close(self) -> None: ...


T = TypeVar("T", bound=Closable)


class ChipperCache:
    """Open chippers of this process, by owner and key, least recently used closed first.

    ``get(owner, key, build, limit)`` returns the entry of ``key`` (built by
    ``build()`` on first use); an owner never keeps more than ``limit`` entries.
    Entries are anything with ``close()`` (a :class:`~stacchip.chipper.Chipper`,
    an open export item). After a fork the child starts empty: the parent's
    entries are dropped there, neither used nor closed.
    """

    def __init__(self) -> None:
        self._owners = itertools.count(1)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Hashable, Hashable], Closable] = OrderedDict()
        #: Owners released by a finalizer, closed at the next use of the cache.
        self._released: collections.deque[Hashable] = collections.deque()

    def _here(self) -> OrderedDict[tuple[Hashable, Hashable], Closable]:
        if os.getpid() != self._pid:  # forked: the parent's handles are not ours
            self._reset()
        while self._released:
            try:
                owner = self._released.popleft()
            except IndexError:  # another thread took it
                break
            self.close(owner)
        return self._entries

    def release(self, owner: Hashable) -> None:
        """Close ``owner``'s entries at the next use of the cache. For finalizers: the
        garbage collector may run one while this thread holds the cache's lock (a
        plain close would then wait for itself), so this takes no lock."""
        self._released.append(owner)

    def new_owner(self) -> int:
        """A fresh owner id (unique in this process)."""
        return next(self._owners)

    def get(self, owner: Hashable, key: Hashable, build: Callable[[], T], limit: int) -> T:
        """The entry of ``(owner, key)``, built on first use; keeps at most ``limit`` per owner."""
        entries = self._here()
        with self._lock:
            found = entries.get((owner, key))
            if found is not None:
                entries.move_to_end((owner, key))
                return cast(T, found)
        built: Closable = build()  # outside the lock: opening an item reads its STAC JSON and rasters
        evicted: list[Closable] = []
        with self._lock:
            found = entries.get((owner, key))
            if found is not None:  # another thread built it meanwhile
                evicted.append(built)
                built = found
            entries[(owner, key)] = built
            entries.move_to_end((owner, key))
            mine = [k for k in entries if k[0] == owner]
            for old in mine[: max(0, len(mine) - max(1, int(limit)))]:
                evicted.append(entries.pop(old))
        for entry in evicted:
            entry.close()
        return cast(T, built)

    def held(self, owner: Hashable) -> dict[Hashable, Any]:
        """``{key: entry}`` of ``owner`` in this process, least recently used first (a copy)."""
        entries = self._here()
        with self._lock:
            return {k[1]: v for k, v in entries.items() if k[0] == owner}

    def close(self, owner: Hashable | None = None) -> None:
        """Close the entries of ``owner`` (every entry when None) in this process."""
        if os.getpid() != self._pid:
            self._reset()
        entries = self._entries
        with self._lock:
            gone = [k for k in entries if owner is None or k[0] == owner]
            closing = [entries.pop(k) for k in gone]
        for entry in closing:
            entry.close()


#: The chipper cache of this process.
CHIPPERS = ChipperCache()
#: Owner of the export's open items in :data:`CHIPPERS`.
EXPORT = "export"


@dataclass(frozen=True)
class ReadTask:
    """One worker task: chips of one item, in row order, with their output slots."""

    data: str
    platform: str
    item_id: str
    chip_size: int
    slots: tuple[int, ...]
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    mountpath: str | None = None


class _OpenItem:
    """A chipper over one item plus its channel assets and nodata values."""

    def __init__(self, task: ReadTask) -> None:
        item = load_item_under(task.data, task.platform, task.item_id)
        self.spec: PlatformBands = platform_bands(task.platform)
        self.keys = self.spec.asset_keys(item)
        # edge="keep": an index made with --edge keep holds the partial edge chips;
        # their pixels beyond the grid read as the fill value and are marked nodata.
        grid = ChipGrid.of(item, task.chip_size, edge="keep")
        self.chipper = Chipper(grid, mountpath=task.mountpath, assets=sorted(set(self.keys)))
        self.nodata = [
            self._nodata(item, key, band) for key, (_, band) in zip(self.keys, self.spec.sources, strict=True)
        ]

    def _nodata(self, item: Any, key: str, band: int) -> float | None:
        declared = asset_nodata(item.assets[key], band)
        if declared is not None:
            return declared
        with gdal_env(), rasterio.open(self.chipper.path(key)) as ds:
            if band < len(ds.nodatavals) and ds.nodatavals[band] is not None:
                return float(ds.nodatavals[band])
        return self.spec.default_nodata

    def _stack(self, chip: dict[str, np.ndarray], item_id: str, x: int, y: int) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.spec.stack(item_id, chip, self.keys)
        mask = np.stack([is_nodata(pixels[i], nd) for i, nd in enumerate(self.nodata)])
        # a partial edge chip: pixels beyond the grid are nodata whatever value filled them
        rows, cols = self.chipper.chip_grid.shape
        size = self.chipper.chip_grid.chip_size
        inside_y, inside_x = int(rows) - y * size, int(cols) - x * size
        if inside_y < size:
            mask[:, max(inside_y, 0) * mask.shape[1] // size:, :] = True
        if inside_x < size:
            mask[:, :, max(inside_x, 0) * mask.shape[2] // size:] = True
        return pixels, mask

    def read(self, x: int, y: int, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and nodata mask of one chip."""
        return self._stack(self.chipper.chip(x, y), item_id, x, y)

    def read_many(
        self, xs: Sequence[int], ys: Sequence[int], item_id: str
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(x, y, pixels, mask)`` of many chips, in COG block order where the chipper
        offers it (each block decoded once), read ahead in parallel."""
        many = getattr(self.chipper, "chips", None)
        if many is None:
            for x, y in zip(xs, ys, strict=True):
                yield (x, y, *self.read(x, y, item_id))
            return
        try:
            chips = many(list(zip(xs, ys, strict=True)), order="block")
        except TypeError:  # a chipper without block ordering
            chips = many(list(zip(xs, ys, strict=True)))
        for x, y, chip in chips:
            yield (x, y, *self._stack(chip, item_id, x, y))

    def close(self) -> None:
        self.chipper.close()


def _open_item(task: ReadTask, limit: int = CHIPPER_CACHE) -> _OpenItem:
    """The open item of ``task`` in this process (from :data:`CHIPPERS`, owner :data:`EXPORT`,
    which keeps ``limit`` items open)."""
    key = (task.data, task.platform, task.item_id, task.chip_size, task.mountpath)
    return CHIPPERS.get(EXPORT, key, lambda: _OpenItem(task), limit)


def close_open_items() -> None:
    """Close every item the export's read tasks keep open in this process."""
    CHIPPERS.close(EXPORT)


class ReadResult(NamedTuple):
    """Chips of one :class:`ReadTask`: pixels ``(n, C, H, W)`` in the source dtype and
    nodata mask, or ``None`` for both and ``missing`` naming why the item lacks a band."""

    slots: tuple[int, ...]
    pixels: np.ndarray | None
    mask: np.ndarray | None
    missing: str | None = None


def read_task(task: ReadTask) -> ReadResult:
    """Read the chips of ``task`` (see :class:`ReadResult`).

    An item without an asset (or band) the platform's band order needs is
    reported in ``missing`` instead of failing the job (upstream skipped such
    cubes too, e.g. single-polarisation Sentinel-1 scenes); read errors raise.
    """
    slot_of = {(x, y): slot for x, y, slot in zip(task.xs, task.ys, task.slots, strict=True)}
    slots = []
    pixels = []
    masks = []
    try:
        opened = _open_item(task)
        for x, y, p, m in opened.read_many(task.xs, task.ys, task.item_id):
            slots.append(slot_of[(x, y)])
            pixels.append(p)
            masks.append(m)
    except AssetNotFoundError as exc:
        return ReadResult(task.slots, None, None, str(exc))
    return ReadResult(tuple(slots), np.stack(pixels), np.stack(masks))


def plan_reads(
    rows: pa.Table,
    data: str,
    platform: str,
    mountpath: str | None = None,
    task_chips: int = TASK_CHIPS,
) -> list[ReadTask]:
    """Worker tasks for ``rows`` (slot ``i`` is row ``i``): grouped by item, row order inside."""
    item_ids = np.asarray(rows.column("item_id").to_pylist(), dtype=object)
    xs = rows.column("chip_index_x").to_numpy().astype(np.int64)
    ys = rows.column("chip_index_y").to_numpy().astype(np.int64)
    sizes = rows.column("chip_size").to_numpy().astype(np.int64)
    tasks = []
    for item_id in sorted(set(item_ids)):
        slots = np.nonzero(item_ids == item_id)[0]
        if len(set(sizes[slots].tolist())) > 1:
            raise IndexFileError(f"item {item_id!r}: the index mixes chip sizes {sorted(set(sizes[slots]))}")
        order = np.lexsort((xs[slots], ys[slots]))
        slots = slots[order]
        for start in range(0, len(slots), task_chips):
            part = slots[start:start + task_chips]
            tasks.append(
                ReadTask(
                    data=data, platform=platform, item_id=str(item_id), chip_size=int(sizes[part[0]]),
                    slots=tuple(int(s) for s in part), xs=tuple(int(v) for v in xs[part]),
                    ys=tuple(int(v) for v in ys[part]), mountpath=mountpath,
                )
            )
    return tasks


class _Done:
    """A finished result with the ``AsyncResult.get`` interface."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self, timeout: float | None = None) -> Any:
        return self.value


class ChipReader:
    """Runs :class:`ReadTask` s inline or over a process pool (kept for the reader's life)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))
        self._pool: Any = None

    def __enter__(self) -> ChipReader:
        if self.workers > 1:
            # spawn: GDAL and boto3 state of the parent are not fork-safe.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        close_open_items()

    def submit(self, func: Any, *args: Any) -> Any:
        """Run ``func(*args)`` in the pool (an ``AsyncResult``) or inline (a finished stand-in)."""
        if self._pool is not None:
            return self._pool.apply_async(func, args)
        return _Done(func(*args))

    def run(self, tasks: Sequence[ReadTask], desc: str = "chips") -> Iterator[ReadResult]:
        """Results of ``tasks`` as they finish, with a progress bar counting chips."""
        total = sum(len(t.slots) for t in tasks)
        results = (
            self._pool.imap_unordered(read_task, tasks) if self._pool is not None else map(read_task, tasks)
        )
        with tqdm(total=total, desc=desc, unit="chip", disable=total == 0 or None) as bar:
            for result in results:
                bar.update(len(result[0]))
                yield result


def item_reader(
    data: str,
    platform: str,
    table: pa.Table,
    mountpath: str | None = None,
    open_limit: int = CHIPPER_CACHE,
) -> Callable[[str, np.ndarray], Iterator[tuple[int, np.ndarray, np.ndarray]]]:
    """``read_item(item_id, rows)``: the chips of index rows ``rows`` (of ``table``, all of one
    item) read in this process, in COG block order (each block decoded once; tiles decode in
    the tile engine's threads, on every core), as ``(row, pixels (C, H, W), nodata mask)``.

    The item stays open (in :data:`CHIPPERS`, owner :data:`EXPORT`, ``open_limit`` items) for
    the next rows. An item lacking a band asset is an :class:`~stacchip.errors.ItemError`
    (the selection leaves such items out up front: what remains is bad input).
    """

    def read_item(item_id: str, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        part = table.take(pa.array(rows))
        sizes = set(part.column("chip_size").to_pylist())
        if len(sizes) > 1:
            raise IndexFileError(f"item {item_id!r}: the index mixes chip sizes {sorted(sizes)}")
        xs = [int(v) for v in part.column("chip_index_x").to_pylist()]
        ys = [int(v) for v in part.column("chip_index_y").to_pylist()]
        row_of = {(x, y): int(r) for x, y, r in zip(xs, ys, rows, strict=True)}
        task = ReadTask(data=data, platform=platform, item_id=item_id, chip_size=int(sizes.pop()),
                        slots=(), xs=(), ys=(), mountpath=mountpath)
        try:
            for x, y, pixels, mask in _open_item(task, open_limit).read_many(xs, ys, item_id):
                yield row_of[(x, y)], pixels, mask
        except AssetNotFoundError as exc:
            raise ItemError(f"{exc}; the platform's bands are a contract "
                            "(fix the item or leave it out of the index)") from exc

    return read_item
