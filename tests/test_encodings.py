"""stacchip.encodings: the geographic and time encodings of cubes and splits."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from stacchip import encodings


def test_week_53_does_not_collide_with_week_1() -> None:
    week53 = dt.datetime(2020, 12, 31, 12)  # ISO week 53 of 2020
    week1 = dt.datetime(2020, 1, 1, 12)  # ISO week 1 of 2020
    assert week53.isocalendar().week == 53 and week1.isocalendar().week == 1
    # upstream: 2*pi*week/52 gives the same angle for both
    assert math.isclose(math.sin(53 * 2 * math.pi / 52), math.sin(1 * 2 * math.pi / 52))
    (w53, h53), (w1, _) = encodings.normalize_timestamp(week53), encodings.normalize_timestamp(week1)
    assert abs(w53[0] - w1[0]) > 1e-3 or abs(w53[1] - w1[1]) > 1e-3
    # neighbouring days are neighbours on the circle, 53 is not far from 1
    gap = math.atan2(w1[0], w1[1]) - math.atan2(w53[0], w53[1])
    assert math.isclose(gap % (2 * math.pi), 2 * math.pi / 366, rel_tol=1e-4)
    assert h53 == pytest.approx((0.0, -1.0), abs=1e-7)  # noon UTC
    # a datetime's real hour is used, not noon
    assert encodings.normalize_timestamp(dt.datetime(2020, 1, 1, 6))[1] == pytest.approx((1.0, 0.0), abs=1e-7)


def test_normalize_latlon_returns_lat_then_lon() -> None:
    (lat_s, lat_c), (lon_s, lon_c) = encodings.normalize_latlon((10.0, 40.0, 12.0, 42.0))
    assert (lat_s, lat_c) == pytest.approx((math.sin(math.radians(41.0)), math.cos(math.radians(41.0))), abs=1e-6)
    assert (lon_s, lon_c) == pytest.approx((math.sin(math.radians(11.0)), math.cos(math.radians(11.0))), abs=1e-6)
    lon, lat = encodings.bbox_centres(np.array([[-179.9, 0.0, 179.9, 1.0]]))
    assert abs(abs(lon[0]) - 180.0) < 1e-9 and lat[0] == pytest.approx(0.5)


def test_prechip_keeps_the_encodings_importable():
    from stacchip.processors import prechip

    for name in encodings.__all__:
        assert getattr(prechip, name) is getattr(encodings, name)
