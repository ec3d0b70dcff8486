"""Chipper: the pixels of any indexed chip, on demand.

For every asset the chip equals, pixel for pixel, a nearest-neighbour resample
onto the finest grid: fine pixel ``(r, c)`` takes the asset pixel containing the
fine pixel's centre (also for bands whose resolution does not divide the chip,
such as Sentinel-2's 60 m bands). With ``native=True`` each asset is returned at
its own resolution instead: the asset pixels under the chip's fine pixel centres.
Datasets are opened once per process and thread (see ``stacchip.reader``).

Reads go through the tile read path (:mod:`stacchip.tiles`: cached COG layouts,
the tiles of every asset fetched together, decoded on all cores, a bounded tile
cache) wherever it reads the file exactly as GDAL does, and through GDAL
otherwise (the reason logged once per reason: internal JPEG-YCbCr, codecs or
layouts the tile path lacks, hrefs only GDAL opens). ``reader="gdal"`` (or the
environment variable ``STACCHIP_READER=gdal``) reads everything through GDAL.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from stacchip import grid as gridmath
from stacchip.errors import AssetNotFoundError, AssetReadError, ChipError, ChipOutOfRangeError, ConfigError
# is_raster_asset and its tables live in platforms (tiles/ uses them too); importable here as before
from stacchip.platforms import NON_DATA_ROLES, NON_RASTER_TYPES, asset_nodata, is_raster_asset  # noqa: F401
from stacchip.indexer import ChipIndexer
from stacchip.reader import (
    DatasetCache,
    LanePool,
    asset_transform,
    check_fill,
    checked_transform,
    gdal_env,
    read_indexed,
    resolve_href,
)
from stacchip.tiles.layouts import DEFAULT_STORE, LayoutStore
from stacchip.tiles.reader import REMOTE_IO_THREADS, PendingRead, TileFile, TileFiles, shared_cache
from stacchip.tiles.reader import decode_threads_setting
from stacchip.tiles.reader import engine as tile_engine
from stacchip.tiles.sources import ForkedRuntimeError, NoRangeSupportError, tile_href
from stacchip.tiles.tiff import TiffError

logger = logging.getLogger(__name__)

#: Parallel reads for remote (S3/HTTP) hrefs, where threads wait on latency.
REMOTE_THREADS = 16
#: Read paths: ``auto`` (tiles where exact, GDAL elsewhere), ``tiles`` (the same),
#: ``gdal`` (GDAL only). Default from the environment variable ``STACCHIP_READER``.
READERS = ("auto", "tiles", "gdal")
READER_ENV = "STACCHIP_READER"

_fallback_logged: set[str] = set()


def _log_fallback(reason: str, path: str) -> None:
    """Say once per reason (per process) that files are read through GDAL."""
    if reason in _fallback_logged:
        return
    _fallback_logged.add(reason)
    logger.info("reading through GDAL (%s), e.g. %s; logged once per reason", reason, path)


def reader_setting(reader: str | None) -> str:
    """The read path for a ``reader=`` argument (``None``: ``STACCHIP_READER``, else auto)."""
    value = reader if reader is not None else os.environ.get(READER_ENV) or "auto"
    value = str(value).strip().lower()
    if value not in READERS:
        where = "reader" if reader is not None else READER_ENV
        raise ConfigError(f"{where} must be one of {', '.join(READERS)}; got {value!r}")
    return value


def _layout_store(layouts: Any) -> LayoutStore:
    if layouts is None:
        return DEFAULT_STORE
    if isinstance(layouts, LayoutStore):
        return layouts
    if isinstance(layouts, (str, os.PathLike)):
        return LayoutStore(path=layouts)
    raise ConfigError(f"layouts must be a LayoutStore or the path of a layout file, got {type(layouts).__name__}")


class Chipper:
    """Read chips of an item, from its chip grid: a :class:`~stacchip.grid.ChipGrid`
    (``ChipGrid.of(item, chip_size)``) or an indexer (upstream's ``Chipper(indexer)``).

    ``chip_grid`` is the grid read; ``indexer`` is the indexer given, or, for a
    grid, the grid itself (it answers the same grid attributes: ``item``,
    ``grid``, ``affine``, ``chip_size``, ``check_chip``, and ``kept_chips``:
    every chip of a grid, those an indexer's nodata filter keeps).
    ``mountpath`` re-roots hrefs under a local directory (upstream semantics);
    ``assets`` chooses the assets (default: every raster data asset);
    ``asset_blacklist`` drops some. ``native=True`` returns assets at their own
    resolution. ``len()``, iteration and ``[i]`` cover the chips the index keeps
    (after the nodata filter), in index row order; ``[i]`` gives ``(x, y, chip)``.

    ``reader`` picks the read path (``"auto"``/``"tiles"``: the tile reader where
    it is exact, GDAL elsewhere; ``"gdal"``: GDAL only; default from
    ``STACCHIP_READER``). ``layouts`` is where file layouts (COG headers) are
    kept: a :class:`~stacchip.tiles.LayoutStore`, or the path of a layout JSON
    file (e.g. an index's ``index_{item}.layouts.json``) to load; default: one
    store shared by the process.
    """

    def __init__(
        self,
        indexer: ChipIndexer | gridmath.ChipGrid,
        mountpath: str | os.PathLike[str] | None = None,
        assets: Sequence[str] | None = None,
        asset_blacklist: Sequence[str] | None = None,
        *,
        native: bool = False,
        threads: int | None = None,
        reader: str | None = None,
        layouts: Any = None,
    ) -> None:
        self.chip_grid = gridmath.as_chip_grid(indexer)
        self.indexer: Any = indexer
        self.mountpath = None if mountpath in (None, "") else mountpath
        self.assets = list(assets) if assets is not None else None
        self.asset_blacklist = list(asset_blacklist) if asset_blacklist is not None else None
        self.native = native
        item = indexer.item
        for key in (self.assets or []) + (self.asset_blacklist or []):
            if key not in item.assets:
                raise AssetNotFoundError(
                    f"item {item.id!r}: asset {key!r} not found; assets are "
                    + ", ".join(sorted(item.assets))
                )
        self._datasets = DatasetCache()
        self.reader = reader_setting(reader)
        self._layouts = _layout_store(layouts)
        self._tiles = TileFiles()
        #: href -> why it is read through GDAL (files the tile path does not read)
        self._gdal_only: dict[str, str] = {}
        #: checked transform of each asset file (see :func:`stacchip.reader.asset_transform`), by
        #: path (GDAL) or file version (tiles)
        self._transforms: dict[Any, Any] = {}
        #: (file version, axis, chip row or column) -> what :meth:`_axis` returns
        self._axes: dict[Any, tuple[np.ndarray, list[Any], bool]] = {}
        self.threads = self._auto_threads() if threads is None else max(1, int(threads))
        # Remote files get several lanes each so read-ahead overlaps their requests.
        spread = max(1, self.threads // max(1, len(self.asset_keys))) if self._remote() else 1
        self._lanes = LanePool(self.threads, spread=spread) if self.threads > 1 else None

    def _remote(self) -> bool:
        """True when any chipped asset is read over the network (s3://, http(s)://)."""
        if self.mountpath is not None:
            return False
        hrefs = [self.indexer.item.assets[k].href for k in self.asset_keys]
        return any("://" in h and not h.startswith("file://") for h in hrefs)

    def _auto_threads(self) -> int:
        """Lanes for parallel asset reads: one per core for local files, 16 when
        any href is remote (reads then wait on the network, not the CPU)."""
        keys = self.asset_keys
        want = REMOTE_THREADS if self._remote() else (os.cpu_count() or 1)
        return max(1, min(want, len(keys) * 4))

    @property
    def asset_keys(self) -> list[str]:
        """The asset keys every chip holds."""
        item = self.indexer.item
        if self.assets is not None:
            keys = list(self.assets)
        else:
            keys = [k for k, a in item.assets.items() if is_raster_asset(a)]
        if self.asset_blacklist is not None:
            keys = [k for k in keys if k not in self.asset_blacklist]
        return keys

    def __len__(self) -> int:
        return len(self.indexer.kept_chips[0])

    def __getitem__(self, index: int) -> tuple[int, int, dict[str, np.ndarray]]:
        xs, ys = self.indexer.kept_chips
        n = len(xs)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise ChipOutOfRangeError(
                f"item {self.indexer.item.id!r}: chip number {index} is outside 0..{n - 1}"
            )
        x, y = int(xs[i]), int(ys[i])
        return x, y, self.chip(x, y)

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        xs, ys = self.indexer.kept_chips
        yield from self.chips(zip(xs.tolist(), ys.tolist(), strict=False))

    def tile_file(self, key: str) -> TileFile | None:
        """The open :class:`~stacchip.tiles.reader.TileFile` of asset ``key``, or
        ``None`` when it is read through GDAL (``reader="gdal"``, or a file the
        tile path does not read exactly; the reason is logged once)."""
        if self.reader == "gdal":
            return None
        by_key = self._tiles.by_key()  # per process, like the files
        known = by_key.get(key, self)
        if known is not self:
            return known
        f = self._open_tile_file(key)
        by_key[key] = f
        return f

    def _open_tile_file(self, key: str) -> TileFile | None:
        href = tile_href(self.indexer.item.assets[key].href, self.mountpath)
        if href is None:
            _log_fallback("an href only GDAL opens", self.indexer.item.assets[key].href)
            return None
        if href in self._gdal_only:
            return None
        what = f"item {self.indexer.item.id!r} asset {key!r} "
        try:
            f = self._tiles.get(href, what, self._layouts)
        except TiffError as exc:
            self._gdal_only[href] = reason = f"not a TIFF the tile reader parses: {exc}"
            _log_fallback(reason.split(":")[0], href)
            return None
        except ForkedRuntimeError:
            reason = "a gs:// or az:// file in a child forked after its parent used obstore's runtime"
            self._gdal_only[href] = reason
            _log_fallback(reason, href)
            return None
        except NoRangeSupportError:
            reason = "a large file on a server that ignores Range requests"
            self._gdal_only[href] = reason
            _log_fallback(reason, href)
            return None
        unsupported = f.layout.unsupported
        if unsupported is not None:
            self._gdal_only[href] = unsupported
            for part in unsupported.split("; "):
                _log_fallback(part, href)
            return None
        return f

    def open(self) -> "Chipper":
        """Open every asset's file now (read its layout, or open it with GDAL) and
        check it against the item's grid, without reading pixels. Returns self."""
        for key in self.asset_keys:
            f = self.tile_file(key)
            if f is not None:
                self._tile_transform(key, f)
            else:
                with gdal_env():
                    ds = self._datasets.get(self.path(key), f"item {self.indexer.item.id!r} asset {key!r} ")
                    self.transform_of(key, self.path(key), ds)
        return self

    def _engine(self) -> Any:
        decode = min(self.threads, decode_threads_setting())
        return tile_engine(decode, REMOTE_IO_THREADS if self.threads > 1 else 1)

    def _tile_transform(self, key: str, f: TileFile) -> Any:
        """The checked transform of asset ``key`` read by tiles: from the layout's
        GeoTIFF keys when they are plain (EPSG code, scale and tie point), else
        from GDAL's reading of the file (opened once for that)."""
        version = f.cache_key  # href and file identity: a rewritten file is checked again
        transform = self._transforms.get(version)
        if transform is not None:
            return transform
        layout = f.layout
        if layout.geo_exact:
            import pyproj
            from affine import Affine

            epsg, geotransform = layout.epsg, layout.geotransform
            if epsg is None or geotransform is None:  # geo_exact means both were parsed from the header
                raise AssetReadError(f"{f.href!r}: layout claims exact georeferencing without EPSG/transform")
            transform = checked_transform(
                f.href, layout.bands, pyproj.CRS.from_epsg(epsg), (layout.height, layout.width),
                Affine(*geotransform), self.indexer.item, key, self.indexer.grid,
            )
        else:
            with gdal_env():
                ds = self._datasets.get(self.path(key), f"item {self.indexer.item.id!r} asset {key!r} ")
                transform = asset_transform(ds, self.indexer.item, key, self.indexer.grid)
        self._transforms[version] = transform
        return transform

    def _axis(self, key: str, f: TileFile, axis: int, i: int) -> tuple[np.ndarray, list[Any], bool]:
        """Asset indices of chip row (``axis=0``) or column ``i`` of asset ``key``,
        how they fall into tiles, and whether some lie outside the raster; kept
        per file version (a scan asks for the same ones many times)."""
        memo = self._axes
        mkey = (f.cache_key, axis, i)
        hit = memo.get(mkey)
        if hit is not None:
            return hit
        ix = self.indexer
        both = gridmath.chip_asset_indices(ix.affine, self._tile_transform(key, f), i, i, ix.chip_size)
        idx = both[axis]
        if self.native:
            idx = np.unique(idx)
        n = f.layout.height if axis == 0 else f.layout.width
        hit = (idx, f.runs(idx, axis), bool(idx.min() < 0 or idx.max() >= n))
        if len(memo) >= 16384:
            memo.clear()
        memo[mkey] = hit
        return hit

    def _start_tiles(self, key: str, f: TileFile, x: int, y: int) -> Any:
        rows, row_runs, rows_out = self._axis(key, f, 0, y)
        cols, col_runs, cols_out = self._axis(key, f, 1, x)
        layout = f.layout
        fill = self.fill_value(key, layout.nodata)
        if rows_out or cols_out:
            # pixels beyond the raster take the fill value: it must fit the band's type
            ix = self.indexer
            fill = check_fill(fill, layout.dtype, f"item {ix.item.id!r} asset {key!r} (href {f.href!r}) ")
        return f.read(rows, cols, fill, self._engine(), runs=(row_runs, col_runs))

    def path(self, key: str) -> str:
        """The path GDAL opens for asset ``key``."""
        return resolve_href(self.indexer.item.assets[key].href, self.mountpath)

    def fill_value(self, key: str, file_nodata: float | None) -> float | int:
        """Value for pixels outside an asset: its nodata, else 0."""
        declared = asset_nodata(self.indexer.item.assets[key])
        if declared is not None:
            return declared
        return 0 if file_nodata is None else file_nodata

    def get_pixels_for_asset(self, key: str, x: int, y: int) -> np.ndarray:
        """Pixels of asset ``key`` for chip ``(x, y)``: ``(bands, rows, cols)``."""
        ix = self.indexer
        ix.check_chip(x, y)
        with gdal_env():
            return self._read(key, self.path(key), x, y)

    def _read(self, key: str, path: str, x: int, y: int) -> np.ndarray:
        f = self.tile_file(key)
        if f is not None:
            return self._start_tiles(key, f, x, y).result()
        ix = self.indexer
        what = f"item {ix.item.id!r} asset {key!r} "
        ds = self._datasets.get(path, what)
        rows, cols = gridmath.chip_asset_indices(ix.affine, self.transform_of(key, path, ds), x, y, ix.chip_size)
        if self.native:
            rows, cols = np.unique(rows), np.unique(cols)
        return read_indexed(ds, rows, cols, fill=self.fill_value(key, ds.nodata), what=what)

    def transform_of(self, key: str, path: str, ds: Any) -> Any:
        """The checked transform of asset ``key`` (file ``path``, open as ``ds``),
        computed once per file: the item's grid for the asset, after comparing
        it with the file's own CRS, size and georeferencing."""
        transform = self._transforms.get(path)
        if transform is None:
            transform = asset_transform(ds, self.indexer.item, key, self.indexer.grid)
            self._transforms[path] = transform
        return transform

    def _read_in_lane(self, key: str, path: str, x: int, y: int) -> np.ndarray:
        with gdal_env():
            return self._read(key, path, x, y)

    def _cost(self, key: str) -> float:
        """Relative read cost of an asset: its pixels per fine pixel (from STAC metadata)."""
        from stacchip.projection import asset_grid

        try:
            grid = asset_grid(self.indexer.item, key)
        except Exception:  # noqa: BLE001 - cost is a hint; metadata errors surface on read
            grid = None
        if grid is None:
            return 1.0
        fine = self.indexer.grid.res
        return (fine[0] / grid.res[0]) * (fine[1] / grid.res[1])

    def _submit(self, x: int, y: int) -> dict[str, Any]:
        """Start reading every asset of chip ``(x, y)``; values are futures (or arrays)."""
        self.indexer.check_chip(x, y)
        keys = self.asset_keys
        pending: dict[str, Any] = {}
        gdal_keys = []
        for key in keys:  # tile reads first: every asset's tiles are requested together
            f = self.tile_file(key)
            if f is not None:
                pending[key] = self._start_tiles(key, f, x, y)
            else:
                gdal_keys.append(key)
        if gdal_keys and self._lanes is None:
            with gdal_env():
                for key in gdal_keys:
                    pending[key] = self._read(key, self.path(key), x, y)
        elif gdal_keys:
            if not hasattr(self, "_costs"):
                self._costs = {key: self._cost(key) for key in keys}
            lanes = self._lanes
            if lanes is None:  # not reached: without lanes every read is inline (branch above)
                raise ChipError("internal: GDAL reads queued without read lanes")
            for key in gdal_keys:
                pending[key] = lanes.submit(
                    self.path(key), self._costs.get(key, 1.0), self._read_in_lane, key, self.path(key), x, y
                )
        return {key: pending[key] for key in keys}

    @staticmethod
    def _collect(pending: dict[str, Any]) -> dict[str, np.ndarray]:
        return {key: (value.result() if hasattr(value, "result") else value) for key, value in pending.items()}

    def chip(self, x: int, y: int) -> dict[str, np.ndarray]:
        """``{asset key: (bands, chip_size, chip_size) array}`` for chip ``(x, y)``.

        Assets are read in parallel (``threads`` lanes)."""
        return self._collect(self._submit(int(x), int(y)))

    def block_order(self, positions: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """``positions`` sorted so chips sharing a COG block are read one after another.

        Chips are grouped by the block (of the first asset's tiling, in chips)
        they fall in, blocks in row order, chips in row order within a block:
        every block is decoded once and only one block per band needs to stay
        in GDAL's block cache.
        """
        pos = [(int(x), int(y)) for x, y in positions]
        keys = self.asset_keys
        per_block = 1
        f = self.tile_file(keys[0]) if keys else None
        if f is not None:
            fine_per_asset = self._tile_transform(keys[0], f).a / self.indexer.affine.a
            block_fine = f.layout.tile_width * fine_per_asset
            per_block = max(1, int(block_fine // self.indexer.chip_size))
        elif keys:
            with gdal_env():
                ds = self._datasets.get(self.path(keys[0]), f"asset {keys[0]!r} ")
            fine_per_asset = self.transform_of(keys[0], self.path(keys[0]), ds).a / self.indexer.affine.a
            block_fine = ds.block_shapes[0][1] * fine_per_asset
            per_block = max(1, int(block_fine // self.indexer.chip_size))
        return sorted(pos, key=lambda p: (p[1] // per_block, p[0] // per_block, p[1], p[0]))

    def chips(  # noqa: C901 - read-ahead over the tile and GDAL paths in one loop
        self,
        positions: Iterable[tuple[int, int]],
        prefetch: int | None = None,
        order: str = "given",
    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Read many chips, yielding ``(x, y, chip)``.

        ``order="given"`` yields in the order given; ``order="block"`` reorders
        by block locality first (see :meth:`block_order`; what an export of many
        chips of one scene wants). Up to ``prefetch`` chips are read ahead in
        parallel, which keeps every lane busy for random access. By default
        that is 4 per lane (at least 256 when tiles are read: queued chips cost
        only the tiles they hold, and a scan needs the next row of tiles in
        flight while it cuts the chips of the current one).

        Memory is bounded whatever ``prefetch`` is: the chips queued never hold
        more distinct decoded tiles than half the tile cache budget
        (``STACCHIP_TILE_CACHE_MB``; at least two chips are always queued), so
        a read keeps at most about 1.5 budgets of decoded tiles (the cache plus
        tiles it evicted that queued chips still hold), the compressed bytes of
        those tiles while in flight, and the chips yielded. That is deep in a
        scan, where chips share tiles, and shallow for random chips, whose
        tiles are all their own.
        """
        if order == "block":
            positions = self.block_order(positions)
        elif order != "given":
            raise ConfigError(f"order must be 'given' or 'block', got {order!r}")
        if prefetch is not None:
            ahead = max(1, prefetch)
        else:
            ahead = 4 * self.threads
            if any(self.tile_file(k) is not None for k in self.asset_keys):
                ahead = max(ahead, 256)
        byte_limit = shared_cache().budget // 2
        held: dict[Any, int] = {}  # tile -> chips in the queue that use it
        held_bytes = 0

        def tiles_of(pending: dict[str, Any]) -> Iterator[tuple[Any, int]]:
            for value in pending.values():
                if isinstance(value, PendingRead):
                    nbytes = value.f.layout.tile_nbytes
                    for tile in value.futures:
                        yield (value.f.cache_key, tile), nbytes

        queue: deque[tuple[int, int, dict[str, Any], list[tuple[Any, int]]]] = deque()

        def pop() -> tuple[int, int, dict[str, np.ndarray]]:
            nonlocal held_bytes
            qx, qy, pending, tiles = queue.popleft()
            for tile, nbytes in tiles:
                held[tile] -= 1
                if not held[tile]:
                    del held[tile]
                    held_bytes -= nbytes
            return qx, qy, self._collect(pending)

        for x, y in positions:
            pending = self._submit(int(x), int(y))
            tiles = list(tiles_of(pending))
            queue.append((int(x), int(y), pending, tiles))
            for tile, nbytes in tiles:
                if tile not in held:
                    held[tile] = 0
                    held_bytes += nbytes
                held[tile] += 1
            while len(queue) >= ahead or (held_bytes > byte_limit and len(queue) > 2):
                yield pop()
        while queue:
            yield pop()

    def close(self) -> None:
        """Stop the read threads and close the datasets this chipper opened."""
        if self._lanes is not None:
            self._lanes.shutdown()
        self._datasets.close()
        self._tiles.close()

    def __enter__(self) -> "Chipper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
