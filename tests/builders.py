"""Test data builders: real STAC items from tests/data with COGs written
to match them (scaled down), and small synthetic rasters."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rasterio
from affine import Affine

SHARED_ITEMS = Path(__file__).resolve().parent / "data"

REAL_ITEMS = {
    "sentinel-2": "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json",
    "landsat": "landsat-c2l2-sr-LC09_L2SR_086107_20240311_20240312_02_T2_SR.json",
    "naip": "naip_m_4207009_ne_19_060_20211024.json",
    "sentinel-1": "sentinel-1-rtc-pc.json",
    "upstream-test": "stacchip_test_item.json",
}

RASTER_MEDIA = ("tiff", "geotiff", "cloud-optimized")


def real_item(name: str) -> dict[str, Any]:
    """A real STAC item dict from the shared fixtures."""
    return json.loads((SHARED_ITEMS / REAL_ITEMS[name]).read_text())


def write_cog(
    path: Path,
    data: np.ndarray,
    transform: Affine,
    crs: Any,
    nodata: float | None = None,
    blocksize: int = 256,
) -> Path:
    """Write a (bands, rows, cols) or (rows, cols) array as a COG."""
    if data.ndim == 2:
        data = data[None]
    profile = {
        "driver": "COG",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "compress": "DEFLATE",
        "blocksize": blocksize,
        "overviews": "NONE",
    }
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def coded_pixels(shape: tuple[int, int], bands: int, dtype: str, salt: int) -> np.ndarray:
    """Pixels that encode their own position (modulo the dtype range)."""
    rows, cols = shape
    r = np.arange(rows, dtype=np.int64)[:, None]
    c = np.arange(cols, dtype=np.int64)[None, :]
    out = np.empty((bands, rows, cols), dtype=dtype)
    info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
    for b in range(bands):
        v = r * 1009 + c * 7 + b * 101 + salt * 31
        if info is not None:
            lo = max(int(info.min), 0) + 1
            v = lo + v % (min(int(info.max), 2**31) - lo)
        out[b] = v.astype(dtype)
    return out


def _is_raster(asset: dict[str, Any]) -> bool:
    media = (asset.get("type") or "").lower()
    roles = set(asset.get("roles") or [])
    if roles & {"thumbnail", "overview", "metadata", "tiles"} and "data" not in roles:
        return False
    return media == "" or any(token in media for token in RASTER_MEDIA)


def _crs_of(item: dict[str, Any], asset: dict[str, Any]) -> str:
    for fields in (asset, item["properties"]):
        if fields.get("proj:code"):
            return fields["proj:code"]
        if fields.get("proj:epsg"):
            return f"EPSG:{fields['proj:epsg']}"
        if fields.get("proj:wkt2"):
            return fields["proj:wkt2"]
    raise ValueError("fixture item has no CRS")


def materialize(
    item: dict[str, Any],
    directory: Path,
    factor: int = 1,
    pixels: Callable[[str, dict[str, Any], tuple[int, int]], np.ndarray] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Write a COG for every raster asset of ``item`` and point the hrefs at them.

    Grids are scaled down by ``factor`` (shape // factor, pixel size * factor),
    keeping the projection metadata consistent with the written files. Assets
    without a grid of their own use the item's. ``pixels(key, asset, shape)``
    returns the data (default: position-coded values of the declared dtype).
    Non-raster assets are dropped (or kept with ``keep``).
    """
    item = copy.deepcopy(item)
    props = item["properties"]

    def scale(fields: dict[str, Any]) -> tuple[tuple[int, int], Affine] | None:
        if "proj:shape" not in fields or "proj:transform" not in fields:
            return None
        rows, cols = fields["proj:shape"]
        t = [float(v) for v in fields["proj:transform"][:6]]
        shape = (max(1, math.floor(rows / factor)), max(1, math.floor(cols / factor)))
        transform = Affine(t[0] * factor, t[1], t[2], t[3], t[4] * factor, t[5])
        fields["proj:shape"] = list(shape)
        fields["proj:transform"] = list(transform)[:6] + (
            [0.0, 0.0, 1.0] if len(fields["proj:transform"]) == 9 else []
        )
        return shape, transform

    item_grid = scale(props)
    assets = {}
    for n, (key, asset) in enumerate(item["assets"].items()):
        if not _is_raster(asset):
            if keep is not None and keep(key):
                assets[key] = asset
            continue
        grid = scale(asset) or item_grid
        if grid is None:
            continue
        shape, transform = grid
        bands = len(asset.get("eo:bands") or asset.get("raster:bands") or [None])
        rb = (asset.get("raster:bands") or [{}])[0]
        dtype = rb.get("data_type") or "uint16"
        if pixels is not None:
            data = pixels(key, asset, shape)
        else:
            data = coded_pixels(shape, bands, dtype, n)
        nodata = rb.get("nodata")
        path = write_cog(directory / f"{key}.tif", data, transform, _crs_of(item, asset), nodata)
        asset["href"] = str(path)
        assets[key] = asset
    item["assets"] = assets
    return item
