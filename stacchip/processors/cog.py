"""Writing Cloud-Optimized GeoTIFFs for processors that transform pixels (LINZ, Sentinel-1, MODIS).

Everything goes through GDAL's COG driver: tiled 512 px blocks, DEFLATE with a
predictor suited to the data type, internal overviews, BigTIFF when needed.
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
