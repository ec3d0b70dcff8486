"""Chip grid math: pure, vectorised, no I/O; and :class:`ChipGrid`, the chip grid of one item.

A chip grid cuts the finest-resolution grid of an item into square chips of
``chip_size`` pixels. Chip ``(x, y)`` covers fine pixels
``rows y*chip_size .. (y+1)*chip_size`` and ``cols x*chip_size .. (x+1)*chip_size``.
Partial chips at the right and bottom edges are dropped (upstream's rule).

Other assets are aligned by nearest neighbour: fine pixel ``(r, c)`` takes the
asset pixel that contains the fine pixel's centre, with pixel boundaries
belonging to the pixel to their right/below (half-open intervals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyproj
import shapely
from affine import Affine

from stacchip.errors import ChipOutOfRangeError, ConfigError

if TYPE_CHECKING:
    from stacchip.projection import Grid

# A fine pixel centre that lies within this many asset pixels of an asset pixel
# boundary is treated as lying exactly on it: guards floor() against float
# round-off (e.g. 0.9999999999 for an exact 1) without moving real positions.
BOUNDARY_TOLERANCE = 1e-9

LONLAT = pyproj.CRS.from_user_input("OGC:CRS84")


EDGE_RULES = ("drop", "keep")


def chip_counts(shape: tuple[int, int], chip_size: int, edge: str = "drop") -> tuple[int, int]:
    """Number of chips ``(x_size, y_size)`` in a ``(rows, cols)`` grid.

    ``edge="drop"`` (upstream's rule) counts whole chips only; ``edge="keep"``
    also counts the partial chips at the right and bottom edges (their pixels
    beyond the grid are nodata).
    """
    rows, cols, size = int(shape[0]), int(shape[1]), int(chip_size)
    if edge == "keep":
        return -(-cols // size), -(-rows // size)
    return cols // size, rows // size


def check_chip_size(chip_size: Any, what: str = "") -> int:
    """``chip_size`` as a positive int of pixels, else :class:`ConfigError` (``what`` names the item)."""
    if isinstance(chip_size, bool) or not isinstance(chip_size, (int, np.integer)) or chip_size <= 0:
        raise ConfigError(f"{what}chip_size must be a positive integer, got {chip_size!r}")
    return int(chip_size)


def check_edge(edge: str) -> str:
    """``edge`` if it is one of :data:`EDGE_RULES`, else :class:`ConfigError`."""
    if edge not in EDGE_RULES:
        raise ConfigError(f"edge must be one of {EDGE_RULES}, got {edge!r}")
    return edge


@dataclass(frozen=True, eq=False)
class ChipGrid:
    """The chip grid of one item: all a :class:`~stacchip.chipper.Chipper` needs to read chips.

    ``item`` is the :class:`pystac.Item`, ``grid`` its finest grid
    (:class:`stacchip.projection.Grid`), ``chip_size`` in pixels of that grid,
    ``edge`` ``"drop"`` (whole chips only, upstream's rule) or ``"keep"`` (also
    the partial chips at the right and bottom edges). A value: no statistics,
    no I/O. Build one with :meth:`of`; every indexer gives its own as
    ``indexer.chip_grid``.
    """

    item: Any
    grid: Grid
    chip_size: int
    edge: str = "drop"

    @classmethod
    def of(
        cls, item: Any, chip_size: int = 256, *, edge: str = "drop", shape: Sequence[int] | None = None
    ) -> ChipGrid:
        """The chip grid of ``item`` (a :class:`pystac.Item` or STAC dict) from its projection
        metadata (:func:`stacchip.projection.item_grid`; ``shape`` overrides ``(rows, cols)``)."""
        from stacchip.items import as_item
        from stacchip.projection import item_grid

        item = as_item(item)
        size = check_chip_size(chip_size, f"item {item.id!r}: ")
        return cls(item, item_grid(item, shape), size, check_edge(edge))

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the finest grid, in pixels."""
        return int(self.grid.shape[0]), int(self.grid.shape[1])

    @property
    def affine(self) -> Affine:
        """The finest grid's transform (metres)."""
        return self.grid.transform

    @property
    def x_size(self) -> int:
        """Number of chips in x (whole chips only unless ``edge="keep"``)."""
        return chip_counts(self.grid.shape, self.chip_size, self.edge)[0]

    @property
    def y_size(self) -> int:
        """Number of chips in y (whole chips only unless ``edge="keep"``)."""
        return chip_counts(self.grid.shape, self.chip_size, self.edge)[1]

    @property
    def size(self) -> int:
        """Number of chips in the grid."""
        return self.x_size * self.y_size

    @property
    def kept_chips(self) -> tuple[np.ndarray, np.ndarray]:
        """``(xs, ys)`` of every chip, in row order (a grid keeps them all; an indexer's
        ``kept_chips`` leaves out the chips its nodata filter drops)."""
        return chip_positions(self.x_size, self.y_size)

    def check_chip(self, x: int, y: int) -> None:
        """Raise :class:`ChipOutOfRangeError` unless chip ``(x, y)`` is on the grid."""
        if not (0 <= int(x) < self.x_size and 0 <= int(y) < self.y_size):
            raise ChipOutOfRangeError(
                f"item {self.item.id!r}: chip ({x}, {y}) is outside the "
                f"{self.x_size} x {self.y_size} chip grid"
            )


def as_chip_grid(source: Any) -> ChipGrid:
    """The :class:`ChipGrid` of ``source``: a grid itself, an indexer's ``chip_grid``, or
    the grid attributes (``item``, ``grid``, ``chip_size``, ``edge``) of an indexer-like
    object; else :class:`ConfigError`."""
    if isinstance(source, ChipGrid):
        return source
    grid = getattr(source, "chip_grid", None)
    if isinstance(grid, ChipGrid):
        return grid
    try:
        return ChipGrid(source.item, source.grid, int(source.chip_size), getattr(source, "edge", "drop"))
    except AttributeError:
        raise ConfigError(f"expected a ChipGrid or an indexer, got {type(source).__name__}") from None


def chip_positions(x_size: int, y_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Chip indices ``(xs, ys)`` of every chip in row order (y outer, x inner)."""
    ys, xs = np.divmod(np.arange(x_size * y_size, dtype=np.int64), max(x_size, 1))
    return xs, ys


def chip_bounds(
    transform: Affine, xs: np.ndarray, ys: np.ndarray, chip_size: int
) -> np.ndarray:
    """``(N, 4)`` array of chip ``minx, miny, maxx, maxy`` in CRS units."""
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    step_x = transform.a * chip_size
    step_y = transform.e * chip_size
    x0 = transform.c + xs * step_x
    x1 = transform.c + (xs + 1) * step_x
    y0 = transform.f + ys * step_y
    y1 = transform.f + (ys + 1) * step_y
    return np.column_stack(
        [np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1)]
    )


def lonlat_transformer(crs: pyproj.CRS) -> pyproj.Transformer:
    """Transformer from ``crs`` to longitude/latitude (OGC:CRS84, x=lon)."""
    return pyproj.Transformer.from_crs(crs, LONLAT, always_xy=True)


def reproject_geometries(geoms: np.ndarray, transformer: pyproj.Transformer) -> np.ndarray:
    """Reproject an array of shapely geometries in one call."""

    def _apply(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(np.asarray(geoms, dtype=object), _apply)


def chip_polygons_lonlat(bounds: np.ndarray, crs: pyproj.CRS) -> np.ndarray:
    """Every chip polygon (from ``chip_bounds``) in lon/lat, in one call.

    Each polygon is the chip's four corners reprojected, in shapely's
    counter-clockwise ``box`` order starting at ``(maxx, miny)``.
    """
    n = len(bounds)
    minx, miny, maxx, maxy = bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3]
    xs = np.column_stack([maxx, maxx, minx, minx, maxx]).ravel()
    ys = np.column_stack([miny, maxy, maxy, miny, miny]).ravel()
    lon, lat = lonlat_transformer(crs).transform(xs, ys)
    coords = np.stack([np.asarray(lon), np.asarray(lat)], axis=-1).reshape(n, 5, 2)
    return shapely.polygons(coords)


def axis_map(
    fine_origin: float,
    fine_step: float,
    asset_origin: float,
    asset_step: float,
    start: int | np.ndarray,
    count: int,
) -> np.ndarray:
    """Asset pixel index holding each fine pixel centre along one axis.

    For fine pixels ``start .. start+count`` (``start`` may be an array, giving
    one row per start), returns ``floor((fine centre - asset origin) / asset step)``.
    Steps carry their sign (negative for y), so indices grow with the pixel index.
    """
    start = np.asarray(start, dtype=np.float64)
    offsets = np.arange(count, dtype=np.float64) + 0.5
    centres = np.add.outer(start, offsets) * fine_step + (fine_origin - asset_origin)
    pos = centres / asset_step
    return np.floor(pos + BOUNDARY_TOLERANCE).astype(np.int64)


def chip_asset_indices(
    fine: Affine, asset: Affine, x: int, y: int, chip_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Asset ``(rows, cols)`` index vectors for chip ``(x, y)``.

    ``asset_pixels[np.ix_(rows, cols)]`` is the chip resampled by nearest neighbour
    onto the fine grid. Indices may fall outside the asset (callers pad).
    """
    rows = axis_map(fine.f, fine.e, asset.f, asset.e, y * chip_size, chip_size)
    cols = axis_map(fine.c, fine.a, asset.c, asset.a, x * chip_size, chip_size)
    return rows, cols


def reduction_weights(
    fine_origin: float,
    fine_step: float,
    asset_origin: float,
    asset_step: float,
    n_chips: int,
    chip_size: int,
    asset_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chip counts of fine pixels falling in each asset pixel, along one axis.

    Returns ``(weights, outside)``: ``weights`` is ``(n_chips, asset_len)`` float64
    where ``weights[i, k]`` is how many fine pixels of chip ``i`` take asset pixel
    ``k``; ``outside[i]`` counts the chip's fine pixels that fall outside the asset.
    A 2-D chip count is then ``Wy @ mask @ Wx.T`` (separable nearest neighbour).
    """
    idx = axis_map(
        fine_origin, fine_step, asset_origin, asset_step,
        np.arange(n_chips) * chip_size, chip_size,
    )
    inside = (idx >= 0) & (idx < asset_len)
    outside = (~inside).sum(axis=1).astype(np.float64)
    weights = np.zeros((n_chips, max(asset_len, 0)), dtype=np.float64)
    chip_of = np.broadcast_to(np.arange(n_chips)[:, None], idx.shape)
    np.add.at(weights, (chip_of[inside], idx[inside]), 1.0)
    return weights, outside
