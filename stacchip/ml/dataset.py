"""``ChipDataset``: a map-style dataset over the rows of a chip index.

Each sample is one index row: the chip's pixels read on demand through
:class:`stacchip.chipper.Chipper` plus its metadata. It works with
``torch.utils.data.DataLoader`` (any number of workers, ``fork`` or ``spawn``)
without importing torch itself:

* chippers (and their open rasters) are built lazily, one per item, in the
  process that reads, and kept in the process's chipper cache
  (:data:`stacchip.export.chip_reader.CHIPPERS`, shared with the export's
  readers; each dataset keeps at most ``max_open_items``); a forked worker
  drops what it inherited and a spawned worker receives a pickle without any
  handle or cached item;
* samples hold numpy arrays, numbers and strings only, which the default
  collate function turns into tensors and lists.

Sample keys: ``pixels`` (``(C, H, W)`` float32, channels in asset order),
``chipid``, ``item_id``, ``platform``, ``datetime`` (ISO 8601 UTC string),
``timestamp`` (int64 microseconds since the epoch, UTC), ``bounds``
(``[minx, miny, maxx, maxy]`` float64, degrees lon/lat), ``chip_index``
(``[x, y]`` int64), ``cloud``, ``nodata`` (fractions 0-1), ``index`` (row
number) and, with labels, ``target`` (``(H, W)``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence, Unpack

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from stacchip import storage
from stacchip.chipper import Chipper
from stacchip.errors import AssetNotFoundError, ConfigError, IndexFileError, ItemError
from stacchip.export.chip_reader import CHIPPERS
from stacchip.index import QueryFilters, bbox_array, check_filters, index_files, open_index, query
from stacchip.scan import IndexDataset
from stacchip.grid import ChipGrid
from stacchip.ml.assets import band_count, check_assets, data_asset_keys
from stacchip.ml.items import ItemSource, hrefs_from_index
from stacchip.ml.labels import LabelRaster, as_label_raster
from stacchip.platforms import PLATFORMS
from stacchip.reader import gdal_env

logger = logging.getLogger(__name__)

#: Index columns a dataset keeps per row (plus ``split`` when present).
ROW_COLUMNS = (
    "chipid", "item_id", "platform", "chip_index_x", "chip_index_y", "chip_size",
    "datetime", "cloud_cover_percentage", "nodata_percentage", "bbox",
)

Stats = Any  # mapping, (mean, std) pair, or path to a JSON file

#: What to pass when the STAC items of an index cannot be found.
WHERE_ITEMS = (
    "pass root= (the data root in the bucket layout, holding {platform}/{item_id}/stac_item.json; "
    "local, file:// or s3://) or items= (a mapping item_id -> pystac.Item, STAC dict or path/URL of the "
    "item JSON); for index files written by `stacchip index`, items=ItemSource.from_index(<index dir>) "
    "uses the item_href they record"
)


def _describe(index: Any) -> str:
    if isinstance(index, (str, os.PathLike)):
        return repr(str(index))
    parts = [str(p) for p in index]
    return repr(parts[0]) + (f" (+{len(parts) - 1} more)" if len(parts) > 1 else "")


def load_index(
    index: Any,
    *,
    split: str | Sequence[str] | None = None,
    **filters: Unpack[QueryFilters],
) -> pa.Table:
    """Index rows passing the filters, from a table, dataset, files, dirs or prefixes.

    Filters are those of :func:`stacchip.index.query` (:class:`~stacchip.index.QueryFilters`:
    ``bbox``, ``start``, ``end``, ``max_cloud``, ``max_nodata``, ``platform``,
    ``item_id``) plus ``split`` (values of the ``split`` column written by
    :func:`stacchip.ml.splits.assign_splits`).
    """
    check_filters(filters, "load_index")
    if isinstance(index, pa.Table):
        source: Any = pads.dataset(index)
    elif isinstance(index, pads.Dataset):
        source = index
    else:
        source = open_with_extra_columns(index)
    table = query(source, **filters)
    if split is not None:
        if "split" not in table.column_names:
            raise IndexFileError("split filter given but the index has no 'split' column")
        values = [split] if isinstance(split, str) else list(split)
        table = table.filter(pc.is_in(table.column("split"), pa.array(values, pa.string())))
    return table


def open_with_extra_columns(index: Any) -> pads.Dataset:
    """:func:`stacchip.index.open_index`, keeping extra columns (e.g. ``split``).

    Extra columns are those any current-schema file holds; files without them
    read as nulls. Upstream-written files are normalised as ``open_index`` does.
    """
    return open_index(index, extra_columns=True)


def load_stats(stats: Stats) -> Any:
    """Normalisation statistics from a mapping, a ``(mean, std)`` pair or a JSON file.

    Also accepts the ``stats.json`` written by ``stacchip-stats`` (per-band
    entries under ``"bands"``) and ``{"mean": {band: m}, "std": {band: s}}``.
    """
    if stats is None:
        return None
    if isinstance(stats, (str, os.PathLike)):
        try:
            stats = json.loads(storage.read_bytes(stats))
        except ValueError as exc:
            raise ConfigError(f"normalize: {str(stats)!r} is not JSON: {exc}") from exc
    if isinstance(stats, Mapping):
        if isinstance(stats.get("bands"), Mapping):
            # stats.json of stacchip-stats: {"bands": {band: {"mean", "std", ...}}}
            stats = stats["bands"]
        elif isinstance(stats.get("mean"), Mapping) and isinstance(stats.get("std"), Mapping):
            # metadata.yaml layout: {"mean": {band: m}, "std": {band: s}}
            stats = {k: {"mean": stats["mean"][k], "std": stats["std"][k]} for k in stats["mean"]}
    return stats


class ChipDataset:
    """Map-style dataset over the chips of an index.

    ``index``: a pyarrow Table, a ``pyarrow.dataset.Dataset``, or index files,
    directories or ``s3://`` prefixes. Filters select rows: those of
    :func:`stacchip.index.query` (:class:`~stacchip.index.QueryFilters`: ``bbox``
    in degrees, ``start``/``end``, ``max_cloud``/``max_nodata`` fractions,
    ``platform``, ``item_id``) and ``split``.

    Items come from ``items`` (an :class:`ItemSource`, or a mapping
    ``item_id -> item/dict/path``), ``root`` (the data root laid out as the
    bucket: ``{root}/{platform}/{item_id}/stac_item.json``) or, for index files
    written by ``stacchip index``, the ``item_href`` in their metadata. A table
    (e.g. from ``assign_splits(read_index(dir))``) carries no file metadata:
    give it ``root=`` or ``items=`` (``ItemSource.from_index(dir)`` reuses the
    index files' ``item_href``). ``mountpath`` re-roots asset hrefs (as in
    :class:`Chipper`).

    ``assets``: asset keys read, in channel order (default: each item's data
    bands, without QA/mask rasters such as ``scl`` or ``qa_pixel``, nor
    ``label_asset``; see :mod:`stacchip.ml.assets`). ``bands``: optional
    ``{asset: [band positions]}`` (0-based) to keep some bands of multi-band
    assets. ``normalize``: ``{"mean": [...], "std": [...]}`` per output channel,
    ``{asset: {"mean": m, "std": s}}`` per asset (scalars or per band), a
    ``(mean, std)`` pair, or a JSON file holding one of these; pixels become
    ``(x - mean) / std``. ``transform`` is called on each sample dict last.

    Labels: ``label_asset`` (an asset of the item, nearest-resampled onto the
    chip by the chipper) or ``label_raster`` (path/URL or :class:`LabelRaster`,
    see :mod:`stacchip.ml.labels`); returned as ``target`` with ``target_dtype``.

    ``max_open_items`` bounds the chippers (and open rasters) kept per process.

    ``item_roots``: where the ``item_href`` s a compacted index records may point besides
    the index root itself (local directories, ``s3://`` or ``https://`` prefixes); an href
    elsewhere raises :class:`~stacchip.errors.UnsafePathError` (a manifest is untrusted data).

    At construction the STAC item of the first row of each platform is read
    (no raster is opened) to check ``assets``, ``bands`` and ``label_asset``:
    an unknown name raises :class:`ConfigError` naming the asset and the item
    and listing its assets, instead of failing later inside a DataLoader
    worker.
    """

    def __init__(
        self,
        index: Any,
        *,
        root: str | os.PathLike[str] | None = None,
        items: Any = None,
        assets: Sequence[str] | None = None,
        bands: Mapping[str, Sequence[int]] | None = None,
        mountpath: str | os.PathLike[str] | None = None,
        split: str | Sequence[str] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        normalize: Stats = None,
        label_asset: str | None = None,
        label_raster: str | os.PathLike[str] | LabelRaster | None = None,
        target_dtype: str | None = "int64",
        dtype: str = "float32",
        max_open_items: int = 32,
        item_roots: Sequence[str | os.PathLike[str]] | None = None,
        **filters: Unpack[QueryFilters],
    ) -> None:
        check_filters(filters, "ChipDataset")
        table = load_index(index, split=split, **filters)
        self._set_rows(table)
        hrefs: dict[str, str] = {}
        if root is None and items is None:
            if isinstance(index, (pa.Table, pads.Dataset, IndexDataset)):
                raise ConfigError(
                    "ChipDataset over a table (or pyarrow dataset) cannot find the STAC items: "
                    + WHERE_ITEMS
                )
            from stacchip.compacted import hrefs_for  # a compacted index: no footer reads

            found = hrefs_for(index, [str(r) for r in item_roots or []])
            hrefs = found if found is not None else hrefs_from_index(index_files(index))
            if not hrefs:
                raise ConfigError(
                    f"the index files of {_describe(index)} record no item_href (only `stacchip index` "
                    "writes it): " + WHERE_ITEMS
                )
        if isinstance(items, ItemSource):
            self.items = items
        else:
            self.items = ItemSource(root=root, items=items, hrefs=hrefs)
        self.assets = list(assets) if assets is not None else None
        self.bands = {k: [int(b) for b in v] for k, v in (bands or {}).items()}
        if self.assets is not None:
            unknown = [k for k in self.bands if k not in self.assets]
            if unknown:
                raise ConfigError(f"bands given for assets {unknown} that are not in assets={self.assets}")
        self.mountpath = mountpath
        self.transform = transform
        self.stats = load_stats(normalize)
        self.label_asset = label_asset
        self.label_raster = as_label_raster(label_raster)
        if self.label_asset is not None and self.label_raster is not None:
            raise ConfigError("give label_asset or label_raster, not both")
        self.target_dtype = target_dtype
        self.dtype = np.dtype(dtype)
        if max_open_items < 1:
            raise ConfigError(f"max_open_items must be >= 1, got {max_open_items}")
        self.max_open_items = int(max_open_items)
        self._own_chippers()
        self.check_items()

    def check_items(self) -> None:
        """Check ``assets``, ``bands`` and ``label_asset`` against the STAC item of the first
        row of each platform (reads items only, no raster); raises :class:`ConfigError`."""
        column = self.table.column("platform")
        for value in pc.unique(column).to_pylist():
            i = int(pc.index(column, value).as_py())
            platform, item_id = str(self.platform[i]), str(self.item_id[i])
            try:
                item = self.items.get(platform, item_id)
            except ItemError as exc:
                if self.items.root is not None and item_id not in self.items.items:
                    raise ConfigError(
                        f"{exc}. root={self.items.root!r} must be the data root holding "
                        "{platform}/{item_id}/stac_item.json (the bucket layout), not the index directory"
                    ) from exc
                raise
            check_assets(item, platform, self.assets, self.bands, self.label_asset)

    # --- rows ---------------------------------------------------------------------------

    def _set_rows(self, table: pa.Table) -> None:
        missing = [c for c in ROW_COLUMNS if c not in table.column_names]
        if missing:
            raise IndexFileError(f"index lacks columns {missing}")
        self.chipid = np.asarray(table.column("chipid").to_pylist(), dtype=object)
        self.item_id = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        self.platform = np.asarray(table.column("platform").to_pylist(), dtype=object)
        self.x = table.column("chip_index_x").to_numpy().astype(np.int64)
        self.y = table.column("chip_index_y").to_numpy().astype(np.int64)
        self.chip_size = table.column("chip_size").to_numpy().astype(np.int64)
        ts = pc.cast(table.column("datetime"), pa.timestamp("us", tz="UTC"))
        self.timestamp = pc.cast(ts, pa.int64()).to_numpy().astype(np.int64)
        self.cloud = table.column("cloud_cover_percentage").to_numpy().astype(np.float64)
        self.nodata = table.column("nodata_percentage").to_numpy().astype(np.float64)
        self.bounds = bbox_array(table)
        self.split = (
            np.asarray(table.column("split").to_pylist(), dtype=object)
            if "split" in table.column_names else None
        )
        self.table = table

    def __len__(self) -> int:
        return len(self.chipid)

    # --- per-process chippers -------------------------------------------------------------

    def _own_chippers(self) -> None:
        """A fresh owner in the process's chipper cache (closed when the dataset is collected)."""
        self._pid = os.getpid()
        self._owner = CHIPPERS.new_owner()
        weakref.finalize(self, CHIPPERS.release, self._owner)  # closed at the cache's next use

    @property
    def _chippers(self) -> dict[Any, Chipper]:
        """``{(platform, item_id, chip_size): chipper}`` this dataset keeps open in this process."""
        return CHIPPERS.held(self._owner)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_owner", None)  # open rasters never cross a process boundary
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._own_chippers()

    def chipper(self, platform: str, item_id: str, chip_size: int) -> Chipper:
        """The chipper of one item in this process (built on first use)."""
        self._pid = os.getpid()  # a forked worker's cache starts empty: the parent's handles stay unused

        def build() -> Chipper:
            item = self.items.get(platform, item_id)
            # edge="keep" accepts every position an index can hold (whole chips and
            # partial edge chips); pixels beyond the grid read as nodata.
            grid = ChipGrid.of(item, int(chip_size), edge="keep")
            return Chipper(grid, mountpath=self.mountpath, assets=self.item_assets(item))

        return CHIPPERS.get(self._owner, (platform, item_id, int(chip_size)), build, self.max_open_items)

    def item_assets(self, item: Any) -> list[str]:
        """Assets read for ``item``, in channel order: ``assets``, else its data bands."""
        if self.assets is not None:
            return list(self.assets)
        return data_asset_keys(item, exclude=[self.label_asset] if self.label_asset else [])

    def asset_keys(self, chipper: Chipper) -> list[str]:
        """Assets read for an item, in channel order."""
        return self.item_assets(chipper.chip_grid.item)

    def channel_names(self, i: int = 0) -> list[str]:
        """Names of the output channels for row ``i``: ``asset`` or ``asset:band``."""
        chipper = self.chipper(self.platform[i], self.item_id[i], self.chip_size[i])
        names: list[str] = []
        for key in self.asset_keys(chipper):
            count = band_count(chipper.chip_grid.item.assets[key]) or 1
            positions = self.bands.get(key, list(range(count)))
            if count == 1 and key not in self.bands:
                names.append(key)
            else:
                names.extend(f"{key}:{b}" for b in positions)
        return names

    # --- samples -----------------------------------------------------------------------

    def read_pixels(self, i: int) -> np.ndarray:
        """``(C, H, W)`` pixels of row ``i`` (before normalisation), in ``dtype``."""
        chipper = self.chipper(self.platform[i], self.item_id[i], self.chip_size[i])
        keys = self.asset_keys(chipper)
        chip = chipper.chip(int(self.x[i]), int(self.y[i]))
        parts = []
        for key in keys:
            data = chip[key]
            if key in self.bands:
                data = data[self.bands[key]]
            parts.append(data.astype(self.dtype, copy=False))
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0].copy()

    def read_target(self, i: int) -> np.ndarray | None:
        """``(H, W)`` label of row ``i``, or ``None`` without labels."""
        if self.label_asset is None and self.label_raster is None:
            return None
        chipper = self.chipper(self.platform[i], self.item_id[i], self.chip_size[i])
        x, y = int(self.x[i]), int(self.y[i])
        if self.label_asset is not None:
            if self.label_asset not in chipper.chip_grid.item.assets:
                raise AssetNotFoundError(
                    f"item {self.item_id[i]!r}: label asset {self.label_asset!r} not found; assets are "
                    + ", ".join(sorted(chipper.chip_grid.item.assets))
                )
            chipper.chip_grid.check_chip(x, y)
            with gdal_env():
                target = chipper.get_pixels_for_asset(self.label_asset, x, y)[0]
        elif self.label_raster is not None:
            target = self.label_raster.read(chipper.chip_grid.grid, x, y, int(self.chip_size[i]))
        if self.target_dtype is not None:
            target = target.astype(self.target_dtype)
        return target

    def normalize(self, pixels: np.ndarray, i: int = 0) -> np.ndarray:
        """Apply the normalisation statistics to ``(C, H, W)`` pixels of row ``i``."""
        if self.stats is None:
            return pixels
        mean, std = self._mean_std(i, pixels.shape[0])
        return ((pixels - mean[:, None, None]) / std[:, None, None]).astype(self.dtype, copy=False)

    def _mean_std(self, i: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
        stats = self.stats
        if isinstance(stats, Mapping) and "mean" in stats and "std" in stats:
            mean, std = stats["mean"], stats["std"]
        elif isinstance(stats, (tuple, list)) and len(stats) == 2:
            mean, std = stats
        elif isinstance(stats, Mapping):
            chipper = self.chipper(self.platform[i], self.item_id[i], self.chip_size[i])
            means: list[float] = []
            stds: list[float] = []
            for key in self.asset_keys(chipper):
                if key not in stats:
                    by_band = self._platform_band_stats(stats, str(self.platform[i]), chipper, key)
                    if by_band is None:
                        raise ConfigError(f"normalize: no statistics for asset {key!r}")
                    means.extend(by_band[0])
                    stds.extend(by_band[1])
                    continue
                entry = stats[key]
                if not isinstance(entry, Mapping) or "mean" not in entry or "std" not in entry:
                    raise ConfigError(f"normalize: statistics of asset {key!r} need 'mean' and 'std'")
                picked = []
                for value in (entry["mean"], entry["std"]):
                    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
                    if key in self.bands and len(arr) == self._asset_channels(chipper, key, all_bands=True) > 1:
                        arr = arr[self.bands[key]]
                    n = self._asset_channels(chipper, key)
                    if len(arr) not in (1, n):
                        raise ConfigError(
                            f"normalize: asset {key!r} has {n} channel(s) but {len(arr)} statistics values"
                        )
                    picked.append(np.broadcast_to(arr, (n,)))
                means.extend(picked[0].tolist())
                stds.extend(picked[1].tolist())
            mean, std = means, stds
        else:
            raise ConfigError(
                "normalize must be {'mean': [...], 'std': [...]}, {asset: {'mean', 'std'}}, "
                "a (mean, std) pair or a JSON file of one of these"
            )
        try:
            mean_a = np.broadcast_to(np.asarray(mean, dtype=np.float64), (channels,))
            std_a = np.broadcast_to(np.asarray(std, dtype=np.float64), (channels,))
        except ValueError as exc:
            raise ConfigError(f"normalize: statistics do not fit {channels} channels: {exc}") from exc
        if np.any(std_a == 0):
            raise ConfigError("normalize: a standard deviation is 0")
        return mean_a, std_a

    def _platform_band_stats(
        self, stats: Mapping[str, Any], platform: str, chipper: Chipper, key: str
    ) -> tuple[list[float], list[float]] | None:
        """Per-channel mean/std of a multi-band asset from statistics keyed by band name
        (``stacchip-stats`` output: NAIP's ``red, green, blue, nir`` of asset ``image``),
        through the platform's band order; ``None`` when the names do not resolve."""
        spec = PLATFORMS.get(platform)
        if spec is None:
            return None
        names = {index: band for band, (keys, index) in zip(spec.band_order, spec.sources, strict=True) if key in keys}
        if not names:
            return None
        positions = self.bands.get(key, list(range(max(self._asset_channels(chipper, key, all_bands=True),
                                                         max(names) + 1))))
        means: list[float] = []
        stds: list[float] = []
        for p in positions:
            entry = stats.get(names.get(p, ""))
            if not isinstance(entry, Mapping) or entry.get("mean") is None or entry.get("std") is None:
                raise ConfigError(
                    f"normalize: no statistics for band {p} of asset {key!r} "
                    f"({platform} band {names.get(p, '?')!r})"
                )
            means.append(float(entry["mean"]))
            stds.append(float(entry["std"]))
        return means, stds

    def _asset_channels(self, chipper: Chipper, key: str, all_bands: bool = False) -> int:
        if key in self.bands and not all_bands:
            return len(self.bands[key])
        return band_count(chipper.chip_grid.item.assets[key]) or 1

    def metadata(self, i: int) -> dict[str, Any]:
        """Metadata of row ``i`` (no pixels)."""
        ts = int(self.timestamp[i])
        when = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=ts)
        meta: dict[str, Any] = {
            "index": int(i),
            "chipid": str(self.chipid[i]),
            "item_id": str(self.item_id[i]),
            "platform": str(self.platform[i]),
            "datetime": when.isoformat().replace("+00:00", "Z"),
            "timestamp": np.int64(ts),
            "bounds": self.bounds[i].copy(),
            "chip_index": np.array([self.x[i], self.y[i]], dtype=np.int64),
            "cloud": float(self.cloud[i]),
            "nodata": float(self.nodata[i]),
        }
        if self.split is not None:
            meta["split"] = "" if self.split[i] is None else str(self.split[i])
        return meta

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"ChipDataset index {index} is outside 0..{n - 1}")
        sample = self.metadata(i)
        sample["pixels"] = self.normalize(self.read_pixels(i), i)
        target = self.read_target(i)
        if target is not None:
            sample["target"] = target
        if self.transform is not None:
            return self.transform(sample)
        return sample

    def close(self) -> None:
        """Close every raster this process opened."""
        CHIPPERS.close(self._owner)
        if self.label_raster is not None:
            self.label_raster.close()

    def rows_of(self, ids: Iterable[str]) -> np.ndarray:
        """Row numbers of the given chip ids (raises ``KeyError`` for unknown ids)."""
        lookup = {c: k for k, c in enumerate(self.chipid)}
        return np.array([lookup[c] for c in ids], dtype=np.int64)
