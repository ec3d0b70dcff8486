"""Time stacks: the same chip of the same grid over time, as ``(T, C, H, W)``.

Chips *share a grid* when their items have the same CRS, transform and shape
(e.g. one MGRS tile of Sentinel-2 over a season) and they sit at the same chip
position with the same chip size; such chips cover exactly the same pixels.
:func:`build_stacks` groups index rows that way (reading each item's
projection once; ``grid="tile"`` groups by the tile parsed from the item id
instead, without reading items) and picks members with a rule:

* ``"all"``: every date, in time order;
* ``"least_cloudy"``: per period (``"month"``, ``"season"`` (DJF, MAM, JJA,
  SON), ``"year"``, ``N`` days counted from 1970-01-01, or explicit
  ``[(start, end), ...]`` ranges) the chip with the lowest cloud fraction
  (then nodata, then earliest);
* ``"first_middle_last"``: the first, middle and last dates (three members,
  as in the crop-type pipeline);
* ``"evenly"``: ``length`` dates evenly spaced from first to last.

Stacks with fewer than ``min_length`` members are dropped. Members are always
in ascending time order. :class:`TimeStackDataset` reads them through a
:class:`~stacchip.ml.dataset.ChipDataset`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stacchip.errors import ConfigError, IndexFileError
from stacchip.ml.items import ItemSource
from stacchip.ml.splits import tile_of
from stacchip.projection import item_grid

RULES = ("all", "least_cloudy", "first_middle_last", "evenly")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class TimeStack:
    """One stack: the grid/position key and its members' row numbers in time order."""

    key: str
    rows: tuple[int, ...]
    timestamps: tuple[int, ...]  # microseconds since the epoch, UTC

    @property
    def datetimes(self) -> list[dt.datetime]:
        """Member datetimes (UTC), ascending."""
        return [_EPOCH + dt.timedelta(microseconds=t) for t in self.timestamps]

    def __len__(self) -> int:
        return len(self.rows)


def grid_keys(
    table: pa.Table, items: ItemSource | None = None, grid: str = "items",
) -> np.ndarray:
    """Per-row key ``"{grid}|{chip_size}|{x}|{y}"`` of chips covering the same pixels."""
    item_ids = table.column("item_id").to_pylist()
    platforms = table.column("platform").to_pylist()
    per_item: dict[str, str] = {}
    for item_id, platform in zip(item_ids, platforms, strict=False):
        if item_id in per_item:
            continue
        if grid == "items":
            if items is None:
                raise ConfigError("grid='items' needs an ItemSource (root= or items=)")
            g = item_grid(items.get(platform, item_id))
            t = g.transform
            per_item[item_id] = (
                f"{g.crs.to_string()}|{t.a:.6f},{t.b:.6f},{t.c:.4f},{t.d:.6f},{t.e:.6f},{t.f:.4f}|"
                f"{g.shape[0]}x{g.shape[1]}"
            )
        elif grid == "tile":
            per_item[item_id] = f"{platform}|{tile_of(item_id)}"
        else:
            raise ConfigError(f"grid must be 'items' or 'tile', got {grid!r}")
    size = table.column("chip_size").to_numpy()
    xs = table.column("chip_index_x").to_numpy()
    ys = table.column("chip_index_y").to_numpy()
    return np.array(
        [f"{per_item[i]}|{s}|{x}|{y}" for i, s, x, y in zip(item_ids, size, xs, ys, strict=False)], dtype=object
    )


