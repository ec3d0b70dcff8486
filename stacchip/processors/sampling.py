"""What a task samples: its row of the sample file, its years and its seasons.

* :func:`read_samples` reads a vector file (FlatGeobuf, GeoJSON, GeoPackage,
  ...) from a local path, ``s3://`` or ``http(s)://`` URL into a GeoDataFrame
  in degrees (EPSG:4326), once per process.
* :func:`sample_row` returns row ``index`` with a clear error when it is out of
  range or the file lacks a needed column.
* :func:`pick_years` draws years reproducibly from the task index.
* :func:`periods` turns years and seasons into STAC datetime intervals
  (``start/end`` with full-day timestamps, both ends inclusive).
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import io
import logging
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from stacchip import storage
from stacchip.errors import ConfigError, DatetimeError, StorageError

logger = logging.getLogger(__name__)

#: Seasons by name: calendar quarters (upstream's "quartals") and meteorological seasons.
NAMED_SEASONS: dict[str, tuple[str, str]] = {
    "q1": ("01-01", "03-31"),
    "q2": ("04-01", "06-30"),
    "q3": ("07-01", "09-30"),
    "q4": ("10-01", "12-31"),
    "djf": ("12-01", "02-28"),
    "mam": ("03-01", "05-31"),
    "jja": ("06-01", "08-31"),
    "son": ("09-01", "11-30"),
}
QUARTERS: tuple[str, ...] = ("q1", "q2", "q3", "q4")


@functools.lru_cache(maxsize=4)
def read_samples(source: str) -> Any:
    """The sample file at ``source`` as a GeoDataFrame in EPSG:4326 (cached per process).

    Raises :class:`ConfigError` naming the file when it cannot be read, is not
    a vector layer, or is empty.
    """
    import geopandas as gpd

    try:
        data = storage.read_bytes_retry(source)
    except StorageError as exc:
        raise ConfigError(f"sample file {source!r} cannot be read: {exc}") from exc
    try:
        frame = gpd.read_file(io.BytesIO(data))
    except Exception as exc:  # pyogrio raises its own DataSourceError and friends
        raise ConfigError(f"sample file {source!r} is not a readable vector file: {exc}") from exc
    if len(frame) == 0:
        raise ConfigError(f"sample file {source!r} has no rows")
    if frame.crs is None:
        logger.warning("sample file %s has no CRS; assuming EPSG:4326 (degrees)", source)
        frame = frame.set_crs("EPSG:4326")
    elif not frame.crs.equals("EPSG:4326"):
        frame = frame.to_crs("EPSG:4326")
    if frame.geometry.isna().any() or frame.geometry.is_empty.any():
        bad = [int(i) for i in frame.index[frame.geometry.isna() | frame.geometry.is_empty][:5]]
        raise ConfigError(f"sample file {source!r}: rows {bad} have no geometry")
    return frame


def sample_row(source: str, index: int, columns: Sequence[str] = ()) -> Any:
    """Row ``index`` (0-based, file order) of the sample file; checks ``columns`` exist."""
    frame = read_samples(source)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(
            f"sample file {source!r} lacks column(s) {', '.join(missing)}; "
            f"it has {', '.join(map(str, frame.columns))}"
        )
    if not 0 <= index < len(frame):
        raise ConfigError(f"task index {index} is beyond sample file {source!r} with {len(frame)} rows")
    return frame.iloc[index]


def pick_years(years: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` distinct years drawn from ``years`` with a generator seeded by ``seed``."""
    pool = sorted(set(int(y) for y in years))
    if count < 1:
        raise ConfigError(f"number of years to sample must be >= 1, got {count}")
    if count > len(pool):
        raise ConfigError(f"cannot sample {count} distinct years from {pool}")
    return random.Random(seed).sample(pool, count)


@dataclass(frozen=True)
class Period:
    """A named time range: ``interval`` is the STAC ``start/end`` string (inclusive)."""

    name: str
    start: dt.datetime
    end: dt.datetime

    @property
    def interval(self) -> str:
        """``YYYY-MM-DDT00:00:00Z/YYYY-MM-DDT23:59:59.999999Z``: every scene of the last day included."""
        return f"{_iso(self.start)}/{_iso(self.end)}"


def _iso(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _month_day(text: str, what: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,2})-(\d{1,2})", text.strip())
    if not match:
        raise ConfigError(f"season {what!r}: {text!r} is not MM-DD")
    month, day = int(match.group(1)), int(match.group(2))
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise ConfigError(f"season {what!r}: {text!r} is not a valid MM-DD")
    return month, day


def season_bounds(season: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((month, day), (month, day))`` of a named season or ``MM-DD/MM-DD``."""
    key = season.strip().lower()
    if key in NAMED_SEASONS:
        start, end = NAMED_SEASONS[key]
    elif "/" in key:
        start, end = key.split("/", 1)
    else:
        raise ConfigError(
            f"unknown season {season!r}: use {', '.join(NAMED_SEASONS)} or MM-DD/MM-DD"
        )
    return _month_day(start, season), _month_day(end, season)


def _day(year: int, month: int, day: int) -> dt.date:
    return dt.date(year, month, min(day, calendar.monthrange(year, month)[1]))


def period(year: int, season: str) -> Period:
    """The period of ``season`` in ``year``; a season that wraps (``12-01/02-28``) ends next year."""
    (m0, d0), (m1, d1) = season_bounds(season)
    start = _day(year, m0, d0)
    end_year = year + 1 if (m1, d1) < (m0, d0) else year
    end = _day(end_year, m1, d1)
    if (m1, d1) == (2, 28) and calendar.isleap(end_year):
        end = dt.date(end_year, 2, 29)
    return Period(
        f"{year}-{season}",
        dt.datetime.combine(start, dt.time.min),
        dt.datetime.combine(end, dt.time.max),
    )


def periods(years: Sequence[int], seasons: Sequence[str]) -> list[Period]:
    """Every season of every year, in order."""
    return [period(year, season) for year in years for season in seasons]


def month_period(year: int, month: int) -> Period:
    """The calendar month ``month`` of ``year`` (both ends inclusive)."""
    if not 1 <= month <= 12:
        raise ConfigError(f"month {month} is not 1-12")
    last = calendar.monthrange(year, month)[1]
    return Period(
        f"{year}-{month:02d}",
        dt.datetime(year, month, 1),
        dt.datetime.combine(dt.date(year, month, last), dt.time.max),
    )


def parse_datetime(value: str) -> dt.datetime:
    """An ISO 8601 timestamp (``Z`` or offset, any number of fractional digits) as aware UTC."""
    text = str(value).strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    match = re.match(r"^(.*T\d{2}:\d{2}:\d{2})\.(\d+)(.*)$", text)
    if match:  # Python < 3.11 style: normalise fractional seconds to 6 digits
        text = f"{match.group(1)}.{match.group(2)[:6].ljust(6, '0')}{match.group(3)}"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise DatetimeError(f"{value!r} is not an ISO 8601 timestamp") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)
