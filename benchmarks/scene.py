"""An Earth-Search-shaped Sentinel-2 L2A scene for benchmarks, built once into a cache dir.

The scene copies the layout of Earth Search's ``sentinel-2-c1-l2a`` item
``S2A_T20HNJ_20240311T140636_L2A`` (``tests/data``): UTM 20S, origin
(499980 m, 6400000 m), 10 m bands ``blue green red nir`` (10980² px), 20 m bands
``rededge1-3 nir08 swir16 swir22`` and ``scl`` (5490² px), optionally 60 m bands
``coastal nir09`` (1830² px). Reflectance bands are uint16 DN
(``reflectance * 10000 + 1000``, the item's scale 0.0001 / offset -0.1), ``scl`` is
uint8 with Scene Classification classes. Files are COGs like Earth Search's:
1024 px tiles, DEFLATE + predictor 2, internal overviews, nodata 0.

Pixels have spatial structure (fractal terrain, agricultural parcels, water,
clouds with displaced shadows, a diagonal nodata corner where the swath ends,
per-pixel sensor noise) so DEFLATE ratios are close to real ones (the real item's
``file:size`` is ~150 MB per 10 m band, ~42 MB per 20 m band; this builder
logs what it writes).

``copies`` scenes are made under distinct paths (``{cache}/sentinel-2-c1-l2a/{item_id}_{k:02d}/``)
as **hard links** to the first (a plain copy when hard links are impossible), each
with its own ``stac_item.json`` pointing at its own files: GDAL's block and handle
caches are keyed by path, so the copies do not share them (the OS page cache does).

Run ``python -m benchmarks.scene --cache DIR`` or call :func:`build_scene`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyproj
import rasterio
from affine import Affine
from rasterio.shutil import copy as rio_copy
from tqdm import tqdm

logger = logging.getLogger(__name__)

#: Bump when the pixels or the layout change, so cached scenes are rebuilt.
BUILDER_VERSION = 3

SOURCE_ITEM = (
    Path(__file__).resolve().parents[1] / "tests" / "data"
    / "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
)
PLATFORM = "sentinel-2-c1-l2a"
EPSG = 32720
ORIGIN = (499980.0, 6400000.0)  # upper-left corner, metres (UTM 20S)

#: asset key -> (file name, resolution in metres). Order: 10 m, 20 m, 60 m.
BANDS: dict[str, tuple[str, int]] = {
    "blue": ("B02.tif", 10),
    "green": ("B03.tif", 10),
    "red": ("B04.tif", 10),
    "nir": ("B08.tif", 10),
    "rededge1": ("B05.tif", 20),
    "rededge2": ("B06.tif", 20),
    "rededge3": ("B07.tif", 20),
    "nir08": ("B8A.tif", 20),
    "swir16": ("B11.tif", 20),
    "swir22": ("B12.tif", 20),
    "scl": ("SCL.tif", 20),
    "coastal": ("B01.tif", 60),
    "nir09": ("B09.tif", 60),
}
#: The 10 bands a benchmark chip holds (4 x 10 m + 6 x 20 m).
CHIP_BANDS = ["blue", "green", "red", "nir", "rededge1", "rededge2", "rededge3",
              "nir08", "swir16", "swir22"]

# Surface reflectance (0-1) per band: vegetation, bare soil, water, cloud top.
_REFL = {
    #            veg    soil   water  cloud
    "coastal": (0.030, 0.070, 0.060, 0.55),
    "blue": (0.035, 0.080, 0.055, 0.55),
    "green": (0.065, 0.110, 0.050, 0.55),
    "red": (0.040, 0.140, 0.030, 0.56),
    "rededge1": (0.100, 0.170, 0.025, 0.56),
    "rededge2": (0.250, 0.190, 0.020, 0.55),
    "rededge3": (0.300, 0.210, 0.018, 0.55),
    "nir": (0.330, 0.230, 0.015, 0.54),
    "nir08": (0.340, 0.240, 0.014, 0.53),
    "nir09": (0.340, 0.240, 0.012, 0.45),
    "swir16": (0.200, 0.300, 0.008, 0.35),
    "swir22": (0.100, 0.250, 0.006, 0.25),
}
# SCL classes used (ESA L2A): 0 nodata, 3 cloud shadow, 4 vegetation,
# 5 not vegetated, 6 water, 8 cloud medium, 9 cloud high, 10 thin cirrus.
SCL_NODATA, SCL_SHADOW, SCL_VEG, SCL_SOIL, SCL_WATER = 0, 3, 4, 5, 6
SCL_CLOUD_MED, SCL_CLOUD_HIGH, SCL_CIRRUS = 8, 9, 10


@dataclass(frozen=True)
class SceneSpec:
    """What to build. ``size10`` is the 10 m bands' side in pixels (a multiple of 6;
    20 m bands are ``size10 / 2``, 60 m bands ``size10 / 6``); ``blocksize`` the COG
    tile side in pixels; ``copies`` the number of scenes under distinct paths."""

    size10: int = 10980
    blocksize: int = 1024
    with_60m: bool = True
    copies: int = 16
    seed: int = 20240311

    def __post_init__(self) -> None:
        if self.size10 <= 0 or self.size10 % 6:
            raise ValueError(f"size10 must be a positive multiple of 6, got {self.size10}")
        if self.blocksize <= 0 or self.blocksize % 16:
            raise ValueError(f"blocksize must be a positive multiple of 16, got {self.blocksize}")
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")

    @property
    def assets(self) -> list[str]:
        """Asset keys written."""
        return [k for k, (_, res) in BANDS.items() if self.with_60m or res != 60]

    def shape(self, res: int) -> int:
        """Side in pixels of a band at ``res`` metres."""
        return self.size10 * 10 // res

    @property
    def extent(self) -> float:
        """Side of the scene in metres."""
        return self.size10 * 10.0


@dataclass
class Scene:
    """A built scene: its copies' item JSON paths and ids."""

    root: Path
    spec: SceneSpec
    item_paths: list[Path] = field(default_factory=list)
    link_mode: str = "hardlink"
    file_sizes: dict[str, int] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def item_ids(self) -> list[str]:
        return [p.parent.name for p in self.item_paths]

    def item(self, k: int = 0) -> dict[str, Any]:
        """The STAC item dict of copy ``k``."""
        return json.loads(self.item_paths[k].read_text())


