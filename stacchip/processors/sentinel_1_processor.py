"""``stacchip-sentinel-1``: Sentinel-1 RTC backscatter per MGRS tile, written as COGs.

Task ``i`` takes row ``i`` of the MGRS sample file (``STACCHIP_MGRS_SOURCE``)
and, with a generator seeded by ``i`` (as upstream), draws ``--n-years`` years
(default one of 2018-2023) and ``--n-seasons`` seasons (default one quarter).
It searches scenes that intersect the tile (upstream's search had no working
spatial filter) and picks the one covering most of the tile (then the
earliest). The ``vv`` and ``vh`` assets are rewritten as Cloud-Optimized
GeoTIFFs (upstream wrote plain GeoTIFFs), then the item JSON and its chip
index (:class:`~stacchip.indexer.Sentinel1Indexer`: nodata where any
backscatter band is nodata) are written.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

import pystac
from shapely.geometry import mapping, shape

from stacchip.indexer import Sentinel1Indexer
from stacchip.errors import ConfigError
from stacchip.processors.base import Processor, ProcessorSettings, main, register, run_upstream
from stacchip.processors.cog import copy_as_cog
from stacchip.processors.publish import Outcome, RenderedAsset, filename_of
from stacchip.processors.sampling import period
from stacchip.processors.settings import Integer, setting
from stacchip.reader import gdal_env, resolve_href

logger = logging.getLogger(__name__)

STAC_API = "https://planetarycomputer.microsoft.com/api/stac/v1"
COLLECTION = "sentinel-1-rtc"
PLATFORM_NAME = "sentinel-1-rtc"
S1_ASSETS = ["vv", "vh"]


def coverage(item: pystac.Item, area: Any) -> float:
    """Fraction (0-1) of ``area`` (shapely, degrees) covered by the item's footprint."""
    if item.geometry is None or area.area == 0:
        return 0.0
    return float(shape(item.geometry).intersection(area).area / area.area)


def render_cog(href: str) -> Any:
    """A render function writing the raster at ``href`` as a COG to a local path."""
    def render(path: str) -> None:
        with gdal_env():
            copy_as_cog(resolve_href(href), path)
    return render


@dataclass(frozen=True)
class Sentinel1Settings(ProcessorSettings):
    """The settings of ``stacchip-sentinel-1``: the shared ones and these."""

    n_seasons: int = setting(
        1, flag="--n-seasons", env="STACCHIP_N_SEASONS", kind=Integer(1), help="seasons drawn per year")
    collection: str = setting(COLLECTION, flag="--collection", env="STACCHIP_COLLECTION", help="STAC collection")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_seasons > len(self.seasons):
            raise ConfigError(f"--n-seasons {self.n_seasons} is more than the {len(self.seasons)} seasons given")


@register
class Sentinel1Processor(Processor):
    """One Sentinel-1 RTC scene per MGRS tile for random years and seasons."""

    name = "sentinel-1"
    prog = "stacchip-sentinel-1"
    description = "Sentinel-1 RTC scenes per MGRS tile into a bucket, as COGs."
    default_api = STAC_API
    settings_type = Sentinel1Settings
    settings: Sentinel1Settings
    sample_var = "STACCHIP_MGRS_SOURCE"
    default_years = tuple(range(2018, 2024))
    default_n_years = 1
    default_seasons = ("q1", "q2", "q3", "q4")

    def run_task(self, index: int) -> list[Outcome]:
        s = self.settings
        row = self.sample(index)
        area = row.geometry
        rng = random.Random(index)
        years = rng.sample(sorted(set(s.years)), s.n_years)
        publisher = self.publisher(index)
        outcomes: list[Outcome] = []
        for year in years:
            for season in rng.sample(list(s.seasons), s.n_seasons):
                p = period(year, season)
                items = self.catalog.search([s.collection], datetime=p.interval, intersects=mapping(area))
                if not items:
                    logger.info("task %d: %s: no scene intersects the tile; skipping", index, p.name)
                    continue
                items.sort(key=lambda it: (-round(coverage(it, area), 6),
                                           it.datetime.isoformat() if it.datetime else "", it.id))
                item = items[0]
                plan = {
                    key: RenderedAsset(render_cog(item.assets[key].href), filename_of(item.assets[key].href),
                                       item.assets[key].href)
                    for key in S1_ASSETS if key in item.assets
                }
                for key in plan:
                    item.assets[key].media_type = pystac.MediaType.COG
                outcome = publisher.publish(
                    item, PLATFORM_NAME, plan,
                    lambda it: Sentinel1Indexer(
                        it, chip_size=s.chip_size, chip_max_nodata=s.chip_max_nodata, platform=PLATFORM_NAME
                    ),
                )
                outcome.note = outcome.note or p.name
                outcomes.append(outcome)
        return outcomes


def process_mgrs_tile(index: int, mgrs_source: str, bucket: str) -> None:
    """Upstream-compatible call: process row ``index`` of ``mgrs_source`` into ``bucket``."""
    run_upstream(Sentinel1Processor, ["--index", str(index), "--sample-source", mgrs_source, "--bucket", bucket])


def process(argv: Sequence[str] | None = None) -> int:
    """Console script ``stacchip-sentinel-1``."""
    return main(Sentinel1Processor, argv)


if __name__ == "__main__":
    raise SystemExit(process())
