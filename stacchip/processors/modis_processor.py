"""``stacchip-modis``: MODIS 8-day surface reflectance (MOD09A1) per sinusoidal tile, as Web Mercator COGs.

Task ``i`` takes tile ``SIN_GRID_TILES[i]`` (vertical, horizontal), or the
``i``-th line of ``--tiles`` / ``STACCHIP_MODIS_TILES`` (``v,h`` per line). For
each year (default 2018, 2020, 2022, 2023) it draws ``--months-per-year``
months (default 4, seeded with ``v * h * year`` as upstream) and picks the
first composite of each month. The reflectance bands, the 500 m QC and the
500 m state QA (which the index's cloud statistics need) are reprojected to
EPSG:3857 (nearest neighbour) and written as Cloud-Optimized GeoTIFFs
(upstream wrote plain GeoTIFFs). The item datetime is set to the end of the
composite period (parsed with any number of fractional-second digits;
upstream failed on them), its projection fields describe the new grid, and its
chip index comes from :class:`~stacchip.indexer.ModisIndexer`.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pystac
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from stacchip import storage
from stacchip.errors import ConfigError
from stacchip.indexer import ModisIndexer
from stacchip.processors.base import Processor, ProcessorSettings, main, register, run_upstream
from stacchip.catalog.stac_api import Rule, Sort
from stacchip.processors.cog import copy_as_cog
from stacchip.processors.publish import Outcome, RenderedAsset, filename_of
from stacchip.processors.sampling import month_period, parse_datetime
from stacchip.processors.settings import Custom, Integer, Items, setting
from stacchip.reader import gdal_env, resolve_href

logger = logging.getLogger(__name__)

STAC_API = "https://planetarycomputer.microsoft.com/api/stac/v1"
COLLECTION = "modis-09A1-061"
PLATFORM_NAME = "modis"
DST_CRS = "EPSG:3857"
BANDS = [
    "sur_refl_b01", "sur_refl_b02", "sur_refl_b03", "sur_refl_b04",
    "sur_refl_b05", "sur_refl_b06", "sur_refl_b07", "sur_refl_qc_500m",
    ModisIndexer.qa_asset,
]
YEARS = (2018, 2020, 2022, 2023)
MONTHS_PER_YEAR = 4

#: Sinusoidal grid tiles (vertical -> horizontal numbers) without nodata in the
#: sinusoidal projection, away from the dateline cut-off (upstream's selection).
_TILES_BY_ROW: dict[int, tuple[int, ...]] = {
    2: (12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,),
    3: (9, 11, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,),
    4: (8, 10, 11, 12, 13, 14, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,),
    5: (7, 8, 9, 10, 11, 12, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 30,),
    6: (3, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,),
    7: (3, 7, 8, 9, 10, 11, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,),
    8: (1, 2, 8, 9, 10, 11, 12, 13, 16, 18, 19, 20, 21, 22, 23, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34,),
    9: (1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 16, 19, 21, 22, 23, 25, 27, 28, 29, 30, 31, 32, 33, 34,),
    10: (2, 3, 4, 5, 10, 11, 12, 13, 14, 17, 19, 20, 21, 22, 23, 27, 28, 29, 30, 31, 32, 33,),
    11: (3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 15, 19, 20, 21, 22, 23, 27, 28, 29, 30, 31, 32,),
    12: (11, 12, 13, 16, 17, 19, 20, 24, 27, 28, 29, 30,),
    13: (12, 13, 17, 20, 21, 22, 28,),
    14: (13, 14, 15, 16, 18, 22,),
}
SIN_GRID_TILES: list[tuple[int, int]] = [(v, h) for v, hs in _TILES_BY_ROW.items() for h in hs]


def fill_value(dtype: str, nodata: float | None) -> float:
    """Nodata of a warped band: the file's, else the dtype's extreme (65535 for the uint16 state QA)."""
    if nodata is not None:
        return nodata
    info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
    if info is None:
        return float("nan")
    return info.max if info.min == 0 else info.min


def warped_grid(href: str) -> tuple[tuple[int, int], list[float]]:
    """``((rows, cols), transform)`` of the raster at ``href`` reprojected to :data:`DST_CRS`."""
    with gdal_env(), rasterio.open(resolve_href(href)) as src:
        with WarpedVRT(src, crs=DST_CRS, resampling=Resampling.nearest) as vrt:
            return (vrt.height, vrt.width), list(vrt.transform)[:6]


def render_warped(href: str) -> Any:
    """A render function writing ``href`` reprojected to :data:`DST_CRS` as a COG."""
    def render(path: str) -> None:
        with gdal_env(), rasterio.open(resolve_href(href)) as src:
            nodata = fill_value(src.dtypes[0], src.nodata)
            with WarpedVRT(src, crs=DST_CRS, resampling=Resampling.nearest, nodata=nodata) as vrt:
                copy_as_cog(vrt, path)
    return render


def reproject_metadata(item: pystac.Item, grids: dict[str, tuple[tuple[int, int], list[float]]]) -> None:
    """Point the item's projection fields at the Web Mercator grids (item level: the QA asset's)."""
    for fields in [item.properties] + [a.extra_fields for a in item.assets.values()]:
        for key in [k for k in fields if k.startswith("proj:")]:
            del fields[key]
    ref_shape, ref_transform = grids.get(ModisIndexer.qa_asset) or next(iter(grids.values()))
    item.properties["proj:code"] = DST_CRS
    item.properties["proj:shape"] = list(ref_shape)
    item.properties["proj:transform"] = ref_transform
    for key, (shape, transform) in grids.items():
        if (shape, transform) != (ref_shape, ref_transform):
            item.assets[key].extra_fields["proj:shape"] = list(shape)
            item.assets[key].extra_fields["proj:transform"] = transform
        item.assets[key].media_type = pystac.MediaType.COG
    ext = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
    item.stac_extensions = [e for e in item.stac_extensions if "/projection/" not in e] + [ext]


def _tiles(text: str, label: str) -> tuple[tuple[int, int], ...]:
    return tuple(read_tiles(text))


@dataclass(frozen=True)
class ModisSettings(ProcessorSettings):
    """The settings of ``stacchip-modis``: the shared ones and these."""

    years: tuple[int, ...] = setting(
        tuple(YEARS), flag="--years", env="STACCHIP_YEARS", kind=Items(int), help="years, e.g. 2018,2020,2022,2023")
    months_per_year: int = setting(
        MONTHS_PER_YEAR, flag="--months-per-year", env="STACCHIP_MONTHS_PER_YEAR", kind=Integer(1),
        unit="1-12", help="months drawn per year")
    tiles: tuple[tuple[int, int], ...] = setting(
        tuple(SIN_GRID_TILES), flag="--tiles", env="STACCHIP_MODIS_TILES", kind=Custom(_tiles, "file"),
        shown="the built-in sinusoidal tiles", help="file of 'v,h' lines replacing the built-in tile list")
    collection: str = setting(COLLECTION, flag="--collection", env="STACCHIP_COLLECTION", help="STAC collection")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.months_per_year > 12:
            raise ConfigError(f"--months-per-year {self.months_per_year} is more than 12")


@register
class ModisProcessor(Processor):
    """MODIS 8-day composites per sinusoidal tile and random months."""

    name = "modis"
    prog = "stacchip-modis"
    description = "MODIS surface reflectance per sinusoidal tile into a bucket, as Web Mercator COGs."
    default_api = STAC_API
    settings_type = ModisSettings
    settings: ModisSettings

    def validate(self, indices: Sequence[int]) -> None:
        for index in indices:
            if not 0 <= index < len(self.settings.tiles):
                raise ConfigError(f"task index {index} is beyond the {len(self.settings.tiles)} MODIS tiles")

    def run_task(self, index: int) -> list[Outcome]:
        s = self.settings
        v, h = s.tiles[index]
        publisher = self.publisher(index)
        outcomes: list[Outcome] = []
        for year in s.years:
            months = random.Random(v * h * year).sample(range(1, 13), s.months_per_year)
            for month in months:
                p = month_period(year, month)
                items = self.catalog.search(
                    [s.collection], datetime=p.interval,
                    rules=[Rule("modis:vertical-tile", "eq", v), Rule("modis:horizontal-tile", "eq", h)],
                    sort=[Sort("datetime")], limit=1,
                )
                if not items:
                    logger.info("task %d: tile h%02dv%02d %s: no composite; skipping", index, h, v, p.name)
                    continue
                item = items[0]
                # a composite that cannot be read fails alone; the tile's other months still run
                outcome = publisher.guard(PLATFORM_NAME, item.id, functools.partial(self._item, publisher, item))
                outcome.note = outcome.note or p.name
                outcomes.append(outcome)
        return outcomes

    def _item(self, publisher: Any, item: pystac.Item) -> Outcome:
        s = self.settings
        keys = [k for k in BANDS if k in item.assets]
        hrefs = {k: item.assets[k].href for k in keys}
        early = publisher.skip_or_plan(PLATFORM_NAME, item.id, hrefs)
        if early is not None:
            return early
        plan = {k: RenderedAsset(render_warped(hrefs[k]), filename_of(hrefs[k]), hrefs[k]) for k in keys}
        end = item.properties.get("end_datetime")
        if end:
            item.datetime = parse_datetime(end)
        reproject_metadata(item, {k: warped_grid(hrefs[k]) for k in keys})
        return publisher.publish(
            item, PLATFORM_NAME, plan,
            lambda it: ModisIndexer(
                it, chip_size=s.chip_size, chip_max_nodata=s.chip_max_nodata, platform=PLATFORM_NAME
            ),
        )


def read_tiles(source: str) -> list[tuple[int, int]]:
    """``(v, h)`` pairs from a text file of ``v,h`` lines (``#`` comments allowed)."""
    try:
        text = storage.read_bytes_retry(source).decode()
    except Exception as exc:
        raise ConfigError(f"MODIS tile list {source!r} cannot be read: {exc}") from exc
    tiles = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            v_text, h_text = line.replace(" ", "").split(",")
            tiles.append((int(v_text), int(h_text)))
        except ValueError:
            raise ConfigError(f"MODIS tile list {source!r} line {n}: {line!r} is not 'v,h'") from None
    if not tiles:
        raise ConfigError(f"MODIS tile list {source!r} is empty")
    return tiles


def process_modis_tile(index: int, bucket: str) -> None:
    """Upstream-compatible call: process tile ``index`` into ``bucket``."""
    run_upstream(ModisProcessor, ["--index", str(index), "--bucket", bucket])


def process(argv: Sequence[str] | None = None) -> int:
    """Console script ``stacchip-modis``."""
    return main(ModisProcessor, argv)


if __name__ == "__main__":
    raise SystemExit(process())
