"""The filters that select index rows, declared once, checked once, and evaluated without
``pyarrow.dataset``.

:class:`QueryFilters` names them (``bbox``, ``start``, ``end``, ``max_cloud``, ``max_nodata``,
``platform``, ``item_id``); :meth:`Selection.of` checks their values (a bad value raises
:class:`~stacchip.errors.ConfigError` naming the filter, before anything is read) and then:

* :meth:`Selection.may_hold` tells from recorded extents (a manifest's partitions, files and
  row groups, or a file's row-group statistics) whether rows passing the filters can be
  there -- conservatively: time ranges are widened by :data:`TIME_MARGIN`, limits by the
  float32 rounding of the columns;
* :meth:`Selection.mask` evaluates them on an Arrow table with ``pyarrow.compute`` kernels
  (``bbox`` on the ``bbox`` covering column: chips whose box meets the query box);
* :meth:`Selection.exact` keeps, of those, the chips whose polygon intersects the query
  area (shapely, imported only then).

Units: ``bbox`` in degrees (``minx > maxx`` crosses the antimeridian), cloud and nodata
limits fractions 0-1, times ISO 8601 strings, dates or datetimes (naive meaning UTC).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
import pyarrow as pa

from stacchip.errors import ConfigError
from stacchip.schema import GEOMETRY_COLUMN, bool_array, cast, compute, compute_options, scalar, string_array

#: Time pruning on recorded extents widens the asked range by this much on both sides, so
#: a reader never skips rows over how a bare date or a time zone is understood.
TIME_MARGIN = dt.timedelta(days=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class QueryFilters(TypedDict, total=False):
    """The filters that select index rows, declared once: those of :func:`stacchip.index.query`,
    also taken by :func:`stacchip.ml.load_index`, :class:`~stacchip.ml.ChipDataset` and the
    compacted-index planner (:func:`stacchip.compacted.plan`). Each is optional; ``None``
    is no filter.

    ``bbox``: ``(minx, miny, maxx, maxy)`` in degrees, chips intersecting it
    (``minx > maxx`` crosses the antimeridian). ``start``/``end``: inclusive
    bounds of ``datetime`` (ISO strings, dates or datetimes, naive meaning UTC;
    a date ``end`` includes that whole UTC day). ``max_cloud``/``max_nodata``:
    largest cloud and nodata fractions, 0-1. ``platform``: names of platforms,
    any alias (:func:`stacchip.platforms.platform_aliases`). ``item_id``: item ids.
    """

    bbox: Sequence[float] | None
    start: Any
    end: Any
    max_cloud: float | None
    max_nodata: float | None
    platform: str | Sequence[str] | None
    item_id: str | Sequence[str] | None


#: Names of the :class:`QueryFilters`.
FILTERS: tuple[str, ...] = tuple(QueryFilters.__annotations__)


def check_filters(filters: Mapping[str, Any], where: str = "query") -> dict[str, Any]:
    """The filters of ``filters`` that are set (not None); a name that is no filter raises
    ``TypeError`` as an unknown keyword argument of ``where`` would."""
    unknown = [name for name in filters if name not in FILTERS]
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r} "
                        f"(filters: {', '.join(FILTERS)})")
    return {name: value for name, value in filters.items() if value is not None}


def fraction_problem(number: float) -> str | None:
    """Why ``number`` is not a fraction 0-1 (cloud and nodata limits), or None when it is one.
    A number that looks like a percentage (above 1, at most 100) is told so."""
    if math.isfinite(number) and 1.0 < number <= 100.0:
        return f"looks like a percentage; it is a fraction between 0 and 1 (write {number / 100:g} for {number:g} %)"
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        return "is not a fraction between 0 and 1"
    return None


def check_fraction(value: Any, field: str) -> float:
    """``value`` as a fraction 0-1, else :class:`ConfigError` naming ``field`` (see :func:`fraction_problem`)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field} = {value!r} is not a fraction (0-1)") from exc
    problem = fraction_problem(number)
    if problem:
        raise ConfigError(f"{field} = {value!r} {problem}")
    return number