def _period_of(period: Any) -> Callable[[dt.datetime], Any]:
    if period == "month":
        return lambda d: (d.year, d.month)
    if period == "year":
        return lambda d: d.year
    if period == "season":
        # Meteorological seasons; December counts with the following year's winter.
        return lambda d: (d.year + (1 if d.month == 12 else 0), (d.month % 12) // 3)
    if isinstance(period, (int, float)) and not isinstance(period, bool) and period > 0:
        days = float(period)
        return lambda d: int((d - _EPOCH).total_seconds() // (days * 86400))
    if isinstance(period, dt.timedelta) and period.total_seconds() > 0:
        secs = period.total_seconds()
        return lambda d: int((d - _EPOCH).total_seconds() // secs)
    if isinstance(period, Sequence) and not isinstance(period, str) and period:
        ranges = [(_as_dt(a), _as_dt(b)) for a, b in period]

        def which(d: dt.datetime) -> Any:
            for k, (a, b) in enumerate(ranges):
                if a <= d <= b:
                    return k
            return None

        return which
    raise ConfigError(
        f"period must be 'month', 'season', 'year', a number of days, a timedelta "
        f"or a list of (start, end) ranges; got {period!r}"
    )


def _as_dt(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value


def select(
    ts: np.ndarray, cloud: np.ndarray, nodata: np.ndarray, rule: str,
    period: Any = None, length: int | None = None,
) -> np.ndarray:
    """Positions (into the given arrays) a rule keeps, in ascending time."""
    order = np.lexsort((nodata, cloud, ts))  # by time, ties: less cloud, less nodata
    if rule == "all":
        return order
    if rule == "first_middle_last":
        if len(order) < 3:
            return order[:0]
        return order[[0, (len(order) - 1) // 2, len(order) - 1]]
    if rule == "evenly":
        if length is None or length < 1:
            raise ConfigError("rule 'evenly' needs length >= 1")
        if len(order) < length:
            return order[:0]
        picks = np.unique(np.round(np.linspace(0, len(order) - 1, length)).astype(int))
        return order[picks]
    if rule == "least_cloudy":
        if period is None:
            raise ConfigError("rule 'least_cloudy' needs a period")
        which = _period_of(period)
        best: dict[Any, int] = {}
        for k in order:
            p = which(_EPOCH + dt.timedelta(microseconds=int(ts[k])))
            if p is None:
                continue
            cur = best.get(p)
            if cur is None or (cloud[k], nodata[k], ts[k]) < (cloud[cur], nodata[cur], ts[cur]):
                best[p] = int(k)
        chosen = np.array(sorted(best.values(), key=lambda k: (ts[k], k)), dtype=np.int64)
        return chosen
    raise ConfigError(f"unknown stack rule {rule!r}; choose one of {', '.join(RULES)}")


def build_stacks(
    table: pa.Table,
    items: ItemSource | None = None,
    *,
    rule: str = "all",
    period: Any = None,
    length: int | None = None,
    min_length: int = 1,
    grid: str = "items",
) -> list[TimeStack]:
    """Time stacks over the rows of an index table (see the module docs).

    Row numbers refer to ``table``. Stacks are sorted by key.
    """
    for col in ("item_id", "platform", "chip_index_x", "chip_index_y", "chip_size", "datetime",
                "cloud_cover_percentage", "nodata_percentage"):
        if col not in table.column_names:
            raise IndexFileError(f"index lacks column {col!r}")
    if rule not in RULES:
        raise ConfigError(f"unknown stack rule {rule!r}; choose one of {', '.join(RULES)}")
    if table.num_rows == 0:
        return []
    keys = grid_keys(table, items, grid)
    ts = pc.cast(pc.cast(table.column("datetime"), pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy()
    cloud = table.column("cloud_cover_percentage").to_numpy().astype(np.float64)
    nodata = table.column("nodata_percentage").to_numpy().astype(np.float64)
    uniq, inverse = np.unique(keys.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    cuts = np.flatnonzero(np.diff(inverse[order])) + 1
    stacks: list[TimeStack] = []
    for key, rows in zip(uniq, np.split(order, cuts), strict=False):
        picked = rows[select(ts[rows], cloud[rows], nodata[rows], rule, period, length)]
        if len(picked) < max(min_length, 1):
            continue
        stacks.append(TimeStack(str(key), tuple(int(r) for r in picked), tuple(int(ts[r]) for r in picked)))
    return stacks


class TimeStackDataset:
    """Map-style dataset of time stacks read through a ``ChipDataset``.

    Stack rows refer to ``dataset`` rows (built from ``dataset.table``). A sample
    holds ``pixels`` ``(T, C, H, W)``, ``timestamps`` ``(T,)`` int64 µs UTC,
    ``datetimes`` (T ISO strings), ``chipids``, ``item_ids``, ``cloud``,
    ``nodata`` ``(T,)``, ``bounds`` (degrees), ``chip_index`` ``[x, y]``,
    ``key`` and, with labels, ``target``: ``(T, H, W)`` for a label asset of
    the items, ``(H, W)`` for an external label raster (static in time).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        rule: str = "all",
        period: Any = None,
        length: int | None = None,
        min_length: int = 1,
        grid: str = "items",
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.stacks = build_stacks(
            dataset.table, dataset.items, rule=rule, period=period, length=length,
            min_length=min_length, grid=grid,
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.stacks)

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"TimeStackDataset index {index} is outside 0..{n - 1}")
        stack = self.stacks[i]
        ds = self.dataset
        rows = list(stack.rows)
        pixels = np.stack([ds.normalize(ds.read_pixels(r), r) for r in rows])
        metas = [ds.metadata(r) for r in rows]
        sample: dict[str, Any] = {
            "key": stack.key,
            "pixels": pixels,
            "timestamps": np.array(stack.timestamps, dtype=np.int64),
            "datetimes": [m["datetime"] for m in metas],
            "chipids": [m["chipid"] for m in metas],
            "item_ids": [m["item_id"] for m in metas],
            "cloud": np.array([m["cloud"] for m in metas]),
            "nodata": np.array([m["nodata"] for m in metas]),
            "bounds": metas[0]["bounds"],
            "chip_index": metas[0]["chip_index"],
        }
        if ds.label_asset is not None:
            sample["target"] = np.stack([ds.read_target(r) for r in rows])
        elif ds.label_raster is not None:
            sample["target"] = ds.read_target(rows[0])
        if self.transform is not None:
            return self.transform(sample)
        return sample
