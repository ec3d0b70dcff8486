"""The Hilbert curve, vectorised: integer cells and lon/lat points to curve positions.

Rows sorted by the curve position of their chip centre lie close together on
the ground, so a run of consecutive rows (a Parquet row group) covers a compact
area and its bbox statistics let readers skip it. Everything here is numpy over
whole arrays; no per-point Python loop (the one loop runs once per bit of
``order``).
"""

from __future__ import annotations

import numpy as np

from stacchip import encodings

#: Bits per axis of the lon/lat grid: 2**20 cells over 360 degrees of longitude
#: (~0.00034 degrees, ~38 m at the equator) and 180 degrees of latitude.
DEFAULT_ORDER = 20


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int) -> np.ndarray:
    """Positions along the Hilbert curve of integer cells ``(x, y)`` of a ``2**order`` square grid.

    ``x`` and ``y`` are integers in ``[0, 2**order)`` (any shape, broadcast together);
    returns uint64 positions in ``[0, 4**order)``. Consecutive positions are
    always edge-neighbouring cells. ``order`` is at most 31.
    """
    if not 1 <= int(order) <= 31:
        raise ValueError(f"order must be 1-31 bits per axis, got {order}")
    order = int(order)
    xs, ys = np.broadcast_arrays(np.asarray(x), np.asarray(y))
    if xs.size and (xs.min() < 0 or ys.min() < 0 or xs.max() >> order or ys.max() >> order):
        raise ValueError(f"cells must lie in [0, 2**{order})")
    # Cells in uint32 (order <= 31), updated in place; two bits of d per level.
    cx = xs.astype(np.uint32, copy=True)
    cy = ys.astype(np.uint32, copy=True)
    d = np.zeros(cx.shape, dtype=np.uint64)
    full = np.uint32((1 << order) - 1)
    one = np.uint32(1)
    rx = np.empty(cx.shape, dtype=np.uint32)
    ry = np.empty(cx.shape, dtype=np.uint32)
    tmp = np.empty(cx.shape, dtype=np.uint32)
    for bit in range(order - 1, -1, -1):
        np.right_shift(cx, np.uint32(bit), out=rx)
        rx &= one
        np.right_shift(cy, np.uint32(bit), out=ry)
        ry &= one
        # quadrant (3 * rx) ^ ry, appended as the next two bits of d
        np.multiply(rx, np.uint32(3), out=tmp)
        tmp ^= ry
        d <<= np.uint64(2)
        d |= tmp
        # Rotate: where ry == 0, reflect (if rx == 1) then swap x and y.
        ry ^= one  # now 1 where ry was 0
        np.multiply(rx, ry, out=tmp)  # 1 where a reflection is due
        tmp *= full
        cx ^= tmp
        cy ^= tmp
        np.subtract(np.uint32(0), ry, out=tmp)  # all ones where a swap is due
        tmp &= cx ^ cy
        cx ^= tmp
        cy ^= tmp
    return d


def bbox_centres(
    xmin: np.ndarray, ymin: np.ndarray, xmax: np.ndarray, ymax: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(lon, lat)`` in degrees of lon/lat boxes given as four arrays
    (:func:`stacchip.encodings.bbox_centres` over their columns: a box wider than
    180 degrees straddles the antimeridian and its centre lies near +-180)."""
    columns = [np.asarray(v, dtype=np.float64).ravel() for v in (xmin, ymin, xmax, ymax)]
    return encodings.bbox_centres(np.column_stack(columns))


def lonlat_hilbert(lon: np.ndarray, lat: np.ndarray, order: int = DEFAULT_ORDER) -> np.ndarray:
    """Hilbert positions (uint64) of lon/lat points (degrees) on a ``2**order`` grid over the globe.

    Longitudes are wrapped into [-180, 180), latitudes clipped to [-90, 90];
    NaN sorts as (0, 0).
    """
    n = 1 << int(order)
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    u = np.nan_to_num(((lon + 180.0) % 360.0) / 360.0, nan=0.0)
    v = np.nan_to_num((np.clip(lat, -90.0, 90.0) + 90.0) / 180.0, nan=0.0)
    ix = np.clip((u * n).astype(np.int64), 0, n - 1)
    iy = np.clip((v * n).astype(np.int64), 0, n - 1)
    return hilbert_index(ix, iy, order)
