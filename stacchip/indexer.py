"""Chip indexers: one GeoParquet-ready row per chip of a STAC item.

Upstream-compatible names and signatures (``ChipIndexer``, ``NoStatsChipIndexer``,
``NoDataMaskChipIndexer``, ``Sentinel2Indexer``, ``LandsatIndexer``,
``ModisIndexer``) plus ``Sentinel1Indexer``. Statistics are computed for all
chips at once by block reduction at the QA band's own resolution; the fractions
equal those of a pixel-by-pixel nearest-neighbour upsample of the QA band onto
the finest grid, for any resolution ratio.
"""

from __future__ import annotations

import datetime as dt
import logging
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pystac
import rasterio.crs
from affine import Affine

from stacchip import grid as gridmath
from stacchip import qa as qamod
from stacchip.errors import (
    AssetNotFoundError,
    ConfigError,
    DatetimeError,
    ItemError,
)
from stacchip.index import index_table, upstream_table
from stacchip.items import as_item  # noqa: F401 (lives in the lower stacchip.items; importable here)
from stacchip.platforms import asset_nodata, canonical_platform
from stacchip.projection import Grid, item_grid
from stacchip.reader import StripReader, asset_transform, gdal_env, resolve_href

logger = logging.getLogger(__name__)

Masks = tuple[np.ndarray, np.ndarray]


def item_datetime(item: pystac.Item) -> dt.datetime:
    """``datetime``, else ``start_datetime``, as an aware UTC datetime."""
    value = item.datetime
    if value is None:
        raw = item.properties.get("start_datetime")
        if raw is None:
            raise DatetimeError(
                f"item {item.id!r}: neither 'datetime' nor 'start_datetime' is set"
            )
        try:
            value = dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError as exc:
            raise DatetimeError(
                f"item {item.id!r}: field 'start_datetime' = {raw!r} is not ISO 8601"
            ) from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def item_platform(item: pystac.Item) -> str:
    """Platform name for the index: the canonical platform of the collection id
    (:func:`stacchip.platforms.canonical_platform`, e.g. Earth Search's
    ``sentinel-2-c1-l2a`` is ``sentinel-2-l2a``), else the ``platform`` property."""
    return canonical_platform(item.collection_id or str(item.properties.get("platform") or ""))


