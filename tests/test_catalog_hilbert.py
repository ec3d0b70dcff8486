import numpy as np
import pytest

from stacchip.catalog.hilbert import bbox_centres, hilbert_index, lonlat_hilbert


def _cells(order):
    n = 1 << order
    x, y = np.meshgrid(np.arange(n), np.arange(n))
    return x.ravel(), y.ravel()


def test_order_one_is_the_u_shape():
    x = np.array([0, 0, 1, 1])
    y = np.array([0, 1, 1, 0])
    assert hilbert_index(x, y, 1).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("order", [2, 3, 6])
def test_curve_visits_every_cell_once_through_neighbours(order):
    x, y = _cells(order)
    d = hilbert_index(x, y, order)
    assert d.dtype == np.uint64
    assert np.array_equal(np.sort(d), np.arange(1 << (2 * order), dtype=np.uint64))
    o = np.argsort(d)
    steps = np.abs(np.diff(x[o])) + np.abs(np.diff(y[o]))
    assert (steps == 1).all()


def test_quadrants_are_contiguous_at_every_level():
    # a curve, not just any permutation: each aligned 2**k block holds one run of positions
    order = 5
    x, y = _cells(order)
    d = hilbert_index(x, y, order).astype(np.int64)
    for k in (1, 2, 3):
        block = (x >> k) * 64 + (y >> k)
        for b in np.unique(block):
            run = np.sort(d[block == b])
            assert run[-1] - run[0] == len(run) - 1


def test_big_orders_and_bad_input():
    top = (1 << 31) - 1
    assert int(hilbert_index(np.array([top]), np.array([top]), 31)[0]) < 4**31
    with pytest.raises(ValueError):
        hilbert_index(np.array([4]), np.array([0]), 2)
    with pytest.raises(ValueError):
        hilbert_index(np.array([0]), np.array([0]), 0)


def test_lonlat_positions_keep_neighbours_close():
    rng = np.random.default_rng(1)
    lon = rng.uniform(-20, 40, 20000)
    lat = rng.uniform(-35, 35, 20000)
    o = np.argsort(lonlat_hilbert(lon, lat))
    step = np.hypot(np.diff(lon[o]), np.diff(lat[o])).mean()
    random_step = np.hypot(np.diff(lon), np.diff(lat)).mean()
    assert step < random_step / 20


def test_antimeridian_box_centre_sits_near_180():
    lon, lat = bbox_centres(np.array([-179.9, 10.0]), np.array([0.0, 0.0]), np.array([179.9, 11.0]),
                            np.array([1.0, 1.0]))
    assert abs(abs(lon[0]) - 180) < 1e-9 and lon[1] == 10.5
    assert lat.tolist() == [0.5, 0.5]
