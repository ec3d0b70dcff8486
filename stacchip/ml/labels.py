"""Label rasters chipped on the imagery's grid.

A label (mask) raster is read for a chip onto the chip's own pixel grid (the
item's finest grid) with nearest-neighbour resampling, so target pixel
``(r, c)`` is the label under the centre of image pixel ``(r, c)``:

* label rasters in the item's CRS are read with exact index arithmetic (the same
  rule the chipper uses for coarser bands);
* label rasters in another CRS go through a GDAL warped VRT onto the chip grid
  (nearest).

Labels that are an asset of the item itself are read by the chipper (see
``ChipDataset(label_asset=...)``); this module is for external label rasters
(one map covering many scenes, e.g. a land-cover product).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyproj
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT

from stacchip import grid as gridmath
from stacchip.errors import AssetReadError, ConfigError
from stacchip.projection import Grid
from stacchip.reader import DatasetCache, gdal_env, read_indexed, resolve_href


class LabelRaster:
    """An external label raster, read per chip on the chip's grid.

    ``href`` is a path, ``file://``, ``s3://`` or ``http(s)://`` URL; ``band``
    is 1-based; ``fill`` is the value of target pixels outside the raster
    (default: the raster's nodata, else 0).
    """

    def __init__(self, href: str | os.PathLike[str], band: int = 1, fill: float | int | None = None) -> None:
        if int(band) < 1:
            raise ConfigError(f"label raster {str(href)!r}: band must be >= 1 (1-based), got {band!r}")
        self.href = str(href)
        self.band = int(band)
        self.fill = fill
        self._datasets = DatasetCache()

    @property
    def path(self) -> str:
        """The path GDAL opens."""
        return resolve_href(self.href)

    def read(self, grid: Grid, x: int, y: int, chip_size: int) -> np.ndarray:
        """The ``(chip_size, chip_size)`` label chip of chip ``(x, y)`` of ``grid``."""
        what = f"label raster {self.href!r} "
        with gdal_env():
            ds = self._datasets.get(self.path, what)
            fill = self.fill if self.fill is not None else (ds.nodata if ds.nodata is not None else 0)
            if ds.crs is None:
                raise AssetReadError(f"{what}has no CRS")
            label_crs = pyproj.CRS.from_wkt(ds.crs.to_wkt())
            if label_crs.equals(grid.crs, ignore_axis_order=True):
                rows, cols = gridmath.chip_asset_indices(grid.transform, ds.transform, x, y, chip_size)
                return read_indexed(ds, rows, cols, fill=fill, what=what, indexes=[self.band])[0]
            chip_transform = grid.transform @ Affine.translation(x * chip_size, y * chip_size)
            try:
                with WarpedVRT(
                    ds,
                    crs=grid.crs.to_wkt(),
                    transform=chip_transform,
                    width=chip_size,
                    height=chip_size,
                    resampling=Resampling.nearest,
                    nodata=fill,
                ) as vrt:
                    return vrt.read(self.band)
            except (RasterioError, OSError) as exc:
                raise AssetReadError(f"cannot warp {what}onto the chip grid: {exc}") from exc

    def close(self) -> None:
        """Close the datasets this process opened."""
        self._datasets.close()

    def __repr__(self) -> str:
        return f"LabelRaster({self.href!r}, band={self.band})"


def as_label_raster(value: Any) -> LabelRaster | None:
    """A :class:`LabelRaster` from a path/URL or an instance (``None`` passes)."""
    if value is None or isinstance(value, LabelRaster):
        return value
    if isinstance(value, (str, os.PathLike)):
        return LabelRaster(value)
    raise ConfigError(f"label_raster must be a path, URL or LabelRaster, got {type(value).__name__}")
