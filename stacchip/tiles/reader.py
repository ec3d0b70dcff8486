"""The tile read path: the tiles a read needs, fetched together and decoded in a
thread pool, gathered into exactly the pixels :func:`stacchip.reader.read_indexed`
returns (``(bands, len(rows), len(cols))``, ``fill`` outside the raster).

* :class:`TileFile` is one open raster: its layout and byte source.
* :class:`TileEngine` owns the decode pool (one worker per core by default,
  ``STACCHIP_DECODE_THREADS``), the I/O for remote files (coalesced ranged GETs,
  up to 16 in flight: obstore's async API on one event-loop thread, or, in a child
  forked after its parent used obstore, blocking GETs of the synchronous client in
  fetch threads) and the shared :class:`TileCache`. With one thread
  (``Chipper(threads=1)``) everything runs in the caller's thread.
* Ranges the synchronous client fetches are received into buffers that are reused
  once their tiles are decoded (at most :data:`BUFFER_POOL_BYTES` kept free).
* :class:`TileCache` keeps decoded tiles keyed by file version (href + the
  identity its layout was read with: size and ETag, or size, mtime, inode and
  ctime) and tile, up to a budget in bytes (``STACCHIP_TILE_CACHE_MB``, default
  :data:`DEFAULT_CACHE_MB` MB; least recently used tiles go first; tiles being
  read are shared, never read twice). A scan in tile order therefore decodes
  every tile once as long as one row of tiles of every band fits (10 Sentinel-2
  bands of 1024 px tiles: ~160 MB). ``Chipper.chips`` keeps the tiles its queued
  chips hold within half this budget, whatever its read-ahead depth.
* Tiles a process already holds in its cache are served for the rest of its life
  without looking at the file again; every read that reaches the disk or the
  store is checked against the file's identity (a local file: one ``fstat``
  after each tile's ``pread``; a remote one: every response), and a file that
  changed has its header read again (:meth:`TileFile.refresh`), never its old
  layout used on new bytes.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import numpy as np

from stacchip.tiles.decode import decode_tile
from stacchip.tiles.layouts import DEFAULT_STORE, LayoutStore, open_layout, read_layout
from stacchip.tiles.sources import (  # noqa: F401
    LocalSource,
    RemoteSource,
    StaleLayoutError,
    open_source,
    tile_href,
)
from stacchip.tiles.tiff import Layout

logger = logging.getLogger(__name__)

#: Default tile cache budget, MB (``STACCHIP_TILE_CACHE_MB`` overrides).
DEFAULT_CACHE_MB = 256
#: I/O workers for remote files (requests wait on the network, not the CPU).
REMOTE_IO_THREADS = 16
#: Receive buffers of remote reads kept for reuse once their tiles are decoded (bytes),
#: and the step new ones are rounded up to: fresh memory costs page faults and cache
#: misses on every tile, reused memory does not.
BUFFER_POOL_BYTES = 32 * 2**20
BUFFER_STEP = 256 * 1024

TileKey = tuple[int, int, int]  # (plane, tile row, tile col)
#: One tile along an axis: (tile index, output positions, indices within the tile).
Run = tuple[int, Any, Any]


# --- cache -------------------------------------------------------------------------------


class TileCache:
    """Decoded tiles (futures) by key, bounded by ``budget`` bytes of finished tiles."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._entries: OrderedDict[Any, Future] = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: Any) -> tuple[Future, bool]:
        """The future of ``key`` and whether the caller must fill it (a miss)."""
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return fut, False
            fut = Future()
            self._entries[key] = fut
            self.misses += 1
        fut.add_done_callback(functools.partial(self._finished, key))
        return fut, True

    def _finished(self, key: Any, fut: Future) -> None:
        with self._lock:
            if self._entries.get(key) is not fut:
                return
            if fut.cancelled() or fut.exception() is not None:
                del self._entries[key]  # failed reads are tried again next time
                return
            value = fut.result()
            size = int(value.nbytes) if value is not None else 0
            self._sizes[key] = size
            self._bytes += size
            self._evict()

    def _evict(self) -> None:
        if self._bytes <= self.budget:
            return
        for key in list(self._entries):
            if self._bytes <= self.budget:
                break
            if key not in self._sizes:
                continue  # still being read
            del self._entries[key]
            self._bytes -= self._sizes.pop(key)

    def drop_file(self, file_key: Any) -> None:
        """Forget every tile of one file version."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == file_key]:
                del self._entries[key]
                self._bytes -= self._sizes.pop(key, 0)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._bytes = 0


def _cache_budget() -> int:
    try:
        mb = float(os.environ.get("STACCHIP_TILE_CACHE_MB", DEFAULT_CACHE_MB))
    except ValueError:
        mb = DEFAULT_CACHE_MB
    return int(max(0.0, mb) * 2**20)


def _name_thread(name: str) -> None:
    """Give the OS thread a name (``top -H``, ``/proc/*/task/*/comm``); best effort, Linux."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - a name is a nicety
        pass


