"""Geographic and time encodings of chips: ``(sin, cos)`` pairs a model takes as input.

Pure numpy, no I/O. Angles are radians, coordinates degrees (lon/lat), times
UTC ``datetime64``.

* :func:`bbox_centres`: centre ``(lon, lat)`` of lon/lat boxes, across the
  antimeridian for boxes that straddle it;
* :func:`latlon_norm`: ``(sin, cos)`` of latitude and of longitude;
* :func:`time_norm`: ``(sin, cos)`` of the position in the year and of the
  UTC time of day (:func:`time_angles`):

  - hour: ``a = 2*pi * (hours + minutes/60 + seconds/3600) / 24``;
  - year: ``a = 2*pi * (t - Jan 1 00:00 of t's year) / (length of that
    year)``, the continuous form of the week number (week ``w`` lies near
    ``2*pi*(w-1)/52.18``). Every instant of a year has its own angle, so ISO
    week 53 does not land on week 1 as with upstream's ``2*pi*week/52``;
    Dec 31 and Jan 1 are neighbours.

* :func:`normalize_latlon`, :func:`normalize_timestamp`: upstream's one-value
  helpers over the same formulas.

Used by the cube export (:mod:`stacchip.export`), spatial splits
(:mod:`stacchip.ml.splits`) and the Hilbert sort of compaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np

__all__ = [
    "bbox_centres",
    "latlon_norm",
    "normalize_latlon",
    "normalize_timestamp",
    "sincos",
    "time_angles",
    "time_norm",
]


def sincos(angle: np.ndarray) -> np.ndarray:
    """``(N, 2)`` float32 of ``(sin, cos)`` of angles in radians."""
    angle = np.asarray(angle, dtype=np.float64)
    return np.column_stack([np.sin(angle), np.cos(angle)]).astype(np.float32)


def latlon_norm(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lat_norm, lon_norm)``: ``(sin, cos)`` of latitude and of longitude (degrees in)."""
    return sincos(np.radians(lat)), sincos(np.radians(lon))


def normalize_latlon(bounds: Sequence[float]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Upstream helper: ``((sin lat, cos lat), (sin lon, cos lon))`` of a bbox centre (degrees)."""
    lon, lat = bbox_centres(np.array([bounds], dtype=np.float64))
    lat_n, lon_n = latlon_norm(lon, lat)
    return (float(lat_n[0, 0]), float(lat_n[0, 1])), (float(lon_n[0, 0]), float(lon_n[0, 1]))


def bbox_centres(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``(lon, lat)`` in degrees of ``(N, 4)`` lon/lat boxes ``(xmin, ymin, xmax, ymax)``.

    A box wider than 180 degrees is a chip across the antimeridian (its corners
    sit at +-180): its centre is taken across the antimeridian, near +-180.
    """
    bounds = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    lon = (bounds[:, 0] + bounds[:, 2]) / 2
    lat = (bounds[:, 1] + bounds[:, 3]) / 2
    wrap = (bounds[:, 2] - bounds[:, 0]) > 180
    if wrap.any():
        lon = np.where(wrap, (lon + 360.0) % 360.0 - 180.0, lon)
    return lon, lat


def time_angles(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(year angle, hour angle)`` in radians of UTC ``datetime64`` timestamps.

    Year angle: ``2*pi * (t - Jan 1 of its year) / (year length)``; hour angle:
    ``2*pi * (time of day in hours) / 24``.
    """
    t = np.asarray(times).astype("datetime64[us]")
    year = t.astype("datetime64[Y]")
    start = year.astype("datetime64[us]")
    end = (year + 1).astype("datetime64[us]")
    frac_year = (t - start).astype(np.float64) / (end - start).astype(np.float64)
    day = t.astype("datetime64[D]").astype("datetime64[us]")
    hours = (t - day).astype(np.float64) / 3.6e9
    return 2 * np.pi * frac_year, 2 * np.pi * hours / 24.0


def time_norm(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(week_norm, hour_norm)``, each ``(N, 2)`` float32 ``(sin, cos)``."""
    week, hour = time_angles(times)
    return sincos(week), sincos(hour)


def normalize_timestamp(date: dt.datetime | dt.date) -> tuple[tuple[float, float], tuple[float, float]]:
    """Upstream helper: ``((sin, cos) of the year position, (sin, cos) of the UTC hour)``.

    A plain date means midnight UTC; a naive datetime means UTC.
    """
    if not isinstance(date, dt.datetime):
        date = dt.datetime(date.year, date.month, date.day)
    if date.tzinfo is not None:
        date = date.astimezone(dt.UTC).replace(tzinfo=None)
    week, hour = time_norm(np.array([np.datetime64(date, "us")]))
    return (float(week[0, 0]), float(week[0, 1])), (float(hour[0, 0]), float(hour[0, 1]))
