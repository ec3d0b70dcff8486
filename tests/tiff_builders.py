"""Rasters for the tile-reader tests, written by rasterio (GDAL's GTiff and COG drivers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

TRANSFORM = Affine(10, 0, 500000, 0, -10, 4000000)
CRS = "EPSG:32633"


def pixels(dtype: str, bands: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Structured pixels with noise (compressible, every position distinct enough)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if np.dtype(dtype).kind == "f":
        base = np.sin(np.arange(rows)[:, None] / 17.0) * np.cos(np.arange(cols)[None, :] / 23.0)
        return (base[None] * 1000 + rng.standard_normal((bands, rows, cols))).astype(dtype)
    base = (np.arange(rows)[:, None] * 3 + np.arange(cols)[None, :]) % 200
    data = base[None] + rng.integers(0, 40, (bands, rows, cols))
    if np.dtype(dtype).kind == "i":
        data = data - 120
    elif np.dtype(dtype).itemsize > 1:
        data = data * 250 + 7
    return data.astype(dtype)


def write(path: Path, data: np.ndarray, *, driver: str = "GTiff", compress: str | None = "deflate",
          predictor: int = 1, blocksize: int = 256, interleave: str = "pixel",
          nodata: float | None = None, transform: Affine = TRANSFORM, crs: Any = CRS,
          **options: Any) -> Path:
    """Write ``(bands, rows, cols)`` as a tiled GeoTIFF (``driver="COG"``: a COG)."""
    bands, rows, cols = data.shape
    profile: dict[str, Any] = {"driver": driver, "width": cols, "height": rows, "count": bands,
                                   "dtype": data.dtype.name, "transform": transform, "crs": crs}
    if compress:
        profile["compress"] = compress
    if predictor != 1:
        profile["predictor"] = predictor
    if nodata is not None:
        profile["nodata"] = nodata
    if driver == "COG":
        profile.update(blocksize=blocksize, overviews="NONE")
    else:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize, interleave=interleave)
    profile.update(options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path
