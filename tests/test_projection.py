import copy

import pyproj
import pystac
import pytest
from affine import Affine

from stacchip.errors import (
    ProjectionError,
    UnsupportedTransformError,
    UnsupportedUnitsError,
)
from stacchip.projection import asset_grid, item_crs, item_grid
from tests.builders import real_item


def _item(props=None, assets=None):
    return pystac.Item.from_dict(
        {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": "test-item",
            "geometry": None,
            "properties": {"datetime": "2024-01-01T00:00:00Z", **(props or {})},
            "links": [],
            "assets": assets or {"a": {"href": "a.tif"}},
        }
    )


GRID = {"proj:shape": [100, 200], "proj:transform": [10, 0, 500000, 0, -10, 4000000]}


@pytest.mark.parametrize(
    "field,value",
    [
        ("proj:code", "EPSG:32633"),
        ("proj:epsg", 32633),
        ("proj:wkt2", pyproj.CRS.from_epsg(32633).to_wkt()),
        ("proj:projjson", pyproj.CRS.from_epsg(32633).to_json_dict()),
    ],
)
def test_crs_from_every_field(field, value):
    item = _item({field: value, **GRID})
    assert item_crs(item).equals(pyproj.CRS.from_epsg(32633))
    assert item_grid(item).crs.equals(pyproj.CRS.from_epsg(32633))


def test_asset_crs_overrides_item():
    item = _item(
        {"proj:code": "EPSG:32633", **GRID},
        {"a": {"href": "a.tif", "proj:code": "EPSG:32634"}, "b": {"href": "b.tif"}},
    )
    assert item_crs(item, "a").to_epsg() == 32634
    assert item_crs(item, "b").to_epsg() == 32633
    assert asset_grid(item, "a").crs.to_epsg() == 32634


def test_crs_only_on_assets():
    item = _item(assets={"a": {"href": "a.tif", "proj:epsg": 32720, **GRID}})
    grid = item_grid(item)
    assert grid.crs.to_epsg() == 32720
    assert grid.shape == (100, 200)


def test_finest_grid_takes_the_crs_of_its_own_asset():
    coarse = {"proj:shape": [50, 100], "proj:transform": [20, 0, 500000, 0, -20, 4000000]}
    # CRS stated per asset only: the grid's CRS is the finest asset's, not the first asset's.
    item = _item(assets={
        "thumb": {"href": "t.tif", "proj:code": "EPSG:32633", **coarse},
        "b": {"href": "b.tif", "proj:code": "EPSG:32634", **GRID},
    })
    assert item_grid(item).crs.to_epsg() == 32634
    # An asset CRS overrides the item's for the grid taken from that asset.
    item = _item({"proj:code": "EPSG:32633"}, {
        "c": {"href": "c.tif", **coarse},
        "b": {"href": "b.tif", "proj:code": "EPSG:32634", **GRID},
    })
    assert item_grid(item).crs.to_epsg() == 32634
    assert item_grid(item).transform.a == 10


def test_nine_term_transform():
    item = _item({"proj:epsg": 32633, "proj:shape": [5, 6],
                  "proj:transform": [10.0, 0.0, 1.0, 0.0, -10.0, 2.0, 0.0, 0.0, 1.0]})
    assert item_grid(item).transform == Affine(10, 0, 1, 0, -10, 2)


def test_finest_grid_taken_with_its_own_shape():
    # Shape and transform come together from the finest asset, whatever the order.
    assets = {
        "coarse": {"href": "c.tif", "proj:shape": [50, 50], "proj:transform": [60, 0, 0, 0, -60, 3000]},
        "fine": {"href": "f.tif", "proj:shape": [300, 300], "proj:transform": [10, 0, 0, 0, -10, 3000]},
        "mid": {"href": "m.tif", "proj:shape": [150, 150], "proj:transform": [20, 0, 0, 0, -20, 3000]},
    }
    grid = item_grid(_item({"proj:epsg": 32633}, assets))
    assert grid.shape == (300, 300)
    assert grid.transform.a == 10


def test_real_sentinel2_item_grid():
    item = pystac.Item.from_dict(real_item("sentinel-2"))
    grid = item_grid(item)
    assert grid.shape == (10980, 10980)
    assert tuple(grid.transform)[:6] == (10, 0, 499980, 0, -10, 6400000)
    assert grid.crs.to_epsg() == 32720


def test_shape_override():
    grid = item_grid(_item({"proj:epsg": 32633, **GRID}), shape=[10, 20])
    assert grid.shape == (10, 20)


@pytest.mark.parametrize(
    "transform",
    [[10, 1, 0, 0, -10, 0], [10, 0, 0, 0.5, -10, 0], [10, 0, 0, 0, 10, 0], [-10, 0, 0, 0, -10, 0]],
)
def test_rotated_or_flipped_transform_rejected(transform):
    item = _item({"proj:epsg": 32633, "proj:shape": [10, 10], "proj:transform": transform})
    with pytest.raises(UnsupportedTransformError, match="test-item.*proj:transform"):
        item_grid(item)


def test_bad_nine_term_transform_rejected():
    item = _item({"proj:epsg": 32633, "proj:shape": [10, 10],
                  "proj:transform": [10, 0, 0, 0, -10, 0, 0, 1, 1]})
    with pytest.raises(UnsupportedTransformError, match="last row"):
        item_grid(item)


def test_degrees_rejected():
    item = _item({"proj:epsg": 4326, **GRID})
    with pytest.raises(UnsupportedUnitsError, match="test-item.*degree"):
        item_grid(item)


def test_us_feet_rejected():
    item = _item({"proj:epsg": 2263, **GRID})  # NY Long Island, US survey feet
    with pytest.raises(UnsupportedUnitsError, match="foot"):
        item_grid(item)


def test_missing_crs_names_item_and_fields():
    with pytest.raises(ProjectionError, match="test-item.*no CRS.*proj:code"):
        item_grid(_item(GRID))


def test_missing_grid_names_fields():
    with pytest.raises(ProjectionError, match="test-item.*proj:shape.*proj:transform"):
        item_grid(_item({"proj:epsg": 32633}))


def test_half_grid_names_missing_field():
    with pytest.raises(ProjectionError, match="'proj:transform' is missing"):
        item_grid(_item({"proj:epsg": 32633, "proj:shape": [1, 2]}))


@pytest.mark.parametrize("value", ["EPSG:999999", "not a crs"])
def test_unreadable_crs(value):
    with pytest.raises(ProjectionError, match="proj:code"):
        item_grid(_item({"proj:code": value, **GRID}))


def test_bad_shape():
    props = {"proj:epsg": 32633, "proj:shape": [0, 5], "proj:transform": GRID["proj:transform"]}
    with pytest.raises(ProjectionError, match="proj:shape"):
        item_grid(_item(props))


def test_projection_errors_are_value_errors():
    # Upstream raised ValueError/AssertionError; callers catching ValueError keep working.
    item = copy.deepcopy(_item(GRID))
    with pytest.raises(ValueError):
        item_grid(item)
