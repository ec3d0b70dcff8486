"""Test data builders, shared by every test module: real STAC items from tests/data with
COGs written to match them (scaled down), small synthetic rasters, and the small
Sentinel-2 bucket prechip and stats run on. (Scenes of the training side are built by
``tests/ml_scenes.py``; running processors and looking into buckets, ``tests/processors_support.py``.)"""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rasterio
from affine import Affine

from stacchip.platforms import S2_BANDS

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


def band_count(asset: dict[str, Any]) -> int:
    """Bands a STAC asset dict declares (``eo:bands`` or ``raster:bands``), 1 when it declares none."""
    return len(asset.get("eo:bands") or asset.get("raster:bands") or [None])


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
        bands = band_count(asset)
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


# --- the prechip / stats bucket ------------------------------------------------------------

#: Platform and chip size (pixels) of the prechip/stats scenes.
PRECHIP_PLATFORM = "sentinel-2-l2a"
PRECHIP_CHIP = 32
#: 10980 / 60 = 183 px at "10 m" -> 5 x 5 chips of 32 px; the 20 m grid is 91 px.
PRECHIP_FACTOR = 60
PRECHIP_DATETIMES = ["2024-03-11T14:11:54.463Z", "2020-12-31T23:30:00Z", "2021-06-15T03:05:00Z"]


def prechip_scl(shape: tuple[int, int], salt: int) -> np.ndarray:
    """Scene classes per 20 m pixel of a prechip scene: vegetation, whole cloudy chips, nodata in row 4.

    Chip (0, 4) is half nodata, chip (1, 4) all nodata; chips with
    ``(x + 2 y + salt) % 4 == 0`` are all cloud (class 9); chip (2, 0) is a
    quarter cloud shadow (class 3).
    """
    scl = np.full(shape, 4, dtype=np.uint8)
    for cy in range(5):
        for cx in range(5):
            if (cx + 2 * cy + salt) % 4 == 0:
                scl[cy * 16:(cy + 1) * 16, cx * 16:(cx + 1) * 16] = 9
    scl[0:8, 2 * 16:2 * 16 + 8] = 3
    scl[4 * 16:5 * 16, 0:8] = 0
    scl[4 * 16:5 * 16, 16:32] = 0
    return scl


def prechip_band(shape: tuple[int, int], band: int, salt: int, scl: np.ndarray) -> np.ndarray:
    """Known uint16 values (1..60000) with 0 (the declared nodata) under SCL class 0."""
    rows, cols = shape
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    values = (1 + (r * 7 + c * 3 + band * 101 + salt * 1000) % 60000).astype(np.uint16)
    step = 2 if rows > scl.shape[0] else 1  # 10 m pixel r lies in 20 m pixel r // 2
    rr = np.minimum(np.arange(rows) // step, scl.shape[0] - 1)
    cc = np.minimum(np.arange(cols) // step, scl.shape[1] - 1)
    under = scl[np.ix_(rr, cc)]
    values[under == 0] = 0
    return values[None]


def build_prechip_scenes(root: Path, n_items: int = 3) -> dict[str, Any]:
    """Sentinel-2 scenes with known pixels for prechip and stats (the real item scaled by 60:
    183 px at "10 m", 5 x 5 chips of 32 px) in the bucket layout under ``root/data``, and
    their indexes under ``root/index``; ``{"root", "data", "index", "items"}``."""
    from stacchip.index import write_index
    from stacchip.indexer import Sentinel2Indexer

    data = root / "data"
    index_dir = root / "index" / PRECHIP_PLATFORM
    base = real_item("sentinel-2")
    keep = set(S2_BANDS) | {"scl"}
    base["assets"] = {k: v for k, v in base["assets"].items() if k in keep}
    items = []
    for i in range(n_items):
        item = copy.deepcopy(base)
        item["id"] = f"S2TEST_{i}"
        item["collection"] = PRECHIP_PLATFORM
        item["properties"]["datetime"] = PRECHIP_DATETIMES[i % len(PRECHIP_DATETIMES)]
        scene = data / PRECHIP_PLATFORM / item["id"]
        scl_shape = [
            max(1, math.floor(v / PRECHIP_FACTOR)) for v in base["assets"]["scl"]["proj:shape"]
        ]
        scl = prechip_scl(tuple(scl_shape), i)

        def pixels(key: str, asset: dict[str, Any], shape: tuple[int, int], scl=scl, i=i) -> np.ndarray:
            if key == "scl":
                return scl[None]
            if key in S2_BANDS:
                return prechip_band(shape, S2_BANDS.index(key), i, scl)
            return coded_pixels(shape, 1, "uint16", i)

        item = materialize(item, scene, factor=PRECHIP_FACTOR, pixels=pixels)
        (scene / "stac_item.json").write_text(json.dumps(item))
        indexer = Sentinel2Indexer(item, chip_size=PRECHIP_CHIP, chip_max_nodata=1.0, platform=PRECHIP_PLATFORM)
        table = indexer.create_full_index()
        write_index(table, index_dir / item["id"] / f"index_{item['id']}.parquet")
        items.append(item)
    return {"root": root, "data": str(data), "index": str(root / "index"), "items": items}


def upload_prechip_bucket(scenes: dict[str, Any], bucket: str) -> None:
    """The prechip bucket of :func:`build_prechip_scenes` on the loopback S3 server: scenes and
    items (hrefs rewritten to ``s3://{bucket}/...``) and the index under ``index/``."""
    import boto3

    client = boto3.client("s3")
    data_root = Path(scenes["data"])
    for item in scenes["items"]:
        moved = copy.deepcopy(item)
        for asset in moved["assets"].values():
            rel = Path(asset["href"]).relative_to(data_root).as_posix()
            client.upload_file(asset["href"], bucket, rel)
            asset["href"] = f"s3://{bucket}/{rel}"
        client.put_object(Bucket=bucket, Key=f"{PRECHIP_PLATFORM}/{item['id']}/stac_item.json",
                          Body=json.dumps(moved).encode())
    for path in Path(scenes["index"]).rglob("*.parquet"):
        client.upload_file(str(path), bucket, "index/" + path.relative_to(scenes["index"]).as_posix())


def load_cube(url: str) -> dict[str, np.ndarray]:
    """The arrays of one cube (local path or ``s3://``)."""
    from stacchip import storage

    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def run_all_jobs(cfg: Any, workers: int = 1) -> list[str]:
    """Run every prechip array job of ``cfg`` (a ``PrechipConfig``) in turn; the cube URLs written."""
    from stacchip.processors import prechip

    selection = prechip.prepare(cfg)
    written = []
    for job in range(prechip.jobs_of(cfg, selection)):
        written += prechip.run_job(job, cfg, workers=workers)
    return written