class _AsyncIO:
    """One event-loop thread running remote fetches (obstore's async API), at most
    ``limit`` requests in flight: no thread per request waits on the network."""

    def __init__(self, limit: int) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self._limit = limit
        self._sem: Any = None
        self._thread = threading.Thread(target=self._run, name="stacchip-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import asyncio

        _name_thread("stacchip-io")
        asyncio.set_event_loop(self.loop)
        self._sem = asyncio.Semaphore(self._limit)
        self.loop.run_forever()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        import asyncio

        async def run() -> Any:
            while self._sem is None:
                await asyncio.sleep(0)
            async with self._sem:
                return await fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def shutdown(self, wait: bool = True) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        if wait:
            self._thread.join(timeout=30)


class _Inline:
    """An executor that runs each job in the caller's thread (``threads=1``)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the future
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


# --- engine ------------------------------------------------------------------------------


class TileEngine:
    """Decode and I/O pools plus the tile cache (created lazily, reset after a fork)."""

    def __init__(self, decode_threads: int, io_threads: int, cache: TileCache) -> None:
        self.decode_threads = max(1, int(decode_threads))
        self.io_threads = max(1, int(io_threads))
        self.cache = cache
        self._lock = threading.Lock()
        self._decode: Any = None
        self._io: Any = None
        self._fetch: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._decode = None
        self._io = None
        self._fetch = None
        self._pid = os.getpid()

    def _pool(self, name: str, make: Callable[[], Any]) -> Any:
        """The pool ``self._<name>``, made on first use (and again in a forked child)."""
        if os.getpid() != self._pid:
            self._after_fork()
        pool = getattr(self, name)
        if pool is None:
            with self._lock:
                pool = getattr(self, name)
                if pool is None:
                    pool = make()
                    setattr(self, name, pool)
        return pool

    def _decode_pool(self) -> Any:
        return self._pool("_decode", lambda: _Inline() if self.decode_threads == 1 else ThreadPoolExecutor(
            self.decode_threads, thread_name_prefix="stacchip-decode", initializer=_name_thread,
            initargs=("stacchip-decode",)))

    def _remote_pool(self, blocking: bool) -> tuple[Any, Callable[..., Any]]:
        """Where remote byte ranges are fetched, and the job that fetches one: the
        caller's thread (one I/O thread), fetch threads with blocking GETs (the
        synchronous client), or obstore's async API on one event-loop thread."""
        if self.io_threads == 1:
            return _Inline(), _remote_job
        if blocking:
            return self._pool("_fetch", lambda: ThreadPoolExecutor(
                self.io_threads, thread_name_prefix="stacchip-fetch", initializer=_name_thread,
                initargs=("stacchip-fetch",))), _remote_job
        return self._pool("_io", lambda: _AsyncIO(self.io_threads)), _remote_job_async

    def tiles(self, f: TileFile, keys: list[TileKey]) -> dict[TileKey, Future]:
        """Futures of the decoded tiles ``keys`` of ``f`` (``None`` for sparse tiles);
        missing ones are fetched together (remote: coalesced ranges, in parallel)."""
        decode = self._decode_pool()
        layout = f.layout
        out: dict[TileKey, Future] = {}
        todo: list[tuple[TileKey, Future, int, int]] = []
        for key in keys:
            idx = layout.tile_index(*key)
            offset, count = int(layout.offsets[idx]), int(layout.counts[idx])
            if count == 0:
                fut: Future = Future()
                fut.set_result(None)  # sparse: filled, no bytes read
                out[key] = fut
                continue
            fut, claimed = self.cache.claim((f.cache_key, key))
            out[key] = fut
            if claimed:
                todo.append((key, fut, offset, count))
        if not todo:
            return out
        if not f.source.remote:
            for _key, fut, offset, count in todo:
                decode.submit(_local_job, f, fut, offset, count)
            return out
        from stacchip.tiles.sources import coalesce

        ranges = [(offset, offset + count) for _, _, offset, count in todo]
        io, job = self._remote_pool(cast(Any, f.source).blocking)  # decoding stays in the decode pool
        for start, end, members in coalesce(ranges):
            group = [todo[i] for i in members]
            io.submit(job, f, group, start, end, decode)
        return out

    def shutdown(self) -> None:
        for pool in (self._fetch, self._io, self._decode):  # fetches hand tiles to the decode pool: it goes last
            if pool is not None and not isinstance(pool, _Inline):
                pool.shutdown(wait=True)
        self._decode = self._io = self._fetch = None