def as_when(value: Any, field: str) -> dt.datetime | dt.date:
    """A datetime, or a date for a whole day (date objects, ``YYYY-MM-DD``); else
    :class:`ConfigError` naming ``field``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return dt.date.fromisoformat(text)
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"{field} = {value!r} is not an ISO 8601 date or datetime") from exc
    if isinstance(value, dt.date):
        return value
    raise ConfigError(f"{field} = {value!r} is not a date, datetime or ISO 8601 string")


def micros(value: dt.datetime | dt.date) -> int:
    """Microseconds since the epoch (UTC) of a datetime (naive meaning UTC) or of a date's midnight."""
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_time(text: str) -> dt.datetime:
    """Aware UTC datetime of an ISO 8601 string (``Z``, offsets, or naive meaning UTC)."""
    when = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00").replace("z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _strings(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


@dataclass(frozen=True)
class Selection:
    """Checked filters, ready to prune extents and to mask rows (see the module docstring).

    ``boxes``: longitude ranges ``(x0, x1)`` of the query box (two across the antimeridian),
    ``miny``/``maxy`` its latitudes; ``first``/``last``: inclusive bounds of ``datetime`` in
    microseconds since the epoch; ``max_cloud``/``max_nodata`` float32 limits;
    ``platforms``: every alias of the platforms asked; ``item_ids``.
    """

    boxes: tuple[tuple[float, float], ...] | None = None
    miny: float = -90.0
    maxy: float = 90.0
    first: int | None = None
    last: int | None = None
    max_cloud: float | None = None
    max_nodata: float | None = None
    platforms: frozenset[str] | None = None
    item_ids: frozenset[str] | None = None

    @classmethod
    def of(cls, filters: Mapping[str, Any], where: str = "query") -> Selection:
        """The selection of ``filters`` (:class:`QueryFilters`), every value checked."""
        active = check_filters(filters, where)
        kw: dict[str, Any] = {}
        if "bbox" in active:
            bbox = active["bbox"]
            try:
                minx, miny, maxx, maxy = (float(v) for v in bbox)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bbox = {bbox!r} is not (minx, miny, maxx, maxy) in degrees") from exc
            if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
                raise ConfigError(f"bbox = {bbox!r} holds a value that is not a finite number")
            if miny > maxy:
                raise ConfigError(f"bbox = {bbox!r} has miny above maxy")
            kw["boxes"] = ((minx, maxx),) if minx <= maxx else ((minx, 180.0), (-180.0, maxx))
            kw["miny"], kw["maxy"] = miny, maxy
        if "start" in active:
            kw["first"] = micros(as_when(active["start"], "start"))
        if "end" in active:
            last = as_when(active["end"], "end")
            if isinstance(last, dt.datetime):
                kw["last"] = micros(last)
            else:  # a date ends with its last instant (UTC)
                kw["last"] = micros(last + dt.timedelta(days=1)) - 1
        # Limits compared in the columns' float32: float32(0.05) > 0.05, so a float64
        # comparison would drop a chip stored at exactly the limit; 20 for 20 % is refused.
        for name in ("max_cloud", "max_nodata"):
            if name in active:
                kw[name] = float(np.float32(check_fraction(active[name], name)))
        if "platform" in active:
            from stacchip.platforms import platform_aliases

            kw["platforms"] = frozenset(a for name in _strings(active["platform"]) for a in platform_aliases(name))
        if "item_id" in active:
            kw["item_ids"] = frozenset(_strings(active["item_id"]))
        return cls(**kw)

    @property
    def empty(self) -> bool:
        """True when no filter is set (every row passes)."""
        return self == Selection()

    def columns(self) -> list[str]:
        """The columns :meth:`mask` reads."""
        out = []
        if self.boxes is not None:
            out.append("bbox")
        if self.first is not None or self.last is not None:
            out.append("datetime")
        if self.max_cloud is not None:
            out.append("cloud_cover_percentage")
        if self.max_nodata is not None:
            out.append("nodata_percentage")
        if self.platforms is not None:
            out.append("platform")
        if self.item_ids is not None:
            out.append("item_id")
        return out

    # --- extents --------------------------------------------------------------------------

    def may_hold(
        self,
        bbox: Sequence[float] | None = None,
        when: Sequence[str] | Sequence[int] | None = None,
        cloud: Sequence[float] | None = None,
        nodata: Sequence[float] | None = None,
    ) -> bool:
        """False only when extents prove no row can pass: ``bbox`` ``[xmin, ymin, xmax, ymax]``
        of the rows' boxes, ``when`` ``[first, last]`` (ISO strings or microseconds),
        ``cloud``/``nodata`` ``[min, max]``. A missing extent proves nothing."""
        if self.boxes is not None and bbox:
            x0, y0, x1, y1 = (float(v) for v in bbox)
            if y0 > self.maxy or y1 < self.miny:
                return False
            if not any(x0 <= bx1 and x1 >= bx0 for bx0, bx1 in self.boxes):
                return False
        if (self.first is not None or self.last is not None) and when:
            lo, hi = (v if isinstance(v, (int, np.integer)) else micros(parse_time(str(v))) for v in when)
            margin = int(TIME_MARGIN.total_seconds()) * 1_000_000
            if self.first is not None and hi < self.first - margin:
                return False
            if self.last is not None and lo > self.last + margin:
                return False
        for limit, extent in ((self.max_cloud, cloud), (self.max_nodata, nodata)):
            if limit is not None and extent and float(extent[0]) > limit + 1e-6:
                return False
        return True

    # --- rows -----------------------------------------------------------------------------

    def mask(self, table: pa.Table) -> pa.Array | None:
        """Boolean mask of the rows of ``table`` passing every filter but the exact geometry
        test (``bbox`` on the covering column); None when no filter is set. Nulls fail."""
        parts: list[Any] = []

        def le(a: Any, b: Any) -> Any:
            return compute("less_equal", a, b)

        def ge(a: Any, b: Any) -> Any:
            return compute("greater_equal", a, b)

        if self.boxes is not None:
            box = table.column("bbox")
            xmin, ymin, xmax, ymax = (compute("struct_field", box, options=compute_options("StructFieldOptions", [i]))
                                      for i in range(4))
            f64 = pa.float64()
            in_x = [compute("and", le(xmin, scalar(x1, f64)), ge(xmax, scalar(x0, f64))) for x0, x1 in self.boxes]
            parts.append(in_x[0] if len(in_x) == 1 else compute("or", in_x[0], in_x[1]))
            parts.append(le(ymin, scalar(self.maxy, f64)))
            parts.append(ge(ymax, scalar(self.miny, f64)))
        if self.first is not None or self.last is not None:
            when = cast(table.column("datetime"), pa.int64())
            if self.first is not None:
                parts.append(ge(when, scalar(self.first, pa.int64())))
            if self.last is not None:
                parts.append(le(when, scalar(self.last, pa.int64())))
        for limit, column in ((self.max_cloud, "cloud_cover_percentage"), (self.max_nodata, "nodata_percentage")):
            if limit is not None:
                values = table.column(column)
                if values.type != pa.float32():
                    values = cast(values, pa.float32())
                parts.append(le(values, scalar(limit, pa.float32())))
        for wanted, column in ((self.platforms, "platform"), (self.item_ids, "item_id")):
            if wanted is not None:
                lookup = compute_options("SetLookupOptions", string_array(sorted(wanted)))
                parts.append(compute("is_in", table.column(column), options=lookup))
        if not parts:
            return None
        out = parts[0]
        for part in parts[1:]:
            out = compute("and", out, part)
        if isinstance(out, pa.ChunkedArray):
            out = out.combine_chunks() if out.num_chunks else bool_array(np.zeros(0, dtype=bool))
        return compute("coalesce", out, scalar(False, pa.bool_()))  # nulls fail

    def exact(self, table: pa.Table) -> pa.Table:
        """The rows of ``table`` whose geometry (WKB) intersects the query area; ``table``
        itself without a ``bbox`` filter."""
        if self.boxes is None or table.num_rows == 0:
            return table
        import shapely

        area = shapely.union_all([shapely.box(x0, self.miny, x1, self.maxy) for x0, x1 in self.boxes])
        column = table.column(GEOMETRY_COLUMN)
        if isinstance(column.type, pa.ExtensionType):
            column = pa.chunked_array([c.storage for c in column.chunks], column.type.storage_type)
        geoms = shapely.from_wkb(column.to_pylist())
        return compute("filter", table, bool_array(shapely.intersects(geoms, area)))
