"""``stacchip-sentinel-2``: Sentinel-2 L2A scenes per MGRS tile.

Task ``i`` takes row ``i`` of the MGRS sample file (``STACCHIP_MGRS_SOURCE``,
a ``name`` column such as ``20HNJ`` and the tile geometry), draws
``--n-years`` years (default 2 of 2018-2022, seeded by ``i`` as upstream) and,
for each season (default the four quarters), picks the least cloudy scene of
that tile whose nodata is at most ``--max-scene-nodata`` percent and whose
cloud cover is at most ``--max-cloud`` (a fraction; upstream's
``STACCHIP_MAX_CLOUD_COVER`` in percent). A season without such a scene
is skipped. The scene's bands are copied to the bucket (server-side from
``sentinel-cogs`` when the bucket is on S3), with its item JSON and its chip
index (:class:`~stacchip.indexer.Sentinel2Indexer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from shapely.geometry import mapping

from stacchip import storage
from stacchip.indexer import Sentinel2Indexer
from stacchip.processors.base import Processor, ProcessorSettings, main, register, run_upstream
from stacchip.catalog.stac_api import Rule, Sort
from stacchip.processors.publish import Outcome, copy_plan
from stacchip.processors.sampling import periods, pick_years
from stacchip.processors.settings import Items, setting

logger = logging.getLogger(__name__)

STAC_API = "https://earth-search.aws.element84.com/v1"
COLLECTION = "sentinel-2-l2a"
PLATFORM_NAME = "sentinel-2-l2a"
S2_ASSETS = [
    "blue", "green", "nir", "nir08", "red", "rededge1", "rededge2", "rededge3", "scl", "swir16", "swir22",
]
#: Largest scene cloud cover in percent (``eo:cloud_cover`` is a percentage;
#: upstream compared it with 0.75, i.e. kept only scenes under 0.75 %).
ABSOLUTE_CLOUD_COVER_FILTER = 75.0
#: Largest ``s2:nodata_pixel_percentage`` of a scene, in percent.
SCENE_NODATA_LIMIT = 20.0


@dataclass(frozen=True)
class Sentinel2Settings(ProcessorSettings):
    """The settings of ``stacchip-sentinel-2``: the shared ones and these."""

    collection: str = setting(COLLECTION, flag="--collection", env="STACCHIP_COLLECTION", help="STAC collection")
    assets: tuple[str, ...] = setting(
        tuple(S2_ASSETS), flag="--assets", env="STACCHIP_ASSETS", kind=Items(str), help="asset keys to copy")


@register
class Sentinel2Processor(Processor):
    """Least cloudy Sentinel-2 L2A scene per MGRS tile and season."""

    name = "sentinel-2"
    prog = "stacchip-sentinel-2"
    description = __doc__.split("\n\n")[0].strip("`: ") if __doc__ else ""
    default_api = STAC_API
    sample_var = "STACCHIP_MGRS_SOURCE"
    sample_columns = ("name",)
    default_years = tuple(range(2018, 2023))
    default_n_years = 2
    default_seasons = ("q1", "q2", "q3", "q4")
    default_max_cloud = ABSOLUTE_CLOUD_COVER_FILTER / 100  # a fraction
    default_max_scene_nodata = SCENE_NODATA_LIMIT
    settings_type = Sentinel2Settings
    settings: Sentinel2Settings

    def run_task(self, index: int) -> list[Outcome]:
        s = self.settings
        row = self.sample(index)
        tile = str(row["name"]).strip()
        years = pick_years(s.years, s.n_years, seed=index)
        logger.info("task %d: MGRS %s, years %s", index, tile, years)
        publisher = self.publisher(index)
        dest_is_s3 = storage.is_s3(s.bucket)
        outcomes: list[Outcome] = []
        for period in periods(years, s.seasons):
            items = self.catalog.search(
                [s.collection],
                datetime=period.interval,
                intersects=mapping(row.geometry),
                rules=[
                    Rule("grid:code", "eq", f"MGRS-{tile}"),
                    Rule("s2:nodata_pixel_percentage", "lte", s.max_scene_nodata),
                    Rule("eo:cloud_cover", "lte", s.max_cloud_cover),  # eo:cloud_cover is in percent
                ],
                sort=[Sort("eo:cloud_cover")],
                limit=1,
            )
            if not items:
                logger.info("task %d: MGRS %s %s: no scene within the limits; skipping", index, tile, period.name)
                continue
            item = items[0]
            logger.info("task %d: %s picked %s (cloud %s%%)", index, period.name, item.id,
                        item.properties.get("eo:cloud_cover"))
            plan = {
                key: copy_plan(item.assets[key], dest_is_s3)
                for key in s.assets if key in item.assets
            }
            outcome = publisher.publish(
                item, PLATFORM_NAME, plan,
                lambda it: Sentinel2Indexer(
                    it, chip_size=s.chip_size, chip_max_nodata=s.chip_max_nodata, platform=PLATFORM_NAME
                ),
            )
            outcome.note = outcome.note or period.name
            outcomes.append(outcome)
        return outcomes


def process_mgrs_tile(index: int, mgrs_source: str, bucket: str) -> None:
    """Upstream-compatible call: process row ``index`` of ``mgrs_source`` into ``bucket``."""
    run_upstream(Sentinel2Processor, ["--index", str(index), "--sample-source", mgrs_source, "--bucket", bucket])


def process(argv: Sequence[str] | None = None) -> int:
    """Console script ``stacchip-sentinel-2``."""
    return main(Sentinel2Processor, argv)


if __name__ == "__main__":
    raise SystemExit(process())
