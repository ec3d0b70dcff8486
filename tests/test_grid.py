from fractions import Fraction

import numpy as np
import pyproj
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from stacchip import grid


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 900),
    cols=st.integers(1, 900),
    chip=st.integers(1, 300),
    res=st.sampled_from([0.6, 1.0, 10.0, 30.0, 463.3127165]),
    x0=st.floats(-1e6, 1e6, allow_nan=False),
    y0=st.floats(-1e7, 1e7, allow_nan=False),
)
def test_chips_tile_the_covered_area(rows, cols, chip, res, x0, y0):
    t = Affine(res, 0, x0, 0, -res, y0)
    nx, ny = grid.chip_counts((rows, cols), chip)
    assert nx == cols // chip and ny == rows // chip
    xs, ys = grid.chip_positions(nx, ny)
    assert len(xs) == nx * ny
    if nx * ny == 0:
        return
    b = grid.chip_bounds(t, xs, ys, chip)
    boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    covered = shapely.box(x0, y0 - ny * chip * res, x0 + nx * chip * res, y0)
    union = shapely.union_all(boxes)
    # Same area as the covered rectangle and the sum of chip areas: no gap, no overlap.
    area = covered.area
    assert abs(union.area - area) <= 1e-6 * area
    assert abs(shapely.area(boxes).sum() - area) <= 1e-6 * area
    assert union.symmetric_difference(covered).area <= 1e-6 * area
    # Row order: y outer, x inner.
    assert xs[0] == 0 and ys[0] == 0
    if nx > 1:
        assert (xs[1], ys[1]) == (1, 0)


def _reference_index(fine_origin, fine_step, asset_origin, asset_step, i):
    # Exact rational arithmetic: which asset pixel contains fine pixel i's centre.
    centre = Fraction(fine_origin) + (Fraction(i) + Fraction(1, 2)) * Fraction(fine_step)
    pos = (centre - Fraction(asset_origin)) / Fraction(asset_step)
    return pos.numerator // pos.denominator


@settings(max_examples=80, deadline=None)
@given(
    fine=st.sampled_from([1, 2, 3, 5, 10, 20, 30]),
    coarse=st.sampled_from([1, 2, 3, 5, 7, 10, 20, 25, 30, 60, 100]),
    start=st.integers(0, 2000),
    count=st.integers(1, 64),
    shift=st.integers(-50, 50),
    sign=st.sampled_from([1, -1]),
)
def test_axis_map_matches_exact_reference(fine, coarse, start, count, shift, sign):
    origin = 499980
    asset_origin = origin + shift
    got = grid.axis_map(origin, sign * fine, asset_origin, sign * coarse, start, count)
    want = [
        _reference_index(origin, sign * fine, asset_origin, sign * coarse, start + k)
        for k in range(count)
    ]
    assert got.tolist() == want


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    chip=st.integers(1, 40),
    ratio=st.sampled_from([Fraction(1), Fraction(2), Fraction(3), Fraction(6), Fraction(5, 2), Fraction(7, 3)]),
)
def test_reduction_weights_count_every_fine_pixel_once(n, chip, ratio):
    step = 10.0
    asset_step = float(step * ratio)
    asset_len = int(np.ceil(n * chip / float(ratio)))
    w, outside = grid.reduction_weights(0.0, step, 0.0, asset_step, n, chip, asset_len)
    assert w.shape == (n, asset_len)
    assert np.all(outside == 0)
    assert np.all(w.sum(axis=1) == chip)
    idx = grid.axis_map(0.0, step, 0.0, asset_step, np.arange(n) * chip, chip)
    for i in range(n):
        counts = np.bincount(idx[i], minlength=asset_len)
        assert np.array_equal(w[i], counts)


def test_reduction_weights_outside():
    w, outside = grid.reduction_weights(0.0, 10.0, 0.0, 20.0, 2, 4, 3)
    # chip 0 -> asset pixels 0,0,1,1 ; chip 1 -> 2,2,3,3 where 3 is outside.
    assert w.tolist() == [[2, 2, 0], [0, 0, 2]]
    assert outside.tolist() == [0, 2]


def test_chip_polygons_lonlat_match_pyproj():
    crs = pyproj.CRS.from_epsg(32720)
    t = Affine(10, 0, 499980, 0, -10, 6400000)
    xs, ys = grid.chip_positions(3, 2)
    polys = grid.chip_polygons_lonlat(grid.chip_bounds(t, xs, ys, 256), crs)
    tr = pyproj.Transformer.from_crs(32720, 4326, always_xy=True)
    for poly, x, y in zip(polys, xs, ys):
        minx = 499980 + x * 2560
        maxy = 6400000 - y * 2560
        corners = [(minx + 2560, maxy - 2560), (minx + 2560, maxy), (minx, maxy), (minx, maxy - 2560)]
        want = np.array([tr.transform(cx, cy) for cx, cy in corners])
        got = np.array(poly.exterior.coords)[:4]
        assert np.allclose(got, want, atol=1e-9)


def _item(rows: int, cols: int):
    import pystac

    return pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "g", "geometry": None, "links": [],
        "assets": {"b": {"href": "b.tif"}},
        "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": [rows, cols],
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
    })


def test_chip_grid_is_the_indexers_grid_as_a_value():
    import pickle

    import pytest

    from stacchip.errors import ChipOutOfRangeError, ConfigError
    from stacchip.indexer import NoStatsChipIndexer

    item = _item(250, 330)
    for edge in grid.EDGE_RULES:
        value = grid.ChipGrid.of(item, 64, edge=edge)
        indexer = NoStatsChipIndexer(item, chip_size=64, edge=edge)
        assert (value.x_size, value.y_size, value.size) == (indexer.x_size, indexer.y_size, indexer.size)
        assert value.shape == tuple(indexer.shape) == (250, 330) and value.affine == indexer.affine
        assert indexer.chip_grid.grid == value.grid and indexer.chip_grid.edge == edge
        xs, ys = value.kept_chips
        assert len(xs) == value.size and (xs[-1], ys[-1]) == (value.x_size - 1, value.y_size - 1)
        assert grid.as_chip_grid(indexer).grid == value.grid and grid.as_chip_grid(value) is value
        clone = pickle.loads(pickle.dumps(value))
        assert (clone.chip_size, clone.edge, clone.grid) == (64, edge, value.grid)
    assert grid.ChipGrid.of(item, 64).x_size == 5 and grid.ChipGrid.of(item, 64, edge="keep").x_size == 6
    with pytest.raises(ChipOutOfRangeError, match="outside the 5 x 3 chip grid"):
        grid.ChipGrid.of(item, 64).check_chip(5, 0)
    with pytest.raises(ConfigError, match="chip_size"):
        grid.ChipGrid.of(item, 0)
    with pytest.raises(ConfigError, match="edge"):
        grid.ChipGrid.of(item, 64, edge="pad")
    with pytest.raises(ConfigError, match="ChipGrid or an indexer"):
        grid.as_chip_grid(object())
