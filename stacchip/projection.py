"""CRS, shape and transform of a STAC item and of each of its assets.

Reads the STAC projection extension in its v1 (``proj:epsg``, ``proj:wkt2``,
``proj:projjson``) and v2 (``proj:code``) forms, at item level or asset level
(asset level overrides item level). Shapes are ``(rows, cols)`` in pixels and
transforms are :class:`affine.Affine` in CRS units (metres) per pixel.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import pyproj
from affine import Affine

from stacchip.errors import (
    ProjectionError,
    UnsupportedTransformError,
    UnsupportedUnitsError,
)

CRS_FIELDS = ("proj:code", "proj:epsg", "proj:wkt2", "proj:projjson")
SHAPE_FIELD = "proj:shape"
TRANSFORM_FIELD = "proj:transform"
METRE_UNITS = {"metre", "meter", "m", "metres", "meters"}


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid: CRS, ``(rows, cols)`` shape and affine transform."""

    crs: pyproj.CRS
    shape: tuple[int, int]
    transform: Affine

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (metres), both positive."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` in CRS units."""
        t = self.transform
        x0, y0 = t.c, t.f
        x1 = x0 + t.a * self.shape[1]
        y1 = y0 + t.e * self.shape[0]
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _props(item: Any) -> Mapping[str, Any]:
    return item.properties


def _asset_fields(item: Any, key: str) -> Mapping[str, Any]:
    asset = item.assets[key]
    return getattr(asset, "extra_fields", {}) or {}


def _where(item: Any, key: str | None) -> str:
    where = f"item {item.id!r}"
    if key is not None:
        where += f", asset {key!r}"
    return where


def parse_crs(fields: Mapping[str, Any], where: str) -> pyproj.CRS | None:
    """CRS from the first projection field present in ``fields``, else ``None``.

    Raises :class:`ProjectionError` naming the field when a value is present
    but cannot be understood.
    """
    for field in CRS_FIELDS:
        value = fields.get(field)
        if value is None:
            continue
        try:
            if field == "proj:epsg":
                return pyproj.CRS.from_epsg(int(value))
            if field == "proj:projjson":
                if isinstance(value, str):
                    value = json.loads(value)
                return pyproj.CRS.from_json_dict(value)
            return pyproj.CRS.from_user_input(value)
        except (pyproj.exceptions.CRSError, ValueError, TypeError) as exc:
            raise ProjectionError(
                f"{where}: cannot read CRS from field {field!r} = {value!r}: {exc}"
            ) from exc
    return None


def item_crs(item: Any, asset_key: str | None = None) -> pyproj.CRS:
    """CRS of an asset (its own fields first) or of the item.

    Raises :class:`ProjectionError` when no CRS field is present and
    :class:`UnsupportedUnitsError` when the CRS is not in metres.
    """
    crs = None
    if asset_key is not None:
        crs = parse_crs(_asset_fields(item, asset_key), _where(item, asset_key))
    if crs is None:
        crs = parse_crs(_props(item), _where(item, None))
    if crs is None and asset_key is None:
        # Some catalogs state the CRS only per asset; take the first one found.
        for key in item.assets:
            crs = parse_crs(_asset_fields(item, key), _where(item, key))
            if crs is not None:
                break
    if crs is None:
        raise ProjectionError(
            f"{_where(item, asset_key)}: no CRS given; expected one of "
            + ", ".join(CRS_FIELDS)
        )
    check_metre_units(crs, _where(item, asset_key))
    return crs


def check_metre_units(crs: pyproj.CRS, where: str) -> None:
    """Raise :class:`UnsupportedUnitsError` unless both CRS axes are in metres."""
    units = {(axis.unit_name or "").lower() for axis in crs.axis_info}
    if not units or not units <= METRE_UNITS:
        raise UnsupportedUnitsError(
            f"{where}: CRS {crs.to_string()!r} uses units {sorted(units)}; "
            "chip grids need a projected CRS in metres"
        )


