"""``stacchip-linz``: New Zealand aerial imagery (LINZ) from its static catalog, resampled to one GSD.

Task ``i`` takes survey ``LINZ_PREFIXES[i]`` (or the ``i``-th line of
``--prefixes`` / ``STACCHIP_LINZ_PREFIXES``) under the catalog root
``--root`` / ``STACCHIP_LINZ_ROOT`` (default ``s3://nz-imagery``). Every
``.tiff`` there has its STAC item beside it (same name, ``.json``). Half the
scenes are sampled (at least 10, at most 2000, never more than exist --
upstream failed on surveys with fewer than 10 scenes) with a fixed seed. Each
scene is resampled (bilinear) to ``--resolution`` metres (default 0.3), its
alpha band dropped, written as a Cloud-Optimized GeoTIFF (upstream wrote plain
GeoTIFFs), described by a new STAC item (id and dates from the catalog's item)
and indexed with a nodata mask of the first band's zeros
(:class:`~stacchip.indexer.NoDataMaskChipIndexer`).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pystac
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping

from stacchip import storage
from stacchip.errors import ConfigError, ItemError, StorageError
from stacchip.indexer import NoDataMaskChipIndexer
from stacchip.processors.base import Processor, ProcessorSettings, main, register, run_upstream
from stacchip.processors.cog import write_cog
from stacchip.processors.publish import Outcome, RenderedAsset
from stacchip.processors.sampling import parse_datetime
from stacchip.processors.settings import Custom, Number, setting
from stacchip.reader import gdal_env, resolve_href

logger = logging.getLogger(__name__)

PLATFORM_NAME = "linz"
ROOT = "s3://nz-imagery"
TARGET_RESOLUTION = 0.3
#: Asset key of the resampled image (upstream's items came from rio-stac, which names it "asset").
ASSET_KEY = "asset"
SAMPLE_SEED = 42
LINZ_PREFIXES = [
    "auckland/auckland_2022_0.075m/", "wellington/wellington_2021_0.075m/", "wellington/wellington_2021_0.3m/",
    "bay-of-plenty/bay-of-plenty_2023_0.1m/", "bay-of-plenty/tauranga_2022_0.1m/",
    "bay-of-plenty/tauranga-winter_2022_0.1m/", "canterbury/canterbury_2023_0.3m/",
    "canterbury/ashburton_2023_0.1m/", "canterbury/hurunui_2023_0.075m/", "canterbury/timaru_2022-2023_0.1m/",
    "canterbury/selwyn_2022-2023_0.075m/", "gisborne/gisborne_2023_0.075m/", "hawkes-bay/hawkes-bay_2022_0.05m/",
    "hawkes-bay/napier_2017-2018_0.05m/", "hawkes-bay/wairoa_2014-2015_0.1m/",
    "manawatu-whanganui/manawatu-whanganui_2021-2022_0.3m/", "manawatu-whanganui/palmerston-north_2022_0.125m/",
    "manawatu-whanganui/rangitikei_2021_0.125m/", "manawatu-whanganui/tararua_2024_0.1m/",
    "manawatu-whanganui/whanganui_2022_0.075m/", "marlborough/marlborough_2023_0.075m/",
    "nelson/nelson_2022_0.075m/", "northland/northland_2016_0.1m/", "otago/queenstown_2021_0.1m/",
    "otago/otago_2018_0.1m/", "otago/dunedin_2018-2019_0.1m/", "southland/southland_2023_0.1m/",
    "southland/invercargill_2022_0.05m/", "taranaki/taranaki_2022_0.05m/", "taranaki/new-plymouth_2017_0.1m/",
    "tasman/tasman_2023_0.075m/", "waikato/hamilton_2023_0.05m/", "waikato/otorohanga_2021_0.1m/",
    "waikato/taupo_2023_0.075m/", "waikato/thames-coromandel_2021_0.1m/", "waikato/waikato_2021_0.1m/",
    "waikato/waipa_2021_0.1m/", "west-coast/buller_2020_0.2m/", "west-coast/west-coast_2016_0.1m/",
]


def sample_scenes(files: Sequence[str], seed: int = SAMPLE_SEED) -> list[str]:
    """Half the scenes, at least 10 and at most 2000, never more than there are (sorted input, fixed seed)."""
    pool = sorted(files)
    size = min(len(pool), max(min(len(pool) // 2, 2000), 10))
    return random.Random(seed).sample(pool, size)


def resample(href: str, resolution: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The first three bands of ``href`` resampled (bilinear) to ``resolution`` metres, and its grid."""
    with gdal_env(), rasterio.open(resolve_href(href)) as src:
        gsd = abs(src.transform.a)
        factor = gsd / resolution
        height, width = max(1, int(src.height * factor)), max(1, int(src.width * factor))
        bands = list(range(1, min(3, src.count) + 1))
        data = src.read(bands, out_shape=(len(bands), height, width), resampling=Resampling.bilinear)
        transform = src.transform * src.transform.scale(src.width / width, src.height / height)
        return data, {"crs": src.crs, "transform": transform, "nodata": src.nodata}


