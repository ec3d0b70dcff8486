"""Chipper: the pixels of any indexed chip, on demand.

For every asset the chip equals, pixel for pixel, a nearest-neighbour resample
onto the finest grid: fine pixel ``(r, c)`` takes the asset pixel containing the
fine pixel's centre (also for bands whose resolution does not divide the chip,
such as Sentinel-2's 60 m bands). With ``native=True`` each asset is returned at
its own resolution instead: the asset pixels under the chip's fine pixel centres.
Datasets are opened once per process and thread (see ``stacchip.reader``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from stacchip import grid as gridmath
from stacchip.errors import AssetNotFoundError, ChipOutOfRangeError
from stacchip.indexer import ChipIndexer
from stacchip.reader import DatasetCache, gdal_env, read_indexed, resolve_href

logger = logging.getLogger(__name__)

#: Media types that are never rasters worth chipping.
NON_RASTER_TYPES = ("json", "xml", "html", "text/", "jpeg", "png")
#: Asset roles that mark previews and metadata, not data.
NON_DATA_ROLES = {"thumbnail", "overview", "metadata", "tiles", "visual-preview"}


def is_raster_asset(asset: Any) -> bool:
    """True for assets that look like data rasters (COGs), not previews or metadata."""
    media = (asset.media_type or "").lower()
    if any(token in media for token in NON_RASTER_TYPES):
        return False
    roles = set(asset.roles or [])
    if roles & NON_DATA_ROLES and "data" not in roles:
        return False
    return True


class Chipper:
    """Read chips of an indexed item.

    ``mountpath`` re-roots hrefs under a local directory (upstream semantics);
    ``assets`` chooses the assets (default: every raster data asset);
    ``asset_blacklist`` drops some. ``native=True`` returns assets at their own
    resolution. ``len()``, iteration and ``[i]`` cover the chips the index keeps
    (after the nodata filter), in index row order; ``[i]`` gives ``(x, y, chip)``.
    """

    def __init__(
        self,
        indexer: ChipIndexer,
        mountpath: str | os.PathLike[str] | None = None,
        assets: Sequence[str] | None = None,
        asset_blacklist: Sequence[str] | None = None,
        *,
        native: bool = False,
    ) -> None:
        self.indexer = indexer
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
        for i in range(len(self)):
            yield self[i]

    def path(self, key: str) -> str:
        """The path GDAL opens for asset ``key``."""
        return resolve_href(self.indexer.item.assets[key].href, self.mountpath)

    def fill_value(self, key: str, file_nodata: float | None) -> float | int:
        """Value for pixels outside an asset: its nodata, else 0."""
        bands = self.indexer.item.assets[key].extra_fields.get("raster:bands") or []
        if bands and bands[0].get("nodata") is not None:
            return bands[0]["nodata"]
        return 0 if file_nodata is None else file_nodata

    def get_pixels_for_asset(self, key: str, x: int, y: int) -> np.ndarray:
        """Pixels of asset ``key`` for chip ``(x, y)``: ``(bands, rows, cols)``."""
        ix = self.indexer
        ix.check_chip(x, y)
        ds = self._datasets.get(self.path(key), f"item {ix.item.id!r} asset {key!r} ")
        rows, cols = gridmath.chip_asset_indices(ix.affine, ds.transform, x, y, ix.chip_size)
        if self.native:
            rows, cols = np.unique(rows), np.unique(cols)
        return read_indexed(
            ds, rows, cols, fill=self.fill_value(key, ds.nodata),
            what=f"item {ix.item.id!r} asset {key!r} ",
        )

    def chip(self, x: int, y: int) -> dict[str, np.ndarray]:
        """``{asset key: (bands, chip_size, chip_size) array}`` for chip ``(x, y)``."""
        self.indexer.check_chip(x, y)
        with gdal_env():
            return {key: self.get_pixels_for_asset(key, x, y) for key in self.asset_keys}

    def close(self) -> None:
        """Close the datasets this chipper opened."""
        self._datasets.close()

    def __enter__(self) -> "Chipper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
