"""A small Sentinel-2-shaped scene built offline, for ``stacchip demo`` and examples.

The scene copies the layout of an Earth Search ``sentinel-2-c1-l2a`` item at a
tenth of the size: 10 m bands of ``size``² pixels, 20 m bands of ``size/2``²,
60 m bands of ``size/6``² (rounded up, so they cover the 10 m grid), an SCL band
with clear land, water, clouds, cloud shadow and a nodata corner.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

logger = logging.getLogger(__name__)

EPSG = 32720
ORIGIN = (499980.0, 6400000.0)
BANDS_10M = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08"}
BANDS_20M = {
    "rededge1": "B05", "rededge2": "B06", "rededge3": "B07",
    "nir08": "B8A", "swir16": "B11", "swir22": "B12",
}
BANDS_60M = {"coastal": "B01", "nir09": "B09"}
COG_PROFILE = {
    "driver": "COG",
    "compress": "DEFLATE",
    "predictor": 2,
    "blocksize": 256,
    "overviews": "NONE",
}


def _field(rows: int, cols: int, seed: int) -> np.ndarray:
    """Smooth, structured reflectance-like uint16 values (no pure noise)."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    rng = np.random.default_rng(seed)
    f = np.zeros((rows, cols))
    for _ in range(4):
        kx, ky = rng.uniform(2, 12, size=2) * 2 * math.pi / max(rows, cols)
        phase = rng.uniform(0, 2 * math.pi)
        f += np.sin(kx * xx + ky * yy + phase)
    f = (f - f.min()) / max(np.ptp(f), 1e-9)
    return (500 + 3000 * f + rng.integers(0, 50, size=(rows, cols))).astype(np.uint16)


def _scl(rows: int, cols: int) -> np.ndarray:
    """Scene classification: vegetation, water, clouds, shadow, nodata corner."""
    scl = np.full((rows, cols), 4, dtype=np.uint8)  # vegetation
    yy, xx = np.mgrid[0:rows, 0:cols]
    scl[(yy - rows * 0.7) ** 2 + (xx - cols * 0.3) ** 2 < (rows * 0.12) ** 2] = 6  # water
    cloud = (yy - rows * 0.3) ** 2 + (xx - cols * 0.65) ** 2 < (rows * 0.15) ** 2
    scl[cloud] = 9
    shadow = (yy - rows * 0.38) ** 2 + (xx - cols * 0.55) ** 2 < (rows * 0.1) ** 2
    scl[shadow & ~cloud] = 3
    scl[xx + yy < cols * 0.25] = 0  # nodata corner (swath edge)
    return scl


def _write(path: Path, data: np.ndarray, transform: Affine, nodata: float | None) -> None:
    profile = dict(
        COG_PROFILE, width=data.shape[-1], height=data.shape[-2], count=1,
        dtype=data.dtype.name, crs=f"EPSG:{EPSG}", transform=transform, nodata=nodata,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def build_demo_scene(directory: str | os.PathLike[str], size: int = 1098) -> Path:
    """Write the demo scene's COGs and ``stac_item.json`` into ``directory``.

    ``size`` is the 10 m band width/height in pixels (must be a multiple of 2).
    Returns the path of the item JSON. Nothing is downloaded.
    """
    root = Path(directory).resolve()  # asset hrefs are absolute: a relative --dir works from anywhere
    root.mkdir(parents=True, exist_ok=True)
    item_id = "S2A_T20HNJ_20240311T140636_L2A_DEMO"
    shapes = {10: size, 20: size // 2, 60: math.ceil(size / 6)}
    assets: dict[str, Any] = {}
    seed = 0
    for res, bands in ((10, BANDS_10M), (20, BANDS_20M), (60, BANDS_60M)):
        n = shapes[res]
        transform = Affine(res, 0, ORIGIN[0], 0, -res, ORIGIN[1])
        for key, name in bands.items():
            seed += 1
            data = _field(n, n, seed)
            _write(root / f"{name}.tif", data, transform, 0)
            assets[key] = _asset(f"{name}.tif", n, transform, "uint16", name, key)
    scl_shape = shapes[20]
    scl_transform = Affine(20, 0, ORIGIN[0], 0, -20, ORIGIN[1])
    _write(root / "SCL.tif", _scl(scl_shape, scl_shape), scl_transform, 0)
    assets["scl"] = _asset("SCL.tif", scl_shape, scl_transform, "uint8", None, "scl")
    x0, y0 = ORIGIN
    x1, y1 = x0 + 10 * size, y0 - 10 * size
    footprint = _lonlat_ring([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)])
    lons = [p[0] for p in footprint]
    lats = [p[1] for p in footprint]
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
        ],
        "id": item_id,
        "collection": "sentinel-2-l2a",
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "geometry": {"type": "Polygon", "coordinates": [footprint]},
        "properties": {
            "datetime": dt.datetime(2024, 3, 11, 14, 11, 54, 463000, tzinfo=dt.timezone.utc)
            .isoformat().replace("+00:00", "Z"),
            "platform": "sentinel-2a",
            "proj:epsg": EPSG,
            "eo:cloud_cover": 10.0,
        },
        "links": [],
        "assets": {k: dict(v, href=str(root / v["href"])) for k, v in assets.items()},
    }
    path = root / "stac_item.json"
    path.write_text(json.dumps(item, indent=2))
    logger.info("demo scene written to %s", root)
    return path


def _asset(href: str, n: int, transform: Affine, dtype: str, band: str | None, key: str) -> dict[str, Any]:
    asset: dict[str, Any] = {
        "href": href,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "roles": ["data"],
        "proj:shape": [n, n],
        "proj:transform": list(transform)[:6],
        "raster:bands": [{"nodata": 0, "data_type": dtype, "spatial_resolution": transform.a}],
    }
    if band is not None:
        asset["eo:bands"] = [{"name": band, "common_name": key}]
        asset["roles"] = ["data", "reflectance"]
    return asset


def _lonlat_ring(points: list[tuple[float, float]]) -> list[list[float]]:
    from pyproj import Transformer

    tr = Transformer.from_crs(f"EPSG:{EPSG}", "OGC:CRS84", always_xy=True)
    return [list(tr.transform(x, y)) for x, y in points]
