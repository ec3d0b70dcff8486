"""Platform names: one table maps every catalog's collection id to the platform
a source's bands and QA belong to; indexes store it and every filter takes any alias."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pystac
import pytest
import shapely

from stacchip.errors import ConfigError
from stacchip.index import index_table, query, read_index, write_index
from stacchip.indexer import NoStatsChipIndexer
from stacchip.platforms import ALIASES, PLATFORMS, canonical_platform, platform_aliases, platform_bands
from stacchip.processors import prechip
from tests.builders import real_item

CATALOG_NAMES = [
    ("sentinel-2-c1-l2a", "sentinel-2-l2a"),  # Earth Search v1
    ("sentinel-2-l2a", "sentinel-2-l2a"),  # Planetary Computer, upstream
    ("landsat-c2-l2", "landsat-c2l2-sr"),  # Planetary Computer, Earth Search
    ("landsat-c2l2-sr", "landsat-c2l2-sr"),  # USGS
    ("landsat-c2-l1", "landsat-c2l1"),
    ("modis-09A1-061", "modis"),  # Planetary Computer
    ("naip", "naip"),
    ("sentinel-1-rtc", "sentinel-1-rtc"),
]


@pytest.mark.parametrize("name, canonical", CATALOG_NAMES)
def test_every_catalog_name_resolves(name: str, canonical: str) -> None:
    assert canonical_platform(name) == canonical
    assert canonical_platform(name.upper()) == canonical
    assert platform_bands(name).platform == canonical
    assert name in platform_aliases(canonical) or name.lower() in platform_aliases(canonical)


def test_every_alias_points_at_a_known_platform() -> None:
    assert set(ALIASES.values()) <= set(PLATFORMS)
    assert all(canonical_platform(p) == p for p in PLATFORMS)


def test_unknown_names_are_kept_and_refused_for_bands() -> None:
    assert canonical_platform("my-own-collection") == "my-own-collection"
    with pytest.raises(ConfigError, match="sentinel-2-c1-l2a"):
        platform_bands("my-own-collection")


@pytest.mark.parametrize("fixture, collection, canonical", [
    ("sentinel-2", "sentinel-2-c1-l2a", "sentinel-2-l2a"),
    ("landsat", "landsat-c2l2-sr", "landsat-c2l2-sr"),
])
def test_index_stores_canonical_platform_and_collection(fixture: str, collection: str, canonical: str) -> None:
    item = pystac.Item.from_dict(real_item(fixture))
    assert item.collection_id == collection
    table = NoStatsChipIndexer(item, chip_size=2048).create_full_index()
    assert set(table.column("platform").to_pylist()) == {canonical}
    assert set(table.column("collection").to_pylist()) == {collection}


def _table(item_id: str, platform: str, n: int = 3) -> pa.Table:
    import datetime as dt

    return index_table(
        item_id=item_id, platform=platform, datetime=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        chip_size=256, xs=np.arange(n), ys=np.zeros(n, int), cloud=np.zeros(n), nodata=np.zeros(n),
        polygons=np.array([shapely.box(i, 0, i + 1, 1) for i in range(n)]),
    )


def test_query_matches_any_alias_also_in_older_files(tmp_path: Path) -> None:
    # an index written before platforms were canonical stores Earth Search's name
    write_index(_table("OLD", "sentinel-2-c1-l2a"), tmp_path / "old.parquet")
    write_index(_table("NEW", "sentinel-2-l2a"), tmp_path / "new.parquet")
    write_index(_table("LS", "landsat-c2l2-sr"), tmp_path / "ls.parquet")
    for name in ("sentinel-2-l2a", "sentinel-2-c1-l2a", "SENTINEL-2-L2A"):
        assert sorted(set(query(tmp_path, platform=name).column("item_id").to_pylist())) == ["NEW", "OLD"]
    assert set(query(tmp_path, platform="landsat-c2-l2").column("item_id").to_pylist()) == {"LS"}
    assert read_index(tmp_path).num_rows == 9


def test_prechip_selects_with_either_catalogs_name(tmp_path: Path) -> None:
    write_index(_table("OLD", "sentinel-2-c1-l2a"), tmp_path / "old.parquet")
    write_index(_table("NEW", "sentinel-2-l2a"), tmp_path / "new.parquet")
    for name in ("sentinel-2-c1-l2a", "sentinel-2-l2a"):
        chosen = prechip.select_chips(str(tmp_path), platform=name, max_nodata=None)
        assert chosen.num_rows == 6


def test_indexer_resolves_a_platform_given_by_alias() -> None:
    item = copy.deepcopy(real_item("landsat"))
    ix = NoStatsChipIndexer(item, chip_size=2048, platform="landsat-c2-l2")
    assert ix.platform == "landsat-c2l2-sr"


def test_asset_nodata_reads_raster_bands_only():
    from stacchip.platforms import asset_nodata, is_nodata

    asset = pystac.Asset("x.tif", extra_fields={"raster:bands": [{"nodata": 0}, {"nodata": "nan"}, {}]})
    assert asset_nodata(asset) == 0.0 and np.isnan(asset_nodata(asset, 1))
    assert asset_nodata(asset, 2) is None and asset_nodata(asset, 5) is None
    assert asset_nodata(pystac.Asset("y.tif")) is None
    np.testing.assert_array_equal(is_nodata(np.array([0.0, 1.0, np.nan]), 0), [True, False, True])
