"""Writing Cloud-Optimized GeoTIFFs for processors.

Everything goes through GDAL's COG driver. Processors that transform pixels
(LINZ, Sentinel-1, MODIS) write tiled 512 px blocks, DEFLATE with a predictor
suited to the data type, internal overviews, BigTIFF when needed
(:func:`copy_as_cog`, :func:`write_cog`). The ``aligned`` layout
(:mod:`stacchip.processors.layout`) re-tiles a scene's files without changing
a pixel: square blocks of a given size, ZSTD with a predictor, overviews only
when asked (:func:`retile_cog`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile

#: Block size of written COGs, in pixels.
COG_BLOCKSIZE = 512
#: ZSTD level of re-tiled COGs (GDAL's default; 1 fastest .. 22 smallest).
ZSTD_LEVEL = 9
#: Block sides GDAL's GeoTIFF writer accepts are multiples of this (pixels).
BLOCK_MULTIPLE = 16
#: Smallest GDAL block cache while re-tiling, in MB. GDAL streams the copy through
#: the cache, so it bounds memory; it must hold a few rows of source tiles (a row of
#: 1024 px tiles of a 10980 px uint16 band is 22 MB) or tiles are decoded again.
RETILE_CACHE_MB = 64


def predictor_for(dtype: str | np.dtype) -> int:
    """TIFF predictor for ``dtype``: 3 (floating point) for floats, 2 (horizontal) for integers, else 1 (none)."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return 3
    if kind in "iu":
        return 2
    return 1


def cog_options(dtype: str | np.dtype) -> dict[str, Any]:
    """COG creation options for ``dtype``: DEFLATE, predictor 2 (integers) or 3 (floats)."""
    kind = np.dtype(dtype).kind
    return {
        "compress": "DEFLATE",
        "predictor": 3 if kind == "f" else 2,
        "blocksize": COG_BLOCKSIZE,
        "overviews": "AUTO",
        "bigtiff": "IF_SAFER",
        "num_threads": "ALL_CPUS",
    }


def copy_as_cog(src: Any, dst: str | os.PathLike[str]) -> None:
    """Write dataset ``src`` (open dataset, WarpedVRT or path) as a COG at local path ``dst``."""
    dtype = src.dtypes[0] if hasattr(src, "dtypes") else None
    if dtype is None:
        with rasterio.open(src) as ds:
            dtype = ds.dtypes[0]
    rasterio.shutil.copy(src, str(dst), driver="COG", **cog_options(dtype))


def write_cog(data: np.ndarray, profile: dict[str, Any], dst: str | os.PathLike[str]) -> None:
    """Write ``data`` (bands, rows, cols) with ``crs``/``transform``/``nodata`` from ``profile`` as a COG."""
    bands, height, width = data.shape
    meta = {
        "driver": "GTiff",
        "count": bands,
        "height": height,
        "width": width,
        "dtype": data.dtype.name,
        "crs": profile.get("crs"),
        "transform": profile.get("transform"),
        "nodata": profile.get("nodata"),
    }
    with MemoryFile() as memfile:
        with memfile.open(**meta) as mem:
            mem.write(data)
        with memfile.open() as mem:
            copy_as_cog(mem, dst)


def is_cog(path: str | os.PathLike[str]) -> bool:
    """True when GDAL reports the file's layout as COG."""
    with rasterio.open(str(path)) as ds:
        return ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def retile_cog(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    blocksize: int,
    *,
    level: int = ZSTD_LEVEL,
    overviews: bool = False,
) -> None:
    """Copy the raster file ``src`` to a COG at local path ``dst`` with ``blocksize`` px square tiles.

    Pixels, size, CRS, transform, nodata, masks, band descriptions, scales,
    offsets and metadata are copied unchanged (a lossless re-encoding): ZSTD at
    ``level`` with :func:`predictor_for` the data type. ``overviews=False``
    writes none (the source's are dropped); ``True`` copies the source's or
    builds them (nearest neighbour, so class rasters keep their classes).
    GDAL streams the copy block row by block row through a block cache of
    :data:`RETILE_CACHE_MB` or three rows of source tiles, whichever is larger,
    so memory stays bounded for 10980² bands (~175 MB peak RSS of the whole process for Sentinel-2's
    1024 px tiles; GDAL's default cache would take the whole band).
    ``blocksize`` must be a positive multiple of :data:`BLOCK_MULTIPLE`
    (:class:`~stacchip.errors.ConfigError` otherwise).
    """
    from stacchip.errors import ConfigError

    if blocksize <= 0 or blocksize % BLOCK_MULTIPLE:
        raise ConfigError(f"COG block size {blocksize} px is not a positive multiple of {BLOCK_MULTIPLE}")
    if not 1 <= level <= 22:
        raise ConfigError(f"ZSTD level {level} is outside 1..22")
    with rasterio.open(str(src)) as ds:
        dtype = ds.dtypes[0]
        block_rows = ds.block_shapes[0][0] if ds.block_shapes else 1
        row_bytes = ds.width * min(block_rows, ds.height) * sum(np.dtype(d).itemsize for d in ds.dtypes)
    cache = max(RETILE_CACHE_MB << 20, 3 * row_bytes)
    options = {
        "blocksize": blocksize,
        "compress": "ZSTD",
        "level": level,
        "predictor": predictor_for(dtype),
        "overviews": "AUTO" if overviews else "NONE",
        "resampling": "NEAREST",
        "bigtiff": "IF_SAFER",
        "num_threads": "ALL_CPUS",
    }
    with rasterio.Env(GDAL_CACHEMAX=cache):  # rasterio takes bytes here
        rasterio.shutil.copy(str(src), str(dst), driver="COG", **options)