class ChipIndexer:
    """Indexer base class: the chip grid of an item, without statistics.

    ``chip_size`` is in pixels of the finest grid; ``chip_max_nodata`` is the
    largest nodata fraction (0-1) a chip may have to be kept (0 keeps only chips
    with no nodata at all); ``shape`` overrides the ``(rows, cols)`` shape.
    ``edge="keep"`` also indexes the partial chips at the right and bottom
    edges, whose pixels beyond the grid count as nodata (default ``"drop"``,
    upstream's rule). Subclasses provide statistics through
    :meth:`compute_stats` (all chips at once) or, as upstream subclasses did,
    :meth:`get_stats` (one chip).
    """

    def __init__(
        self,
        item: Any,
        chip_size: int = 256,
        chip_max_nodata: float = 0.5,
        shape: Sequence[int] | None = None,
        *,
        platform: str | None = None,
        edge: str = "drop",
    ) -> None:
        self.item = as_item(item)
        self.edge = gridmath.check_edge(edge)
        chip_size = gridmath.check_chip_size(chip_size, f"item {self.item.id!r}: ")
        try:
            max_nodata = float(chip_max_nodata)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"chip_max_nodata must be a number, got {chip_max_nodata!r}") from exc
        if not 0.0 <= max_nodata <= 1.0:
            raise ConfigError(f"chip_max_nodata must be a fraction in [0, 1], got {chip_max_nodata!r}")
        self.chip_size = int(chip_size)
        self.chip_max_nodata = max_nodata
        #: canonical platform stored in the index (any alias given is resolved)
        self.platform = canonical_platform(platform) if platform is not None else item_platform(self.item)
        #: the item's collection id, stored in the index's ``collection`` column
        self.collection = self.item.collection_id
        self._shape = shape
        self.grid: Grid = item_grid(self.item, shape)
        self._transformer = gridmath.lonlat_transformer(self.grid.crs)

    # --- geometry -----------------------------------------------------------------

    @property
    def crs(self) -> rasterio.crs.CRS:
        """CRS of the finest grid (a rasterio CRS, as upstream)."""
        return rasterio.crs.CRS.from_wkt(self.grid.crs.to_wkt())

    @property
    def shape(self) -> list[int]:
        """``[rows, cols]`` of the finest grid, in pixels."""
        return [int(self.grid.shape[0]), int(self.grid.shape[1])]

    @property
    def transform(self) -> list[float]:
        """The finest grid's 6-term affine transform ``[a, b, c, d, e, f]`` (metres)."""
        return list(self.grid.transform)[:6]

    @property
    def affine(self) -> Affine:
        """The finest grid's transform as :class:`affine.Affine`."""
        return self.grid.transform

    @property
    def chip_grid(self) -> gridmath.ChipGrid:
        """This indexer's chip grid (item, finest grid, chip size, edge rule) as a
        :class:`~stacchip.grid.ChipGrid` value: what a chipper needs to read chips."""
        return gridmath.ChipGrid(self.item, self.grid, self.chip_size, self.edge)

    @property
    def x_size(self) -> int:
        """Number of chips in x (whole chips only unless ``edge="keep"``)."""
        return self.chip_grid.x_size

    @property
    def y_size(self) -> int:
        """Number of chips in y (whole chips only unless ``edge="keep"``)."""
        return self.chip_grid.y_size

    @property
    def size(self) -> int:
        """Number of chips in the grid (before any nodata filter)."""
        return self.x_size * self.y_size

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` of the whole grid in CRS units (metres)."""
        return self.grid.bounds

    def reproject(self, geom: Any) -> Any:
        """Reproject a shapely geometry from the item CRS to lon/lat."""
        return gridmath.reproject_geometries(np.array([geom], dtype=object), self._transformer)[0]

    def check_chip(self, x: int, y: int) -> None:
        """Raise :class:`ChipOutOfRangeError` unless ``(x, y)`` is on the grid."""
        self.chip_grid.check_chip(x, y)

    def get_chip_bbox(self, x: int, y: int) -> Any:
        """Polygon of chip ``(x, y)`` in lon/lat (a shapely Polygon)."""
        self.check_chip(x, y)
        bounds = gridmath.chip_bounds(self.grid.transform, np.array([x]), np.array([y]), self.chip_size)
        return gridmath.chip_polygons_lonlat(bounds, self.grid.crs)[0]

    # --- statistics -----------------------------------------------------------------

    def get_stats(self, x: int, y: int) -> tuple[float, float]:
        """``(cloud fraction, nodata fraction)`` of chip ``(x, y)``."""
        if type(self).compute_stats is ChipIndexer.compute_stats:
            raise NotImplementedError(
                f"{type(self).__name__} has no statistics; use a source indexer "
                "(Sentinel2Indexer, LandsatIndexer, ...) or NoStatsChipIndexer"
            )
        self.check_chip(x, y)
        cloud, nodata = self.stats
        return float(cloud[y, x]), float(nodata[y, x])

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(cloud, nodata)`` fractions, each ``(y_size, x_size)`` float64.

        The default calls :meth:`get_stats` per chip, for subclasses written
        against the upstream API; stacchip's own indexers override this.
        """
        if type(self).get_stats is ChipIndexer.get_stats:
            raise NotImplementedError(
                f"{type(self).__name__} has no statistics; use a source indexer "
                "(Sentinel2Indexer, LandsatIndexer, ...) or NoStatsChipIndexer"
            )
        cloud = np.zeros((self.y_size, self.x_size))
        nodata = np.zeros((self.y_size, self.x_size))
        for y in range(self.y_size):
            for x in range(self.x_size):
                cloud[y, x], nodata[y, x] = self.get_stats(x, y)
        return cloud, nodata

    @cached_property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Cached :meth:`compute_stats`."""
        return self.compute_stats()

    def has_stats(self) -> bool:
        """True when this indexer can compute statistics."""
        return not (
            type(self).compute_stats is ChipIndexer.compute_stats
            and type(self).get_stats is ChipIndexer.get_stats
        )

    @cached_property
    def kept_chips(self) -> tuple[np.ndarray, np.ndarray]:
        """``(xs, ys)`` of the chips the index keeps, in row order.

        Without statistics every chip is kept.
        """
        xs, ys = gridmath.chip_positions(self.x_size, self.y_size)
        if not self.has_stats():
            return xs, ys
        _, nodata = self.stats
        keep = nodata.ravel() <= self.chip_max_nodata
        return xs[keep], ys[keep]

    # --- the index ---------------------------------------------------------------------

    def create_index(self) -> pa.Table:
        """The chip index as upstream returned it: a pyarrow Table of exactly seven
        columns ``chipid``, ``date``, ``chip_index_x``, ``chip_index_y``,
        ``cloud_cover_percentage``, ``nodata_percentage`` (fractions 0-1) and
        ``geometry`` (lon/lat chip polygons as a native geoarrow polygon column).

        :meth:`create_full_index` gives the table stacchip writes and reads
        (plus ``item_id``, ``platform``, ``datetime``, ``chip_size``, ``bbox``).
        """
        return upstream_table(self.create_full_index())

    def create_full_index(self) -> pa.Table:
        """The full chip index of this item (schema :data:`stacchip.index.SCHEMA`):
        upstream's columns with WKB geometry, plus ``item_id``, ``platform``,
        ``datetime`` (UTC), ``chip_size`` and the ``bbox`` struct. What
        :func:`stacchip.index.write_index`, the CLI, the processors and
        ``stacchip.ml`` use."""
        cloud, nodata = self.stats
        xs, ys = gridmath.chip_positions(self.x_size, self.y_size)
        cloud = cloud.ravel()
        nodata = nodata.ravel()
        keep = nodata <= self.chip_max_nodata
        dropped = int((~keep).sum())
        logger.info(
            "item %s: dropped %d/%d chips with nodata above %s",
            self.item.id, dropped, len(keep), self.chip_max_nodata,
        )
        xs, ys = xs[keep], ys[keep]
        bounds = gridmath.chip_bounds(self.grid.transform, xs, ys, self.chip_size)
        polygons = gridmath.chip_polygons_lonlat(bounds, self.grid.crs)
        return index_table(
            item_id=self.item.id,
            platform=self.platform,
            collection=self.collection,
            datetime=item_datetime(self.item),
            chip_size=self.chip_size,
            xs=xs,
            ys=ys,
            cloud=cloud[keep],
            nodata=nodata[keep],
            polygons=polygons,
        )

    # --- helpers for QA-band indexers -------------------------------------------------------

    def asset_href(self, key: str) -> str:
        """The href of asset ``key`` (raises :class:`AssetNotFoundError`)."""
        if key not in self.item.assets:
            raise AssetNotFoundError(
                f"item {self.item.id!r}: asset {key!r} not found; assets are "
                + ", ".join(sorted(self.item.assets))
            )
        return self.item.assets[key].href

    def reduce_masks(
        self,
        href: str,
        decode: Callable[[np.ndarray], Masks],
        what: str,
        band: int = 1,
        gdal_options: Mapping[str, str] | None = None,
        key: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cloud and nodata fractions of every chip from one QA raster.

        Reads the raster at its own resolution one strip of chips at a time,
        decodes each strip with ``decode`` and block-reduces the masks with
        nearest-neighbour weights (see :func:`stacchip.grid.reduction_weights`).
        Fine pixels that fall outside the QA raster count as nodata. With
        ``key`` (the asset the raster belongs to) the file's own grid is first
        checked against the item's (:func:`stacchip.reader.asset_transform`).
        """
        with gdal_env(**(gdal_options or {})), StripReader(resolve_href(href), what) as strips:
            ds = strips.dataset
            transform = ds.transform if key is None else asset_transform(ds, self.item, key, self.grid)
            return block_reduce(
                self.grid.transform, transform, (ds.height, ds.width),
                self.x_size, self.y_size, self.chip_size,
                lambda r0, r1: decode(strips.read(r0, r1, band)),
            )


def block_reduce(
    fine: Affine,
    qa_transform: Affine,
    qa_shape: tuple[int, int],
    x_size: int,
    y_size: int,
    chip_size: int,
    read_masks: Callable[[int, int], Masks],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chip cloud and nodata fractions, ``(y_size, x_size)`` each.

    ``read_masks(r0, r1)`` returns the ``(cloud, nodata)`` masks of QA rows
    ``r0:r1`` (full width). Equals counting, chip by chip, the masks upsampled
    to the fine grid by nearest neighbour.
    """
    height, width = qa_shape
    wy, out_y = gridmath.reduction_weights(
        fine.f, fine.e, qa_transform.f, qa_transform.e, y_size, chip_size, height
    )
    wx, out_x = gridmath.reduction_weights(
        fine.c, fine.a, qa_transform.c, qa_transform.a, x_size, chip_size, width
    )
    cloud = np.zeros((y_size, x_size))
    nodata = np.zeros((y_size, x_size))
    wxt = wx.T.astype(np.float32)
    for j in range(y_size):  # one strip of chips at a time, vectorised across x
        rows = np.nonzero(wy[j])[0]
        if len(rows):
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            cloud_mask, nodata_mask = read_masks(r0, r1)
            weights = wy[j, r0:r1]
            cloud[j] = _weighted_row_sum(cloud_mask, weights) @ wxt
            nodata[j] = _weighted_row_sum(nodata_mask, weights) @ wxt
    inside = np.outer(chip_size - out_y, chip_size - out_x)
    total = float(chip_size) ** 2
    nodata += total - inside  # fine pixels with no QA pixel under them
    return cloud / total, nodata / total


def _weighted_row_sum(mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights @ mask`` for a boolean ``(rows, cols)`` mask, as float32.

    Row weights take few distinct values (fine pixels per QA row), so this sums
    the rows of each weight with an integer reduction (fast, no float copy of
    the mask) and scales.
    """
    counts = np.zeros(mask.shape[1], dtype=np.float32)
    values = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)
    for w in np.unique(weights):
        if w == 0:
            continue
        sel = weights == w
        if sel.all():
            part = np.add.reduce(values, axis=0, dtype=np.uint32)
        else:
            part = np.add.reduce(values[sel], axis=0, dtype=np.uint32)
        counts += np.float32(w) * part
    return counts


class NoStatsChipIndexer(ChipIndexer):
    """Indexer that assumes no chip has clouds or nodata (NAIP, LINZ).

    With ``edge="keep"`` the part of an edge chip beyond the grid is nodata.
    """

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self.grid.shape
        size = self.chip_size
        in_y = np.clip(rows - np.arange(self.y_size) * size, 0, size)
        in_x = np.clip(cols - np.arange(self.x_size) * size, 0, size)
        nodata = 1.0 - np.outer(in_y, in_x) / float(size * size)
        return np.zeros((self.y_size, self.x_size)), nodata


class NoDataMaskChipIndexer(ChipIndexer):
    """Indexer with a given nodata mask and no clouds.

    ``nodata_mask`` is a 2-D boolean array (True = nodata) covering the item's
    extent; at the item's shape it maps pixel for pixel, at any other shape it
    is aligned by nearest neighbour like any coarser band.
    """

    def __init__(
        self,
        item: Any,
        nodata_mask: Any,
        chip_size: int = 256,
        chip_max_nodata: float = 0.5,
        shape: Sequence[int] | None = None,
        *,
        platform: str | None = None,
        edge: str = "drop",
    ) -> None:
        super().__init__(item, chip_size, chip_max_nodata, shape, platform=platform, edge=edge)
        mask = np.asarray(nodata_mask)
        if mask.ndim != 2 or mask.size == 0:
            raise ConfigError(
                f"item {self.item.id!r}: nodata_mask must be a non-empty 2-D array, "
                f"got shape {mask.shape}"
            )
        self.nodata_mask = mask

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        mask = self.nodata_mask.astype(bool)
        rows, cols = self.grid.shape
        t = self.grid.transform
        mask_transform = t @ Affine.scale(cols / mask.shape[1], rows / mask.shape[0])
        zeros = np.zeros(mask.shape[1], dtype=bool)
        cloud, nodata = block_reduce(
            t, mask_transform, mask.shape, self.x_size, self.y_size, self.chip_size,
            lambda r0, r1: (np.broadcast_to(zeros, (r1 - r0, mask.shape[1])), mask[r0:r1]),
        )
        return cloud, nodata


class Sentinel2Indexer(ChipIndexer):
    """Sentinel-2 L2A: statistics from the Scene Classification asset (``scl`` in
    Earth Search items, ``SCL`` in Planetary Computer items).

    Cloud = SCL classes 1, 3, 8, 9, 10; nodata = class 0.
    """

    scl_asset = "scl"
    scl_filter = list(qamod.SCL_CLOUD_CLASSES)
    nodata_value = qamod.SCL_NO_DATA

    def scl_key(self) -> str:
        """The SCL asset key of this item (``scl_asset``, else its upper-case form)."""
        for key in (self.scl_asset, self.scl_asset.upper()):
            if key in self.item.assets:
                return key
        return self.scl_asset  # asset_href names it in the error

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        key = self.scl_key()
        return self.reduce_masks(
            self.asset_href(key),
            lambda scl: qamod.sentinel2_scl(scl, self.scl_filter, self.nodata_value),
            f"item {self.item.id!r} asset {key!r} ",
            key=key,
        )


class LandsatIndexer(ChipIndexer):
    """Landsat Collection 2: statistics from the ``qa_pixel`` asset.

    Nodata = bit 0 (fill); cloud = bit 1 (dilated cloud), bit 3 (cloud) or
    bit 4 (cloud shadow). Reads the asset's own href; with ``alternate="s3"``
    it reads ``alternate.s3.href`` instead (requester-pays when the item says so).
    """

    qa_asset = "qa_pixel"

    def __init__(
        self,
        item: Any,
        chip_size: int = 256,
        chip_max_nodata: float = 0.5,
        shape: Sequence[int] | None = None,
        *,
        platform: str | None = None,
        edge: str = "drop",
        alternate: str | None = None,
    ) -> None:
        super().__init__(item, chip_size, chip_max_nodata, shape, platform=platform, edge=edge)
        self.alternate = alternate

    def qa_href(self) -> tuple[str, dict[str, str]]:
        """The QA href to read and the GDAL options it needs."""
        href = self.asset_href(self.qa_asset)
        if self.alternate is None:
            return href, {}
        alt = self.item.assets[self.qa_asset].extra_fields.get("alternate", {}).get(self.alternate)
        if not alt or "href" not in alt:
            raise AssetNotFoundError(
                f"item {self.item.id!r}: asset {self.qa_asset!r} has no "
                f"'alternate.{self.alternate}.href'"
            )
        options = {}
        if alt.get("storage:requester_pays") or self.item.assets[self.qa_asset].extra_fields.get(
            "storage:requester_pays"
        ):
            options["AWS_REQUEST_PAYER"] = "requester"
        return alt["href"], options

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        href, options = self.qa_href()
        return self.reduce_masks(
            href, qamod.landsat_qa_pixel,
            f"item {self.item.id!r} asset {self.qa_asset!r} ", gdal_options=options, key=self.qa_asset,
        )


class ModisIndexer(ChipIndexer):
    """MODIS surface reflectance (MOD09A1/MYD09A1): statistics from the
    ``sur_refl_state_500m`` asset (500 m state QA).

    Cloud = state bits 0-1 (cloud state, bit 0 least significant) equal to
    0b01 (cloudy) or 0b10 (mixed); nodata = the state fill value 65535.
    """

    qa_asset = "sur_refl_state_500m"

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.reduce_masks(
            self.asset_href(self.qa_asset), qamod.modis_state,
            f"item {self.item.id!r} asset {self.qa_asset!r} ", key=self.qa_asset,
        )


class Sentinel1Indexer(ChipIndexer):
    """Sentinel-1 RTC/GRD: no clouds; nodata where any backscatter asset
    (``vv``, ``vh``, ``hh``, ``hv`` present in the item) equals its nodata value
    (``raster:bands[0].nodata``, else the file's nodata) or is NaN."""

    backscatter_assets = ("vv", "vh", "hh", "hv")

    def nodata_of(self, key: str, file_nodata: float | None) -> float | None:
        declared = asset_nodata(self.item.assets[key])
        return file_nodata if declared is None else declared

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        keys = [k for k in self.backscatter_assets if k in self.item.assets]
        if not keys:
            raise AssetNotFoundError(
                f"item {self.item.id!r}: no backscatter asset; expected one of "
                + ", ".join(self.backscatter_assets)
            )
        readers = []
        with gdal_env():
            try:
                for key in keys:
                    what = f"item {self.item.id!r} asset {key!r} "
                    readers.append(StripReader(resolve_href(self.asset_href(key)), what))
                first = readers[0].dataset
                first_transform = asset_transform(first, self.item, keys[0], self.grid)
                for key, reader in zip(keys, readers, strict=False):
                    ds = reader.dataset
                    transform = asset_transform(ds, self.item, key, self.grid)
                    if (ds.height, ds.width) != (first.height, first.width) or transform != first_transform:
                        raise ItemError(
                            f"item {self.item.id!r}: backscatter asset {key!r} is not on the "
                            f"grid of asset {keys[0]!r}"
                        )
                nodatas = [self.nodata_of(k, r.dataset.nodata) for k, r in zip(keys, readers, strict=False)]

                def read(r0: int, r1: int) -> Masks:
                    mask = np.zeros((r1 - r0, first.width), dtype=bool)
                    for reader, nd in zip(readers, nodatas, strict=False):
                        mask |= qamod.nodata_value(reader.read(r0, r1), nd)
                    return np.zeros_like(mask), mask

                return block_reduce(
                    self.grid.transform, first_transform, (first.height, first.width),
                    self.x_size, self.y_size, self.chip_size, read,
                )
            finally:
                for reader in readers:
                    reader.close()


#: Indexer classes by short name (CLI ``--indexer`` and ``utils.load_indexer_*``).
INDEXERS: dict[str, type[ChipIndexer]] = {
    "base": ChipIndexer,
    "nostats": NoStatsChipIndexer,
    "sentinel-2": Sentinel2Indexer,
    "landsat": LandsatIndexer,
    "modis": ModisIndexer,
    "sentinel-1": Sentinel1Indexer,
    "naip": NoStatsChipIndexer,
    "linz": NoStatsChipIndexer,
}


def indexer_class(name: str | type[ChipIndexer]) -> type[ChipIndexer]:
    """Indexer class for a short name (or the class itself)."""
    if isinstance(name, type) and issubclass(name, ChipIndexer):
        return name
    try:
        return INDEXERS[str(name).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown indexer {name!r}; choose one of {', '.join(sorted(INDEXERS))}"
        ) from None


def guess_indexer(item: pystac.Item) -> type[ChipIndexer]:
    """The source indexer an item most likely needs, from its assets."""
    assets = item.assets
    if "scl" in assets or "SCL" in assets:
        return Sentinel2Indexer
    if "qa_pixel" in assets:
        return LandsatIndexer
    if ModisIndexer.qa_asset in assets:
        return ModisIndexer
    if any(k in assets for k in Sentinel1Indexer.backscatter_assets):
        return Sentinel1Indexer
    return NoStatsChipIndexer