def _settle(fut: Future, fn: Callable[[], Any]) -> None:
    if fut.done():
        return
    try:
        fut.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to the future
        fut.set_exception(exc)


def _local_job(f: TileFile, fut: Future, offset: int, count: int) -> None:
    def work() -> np.ndarray:
        data = cast(LocalSource, f.source).read_checked(offset, count, f.expect)  # StaleLayoutError if it changed
        return f.decode(data)

    _settle(fut, work)


class _Buffers:
    """Free receive buffers, at most :data:`BUFFER_POOL_BYTES` in all; a range takes
    the smallest one that holds it (if at most twice its size plus :data:`BUFFER_STEP`),
    else new memory."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._sizes: list[int] = []  # sorted, beside the buffers of those sizes
        self._free: list[np.ndarray] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self.made = self.reused = 0

    def take(self, n: int) -> np.ndarray:
        with self._lock:
            i = bisect.bisect_left(self._sizes, n)
            if i < len(self._sizes) and self._sizes[i] <= 2 * n + BUFFER_STEP:
                size = self._sizes.pop(i)
                self._bytes -= size
                self.reused += 1
                return self._free.pop(i)
            self.made += 1
        return np.empty(-(-n // BUFFER_STEP) * BUFFER_STEP, np.uint8)

    def give(self, buf: np.ndarray) -> None:
        size = int(buf.size)
        with self._lock:
            if self._bytes + size > self.budget:
                if not self._sizes or self._sizes[0] >= size:
                    return
                self._bytes -= self._sizes.pop(0)  # a larger buffer serves more ranges than the smallest
                self._free.pop(0)
                if self._bytes + size > self.budget:
                    return
            i = bisect.bisect_left(self._sizes, size)
            self._sizes.insert(i, size)
            self._free.insert(i, buf)
            self._bytes += size

    @property
    def nbytes(self) -> int:
        return self._bytes


_buffers = _Buffers(BUFFER_POOL_BYTES)


def _remote_job(f: TileFile, group: list[tuple[TileKey, Future, int, int]], start: int, end: int,
                decode: Any) -> None:
    source = cast(Any, f.source)  # remote files only
    buf = _buffers.take(end - start) if source.blocking else None  # (obstore brings its own memory)
    try:
        data = source.read_into(start, end, buf, expect=f.expect)
    except BaseException as exc:  # noqa: BLE001 - every tile of the group fails with it
        if buf is not None:
            _buffers.give(buf)
        _fail_group(group, exc)
        return
    _decode_group(f, group, start, data, decode, buf)


def _fail_group(group: list[tuple[TileKey, Future, int, int]], exc: BaseException) -> None:
    for _, fut, _, _ in group:
        if not fut.done():
            fut.set_exception(exc)


def _decode_group(f: TileFile, group: list[tuple[TileKey, Future, int, int]], start: int, data: Any,
                  decode: Any, buf: np.ndarray | None = None) -> None:
    """Decode each tile of one fetched byte range (``data`` starts at file offset
    ``start``); ``buf``, the memory it was received into, is reused once every
    tile of the group is decoded (decoding never keeps a view of its input)."""
    view = memoryview(data)
    done = _Countdown(len(group), buf) if buf is not None else None
    try:
        for _, fut, offset, count in group:
            chunk = view[offset - start:offset - start + count]
            decode.submit(_decode_one, f, fut, chunk, done)
    except RuntimeError as exc:  # the decode pool was shut down meanwhile: no tile is left waiting
        _fail_group(group, exc)  # (its buffer is not reused: tiles submitted before may still read it)


def _decode_one(f: TileFile, fut: Future, chunk: memoryview, done: _Countdown | None) -> None:
    _settle(fut, lambda: f.decode(chunk))
    if done is not None:
        done.one()


class _Countdown:
    """Gives ``buf`` back to the buffer pool when ``n`` tiles are decoded."""

    def __init__(self, n: int, buf: np.ndarray) -> None:
        self.n = n
        self.buf: np.ndarray | None = buf
        self._lock = threading.Lock()

    def one(self) -> None:
        with self._lock:
            self.n -= 1
            buf = self.buf if self.n == 0 else None
            if buf is not None:
                self.buf = None
        if buf is not None:
            _buffers.give(buf)


async def _remote_job_async(f: TileFile, group: list[tuple[TileKey, Future, int, int]], start: int, end: int,
                            decode: Any) -> None:
    try:
        data = await cast(Any, f.source).read_async(start, end, expect=f.expect)  # remote files only
    except BaseException as exc:  # noqa: BLE001 - every tile of the group fails with it
        _fail_group(group, exc)
        return
    _decode_group(f, group, start, data, decode)


_engines: dict[tuple[int, int], TileEngine] = {}
_engines_lock = threading.Lock()
_cache: TileCache | None = None


def shared_cache() -> TileCache:
    """The process-wide tile cache."""
    global _cache
    if _cache is None:
        with _engines_lock:
            if _cache is None:
                _cache = TileCache(_cache_budget())
    return _cache


def decode_threads_setting() -> int:
    """Decode threads: ``STACCHIP_DECODE_THREADS`` (a whole number from 1), else one per core.
    A chipper's pool is the smaller of this and its ``threads`` (e.g. 1 in each of many
    DataLoader workers)."""
    raw = os.environ.get("STACCHIP_DECODE_THREADS", "").strip()
    if not raw:
        return os.cpu_count() or 1
    if not raw.isdigit() or int(raw) < 1:
        from stacchip.errors import ConfigError

        raise ConfigError(f"environment variable STACCHIP_DECODE_THREADS={raw!r} is not a whole number from 1")
    return int(raw)


def engine(decode_threads: int | None = None, io_threads: int | None = None) -> TileEngine:
    """The shared engine for a pool size (decode defaults: one per core, or
    ``STACCHIP_DECODE_THREADS``)."""
    if decode_threads is None:
        decode_threads = decode_threads_setting()
    io_threads = REMOTE_IO_THREADS if io_threads is None else io_threads
    key = (max(1, decode_threads), max(1, io_threads))
    eng = _engines.get(key)
    if eng is None:
        from stacchip.reader import _fork_aware

        cache = shared_cache()
        with _engines_lock:
            eng = _engines.get(key)
            if eng is None:
                eng = TileEngine(key[0], key[1], cache)
                _engines[key] = eng
                _fork_aware.add(eng)
    return eng


# --- files ---------------------------------------------------------------------------------


class TileFile:
    """One raster opened for tile reads: its :class:`Layout` and byte source."""

    def __init__(self, href: str, what: str = "", store: LayoutStore | None = None) -> None:
        self.href = href
        self.what = what
        self.store = store if store is not None else DEFAULT_STORE
        self.source: LocalSource | RemoteSource = open_source(href, what)
        self._set_layout(open_layout(href, self.source, self.store))

    def _set_layout(self, layout: Layout) -> None:
        from stacchip.tiles.sources import Identity

        self.layout = layout
        self.cache_key = (self.href, layout.identity())
        self.expect = Identity(layout.size, layout.etag, None) if self.source.remote else \
            Identity(layout.size, None, layout.mtime, layout.inode, layout.ctime)
        self._sparse_value = 0 if layout.nodata is None else layout.nodata

    def refresh(self, stale: Any = None) -> None:
        """Read the header again (the file changed) and forget its cached tiles;
        ``stale`` is the cache key a failed read used (no second read of the header
        when another read already refreshed it). A file that changed into one the
        tile reader does not read is an :class:`~stacchip.errors.AssetReadError`."""
        if stale is not None and stale != self.cache_key:
            return
        shared_cache().drop_file(self.cache_key)
        layout = read_layout(self.href, self.source, self.store)
        if layout.unsupported is not None:
            raise StaleLayoutError(f"{self.what}href {self.href!r} changed into a file the tile reader does "
                                   f"not read ({layout.unsupported}); open it again")
        self._set_layout(layout)

    def decode(self, data: Any) -> np.ndarray:
        try:
            return decode_tile(self.layout, data)
        except Exception as exc:
            from stacchip.errors import AssetReadError

            raise AssetReadError(f"cannot decode a tile of {self.what}href {self.href!r}: {exc}") from exc

    def read(self, rows: np.ndarray, cols: np.ndarray, fill: float,
             eng: TileEngine | None = None, runs: tuple[list[Run], list[Run]] | None = None) -> PendingRead:
        """Start reading pixels ``[:, rows][:, :, cols]``; ``.result()`` gives them.

        ``runs`` is ``(self.runs(rows, 0), self.runs(cols, 1))`` when the caller
        keeps them (a scan reads the same rows and columns many times)."""
        return PendingRead(self, np.asarray(rows), np.asarray(cols), fill, eng or engine(), runs)

    def runs(self, idx: np.ndarray, axis: int) -> list[Run]:
        """How pixel indices ``idx`` along ``axis`` (0 rows, 1 columns) fall into tiles."""
        layout = self.layout
        if axis == 0:
            return _runs(np.asarray(idx), layout.height, layout.tile_height)
        return _runs(np.asarray(idx), layout.width, layout.tile_width)

    def close(self) -> None:
        self.source.close()


class PendingRead:
    """A read in flight; :meth:`result` waits for its tiles and gathers the pixels."""

    def __init__(self, f: TileFile, rows: np.ndarray, cols: np.ndarray, fill: float,
                 eng: TileEngine, runs: tuple[list[Run], list[Run]] | None = None) -> None:
        self.f, self.rows, self.cols, self.fill, self.eng = f, rows, cols, fill, eng
        self._start(runs)

    def _start(self, runs: tuple[list[Run], list[Run]] | None = None) -> None:
        layout = self.layout = self.f.layout  # the file version this read uses
        self.key = self.f.cache_key
        if runs is None:
            self.plan = _plan(layout, self.rows, self.cols)
        else:
            self.plan = _Plan(runs[0], runs[1], layout.planes) if runs[0] and runs[1] else None
        keys = self.plan.keys if self.plan is not None else []
        self.futures = self.eng.tiles(self.f, keys) if keys else {}

    def result(self) -> np.ndarray:
        try:
            tiles = {k: fut.result() for k, fut in self.futures.items()}
        except StaleLayoutError:
            logger.info("%s changed since its layout was read; reading its header again", self.f.href)
            self.f.refresh(self.key)
            self._start()  # the new layout's plan
            tiles = {k: fut.result() for k, fut in self.futures.items()}
        return _assemble(self.layout, self.plan, tiles, self.rows, self.cols, self.fill,
                         self.f._sparse_value)


class _Rep:
    """Local indices ``start, start, ..., stop - 1, stop - 1``: each of
    ``start:stop`` repeated ``factor`` times (a coarser band on the fine grid)."""

    __slots__ = ("start", "stop", "factor")

    def __init__(self, start: int, stop: int, factor: int) -> None:
        self.start, self.stop, self.factor = start, stop, factor


class _Plan:
    """Which tiles a read needs and where their pixels go."""

    def __init__(self, row_runs: list[Run], col_runs: list[Run], planes: int) -> None:
        self.row_runs = row_runs  # (tile row, output positions, local indices)
        self.col_runs = col_runs
        self.keys = [(p, tr, tc) for p in range(planes) for tr, _, _ in row_runs for tc, _, _ in col_runs]


def _as_slice(idx: np.ndarray) -> Any:
    """A slice when ``idx`` is a run of consecutive integers, else ``idx``."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and (len(idx) < 3 or bool(np.all(np.diff(idx) == 1))):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _as_local(idx: np.ndarray) -> Any:
    """Indices within a tile: a slice, a :class:`_Rep` (each index repeated alike), or ``idx``."""
    sl = _as_slice(idx)
    if isinstance(sl, slice) or len(idx) < 2:
        return sl
    first = int(idx[0])
    factor = int(np.searchsorted(idx, first, side="right"))
    if factor > 1 and len(idx) % factor == 0:
        stop = first + len(idx) // factor
        if np.array_equal(idx, np.repeat(np.arange(first, stop), factor)):
            return _Rep(first, stop, factor)
    return idx


