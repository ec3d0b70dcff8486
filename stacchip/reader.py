"""Opening and reading rasters.

* :func:`resolve_href` turns an asset href (local path, ``file://``, ``s3://``,
  ``http(s)://``, with upstream's ``mountpath``) into a path GDAL opens.
* :func:`gdal_options` is the GDAL configuration for cloud COGs: fixed options
  plus what :mod:`stacchip.storage.config` derives from the one I/O configuration
  (region, endpoint, credentials, CA bundle, proxies, requester-pays, retries), so
  GDAL's ``/vsis3/`` and ``/vsicurl/`` reach the same stores the same way.
* :class:`DatasetCache` keeps one open dataset per href per thread per process:
  datasets are opened once, never shared across threads, and a forked child
  never reuses its parent's handles.
* :func:`read_indexed` reads the smallest window holding the requested asset
  pixels and gathers them (nearest-neighbour resampling with exact indices).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import rasterio
from rasterio.env import get_gdal_config, set_gdal_config
from rasterio.errors import RasterioError
from rasterio.session import DummySession
from rasterio.windows import Window

from stacchip.errors import AssetReadError
from stacchip.storage import s3_endpoint  # noqa: F401 (importable here as before)
from stacchip.storage.config import settings as io_settings

logger = logging.getLogger(__name__)

#: GDAL settings for reading COGs over HTTP/S3 (set for every open and read).
CLOUD_COG_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    # Not VSI_CACHE: it wraps local files too and cost 40 % of the chip rate on
    # local COGs (benchmarks/); /vsicurl/ and /vsis3/ keep their own chunk cache.
}


def gdal_options() -> dict[str, str]:
    """GDAL configuration options for the current environment: :data:`CLOUD_COG_OPTIONS`
    plus those of the one I/O configuration (:meth:`~stacchip.storage.config.IOSettings.gdal_options`)."""
    return {**CLOUD_COG_OPTIONS, **io_settings().gdal_options()}


_config_lock = threading.Lock()
#: GDAL configuration values stacchip set (to tell them from the user's own).
_applied: dict[str, str] = {}
#: Every value stacchip ever set per key: a scoped ``rasterio.Env`` leaving may
#: restore one of our older values (e.g. a previous S3 endpoint), which is still ours.
_applied_ever: dict[str, set[str]] = {}

#: Smallest GDAL block cache stacchip wants, in MB: a block row of 10 bands of
#: a 10980-px scene (~160 MB) plus room for random reads. GDAL's default is 5 %
#: of RAM, which is less than this on the small machines batch jobs get.
MIN_BLOCK_CACHE_MB = 512
_cache_checked = False


def _ensure_block_cache() -> None:
    global _cache_checked
    if _cache_checked:
        return
    _cache_checked = True
    if "GDAL_CACHEMAX" in os.environ:
        return  # the user chose
    current = get_gdal_config("GDAL_CACHEMAX")
    if not isinstance(current, int) or current < 100_000:
        return  # set by the user (GDAL reads values below 100000 as MB)
    if current < MIN_BLOCK_CACHE_MB * 2**20:  # GDAL's default, in bytes
        set_gdal_config("GDAL_CACHEMAX", MIN_BLOCK_CACHE_MB)


#: GDAL keys set from the I/O configuration whatever their current value, even the
#: environment's: rasterio puts certifi's bundle in ``GDAL_CURL_CA_BUNDLE`` at import,
#: and the configuration already followed the user's own CA variables.
MANAGED_KEYS = frozenset({"GDAL_CURL_CA_BUNDLE"})


def configure_gdal(**extra: str) -> None:
    """Apply :func:`gdal_options` (plus ``extra``) as GDAL configuration, once.

    Options are process-wide GDAL settings, set only when they differ from the
    current value and never for a key the user set (in the environment, or as
    GDAL configuration with ``rasterio.Env``/``set_gdal_config``: any value
    stacchip did not set itself), so the user's own settings win; ``extra``
    always applies, and so do the CA bundle keys when the I/O configuration names a bundle
    (:data:`MANAGED_KEYS`: libraries set them at import, e.g. to certifi's bundle, and the
    user's own choice is already what the configuration read). They are not unset afterwards: a scoped
    ``rasterio.Env(**options)`` would unset them for every thread on exit while
    other threads still read.
    """
    _ensure_block_cache()
    todo = {}
    for key, value in {**gdal_options(), **extra}.items():
        if key in extra or key in MANAGED_KEYS:
            if get_gdal_config(key, normalize=False) != value:
                todo[key] = value
            continue
        if key in os.environ:
            continue  # the user chose, in the environment
        current = get_gdal_config(key, normalize=False)
        if current == value:
            continue
        if current is not None and current != _applied.get(key) and current not in _applied_ever.get(key, ()):
            continue  # the user chose, with rasterio.Env / set_gdal_config
        todo[key] = value
    if not todo:
        return
    with _config_lock:
        for key, value in todo.items():
            set_gdal_config(key, value, normalize=False)
            _applied[key] = value
            _applied_ever.setdefault(key, set()).add(value)


@contextmanager
def gdal_env(**extra: str) -> Iterator[None]:
    """GDAL environment for stacchip's reads: :func:`configure_gdal`, then a rasterio
    environment without a boto3 session (credentials, region and the rest come from the
    one I/O configuration, as GDAL options) that also carries :data:`MANAGED_KEYS`
    (rasterio's environment sets its own CA bundle for its thread, over the global one)."""
    configure_gdal(**extra)
    options = gdal_options()
    managed = {k: options[k] for k in MANAGED_KEYS if k in options}
    with rasterio.Env(session=DummySession(), **managed):
        yield


def resolve_href(href: str, mountpath: str | os.PathLike[str] | None = None) -> str:
    """Path GDAL can open for an asset href.

    With ``mountpath`` (upstream semantics), the href's URL path is re-rooted
    under ``mountpath``: ``s3://bucket/a/b.tif`` becomes ``{mountpath}/a/b.tif``.
    The path is normalised and must stay under ``mountpath``
    (:func:`stacchip.storage.under_root`): ``s3://bucket/../x`` or
    ``.../%2e%2e/%2e%2e/x`` raise :class:`~stacchip.errors.UnsafePathError`.
    """
    if mountpath is not None and str(mountpath) != "":
        from stacchip.storage import under_root

        url = urlparse(href, allow_fragments=False)
        return under_root(str(mountpath), url.path, what=f"href {href!r}: path")
    url = urlparse(href)
    scheme = url.scheme.lower()
    if scheme == "file":
        return url.path
    if scheme == "s3":
        return f"/vsis3/{url.netloc}{url.path}"
    if scheme == "gs":
        return f"/vsigs/{url.netloc}{url.path}"
    if scheme == "az":
        return f"/vsiaz/{url.netloc}{url.path}"
    if scheme in ("http", "https"):
        return f"/vsicurl/{href}"
    return href


#: Live caches and lane pools, reset in a forked child before any of its threads run.
_fork_aware: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _config_lock
    _config_lock = threading.Lock()  # a parent thread may have held it at the fork
    for obj in list(_fork_aware):
        obj._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class DatasetCache:
    """One open rasterio dataset per (process, thread, path).

    After a fork the child starts with an empty cache (handles of the parent
    are dropped, not used); the parent keeps its own. The reset happens in the
    fork hook, while the child has one thread, so the child's threads never
    race on it.
    """

    def __init__(self) -> None:
        self._after_fork()
        _fork_aware.add(self)

    def _after_fork(self) -> None:
        self._local = threading.local()
        #: (thread, its handles) for every thread that opened something here.
        self._all: list[tuple[threading.Thread, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _handles(self) -> dict[str, Any]:
        if os.getpid() != self._pid:
            self._after_fork()  # not reached after os.fork (the hook ran); kept as a guard
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = {}
            self._local.handles = handles
            with self._lock:
                self._prune_dead_threads()
                self._all.append((threading.current_thread(), handles))
        return handles

    def _prune_dead_threads(self) -> None:
        """Close the datasets of threads that have ended (caller holds the lock):
        short-lived reader threads must not leave their handles open for good."""
        alive = []
        for thread, handles in self._all:
            if thread.is_alive():
                alive.append((thread, handles))
            else:
                _close_all(handles)
        self._all = alive

    def get(self, path: str, what: str = "") -> Any:
        """Open (once) and return the dataset for ``path`` in this thread."""
        handles = self._handles()
        ds = handles.get(path)
        if ds is None or ds.closed:
            try:
                ds = rasterio.open(path)
            except (RasterioError, OSError) as exc:
                raise open_error(path, what, exc) from exc
            handles[path] = ds
        return ds

    def open_count(self) -> int:
        """Number of datasets this process holds open, over all (live) threads."""
        self._handles()
        with self._lock:
            self._prune_dead_threads()
            return sum(len(h) for _, h in self._all)

    def close(self) -> None:
        """Close every dataset this process opened, in all threads."""
        if os.getpid() != self._pid:
            self._handles()
            return
        with self._lock:
            for _, handles in self._all:
                _close_all(handles)

    def __getstate__(self) -> dict[str, Any]:
        # Handles never cross a process boundary (spawned workers pickle us).
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def _close_all(handles: dict[str, Any]) -> None:
    for ds in handles.values():
        try:
            ds.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    handles.clear()


_warned: set[str] = set()
_warned_lock = threading.Lock()


def asset_transform(ds: Any, item: Any, key: str, fine: Any) -> Any:
    """The transform to read asset ``key`` of ``item`` with from open dataset ``ds``.

    Compares the file's own CRS, size and georeferencing with the item's grid
    for that asset (:func:`stacchip.projection.file_transform`): a contradiction
    raises :class:`~stacchip.errors.GridMismatchError`; a file without a CRS is
    read on the item's grid, with one warning per file when its transform
    disagrees. A dataset without bands raises :class:`AssetReadError`.
    """
    import pyproj

    crs = pyproj.CRS.from_wkt(ds.crs.to_wkt()) if ds.crs else None
    return checked_transform(ds.name, ds.count, crs, (ds.height, ds.width), ds.transform, item, key, fine)


def checked_transform(name: str, count: int, crs: Any, shape: tuple[int, int], transform: Any,
                      item: Any, key: str, fine: Any) -> Any:
    """:func:`asset_transform` from what a file states (``crs`` a pyproj CRS or
    ``None``), however it was read (GDAL, or a cached TIFF layout)."""
    from stacchip.projection import file_transform

    if count < 1:
        raise AssetReadError(f"item {item.id!r} asset {key!r}: {name!r} has no raster bands")
    transform, warning = file_transform(item, key, fine, crs=crs, shape=shape, transform=transform)
    if warning:
        with _warned_lock:
            first = name not in _warned
            _warned.add(name)
        if first:
            logger.warning(warning)
    return transform


def check_fill(fill: Any, dtype: Any, what: str) -> Any:
    """``fill`` (a nodata value for pixels outside a raster) if ``dtype`` can hold it,
    else :class:`~stacchip.errors.ItemError` naming ``what`` (writing -9999 into
    uint8 would wrap around silently)."""
    from stacchip.errors import ItemError

    dt = np.dtype(dtype)
    try:
        value = float(fill)
    except (TypeError, ValueError) as exc:
        raise ItemError(f"{what}nodata {fill!r} is not a number") from exc
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        if not (np.isfinite(value) and value == int(value) and info.min <= value <= info.max):
            raise ItemError(f"{what}nodata {fill!r} does not fit the band's data type {dt.name}")
        return int(value)
    return value


#: GDAL messages of a file that is missing or not a raster (not a transient failure).
_NOT_RASTER = ("not recognized as being in a supported file format", "not recognized as a supported file format",
               "no such file or directory", "does not exist in the file system", "not a tiff",
               "http response code: 404", "http response code: 403")


def open_error(path: str, what: str, exc: Exception) -> AssetReadError:
    """The error for a dataset that cannot be opened: :class:`AssetNotRasterError`
    (exit 2) for a local file (missing, or one GDAL cannot read as a raster) and
    for remote objects GDAL reports missing or unreadable, else
    :class:`AssetReadError` (exit 1, worth retrying: network, service)."""
    from stacchip.errors import AssetNotRasterError

    text = str(exc).lower()
    local = not path.startswith("/vsi")
    if local or any(token in text for token in _NOT_RASTER):
        return AssetNotRasterError(f"cannot open {what}href {path!r}: not a readable raster: {exc}")
    return AssetReadError(f"cannot open {what}href {path!r}: {exc}")


def _span(idx: np.ndarray) -> tuple[int, int]:
    return int(idx.min()), int(idx.max()) + 1


def read_indexed(
    ds: Any,
    rows: np.ndarray,
    cols: np.ndarray,
    fill: float | int = 0,
    what: str = "",
    indexes: list[int] | None = None,
) -> np.ndarray:
    """``(bands, len(rows), len(cols))`` pixels ``ds[:, rows][:, :, cols]``.

    Reads only the window spanning the requested rows/cols; indices outside the
    raster are filled with ``fill``.
    """
    r0, r1 = _span(rows)
    c0, c1 = _span(cols)
    cr0, cr1 = max(r0, 0), min(r1, ds.height)
    cc0, cc1 = max(c0, 0), min(c1, ds.width)
    count = ds.count if indexes is None else len(indexes)
    out_dtype = ds.dtypes[0]
    if cr0 >= cr1 or cc0 >= cc1:
        fill = check_fill(fill, out_dtype, f"{what}(href {ds.name!r}) ")
        return np.full((count, len(rows), len(cols)), fill, dtype=out_dtype)
    try:
        data = ds.read(
            indexes=indexes, window=Window(cc0, cr0, cc1 - cc0, cr1 - cr0)
        )
    except (RasterioError, OSError) as exc:
        raise AssetReadError(f"cannot read {what}href {ds.name!r}: {exc}") from exc
    rr = rows - cr0
    cc = cols - cc0
    if cr0 == r0 and cr1 == r1 and cc0 == c0 and cc1 == c1:
        return gather(data, rr, cc)
    fill = check_fill(fill, out_dtype, f"{what}(href {ds.name!r}) ")  # pixels outside are filled
    inside_r = (rr >= 0) & (rr < data.shape[1])
    inside_c = (cc >= 0) & (cc < data.shape[2])
    out = gather(data, np.clip(rr, 0, data.shape[1] - 1), np.clip(cc, 0, data.shape[2] - 1))
    out[:, ~inside_r, :] = fill
    out[:, :, ~inside_c] = fill
    return out


def gather(data: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """``data[:, rr][:, :, cc]``, skipping the copy when indices are the identity."""
    if not _is_identity(rr, data.shape[1]):
        data = data.take(rr, axis=1)  # two 1-D takes: ~5x faster than one 2-D fancy index
    if not _is_identity(cc, data.shape[2]):
        data = data.take(cc, axis=2)
    return data


def _is_identity(idx: np.ndarray, n: int) -> bool:
    return len(idx) == n and idx[0] == 0 and idx[-1] == n - 1 and bool(
        np.all(np.diff(idx) == 1)
    )


class LanePool:
    """Worker threads ("lanes") with sticky assignment of files to lanes.

    Every read of one file goes to the same lane, so each file is opened once
    (in that lane's thread) and its decoded blocks sit in one GDAL block cache
    instead of being decoded again by another thread's handle. Files are given
    to the least-loaded lane by cost (pixels per chip), which balances the
    lanes when assets differ in resolution. Created lazily, rebuilt after a
    fork, never pickled.

    ``spread`` > 1 gives each file that many lanes, used in turn: for remote
    files, where a read waits on the network rather than the CPU, consecutive
    reads of one file (read-ahead over a single-asset item) then overlap.
    """

    def __init__(self, lanes: int, spread: int = 1) -> None:
        self.lanes = max(1, int(lanes))
        self.spread = max(1, min(int(spread), self.lanes))
        self._reset()
        _fork_aware.add(self)

    def _after_fork(self) -> None:
        self._reset()  # the parent's threads do not exist in the child

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._executors: list[Any] = []
        self._load = [0.0] * self.lanes
        self._lane_of: dict[str, int] = {}
        self._lanes_of: dict[str, list[int]] = {}
        self._turn: dict[str, int] = {}
        self._lock = threading.Lock()

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            self._reset()  # forked child: the parent's threads do not exist here

    def lane(self, path: str, cost: float = 1.0) -> int:
        """The lane that reads ``path`` next (lanes assigned on first use)."""
        self._check_pid()
        if self.spread == 1:
            lane = self._lane_of.get(path)
            if lane is None:
                with self._lock:
                    lane = self._lane_of.get(path)
                    if lane is None:
                        lane = min(range(self.lanes), key=self._load.__getitem__)
                        self._load[lane] += cost
                        self._lane_of[path] = lane
            return lane
        with self._lock:
            lanes = self._lanes_of.get(path)
            if lanes is None:
                lanes = sorted(range(self.lanes), key=self._load.__getitem__)[: self.spread]
                for lane in lanes:
                    self._load[lane] += cost / self.spread
                self._lanes_of[path] = lanes
            turn = self._turn.get(path, 0)
            self._turn[path] = turn + 1
            return lanes[turn % len(lanes)]

    def submit(self, path: str, cost: float, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on ``path``'s lane; returns a Future."""
        from concurrent.futures import ThreadPoolExecutor

        lane = self.lane(path, cost)
        if not self._executors:
            with self._lock:
                if not self._executors:
                    self._executors = [
                        ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stacchip-lane{i}")
                        for i in range(self.lanes)
                    ]
        return self._executors[lane].submit(fn, *args)

    def shutdown(self) -> None:
        """Stop the lane threads (waits for queued reads)."""
        if os.getpid() != self._pid:
            self._reset()
            return
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._executors = []

    def __getstate__(self) -> dict[str, Any]:
        return {"lanes": self.lanes, "spread": self.spread}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.lanes = state["lanes"]
        self.spread = state.get("spread", 1)
        self._reset()
        _fork_aware.add(self)


class StripReader:
    """Reads full-width strips of rows of one raster, top to bottom.

    GDAL keeps every decoded block in its block cache while a dataset is open;
    for a whole-band pass that is the whole band again in memory. This reader
    reopens the dataset when a strip starts in a new block row, so only the
    blocks of the current block row stay cached (peak memory: one block row).
    Use as a context manager.
    """

    def __init__(self, path: str, what: str = "") -> None:
        self.path = path
        self.what = what
        self._ds: Any = None
        self._block_row = -1
        self._open()

    def _open(self) -> None:
        if self._ds is not None:
            self._ds.close()
        try:
            self._ds = rasterio.open(self.path)
        except (RasterioError, OSError) as exc:
            raise open_error(self.path, self.what, exc) from exc

    @property
    def dataset(self) -> Any:
        """The open dataset (its ``transform``, ``height``, ``width``, ``nodata``)."""
        return self._ds

    def read(self, r0: int, r1: int, band: int = 1) -> np.ndarray:
        """Rows ``r0:r1`` of ``band``, full width."""
        block_rows = self._ds.block_shapes[band - 1][0] or 1
        block_row = r0 // block_rows
        if self._block_row >= 0 and block_row > self._block_row:
            self._open()  # drop the cached blocks above this strip
        self._block_row = block_row
        try:
            return self._ds.read(band, window=Window(0, r0, self._ds.width, r1 - r0))
        except (RasterioError, OSError) as exc:
            raise AssetReadError(f"cannot read {self.what}href {self.path!r}: {exc}") from exc

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    def __enter__(self) -> "StripReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