def parse_transform(value: Any, where: str) -> Affine:
    """Affine from a 6- or 9-term ``proj:transform``; must be north-up, unrotated."""
    try:
        terms = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise ProjectionError(
            f"{where}: field {TRANSFORM_FIELD!r} = {value!r} is not a list of numbers"
        ) from exc
    if len(terms) == 9:
        if terms[6:] != [0.0, 0.0, 1.0]:
            raise UnsupportedTransformError(
                f"{where}: field {TRANSFORM_FIELD!r} has last row {terms[6:]}, "
                "expected [0, 0, 1]"
            )
        terms = terms[:6]
    if len(terms) != 6:
        raise ProjectionError(
            f"{where}: field {TRANSFORM_FIELD!r} has {len(terms)} terms, expected 6 or 9"
        )
    if not all(math.isfinite(t) for t in terms):
        raise ProjectionError(f"{where}: field {TRANSFORM_FIELD!r} has non-finite terms")
    a, b, c, d, e, f = terms
    if b != 0.0 or d != 0.0:
        raise UnsupportedTransformError(
            f"{where}: field {TRANSFORM_FIELD!r} is rotated or sheared "
            f"(b={b}, d={d}); only north-up grids are supported"
        )
    if a <= 0.0 or e >= 0.0:
        raise UnsupportedTransformError(
            f"{where}: field {TRANSFORM_FIELD!r} has pixel size ({a}, {e}); "
            "expected positive x size and negative y size (north-up)"
        )
    return Affine(a, b, c, d, e, f)


def parse_shape(value: Any, where: str) -> tuple[int, int]:
    """``(rows, cols)`` from ``proj:shape``; both positive integers."""
    try:
        rows, cols = (int(v) for v in value)
        ok = all(float(v) == int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ProjectionError(
            f"{where}: field {SHAPE_FIELD!r} = {value!r} is not [rows, cols]"
        ) from exc
    if not ok or rows <= 0 or cols <= 0:
        raise ProjectionError(
            f"{where}: field {SHAPE_FIELD!r} = {value!r} must be two positive integers"
        )
    return rows, cols


def _shape_and_transform(
    fields: Mapping[str, Any], where: str
) -> tuple[tuple[int, int], Affine] | None:
    has_shape = fields.get(SHAPE_FIELD) is not None
    has_transform = fields.get(TRANSFORM_FIELD) is not None
    if not has_shape and not has_transform:
        return None
    if has_shape != has_transform:
        missing = TRANSFORM_FIELD if has_shape else SHAPE_FIELD
        raise ProjectionError(f"{where}: field {missing!r} is missing")
    return (
        parse_shape(fields[SHAPE_FIELD], where),
        parse_transform(fields[TRANSFORM_FIELD], where),
    )


def _has_crs(item: Any, key: str) -> bool:
    fields = {**_props(item), **_asset_fields(item, key)}
    return any(fields.get(field) is not None for field in CRS_FIELDS)


def asset_grid(item: Any, key: str) -> Grid | None:
    """Grid an asset declares (its own fields, else the item's), or ``None``."""
    where = _where(item, key)
    st = _shape_and_transform(_asset_fields(item, key), where)
    if st is None:
        st = _shape_and_transform(_props(item), _where(item, None))
    if st is None:
        return None
    return Grid(item_crs(item, key), st[0], st[1])


def item_grid(item: Any, shape: Any = None) -> Grid:
    """The finest-resolution grid of an item.

    Shape and transform are taken together: from the item properties when both
    are there, else from the asset with the smallest pixel size (ties go to the
    largest shape). ``shape`` overrides the shape (upstream's ``shape=``).
    Raises :class:`ProjectionError` naming the item and field when nothing
    usable is present.
    """
    st = _shape_and_transform(_props(item), _where(item, None))
    if st is not None:
        crs = item_crs(item)
    else:
        best: tuple[tuple[float, int], tuple[tuple[int, int], Affine], str] | None = None
        for key in item.assets:
            found = _shape_and_transform(_asset_fields(item, key), _where(item, key))
            if found is None:
                continue
            (rows, cols), tr = found
            rank = (abs(tr.a) * abs(tr.e), -rows * cols)
            if best is None or rank < best[0]:
                best = (rank, found, key)
        if best is None:
            item_crs(item)  # a missing or unreadable CRS is the first thing to report
            raise ProjectionError(
                f"{_where(item, None)}: no {SHAPE_FIELD!r} and {TRANSFORM_FIELD!r} "
                "in the item properties or in any asset"
            )
        st = best[1]
        # The grid's transform is in the CRS of the asset it comes from (asset
        # fields override the item's), not whichever asset states a CRS first.
        crs = item_crs(item, best[2]) if _has_crs(item, best[2]) else item_crs(item)
    grid_shape, transform = st
    if shape is not None:
        grid_shape = parse_shape(shape, f"{_where(item, None)} (shape argument)")
    return Grid(crs, grid_shape, transform)