def _runs(idx: np.ndarray, n: int, tile: int) -> list[Run]:
    inside = np.nonzero((idx >= 0) & (idx < n))[0]
    if len(inside) == 0:
        return []
    vals = idx[inside]
    tiles = vals // tile
    out = []
    for t in np.unique(tiles).tolist():
        sel = tiles == t
        pos = inside[sel]
        out.append((int(t), _as_slice(pos), _as_local(vals[sel] - t * tile)))
    return out


def _plan(layout: Layout, rows: np.ndarray, cols: np.ndarray) -> _Plan | None:
    row_runs = _runs(rows, layout.height, layout.tile_height)
    col_runs = _runs(cols, layout.width, layout.tile_width)
    if not row_runs or not col_runs:
        return None
    return _Plan(row_runs, col_runs, layout.planes)


def _take(a: np.ndarray, idx: Any, axis: int) -> np.ndarray:
    if isinstance(idx, slice):
        return a[(slice(None),) * axis + (idx,)]
    if isinstance(idx, _Rep):
        idx = np.repeat(np.arange(idx.start, idx.stop), idx.factor)
    return a.take(idx, axis=axis)


def _put(out: np.ndarray, rpos: slice, cpos: slice, tile: np.ndarray, rloc: Any, cloc: Any) -> bool:
    """``out[:, rpos, cpos] = tile[:, rloc][:, :, cloc]`` without temporaries when
    each local index is a slice or a :class:`_Rep` (broadcast into a reshaped view);
    False when it cannot be done that way."""
    if not isinstance(rloc, (slice, _Rep)) or not isinstance(cloc, (slice, _Rep)):
        return False
    target = out[:, rpos, cpos]
    b, h, w = target.shape
    fr = rloc.factor if isinstance(rloc, _Rep) else 1
    fc = cloc.factor if isinstance(cloc, _Rep) else 1
    rs = slice(rloc.start, rloc.stop)
    cs = slice(cloc.start, cloc.stop)
    src = tile[:, rs, cs]
    if src.shape[1] * fr != h or src.shape[2] * fc != w:
        return False
    if fr == 1 and fc == 1:
        target[...] = src
        return True
    # Splitting an axis is always a view. Each column phase takes the tile's
    # pixels at stride fc (long inner loops, not a broadcast with an inner
    # loop of fc elements), then rows are copied whole.
    view = target.reshape(b, h // fr, fr, w)
    first = view[:, :, 0, :]
    for j in range(fc):
        first[:, :, j::fc] = src
    for i in range(1, fr):
        view[:, :, i, :] = first
    return True


def _assemble(layout: Layout, plan: _Plan | None, tiles: dict[TileKey, Any], rows: np.ndarray,
              cols: np.ndarray, fill: float, sparse: float) -> np.ndarray:
    bands = layout.bands
    shape = (bands, len(rows), len(cols))
    dtype = np.dtype(layout.dtype)
    if plan is None:
        return np.full(shape, fill, dtype=dtype)
    covered = (len(plan.row_runs) and sum(_len(p) for _, p, _ in plan.row_runs) == len(rows)
               and sum(_len(p) for _, p, _ in plan.col_runs) == len(cols))
    out = np.empty(shape, dtype=dtype) if covered else np.full(shape, fill, dtype=dtype)
    for tr, rpos, rloc in plan.row_runs:
        for tc, cpos, cloc in plan.col_runs:
            for p in range(layout.planes):
                tile = tiles[(p, tr, tc)]
                dest = slice(None) if layout.planar == 1 else slice(p, p + 1)
                if isinstance(rpos, slice) and isinstance(cpos, slice):
                    if tile is None:
                        out[dest, rpos, cpos] = sparse
                    elif not _put(out[dest], rpos, cpos, tile, rloc, cloc):
                        out[dest, rpos, cpos] = _take(_take(tile, rloc, 1), cloc, 2)
                    continue
                block: Any = sparse if tile is None else _take(_take(tile, rloc, 1), cloc, 2)
                r = np.arange(len(rows))[rpos] if isinstance(rpos, slice) else rpos
                c = np.arange(len(cols))[cpos] if isinstance(cpos, slice) else cpos
                out[dest, r[:, None], c[None, :]] = block
    return out


def _len(pos: Any) -> int:
    return pos.stop - pos.start if isinstance(pos, slice) else len(pos)


class TileFiles:
    """Open :class:`TileFile` per href for one owner (a Chipper), per process:
    a forked or spawned child opens its own (handles never cross processes)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._files: dict[str, TileFile] = {}
        self._by_key: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, href: str, what: str, store: LayoutStore) -> TileFile:
        if os.getpid() != self._pid:
            self._reset()
        f = self._files.get(href)
        if f is None:
            with self._lock:
                f = self._files.get(href)
                if f is None:
                    f = TileFile(href, what, store)
                    self._files[href] = f
        return f

    def by_key(self) -> dict[str, Any]:
        """A per-process memo for the owner (asset key -> TileFile or None)."""
        if os.getpid() != self._pid:
            self._reset()
        return self._by_key

    def open_count(self) -> int:
        if os.getpid() != self._pid:
            self._reset()
        return len(self._files)

    def close(self) -> None:
        if os.getpid() != self._pid:
            self._reset()
            return
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self._by_key.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._reset()


def _after_fork_in_child() -> None:
    """A forked child starts with no pools, an empty tile cache (the parent's
    reads in flight never finish here) and fresh locks."""
    global _cache, _engines_lock, _buffers
    _engines.clear()
    _cache = None
    _buffers = _Buffers(BUFFER_POOL_BYTES)
    _engines_lock = threading.Lock()
    DEFAULT_STORE._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
