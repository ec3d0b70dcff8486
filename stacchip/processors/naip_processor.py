"""``stacchip-naip``: NAIP aerial imagery, the latest scene and one other per sample location.

Task ``i`` takes row ``i`` of the sample file (``STACCHIP_SAMPLE_SOURCE``) and
finds every NAIP scene at its centroid, newest first (``naip:year``, then
``datetime``). It publishes the newest and, when there is more than one, one
other drawn with a generator seeded by ``i`` (upstream sorted oldest first and
kept at most ten, so "latest" was the tenth oldest, and it failed when a
location had a single scene). The ``image`` asset is copied server-side from
the requester-pays ``naip-analytic`` bucket when the output is on S3 and the
object is there, else streamed from its href; the index has no statistics
(:class:`~stacchip.indexer.NoStatsChipIndexer`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import pystac
from shapely.geometry import mapping

from stacchip import storage
from stacchip.indexer import NoStatsChipIndexer
from stacchip.processors.base import Processor, ProcessorSettings, main, register, run_upstream
from stacchip.catalog.stac_api import Sort
from stacchip.processors.publish import Outcome, copy_plan, filename_of
from stacchip.processors.settings import setting

logger = logging.getLogger(__name__)

STAC_API = "https://planetarycomputer.microsoft.com/api/stac/v1"
COLLECTION = "naip"
PLATFORM_NAME = "naip"
AWS_S3_URL = "s3://naip-analytic/{state}/{year}/{resolution}/rgbir_cog/{block}{subblock}/{name}"


def naip_analytic_sources(item: pystac.Item) -> list[str]:
    """Candidate keys of the item's image in the ``naip-analytic`` bucket (empty if unknown)."""
    props = item.properties
    try:
        state = props["naip:state"]
        year = props["naip:year"]
        resolution = f"{round(float(props['gsd']) * 100)}cm"
        quad = next(p for p in item.id.split("_") if p.isdigit() and len(p) == 7)
    except (KeyError, StopIteration, TypeError, ValueError):
        return []
    name = filename_of(item.assets["image"].href)
    fields = dict(state=state, year=year, resolution=resolution, block=quad[:5], name=name)
    return [AWS_S3_URL.format(subblock=f"/{quad[5:]}", **fields), AWS_S3_URL.format(subblock="", **fields)]


def pick_naip(items: Sequence[pystac.Item], seed: int) -> list[pystac.Item]:
    """The newest item and, if there are others, one of them drawn with ``seed``."""
    if not items:
        return []
    latest, rest = items[0], list(items[1:])
    picked = [latest]
    if rest:
        picked.append(random.Random(seed).choice(rest))
    return picked


@dataclass(frozen=True)
class NaipSettings(ProcessorSettings):
    """The settings of ``stacchip-naip``: the shared ones and these."""

    collection: str = setting(COLLECTION, flag="--collection", env="STACCHIP_COLLECTION", help="STAC collection")


@register
class NaipProcessor(Processor):
    """Newest NAIP scene plus one other per sample location."""

    name = "naip"
    prog = "stacchip-naip"
    description = "NAIP scenes (newest plus one other) per sample location into a bucket."
    default_api = STAC_API
    settings_type = NaipSettings
    settings: NaipSettings
    sample_var = "STACCHIP_SAMPLE_SOURCE"

    def run_task(self, index: int) -> list[Outcome]:
        s = self.settings
        row = self.sample(index)
        items = self.catalog.search(
            [s.collection],
            intersects=mapping(row.geometry.centroid),
            sort=[Sort("naip:year", descending=True), Sort("datetime", descending=True)],
        )
        if not items:
            logger.info("task %d: no NAIP scene at this location; nothing to do", index)
            return []
        publisher = self.publisher(index)
        dest_is_s3 = storage.is_s3(s.bucket)
        outcomes = []
        for item in pick_naip(items, index):
            if "image" not in item.assets:
                logger.warning("task %d: NAIP item %s has no 'image' asset; skipping", index, item.id)
                continue
            plan = {
                "image": copy_plan(
                    item.assets["image"], dest_is_s3, requester_pays=True,
                    extra_sources=naip_analytic_sources(item),
                )
            }
            outcomes.append(
                publisher.publish(
                    item, PLATFORM_NAME, plan,
                    lambda it: NoStatsChipIndexer(
                        it, chip_size=s.chip_size, chip_max_nodata=s.chip_max_nodata, platform=PLATFORM_NAME
                    ),
                )
            )
        return outcomes


def process_naip_tile(index: int, sample_source: str, bucket: str) -> None:
    """Upstream-compatible call: process row ``index`` of ``sample_source`` into ``bucket``."""
    run_upstream(NaipProcessor, ["--index", str(index), "--sample-source", sample_source, "--bucket", bucket])


def process(argv: Sequence[str] | None = None) -> int:
    """Console script ``stacchip-naip``."""
    return main(NaipProcessor, argv)


if __name__ == "__main__":
    raise SystemExit(process())