def linz_item(original: pystac.Item, profile: dict[str, Any], shape: tuple[int, int]) -> pystac.Item:
    """A STAC item for the resampled scene: the catalog item's id and dates, the new grid."""
    rows, cols = shape
    t = profile["transform"]
    left, top = t.c, t.f
    right, bottom = left + cols * t.a, top + rows * t.e
    footprint = transform_geom(profile["crs"], "EPSG:4326", mapping(box(left, bottom, right, top)))
    props = original.properties
    start = props.get("start_datetime") or props.get("datetime")
    if not start:
        raise ItemError(f"LINZ item {original.id!r} has neither start_datetime nor datetime")
    when = parse_datetime(start)
    xs = [p[0] for p in footprint["coordinates"][0]]
    ys = [p[1] for p in footprint["coordinates"][0]]
    item = pystac.Item(
        id=original.id, geometry=footprint, bbox=[min(xs), min(ys), max(xs), max(ys)], datetime=when,
        properties={k: props[k] for k in ("start_datetime", "end_datetime") if props.get(k)},
        collection=PLATFORM_NAME,
    )
    epsg = profile["crs"].to_epsg()
    item.properties["proj:code"] = f"EPSG:{epsg}" if epsg else None
    if not epsg:
        del item.properties["proj:code"]
        item.properties["proj:wkt2"] = profile["crs"].to_wkt()
    item.properties["proj:shape"] = [rows, cols]
    item.properties["proj:transform"] = list(t)[:6]
    item.properties["gsd"] = abs(t.a)
    item.stac_extensions.append("https://stac-extensions.github.io/projection/v2.0.0/schema.json")
    return item


def _root(text: str, label: str) -> str:
    return text.rstrip("/") or ROOT


def _prefixes(source: str, label: str) -> tuple[str, ...]:
    """Survey prefixes from a text file, one per line (``#`` lines are comments)."""
    try:
        lines = storage.read_bytes_retry(source).decode().splitlines()
    except Exception as exc:
        raise ConfigError(f"LINZ prefix list {source!r} cannot be read: {exc}") from exc
    prefixes = tuple(ln.strip() for ln in lines if ln.strip() and not ln.startswith("#"))
    if not prefixes:
        raise ConfigError(f"LINZ prefix list {source!r} is empty")
    return prefixes


@dataclass(frozen=True)
class LinzSettings(ProcessorSettings):
    """The settings of ``stacchip-linz``: the shared ones and these."""

    root: str = setting(ROOT, flag="--root", env="STACCHIP_LINZ_ROOT", kind=Custom(_root, "location"),
                        help="catalog root")
    prefixes: tuple[str, ...] = setting(
        tuple(LINZ_PREFIXES), flag="--prefixes", env="STACCHIP_LINZ_PREFIXES", kind=Custom(_prefixes, "file"),
        shown="the built-in surveys", help="file of survey prefixes, one per line")
    resolution: float = setting(
        TARGET_RESOLUTION, flag="--resolution", env="STACCHIP_RESOLUTION", kind=Number(1e-6), unit="metres",
        help="target GSD")


@register
class LinzProcessor(Processor):
    """Sampled scenes of one LINZ survey per task, resampled to one GSD."""

    name = "linz"
    prog = "stacchip-linz"
    settings_type = LinzSettings
    settings: LinzSettings
    description = "LINZ aerial imagery surveys from the static catalog into a bucket, as COGs."

    def validate(self, indices: Sequence[int]) -> None:
        for index in indices:
            if not 0 <= index < len(self.settings.prefixes):
                raise ConfigError(f"task index {index} is beyond the {len(self.settings.prefixes)} LINZ surveys")

    def run_task(self, index: int) -> list[Outcome]:
        s = self.settings
        prefix = storage.join(s.root, s.prefixes[index])
        try:
            files = [f for f in storage.list_files(prefix, ".tiff")]
        except StorageError as exc:
            raise StorageError(f"cannot list LINZ survey {prefix!r}: {exc}") from exc
        scenes = sample_scenes(files)
        logger.info("task %d: %s has %d scenes, keeping %d", index, prefix, len(files), len(scenes))
        publisher = self.publisher(index)
        outcomes: list[Outcome] = []
        for href in scenes:
            # a scene that cannot be read fails alone; the survey's other scenes still run
            outcomes.append(
                publisher.guard(PLATFORM_NAME, Path(href).stem, functools.partial(self._scene, publisher, href))
            )
        return outcomes

    def _scene(self, publisher: Any, href: str) -> Outcome:
        s = self.settings
        meta_url = href[: -len(".tiff")] + ".json"
        original = pystac.Item.from_dict(json.loads(storage.read_bytes_retry(meta_url)))
        filename = Path(href).name
        early = publisher.skip_or_plan(PLATFORM_NAME, original.id, {ASSET_KEY: href})
        if early is not None:
            return early
        data, profile = resample(href, s.resolution)
        item = linz_item(original, profile, data.shape[1:])
        item.add_asset(ASSET_KEY, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"]))
        mask = data[0] == 0
        plan = {ASSET_KEY: RenderedAsset(functools.partial(write_cog, data, profile), filename, href)}
        return publisher.publish(
            item, PLATFORM_NAME, plan,
            functools.partial(
                NoDataMaskChipIndexer, nodata_mask=mask, chip_size=s.chip_size,
                chip_max_nodata=s.chip_max_nodata, platform=PLATFORM_NAME,
            ),
        )


def process_linz_tile(index: int, bucket: str) -> None:
    """Upstream-compatible call: process survey ``index`` into ``bucket``."""
    run_upstream(LinzProcessor, ["--index", str(index), "--bucket", bucket])


def process(argv: Sequence[str] | None = None) -> int:
    """Console script ``stacchip-linz``."""
    return main(LinzProcessor, argv)


if __name__ == "__main__":
    raise SystemExit(process())
