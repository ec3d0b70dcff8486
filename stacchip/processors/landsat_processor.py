"""``stacchip-landsat``: Landsat 8/9 Collection 2 Level-1 and Level-2 scenes per sample location.

Task ``i`` takes row ``i`` of the sample file (``STACCHIP_SAMPLE_SOURCE``) and
searches at its centroid. It draws distinct years, seeded by ``i``: the first
``--n-years`` for Level-1 (``landsat-c2l1``), the next for Level-2
(``landsat-c2l2-sr``), so the two levels cover different years (upstream drew
the same year for both). For each season (default the four quarters) it picks
the least cloudy Landsat 8 or 9 scene with cloud cover at most ``--max-cloud``
(a fraction; upstream's ``STACCHIP_MAX_CLOUD_COVER`` in percent), copies the
level's bands (server-side from the requester-pays ``usgs-landsat`` bucket when
the output is on S3) and writes the item JSON and
its chip index (:class:`~stacchip.indexer.LandsatIndexer`, chips with no
nodata by default, as upstream).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Sequence

from shapely.geometry import mapping

from stacchip import storage
from stacchip.errors import ConfigError
from stacchip.indexer import LandsatIndexer
from stacchip.processors.base import Processor, ProcessorSettings, main, register, run_upstream
from stacchip.catalog.stac_api import Rule, Sort
from stacchip.processors.publish import Outcome, copy_plan
from stacchip.processors.sampling import periods, pick_years
from stacchip.processors.settings import Custom, Items, parse_list, setting

logger = logging.getLogger(__name__)

STAC_API = "https://landsatlook.usgs.gov/stac-server"
LS_ASSETS_L1 = ["blue", "green", "red", "nir08", "swir16", "lwir", "lwir_high", "swir22", "pan", "qa_pixel"]
LS_ASSETS_L2 = ["blue", "green", "red", "nir08", "swir16", "swir22", "qa_pixel"]
ABSOLUTE_CLOUD_COVER_FILTER = 75.0
PLATFORM_NAME_L2 = "landsat-c2l2-sr"
PLATFORM_NAME_L1 = "landsat-c2l1"
#: Level name -> (collection / bucket platform folder, assets to copy).
LEVELS: dict[str, tuple[str, list[str]]] = {
    "l1": (PLATFORM_NAME_L1, LS_ASSETS_L1),
    "l2": (PLATFORM_NAME_L2, LS_ASSETS_L2),
}
LANDSAT_PLATFORMS = ["LANDSAT_8", "LANDSAT_9"]


def level_assets(level: str) -> list[str]:
    """Asset keys copied for a level (``l1`` or ``l2``)."""
    try:
        return list(LEVELS[level][1])
    except KeyError:
        raise ConfigError(f"unknown Landsat level {level!r}; use l1 or l2") from None


def _levels(text: str, label: str) -> tuple[str, ...]:
    levels = tuple(lv.lower() for lv in parse_list(text, str, label))
    if not levels:
        raise ConfigError(f"{label} is empty; use l1, l2 or l1,l2")
    return levels


@dataclass(frozen=True)
class LandsatSettings(ProcessorSettings):
    """The settings of ``stacchip-landsat``: the shared ones and these."""

    levels: tuple[str, ...] = setting(
        ("l1", "l2"), flag="--levels", env="STACCHIP_LEVELS", kind=Custom(_levels, "list of str"),
        help="levels to process, comma separated: l1,l2")
    platforms: tuple[str, ...] = setting(
        tuple(LANDSAT_PLATFORMS), flag="--platforms", env="STACCHIP_PLATFORMS", kind=Items(str),
        help="values of the 'platform' property to accept")
    collection_l1: str = setting(
        PLATFORM_NAME_L1, flag="--collection-l1", env="STACCHIP_COLLECTION_L1", help="Level-1 STAC collection")
    collection_l2: str = setting(
        PLATFORM_NAME_L2, flag="--collection-l2", env="STACCHIP_COLLECTION_L2", help="Level-2 STAC collection")

    def __post_init__(self) -> None:
        super().__post_init__()
        for level in self.levels:
            level_assets(level)
        needed = self.n_years * len(self.levels)
        if needed > len(set(self.years)):
            raise ConfigError(
                f"{len(self.levels)} levels x {self.n_years} years need {needed} distinct years; "
                f"--years gives {len(set(self.years))}"
            )

    @property
    def collections(self) -> dict[str, str]:
        """The STAC collection of each level."""
        return {"l1": self.collection_l1, "l2": self.collection_l2}


@register
class LandsatProcessor(Processor):
    """Least cloudy Landsat 8/9 L1 and L2 scenes per location and season, in different years."""

    name = "landsat"
    prog = "stacchip-landsat"
    description = "Landsat 8/9 Collection 2 L1 and L2 scenes per sample location into a bucket."
    default_api = STAC_API
    sample_var = "STACCHIP_SAMPLE_SOURCE"
    default_years = tuple(range(2018, 2024))
    default_n_years = 1
    default_seasons = ("q1", "q2", "q3", "q4")
    default_max_cloud = ABSOLUTE_CLOUD_COVER_FILTER / 100  # a fraction
    default_chip_max_nodata = 0.0
    settings_type = LandsatSettings
    settings: LandsatSettings

    def run_task(self, index: int) -> list[Outcome]:
        s = self.settings
        row = self.sample(index)
        centroid = mapping(row.geometry.centroid)
        n = s.n_years
        drawn = pick_years(s.years, n * len(s.levels), seed=index)
        publisher = self.publisher(index)
        dest_is_s3 = storage.is_s3(s.bucket)
        outcomes: list[Outcome] = []
        for k, level in enumerate(s.levels):
            platform, assets = LEVELS[level]
            years = drawn[k * n:(k + 1) * n]
            logger.info("task %d: %s years %s", index, platform, years)
            for period in periods(years, s.seasons):
                items = self.catalog.search(
                    [s.collections[level]],
                    datetime=period.interval,
                    intersects=centroid,
                    rules=[
                        Rule("platform", "in", list(s.platforms)),
                        Rule("eo:cloud_cover", "lte", s.max_cloud_cover),  # eo:cloud_cover is in percent
                    ],
                    sort=[Sort("eo:cloud_cover")],
                    limit=1,
                )
                if not items:
                    logger.info("task %d: %s %s: no scene within the limits; skipping", index, platform, period.name)
                    continue
                item = items[0]
                plan = {
                    key: copy_plan(item.assets[key], dest_is_s3, requester_pays=True)
                    for key in assets if key in item.assets
                }
                outcome = publisher.publish(
                    item, platform, plan,
                    functools.partial(
                        LandsatIndexer, chip_size=s.chip_size, chip_max_nodata=s.chip_max_nodata,
                        platform=platform,
                    ),
                )
                outcome.note = outcome.note or period.name
                outcomes.append(outcome)
        return outcomes


def process_landsat_tile(index: int, sample_source: str, bucket: str) -> None:
    """Upstream-compatible call: process row ``index`` of ``sample_source`` into ``bucket``."""
    run_upstream(LandsatProcessor, ["--index", str(index), "--sample-source", sample_source, "--bucket", bucket])


def process(argv: Sequence[str] | None = None) -> int:
    """Console script ``stacchip-landsat``."""
    return main(LandsatProcessor, argv)


if __name__ == "__main__":
    raise SystemExit(process())