# --- pixel content -----------------------------------------------------------------------


class _ValueNoise:
    """Smooth value noise on a square lattice of ``cell`` metres (bilinear, smoothstep)."""

    def __init__(self, rng: np.random.Generator, extent: float, cell: float) -> None:
        n = int(math.ceil(extent / cell)) + 3
        self.grid = rng.standard_normal((n, n), dtype=np.float32)
        self.cell = cell

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        fu, fv = u / self.cell, v / self.cell
        j0, i0 = np.floor(fu).astype(np.intp), np.floor(fv).astype(np.intp)
        s, t = fu - j0, fv - i0
        s = (s * s * (3 - 2 * s)).astype(np.float32)
        t = (t * t * (3 - 2 * t)).astype(np.float32)[:, None]
        g0, g1 = self.grid[i0], self.grid[i0 + 1]
        a = g0[:, j0] * (1 - s) + g0[:, j0 + 1] * s
        b = g1[:, j0] * (1 - s) + g1[:, j0 + 1] * s
        return a * (1 - t) + b * t


class _Parcels:
    """Piecewise-constant random field (field parcels with sharp edges)."""

    def __init__(self, rng: np.random.Generator, extent: float, cell: float, offset: float) -> None:
        n = int(math.ceil((extent + offset) / cell)) + 2
        self.grid = rng.standard_normal((n, n), dtype=np.float32)
        self.cell, self.offset = cell, offset

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        j = ((u + self.offset) // self.cell).astype(np.intp)
        i = ((v + self.offset) // self.cell).astype(np.intp)
        return self.grid[i][:, j]


class _Landscape:
    """Deterministic scene fields at any pixel centres (metres from the upper-left corner)."""

    def __init__(self, seed: int, extent: float) -> None:
        rng = np.random.default_rng(seed)
        self.extent = extent

        def fractal(cells: list[float], amps: list[float]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
            octaves = [(_ValueNoise(rng, extent + 3000, c), a) for c, a in zip(cells, amps)]
            return lambda u, v: sum(a * o(u, v) for o, a in octaves)

        self.terrain = fractal([40960, 10240, 2560, 640, 160, 40], [1, .6, .4, .25, .15, .1])
        self.moisture = fractal([20480, 5120, 1280, 320], [1, .6, .35, .2])
        self.clouds = fractal([20480, 5120, 1280, 320, 80], [1, .55, .35, .2, .1])
        self.parcels = [_Parcels(rng, extent, 420.0, 0.0), _Parcels(rng, extent, 610.0, 170.0)]
        self.texture = fractal([60, 20], [1, .6])

    def fields(self, u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
        """``veg`` (fraction), ``water``/``shadow``/``nodata`` (bool), ``cloud``
        (opacity 0-1), ``bright`` (multiplier) on the grid ``v`` (rows) x ``u`` (cols)."""
        terrain = self.terrain(u, v)
        parcels = self.parcels[0](u, v) + 0.7 * self.parcels[1](u, v)
        veg = 1.0 / (1.0 + np.exp(-(1.4 * self.moisture(u, v) + 1.1 * parcels + 0.3)))
        water = terrain < -1.9
        cloud = np.clip((self.clouds(u, v) - 0.7) / 0.7, 0.0, 1.0)
        shadow_src = np.clip((self.clouds(u + 1500.0, v - 900.0) - 0.7) / 0.7, 0.0, 1.0)
        shadow = (shadow_src > 0.3) & (cloud < 0.05)
        bright = 1.0 + 0.10 * terrain + 0.05 * self.texture(u, v)
        uu = (u / self.extent)[None, :]
        vv = (v / self.extent)[:, None]
        nodata = (uu - 0.35 * vv) > 0.6  # diagonal swath edge: ~22 % of the tile
        return {"veg": veg.astype(np.float32), "water": water, "cloud": cloud.astype(np.float32),
                "shadow": shadow, "bright": bright.astype(np.float32), "nodata": nodata}

    @staticmethod
    def band(key: str, f: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """uint16 DN of reflectance band ``key`` (0 = nodata)."""
        veg_r, soil_r, water_r, cloud_r = _REFL[key]
        refl = (f["veg"] * veg_r + (1 - f["veg"]) * soil_r) * f["bright"]
        refl = np.where(f["water"], np.float32(water_r), refl)
        refl = np.where(f["shadow"], refl * np.float32(0.45), refl)
        refl = refl * (1 - f["cloud"]) + f["cloud"] * np.float32(cloud_r)
        noise = rng.standard_normal(refl.shape, dtype=np.float32)
        refl = refl + noise * (np.float32(0.0025) + np.float32(0.015) * refl)
        dn = np.clip(np.rint(refl * 10000.0 + 1000.0), 1, 65535).astype(np.uint16)
        dn[f["nodata"]] = 0
        return dn

    @staticmethod
    def scl(f: dict[str, np.ndarray]) -> np.ndarray:
        """uint8 Scene Classification of the fields."""
        scl = np.where(f["veg"] > 0.5, SCL_VEG, SCL_SOIL).astype(np.uint8)
        scl[f["water"]] = SCL_WATER
        scl[f["shadow"]] = SCL_SHADOW
        cloud = f["cloud"]
        scl[(cloud > 0.05) & (cloud <= 0.25)] = SCL_CIRRUS
        scl[cloud > 0.25] = SCL_CLOUD_MED
        scl[cloud > 0.6] = SCL_CLOUD_HIGH
        scl[f["nodata"]] = SCL_NODATA
        return scl


# --- writing ---------------------------------------------------------------------------------


def _write_resolution(spec: SceneSpec, res: int, keys: list[str], out_dir: Path,
                      tmp_dir: Path, land: _Landscape) -> dict[str, np.ndarray]:
    """Write every band of resolution ``res``; returns SCL class counts if written."""
    n = spec.shape(res)
    transform = Affine(res, 0, ORIGIN[0], 0, -res, ORIGIN[1])
    centres = (np.arange(n, dtype=np.float64) + 0.5) * res
    tmp = {k: tmp_dir / BANDS[k][0] for k in keys}
    profile = dict(driver="GTiff", width=n, height=n, count=1, crs=f"EPSG:{EPSG}",
                   transform=transform, nodata=0, tiled=True,
                   blockxsize=spec.blocksize, blockysize=spec.blocksize)
    dsts = {k: rasterio.open(tmp[k], "w", dtype="uint8" if k == "scl" else "uint16", **profile)
            for k in keys}
    counts: dict[str, np.ndarray] = {}
    try:
        strip = max(spec.blocksize, 16) // 2
        for r0 in tqdm(range(0, n, strip), desc=f"{res} m bands", unit="strip", leave=False):
            r1 = min(r0 + strip, n)
            f = land.fields(centres, centres[r0:r1])
            for k in keys:
                # Noise seeded per (band, strip): content does not depend on strip order.
                rng = np.random.default_rng([spec.seed, res, list(BANDS).index(k), r0])
                data = land.scl(f) if k == "scl" else land.band(k, f, rng)
                if k == "scl":
                    counts["scl"] = counts.get("scl", 0) + np.bincount(data.ravel(), minlength=256)
                dsts[k].write(data, 1, window=rasterio.windows.Window(0, r0, n, r1 - r0))
    finally:
        for d in dsts.values():
            d.close()
    for k in tqdm(keys, desc=f"{res} m COGs", unit="band", leave=False):
        rio_copy(
            tmp[k], out_dir / BANDS[k][0], driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES",
            BLOCKSIZE=spec.blocksize, BIGTIFF="IF_SAFER", NUM_THREADS="2",
            OVERVIEW_RESAMPLING="NEAREST" if k == "scl" else "AVERAGE",
        )
        tmp[k].unlink()
    return counts


def _valid_footprint(spec: SceneSpec) -> list[tuple[float, float]]:
    """Lon/lat ring of the valid-data area (the tile minus the nodata corner)."""
    e = spec.extent
    ring_uv = [(0, 0), (0.6, 0), (0.95, 1), (0, 1), (0, 0)]
    to_lonlat = pyproj.Transformer.from_crs(EPSG, 4326, always_xy=True)
    xs = [ORIGIN[0] + u * e for u, _ in ring_uv]
    ys = [ORIGIN[1] - v * e for _, v in ring_uv]
    lon, lat = to_lonlat.transform(xs, ys)
    return [(round(a, 7), round(b, 7)) for a, b in zip(lon, lat)]


def _item_dict(spec: SceneSpec, item_id: str, folder: Path, sizes: dict[str, int],
               stats: dict[str, float]) -> dict[str, Any]:
    """The source item, reduced to the written assets, hrefs pointing at ``folder``."""
    src = json.loads(SOURCE_ITEM.read_text())
    item = copy.deepcopy(src)
    item["id"] = item_id
    item["links"] = []
    ring = _valid_footprint(spec)
    item["geometry"] = {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    item["bbox"] = [min(lons), min(lats), max(lons), max(lats)]
    item["properties"]["eo:cloud_cover"] = round(stats["cloud_cover_percent"], 6)
    item["properties"]["s2:nodata_pixel_percentage"] = round(stats["nodata_percent"], 6)
    assets = {}
    for key, asset in src["assets"].items():
        if key not in spec.assets:
            continue
        a = copy.deepcopy(asset)
        name, res = BANDS[key]
        n = spec.shape(res)
        a["href"] = str((folder / name).resolve())
        a["proj:shape"] = [n, n]
        a["proj:transform"] = [res, 0, ORIGIN[0], 0, -res, ORIGIN[1]]
        a["file:size"] = sizes[name]
        a.pop("file:checksum", None)
        assets[key] = a
    item["assets"] = assets
    return item


def _manifest_path(cache: Path) -> Path:
    return cache / "scene-manifest.json"


def base_id() -> str:
    """Item id of the source item."""
    return json.loads(SOURCE_ITEM.read_text())["id"]


def load_scene(cache: str | os.PathLike[str], spec: SceneSpec | None = None) -> Scene | None:
    """The scene in ``cache`` if it is complete (and built for ``spec``), else None."""
    cache = Path(cache)
    mpath = _manifest_path(cache)
    if not mpath.exists():
        return None
    try:
        m = json.loads(mpath.read_text())
        built = SceneSpec(**m["spec"])
    except (ValueError, KeyError, TypeError):
        return None
    if m.get("version") != BUILDER_VERSION or (spec is not None and built != spec):
        return None
    for rel, size in m["files"].items():
        p = cache / rel
        if not p.is_file() or p.stat().st_size != size:
            logger.info("scene in %s is incomplete: %s missing or changed", cache, rel)
            return None
    return Scene(root=cache, spec=built, item_paths=[cache / p for p in m["items"]],
                 link_mode=m["link_mode"], file_sizes=m["band_sizes"], stats=m["stats"])


def build_scene(cache: str | os.PathLike[str], spec: SceneSpec = SceneSpec(),
                force: bool = False) -> Scene:
    """Build (once) the scene and its copies in ``cache``; reuse a valid existing one."""
    cache = Path(cache)
    if not force:
        scene = load_scene(cache, spec)
        if scene is not None:
            logger.info("scene cache %s is valid; not rebuilding", cache)
            return scene
    _manifest_path(cache).unlink(missing_ok=True)
    platform_dir = cache / PLATFORM
    if platform_dir.exists():
        shutil.rmtree(platform_dir)
    ids = [f"{base_id()}_{k:02d}" for k in range(spec.copies)]
    first = platform_dir / ids[0]
    first.mkdir(parents=True)
    tmp_dir = cache / ".tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    land = _Landscape(spec.seed, spec.extent)
    counts = None
    for res in (10, 20, 60):
        keys = [k for k in spec.assets if BANDS[k][1] == res]
        if keys:
            c = _write_resolution(spec, res, keys, first, tmp_dir, land)
            counts = c.get("scl", counts)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if counts is None:  # scl is always written
        raise RuntimeError("scl band was not written")
    total = float(counts.sum())
    cloudy = sum(int(counts[c]) for c in (SCL_SHADOW, SCL_CLOUD_MED, SCL_CLOUD_HIGH, SCL_CIRRUS))
    valid = total - float(counts[SCL_NODATA])
    stats = {"nodata_percent": 100.0 * float(counts[SCL_NODATA]) / total,
             "cloud_cover_percent": 100.0 * (cloudy - int(counts[SCL_SHADOW])) / max(valid, 1.0),
             "cloud_or_shadow_percent": 100.0 * cloudy / max(valid, 1.0)}
    names = [BANDS[k][0] for k in spec.assets]
    sizes = {n: (first / n).stat().st_size for n in names}
    link_mode = "hardlink"
    item_paths = []
    for k, item_id in enumerate(ids):
        folder = platform_dir / item_id
        if k:
            folder.mkdir()
            for n in names:
                try:
                    os.link(first / n, folder / n)
                except OSError:
                    link_mode = "copy"
                    shutil.copyfile(first / n, folder / n)
        path = folder / "stac_item.json"
        path.write_text(json.dumps(_item_dict(spec, item_id, folder, sizes, stats), indent=1))
        item_paths.append(path)
    files = {str(p.relative_to(cache)): p.stat().st_size
             for p in sorted(platform_dir.rglob("*")) if p.is_file()}
    manifest = {"version": BUILDER_VERSION, "spec": asdict(spec), "link_mode": link_mode,
                "items": [str(p.relative_to(cache)) for p in item_paths],
                "band_sizes": sizes, "stats": stats, "files": files}
    _manifest_path(cache).write_text(json.dumps(manifest, indent=1))
    logger.info("built scene in %s: %s", cache, {n: f"{s / 1e6:.1f} MB" for n, s in sizes.items()})
    return Scene(root=cache, spec=spec, item_paths=item_paths, link_mode=link_mode,
                 file_sizes=sizes, stats=stats)


def with_hrefs(item: dict[str, Any], href: Callable[[str, str], str]) -> dict[str, Any]:
    """A copy of ``item`` whose asset hrefs are ``href(asset_key, file_name)``."""
    out = copy.deepcopy(item)
    for key, asset in out["assets"].items():
        asset["href"] = href(key, Path(asset["href"]).name)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.scene --cache DIR``: build the scene and print a summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, type=Path, help="cache directory")
    p.add_argument("--size", type=int, default=10980, help="10 m band side, pixels")
    p.add_argument("--blocksize", type=int, default=1024, help="COG tile side, pixels")
    p.add_argument("--copies", type=int, default=16, help="scenes under distinct paths")
    p.add_argument("--no-60m", action="store_true", help="skip the 60 m bands")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = SceneSpec(size10=a.size, blocksize=a.blocksize, copies=a.copies, with_60m=not a.no_60m)
    scene = build_scene(a.cache, spec, force=a.force)
    print(json.dumps({"items": [str(p) for p in scene.item_paths], "link_mode": scene.link_mode,
                      "band_sizes_mb": {k: round(v / 1e6, 1) for k, v in scene.file_sizes.items()},
                      "stats": scene.stats}, indent=1))


if __name__ == "__main__":
    main()
