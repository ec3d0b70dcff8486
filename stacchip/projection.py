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
    GridMismatchError,
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
                return pyproj.CRS.from_epsg(_integer(value, field, where))
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


def _integer(value: Any, field: str, where: str) -> int:
    """An integer field value (JSON integers, or floats with no fraction)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProjectionError(f"{where}: field {field!r} = {value!r} is not an integer")
    if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
        raise ProjectionError(f"{where}: field {field!r} = {value!r} is not an integer")
    return int(value)


def _number_list(value: Any, field: str, where: str) -> list[float]:
    """A JSON array of numbers (no strings, no booleans)."""
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ProjectionError(f"{where}: field {field!r} = {value!r} is not a list of numbers")
    return [float(v) for v in value]


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
    terms = _number_list(value, TRANSFORM_FIELD, where)
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
    """``(rows, cols)`` from ``proj:shape``: a list of two positive integers."""
    terms = _number_list(value, SHAPE_FIELD, where)
    if len(terms) != 2 or not all(math.isfinite(v) and v == int(v) and v > 0 for v in terms):
        raise ProjectionError(
            f"{where}: field {SHAPE_FIELD!r} = {value!r} must be [rows, cols], two positive integers"
        )
    return int(terms[0]), int(terms[1])


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
        if hasattr(shape, "tolist"):
            shape = shape.tolist()
        elif isinstance(shape, (list, tuple)):
            shape = [v.item() if hasattr(v, "item") else v for v in shape]
        grid_shape = parse_shape(shape, f"{_where(item, None)} (shape argument)")
    return Grid(crs, grid_shape, transform)


# --- the grid a raster file states, against the item's --------------------------------


def has_own_grid(item: Any, key: str) -> bool:
    """True when asset ``key`` states its own ``proj:shape``/``proj:transform``."""
    fields = _asset_fields(item, key)
    return fields.get(SHAPE_FIELD) is not None or fields.get(TRANSFORM_FIELD) is not None


def declared_grid(item: Any, key: str, fine: Grid) -> Grid:
    """The grid the item declares for asset ``key``: the asset's own projection
    fields, else the item's, else ``fine`` (the item's finest grid)."""
    grid = asset_grid(item, key)
    if grid is None:
        return fine
    return grid


def same_crs(a: pyproj.CRS, b: pyproj.CRS) -> bool:
    """True when two CRSs are the same (axis order aside), also when one comes
    from an EPSG code and the other from a file's WKT."""
    a = a.source_crs if a.is_bound and a.source_crs is not None else a
    b = b.source_crs if b.is_bound and b.source_crs is not None else b
    if a.equals(b, ignore_axis_order=True):
        return True
    code_a, code_b = a.to_epsg(min_confidence=70), b.to_epsg(min_confidence=70)
    return code_a is not None and code_a == code_b


def _fmt(crs: pyproj.CRS | None, shape: tuple[int, int], transform: Affine) -> str:
    if crs is None:
        name = "no CRS"
    else:
        code = crs.to_epsg(min_confidence=70)
        name = f"EPSG:{code}" if code is not None else repr(crs.name)
    t = transform
    return (f"{name}, {shape[0]}x{shape[1]} px, origin ({t.c:.6g}, {t.f:.6g}), "
            f"pixel ({t.a:.6g}, {t.e:.6g})")


def _agrees(expected: Affine, shape: tuple[int, int], found: Affine) -> bool:
    """True when ``found`` puts every corner of a ``shape`` grid within half an
    expected pixel of where ``expected`` puts it (no rotation either)."""
    if found.b != 0.0 or found.d != 0.0:
        return False
    half_x, half_y = abs(expected.a) / 2, abs(expected.e) / 2
    rows, cols = shape
    return (
        abs(found.c - expected.c) <= half_x
        and abs(found.f - expected.f) <= half_y
        and abs((found.c + found.a * cols) - (expected.c + expected.a * cols)) <= half_x
        and abs((found.f + found.e * rows) - (expected.f + expected.e * rows)) <= half_y
    )


def file_transform(
    item: Any,
    key: str,
    fine: Grid,
    *,
    crs: pyproj.CRS | None,
    shape: tuple[int, int],
    transform: Affine,
) -> tuple[Affine, str | None]:
    """The transform to read asset ``key`` with, checked against the item.

    ``crs``/``shape``/``transform`` are what the file itself states (``crs``
    ``None`` when it states none). Returns ``(transform, warning)``:

    * a file whose CRS differs from the item's, whose size differs from the
      asset's declared ``proj:shape``, or whose origin or extent is off by more
      than half a pixel raises :class:`GridMismatchError` naming item, asset and
      both grids;
    * a file that states no CRS is taken to be on the item's grid (upstream's
      semantics: pixel windows ``[y*size:(y+1)*size, ...]``); ``warning`` says
      so when its own transform disagrees;
    * an asset without projection fields of its own may be coarser than the
      grid it falls back to by a whole factor (upstream's rule) or, when the
      file is georeferenced, cover the same extent at another resolution.

    The returned transform is the item's (declared) one whenever the file
    agrees with it, so pixels are read by the item's grid.
    """
    where = _where(item, key)
    declared = declared_grid(item, key, fine)
    own = has_own_grid(item, key)
    found = f"file: {_fmt(crs, shape, transform)}; item: {_fmt(declared.crs, declared.shape, declared.transform)}"
    if crs is not None and not same_crs(crs, declared.crs):
        raise GridMismatchError(f"{where}: the file's CRS differs from the item's ({found})")
    expected = declared.transform
    if tuple(shape) != tuple(declared.shape):
        rows, cols = declared.shape
        if own:
            raise GridMismatchError(f"{where}: the file's size differs from the asset's proj:shape ({found})")
        if crs is not None:
            # a georeferenced file of the same extent at another resolution
            scaled = expected @ Affine.scale(cols / shape[1], rows / shape[0])
            if _agrees(scaled, shape, transform):
                return scaled, None
            raise GridMismatchError(f"{where}: the file does not cover the item's grid ({found})")
        if rows % shape[0] or cols % shape[1]:
            raise GridMismatchError(
                f"{where}: the file's size does not divide the item's grid ({found})"
            )
        expected = expected @ Affine.scale(cols / shape[1], rows / shape[0])
    if _agrees(expected, shape, transform):
        return expected, None
    if crs is None:
        return expected, (
            f"{where}: the file states no CRS and its transform disagrees with the item; "
            f"reading it on the item's grid ({found})"
        )
    raise GridMismatchError(f"{where}: the file's georeferencing is off the item's grid ({found})")
