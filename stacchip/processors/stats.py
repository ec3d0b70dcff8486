"""``stacchip-stats``: per-band statistics of a platform, mergeable across array jobs.

For every band: ``count`` (valid pixels), ``mean``, ``std`` (population, ddof 0),
``min``, ``max`` and, when asked, percentiles. Nodata pixels are excluded: a
cube's ``nodata_mask`` when present, else pixels equal to the platform's nodata
value (:mod:`stacchip.platforms`) or NaN.

Numerics: each batch of pixels is reduced in float64 with a two-pass mean and
sum of squared deviations (``M2``); batches and job results are combined with
Chan et al.'s parallel update (``n = na + nb``, ``d = mean_b - mean_a``,
``mean = mean_a + d * nb / n``, ``M2 = M2_a + M2_b + d^2 * na * nb / n``), so
partial results merge in any order to the one-pass answer up to float
round-off. Percentiles come from a fixed-edge histogram per band (exactly
mergeable: counts add); they are exact to one bin width, with values outside
the histogram range counted in under/overflow bins.

Sources: the cubes ``stacchip-prechip`` wrote (``--source cubes``, job ``j``
takes cube files ``j*cubes_per_job ..`` of the sorted listing; WebDataset shards
count as cubes where no npz is), or chips read
straight from the index and the scenes (``--source index``, job ``j`` takes
``chips_per_job`` chips of the same seeded shuffle prechip uses, read in this
process by prechip's runner: item by item in COG block order, tiles decoded on
every core, no process pool). For ``--source index`` the selection is prepared
once, as prechip's plan (:mod:`stacchip.export.plan`, one "cube" of
``chips_per_job`` chips per job): the first job to start reads the index and every
item's STAC JSON and writes the plan under ``{output}/stats/{platform}/``; the
other jobs read its summary and their own share only. A cube that is
not a whole npz (truncated, failing its zip CRC checks) is a
:class:`~stacchip.errors.ConfigError` naming the file (exit 2), not a traceback.

Outputs under ``{output}/stats/{platform}/``: ``partial_{job:05d}.json`` per
array job; the merge step (``--merge``, or automatically after ``--all``) writes
``stats.json`` and ``metadata.yaml`` in the layout of Clay's
``configs/metadata.yaml`` (``band_order``, ``rgb_indices``, ``gsd``,
``bands: {mean, std, wavelength}``).

An empty source (no cube files, an index selection with no chip) stops with
exit status 2 and says why, unless ``--allow-empty`` (``STACCHIP_ALLOW_EMPTY=1``).
A job index beyond the source's shares (an array larger than the work) has
nothing to do: it logs one warning line, writes nothing and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import math
import re
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from stacchip import storage
from stacchip.console import ArgumentParser, echo
from stacchip.errors import ConfigError, StorageError
from stacchip.export import selection as chip_selection
from stacchip.export import locality, shards
from stacchip.export import plan as plans
from stacchip.export.outputs import NPZ
from stacchip.export.chip_reader import close_open_items, item_reader
from stacchip.export.cube import VERSION
from stacchip.processors import jobs, settings
from stacchip.platforms import PlatformBands, is_nodata, platform_bands

logger = logging.getLogger(__name__)

#: Default number of histogram bins per band (when percentiles are asked for).
DEFAULT_BINS = 4096
#: Most histogram bins per band (each partial JSON holds bands x bins counts).
MAX_BINS = 1 << 20
#: Format version of the partial/merged JSON.
STATS_FORMAT = 1


class StatsAccumulator:
    """Running per-band count, mean, M2, min, max (and histogram), mergeable.

    ``bands`` names the channels; ``hist_range`` ``(lo, hi)`` with ``bins``
    enables a histogram of ``bins`` equal bins over ``[lo, hi)`` plus an
    underflow and an overflow bin.
    """

    def __init__(
        self,
        bands: Sequence[str],
        hist_range: tuple[float, float] | None = None,
        bins: int = DEFAULT_BINS,
    ) -> None:
        self.bands = list(bands)
        c = len(self.bands)
        self.count = np.zeros(c, dtype=np.int64)
        self.mean = np.zeros(c, dtype=np.float64)
        self.m2 = np.zeros(c, dtype=np.float64)
        self.min = np.full(c, np.inf)
        self.max = np.full(c, -np.inf)
        self.hist_range = None if hist_range is None else (float(hist_range[0]), float(hist_range[1]))
        self.bins = int(bins)
        if self.hist_range is not None:
            if not all(math.isfinite(v) for v in self.hist_range):
                raise ConfigError(f"histogram range {hist_range} is not finite")
            if not self.hist_range[1] > self.hist_range[0] or self.bins < 1:
                raise ConfigError(f"histogram range {hist_range} with {bins} bins is empty")
            self.hist: np.ndarray | None = np.zeros((c, self.bins + 2), dtype=np.int64)
        else:
            self.hist = None

    def _merge_band(self, b: int, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        if n == 0:
            return
        na = int(self.count[b])
        if na == 0:
            self.count[b], self.mean[b], self.m2[b] = n, mean, m2
        else:
            total = na + n
            delta = mean - self.mean[b]
            self.mean[b] = self.mean[b] + delta * n / total
            self.m2[b] = self.m2[b] + m2 + delta * delta * na * n / total
            self.count[b] = total
        self.min[b] = min(self.min[b], lo)
        self.max[b] = max(self.max[b], hi)

    def update(self, pixels: np.ndarray, nodata_mask: np.ndarray | None = None) -> None:
        """Add pixels ``(N, C, H, W)`` (or ``(C, H, W)``); ``nodata_mask`` True = excluded."""
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
            nodata_mask = None if nodata_mask is None else np.asarray(nodata_mask)[None]
        if pixels.ndim != 4 or pixels.shape[1] != len(self.bands):
            raise ConfigError(
                f"pixels of shape {pixels.shape} do not have {len(self.bands)} bands ({self.bands})"
            )
        for b in range(len(self.bands)):
            values = pixels[:, b]
            if nodata_mask is not None:
                values = values[~nodata_mask[:, b]]
            values = values.astype(np.float64, copy=False).ravel()
            if np.issubdtype(values.dtype, np.floating):
                values = values[~np.isnan(values)]
            n = values.size
            if n == 0:
                continue
            mean = float(values.mean())
            m2 = float(np.square(values - mean).sum())
            self._merge_band(b, n, mean, m2, float(values.min()), float(values.max()))
            if self.hist is not None and self.hist_range is not None:
                lo, hi = self.hist_range
                pos = np.floor((values - lo) / (hi - lo) * self.bins)
                pos = np.clip(pos, -1, self.bins).astype(np.int64) + 1
                self.hist[b] += np.bincount(pos, minlength=self.bins + 2)

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        """Fold ``other`` into this accumulator (Chan's parallel update); returns self."""
        if other.bands != self.bands:
            raise ConfigError(f"cannot merge statistics of bands {other.bands} into {self.bands}")
        if (self.hist is None) != (other.hist is None) or (
            self.hist is not None and (self.hist_range != other.hist_range or self.bins != other.bins)
        ):
            raise ConfigError("cannot merge statistics with different histograms")
        for b in range(len(self.bands)):
            self._merge_band(
                b, int(other.count[b]), float(other.mean[b]), float(other.m2[b]),
                float(other.min[b]), float(other.max[b]),
            )
        if self.hist is not None and other.hist is not None:
            self.hist += other.hist
        return self

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per band (NaN without pixels)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / np.maximum(self.count, 1)), np.nan)

    def percentiles(self, qs: Sequence[float]) -> np.ndarray:
        """``(C, len(qs))`` percentiles (0-100) from the histogram, linear within a bin."""
        if self.hist is None or self.hist_range is None:
            raise ConfigError(
                "percentiles need a histogram: compute the partial statistics with --percentiles "
                "(STACCHIP_PERCENTILES) as well, not only the merge"
            )
        lo, hi = self.hist_range
        width = (hi - lo) / self.bins
        out = np.full((len(self.bands), len(qs)), np.nan)
        for b in range(len(self.bands)):
            counts = self.hist[b]
            total = counts.sum()
            if total == 0:
                continue
            cum = np.cumsum(counts)
            for j, q in enumerate(qs):
                target = q / 100.0 * total
                k = int(np.searchsorted(cum, target, side="left"))
                k = min(k, len(counts) - 1)
                if k == 0:
                    out[b, j] = self.min[b]
                elif k == len(counts) - 1:
                    out[b, j] = self.max[b]
                else:
                    before = cum[k - 1]
                    inside = counts[k]
                    frac = 0.0 if inside == 0 else (target - before) / inside
                    value = lo + (k - 1 + frac) * width
                    out[b, j] = min(max(value, self.min[b]), self.max[b])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (floats kept exactly: JSON floats round-trip)."""
        return {
            "format": STATS_FORMAT,
            "bands": self.bands,
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "min": [None if math.isinf(v) else v for v in self.min.tolist()],
            "max": [None if math.isinf(v) else v for v in self.max.tolist()],
            "hist_range": None if self.hist_range is None else list(self.hist_range),
            "bins": self.bins,
            "hist": None if self.hist is None else self.hist.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatsAccumulator:
        """Rebuild an accumulator from :meth:`to_dict` output."""
        try:
            acc = cls(data["bands"], tuple(data["hist_range"]) if data.get("hist_range") else None,
                      int(data.get("bins") or DEFAULT_BINS))
            acc.count = np.asarray(data["count"], dtype=np.int64)
            acc.mean = np.asarray(data["mean"], dtype=np.float64)
            acc.m2 = np.asarray(data["m2"], dtype=np.float64)
            acc.min = np.asarray([np.inf if v is None else v for v in data["min"]], dtype=np.float64)
            acc.max = np.asarray([-np.inf if v is None else v for v in data["max"]], dtype=np.float64)
            if data.get("hist") is not None:
                acc.hist = np.asarray(data["hist"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a stacchip statistics record: {exc}") from exc
        return acc

    def summary(self, percentiles: Sequence[float] = ()) -> dict[str, dict[str, Any]]:
        """``{band: {count, mean, std, min, max[, pXX]}}``."""
        std = self.std
        # percentiles asked of statistics kept without a histogram raise (not silently left out)
        pct = self.percentiles(percentiles) if percentiles else None
        out: dict[str, dict[str, Any]] = {}
        for b, band in enumerate(self.bands):
            n = int(self.count[b])
            entry: dict[str, Any] = {
                "count": n,
                "mean": float(self.mean[b]) if n else None,
                "std": float(std[b]) if n else None,
                "min": float(self.min[b]) if n else None,
                "max": float(self.max[b]) if n else None,
            }
            if pct is not None:
                for j, q in enumerate(percentiles):
                    entry[f"p{q:g}"] = None if not n else float(pct[b, j])
            out[band] = entry
        return out


# --- sources ------------------------------------------------------------------------------------------


def cube_files(chips: str, platform: str) -> list[str]:
    """Sorted cube files of ``platform`` under a chip bucket / directory (npz cubes; else the
    WebDataset shards of ``stacchip-prechip --format webdataset``)."""
    prefix = storage.join_under(chips, VERSION, storage.safe_segment(platform, "platform"))
    if storage.is_s3(prefix):
        prefix = prefix.rstrip("/") + "/"
    try:
        files = list(storage.list_files(prefix, ".npz"))
        if not files:
            files = [u for u in storage.list_files(prefix) if SHARD_NAME.fullmatch(u.rsplit("/", 1)[-1])]
    except StorageError as exc:
        raise ConfigError(f"cannot list cubes under {prefix!r}: {exc}") from exc

    def number(url: str) -> tuple[int, str]:
        name = url.rsplit("/", 1)[-1]
        shard = SHARD_NAME.fullmatch(name)
        if shard:
            return int(shard.group(1)), url
        digits = name[len("cube_"):-len(".npz")] if name.startswith("cube_") else ""
        return (int(digits), url) if digits.isdigit() else (1 << 62, url)

    return sorted(files, key=number)


#: Names of WebDataset shards (:mod:`stacchip.export.shards`).
SHARD_NAME = re.compile(r"shard-([0-9]{6})\.tar(?:\.gz)?")


def cube_pixels(url: str, spec: PlatformBands) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and nodata mask of one cube (mask from ``nodata_mask`` or the platform's nodata)
    or shard (its samples' ``.npy`` and ``.mask.npy``).

    A cube that is not a whole npz (truncated, a member failing its CRC check, no
    ``pixels``) or shard raises :class:`ConfigError` naming it; storage errors propagate.
    """
    raw = storage.read_bytes(url)
    if SHARD_NAME.fullmatch(url.rsplit("/", 1)[-1]):
        problem = shards.shard_damage(raw)
        if problem is not None:
            raise ConfigError(f"shard {url!r} is damaged or not a prechip shard ({problem}); "
                              "re-run stacchip-prechip to write it again")
        samples = shards.read_shard(raw)
        return np.stack([s["npy"] for s in samples]), np.stack([s["mask.npy"] for s in samples])
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            pixels = data["pixels"]
            if "nodata_mask" in data.files:
                mask = data["nodata_mask"]
            else:
                mask = is_nodata(pixels, spec.default_nodata)
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, OSError) as exc:
        raise ConfigError(
            f"cube {url!r} is damaged or not a prechip cube ({type(exc).__name__}: {exc}); "
            "re-run stacchip-prechip to write it again"
        ) from exc
    return pixels, mask


def _output_default(context: Any, values: Mapping[str, Any]) -> str:
    """``--output`` when neither the flag nor STACCHIP_STATS_BUCKET gives it: the chip bucket,
    else the data bucket."""
    output = values.get("chips") or values.get("data")
    if not output:
        raise ConfigError("missing setting: set --output or environment variable STACCHIP_STATS_BUCKET")
    return str(output)


def _hist_range(text: str, label: str) -> tuple[float, float]:
    values = settings.parse_list(text, float, label)
    if len(values) != 2:
        raise ConfigError(f"{label} {text!r} is not LO,HI")
    lo, hi = float(values[0]), float(values[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise ConfigError(f"{label} {text!r} must be two finite numbers LO,HI with LO < HI")
    return lo, hi


@dataclass(frozen=True)
class StatsConfig:
    """Settings of a stats run (see the module docstring); also the table of ``stacchip-stats``'s
    settings (flag, environment variable, type, default, unit, help:
    :mod:`stacchip.processors.settings`). Fractions are 0-1; percentiles 0-100."""

    platform: str = settings.setting(
        flag="--platform", env="STACCHIP_PLATFORM", required=True, help="platform (or any of its catalog names)")
    output: str = settings.setting(
        dataclasses.MISSING, flag="--output", env="STACCHIP_STATS_BUCKET", kind=settings.Location(),
        default_for=_output_default, shown="the chip bucket, else the data bucket", help="where stats/{platform}/ goes")
    source: str = settings.setting(
        "cubes", flag="--source", env="STACCHIP_STATS_SOURCE", kind=settings.Text(["cubes", "index"]),
        help="read cubes, or chips from the index")
    chips: str | None = settings.setting(
        None, flag="--chips", env="STACCHIP_CHIP_BUCKET", kind=settings.Location(), help="cube bucket / path")
    data: str | None = settings.setting(
        None, flag="--data", env="STACCHIP_DATA_BUCKET", kind=settings.Location(),
        help="scenes root for --source index")
    index: Any = settings.setting(
        None, flag="--indexpath", env="STACCHIP_INDEXPATH", kind=settings.IndexPath(),
        help="index for --source index")
    cubes_per_job: int = settings.setting(
        10, flag="--cubes-per-job", env="STACCHIP_CUBES_PER_JOB", kind=settings.Integer(1), unit="cubes",
        help="cubes per array task")
    chips_per_job: int = settings.setting(
        1280, flag="--chips-per-job", env="STACCHIP_CHIPS_PER_JOB", kind=settings.Integer(1), unit="chips",
        help="chips per array task for --source index")
    max_cubes: int | None = settings.setting(
        None, flag="--max-cubes", env="STACCHIP_MAX_CUBES", kind=settings.Integer(1),
        help="use at most this many cubes")
    max_chips: int | None = settings.setting(
        None, flag="--max-chips", env="STACCHIP_MAX_CHIPS", kind=settings.Integer(1),
        help="use at most this many chips of the shuffle")
    seed: int = settings.setting(
        chip_selection.DEFAULT_SEED, flag="--seed", env="STACCHIP_SEED", kind=settings.Integer(0),
        help="shuffle seed for --source index")
    max_nodata: float | None = settings.setting(
        None, flag="--max-nodata", env="STACCHIP_MAX_NODATA", kind=settings.Fraction(optional=True),
        unit="fraction 0-1 or 'none'", help="nodata filter for --source index")
    max_cloud: float | None = settings.setting(
        None, flag="--max-cloud", env="STACCHIP_MAX_CLOUD", kind=settings.Fraction(optional=True),
        unit="fraction 0-1 or 'none'", help="cloud filter for --source index")
    percentiles: Sequence[float] = settings.setting(
        (), flag="--percentiles", env="STACCHIP_PERCENTILES", kind=settings.Items(float), unit="0-100",
        help="comma-separated percentiles, e.g. 1,50,99")
    hist_range: tuple[float, float] | None = settings.setting(
        None, flag="--hist-range", kind=settings.Custom(_hist_range, "lo,hi"), shown="per platform",
        help="LO,HI of the percentile histogram")
    bins: int = settings.setting(
        DEFAULT_BINS, flag="--bins", kind=settings.Integer(1, MAX_BINS), unit=f"1-{MAX_BINS}", help="histogram bins")
    mountpath: str | None = settings.setting(
        None, flag="--mountpath", env="STACCHIP_MOUNTPATH", help="re-root asset hrefs under this local directory")
    #: Accept a source or job share with nothing in it (else :class:`EmptySelectionError`).
    allow_empty: bool = settings.setting(
        False, flag="--allow-empty", env="STACCHIP_ALLOW_EMPTY", kind=settings.Bool(),
        help="exit 0 when the source (or this job's share of it) is empty (else exit 2 saying why)")

    def __post_init__(self) -> None:
        platform_bands(self.platform)  # an unknown platform is named at once
        for q in self.percentiles:
            if not 0 <= q <= 100:
                raise ConfigError(f"percentile {q} is outside 0..100")

    def accumulator(self) -> StatsAccumulator:
        """An empty accumulator for this platform (with a histogram if percentiles are asked)."""
        spec = platform_bands(self.platform)
        hist = None
        if self.percentiles:
            hist = self.hist_range or spec.value_range
        return StatsAccumulator(spec.band_order, hist, self.bins)


def stats_dir(output: str, platform: str) -> str:
    """Folder of the partial and merged results."""
    return storage.join_under(output, "stats", storage.safe_segment(platform, "platform"))


def partial_url(output: str, platform: str, job_index: int) -> str:
    """Partial result of array job ``job_index``."""
    return storage.join(stats_dir(output, platform), f"partial_{job_index:05d}.json")


@dataclass(frozen=True)
class _PlanSettings:
    """prechip's plan settings (:class:`stacchip.export.plan.PlanSettings`) of ``--source index``:
    one "cube" of ``chips_per_job`` chips of the seeded shuffle per job (the last one partial),
    so job ``j`` reads chips ``order[j * chips_per_job:(j + 1) * chips_per_job]`` as before."""

    index: Any
    data: str
    platform: str
    max_nodata: float | None
    max_cloud: float | None
    seed: int
    cube_size: int
    allow_empty: bool
    output: str
    partial: bool = True
    cubes_per_job: int = 1
    mode: str = locality.GLOBAL
    items_per_job: int = locality.DEFAULT_ITEMS_PER_JOB
    mix_items: int = locality.DEFAULT_MIX_ITEMS
    strip_px: int = locality.STRIP_PX
    format: str = NPZ
    compress_level: int = 0
    overwrite: bool = False
    dry_run: bool = False
    plan_wait: float = plans.DEFAULT_PLAN_WAIT


def _plan_settings(config: StatsConfig) -> _PlanSettings:
    if not config.data or config.index is None:
        raise ConfigError("--source index needs --data/STACCHIP_DATA_BUCKET and --indexpath/STACCHIP_INDEXPATH")
    return _PlanSettings(
        index=config.index, data=config.data, platform=config.platform, max_nodata=config.max_nodata,
        max_cloud=config.max_cloud, seed=config.seed, cube_size=config.chips_per_job, allow_empty=config.allow_empty,
        output=stats_dir(config.output, config.platform))


def _index_plan(config: StatsConfig) -> plans.Plan:
    """The plan of ``--source index`` (:mod:`stacchip.export.plan`): prepared once, by the first
    job to start, and written under ``stats/{platform}/``; the other jobs read its summary and
    their own share (not the whole index, nor every item's STAC JSON). An empty selection is
    :class:`EmptySelectionError` unless ``allow_empty``."""
    settings = _plan_settings(config)
    fresh = not storage.exists(config.output)
    try:
        plan = plans.obtain(settings)
        if plan.empty:
            chip_selection.empty_selection(plan.empty, config.allow_empty)
            if fresh:
                storage.prune_empty_dirs(config.output)
    except BaseException:
        if fresh:  # a run stopped by its selection leaves no folder behind
            storage.prune_empty_dirs(config.output)
        raise
    return plan


def _index_chips(config: StatsConfig, plan: plans.Plan) -> int:
    """Chips the statistics cover: the selection's, at most ``max_chips``."""
    n = 0 if plan.empty else int(plan.record["chips"])
    return n if config.max_chips is None else min(config.max_chips, n)


def job_count(config: StatsConfig) -> int:
    """Array size that covers the whole source."""
    if config.source == "cubes":
        n = len(cube_files(_chips(config), config.platform))
        if config.max_cubes is not None:
            n = min(n, config.max_cubes)
        return math.ceil(n / config.cubes_per_job)
    return math.ceil(_index_chips(config, _index_plan(config)) / config.chips_per_job)


def _chips(config: StatsConfig) -> str:
    if not config.chips:
        raise ConfigError("--source cubes needs --chips/STACCHIP_CHIP_BUCKET")
    return config.chips


def job_stats(job_index: int, config: StatsConfig, workers: int = 1) -> StatsAccumulator:
    """Statistics of array job ``job_index``'s share of the source."""
    return _job_stats(job_index, config, workers)[0]


def _job_stats(job_index: int, config: StatsConfig, workers: int = 1) -> tuple[StatsAccumulator, int]:
    """:func:`job_stats` and the number of jobs the whole source needs."""
    acc = config.accumulator()
    spec = platform_bands(config.platform)
    if config.source == "cubes":
        files = cube_files(_chips(config), config.platform)
        if config.max_cubes is not None:
            files = files[:config.max_cubes]
        mine = files[job_index * config.cubes_per_job:(job_index + 1) * config.cubes_per_job]
        n_jobs = math.ceil(len(files) / config.cubes_per_job)
        if not files:
            prefix = storage.join(_chips(config), VERSION, config.platform)
            chip_selection.empty_selection(f"no .npz cube files under {prefix!r}", config.allow_empty)
        for url in tqdm(mine, desc=f"stats job {job_index}", unit="cube", disable=len(mine) < 2 or None):
            pixels, mask = cube_pixels(url, spec)
            acc.update(pixels, mask)
        return acc, n_jobs
    if config.source != "index":
        raise ConfigError(f"unknown statistics source {config.source!r}; use 'cubes' or 'index'")
    plan = _index_plan(config)
    n = _index_chips(config, plan)
    n_jobs = math.ceil(n / config.chips_per_job)
    if not 0 <= job_index < n_jobs:
        return acc, n_jobs
    share, _ = plan.share(job_index)
    # the share's chips in shuffle order (output j, position p: chip j * chips_per_job + p), up to max_chips
    ranks = (share.column("output").to_numpy().astype(np.int64) * config.chips_per_job
             + share.column("position").to_numpy())
    kept = np.flatnonzero(ranks < n)
    rows = plans.rows_of(share, kept[np.argsort(ranks[kept], kind="stable")].tolist())
    read_index_chips(rows, config, acc, workers)
    return acc, n_jobs


#: Chips added to the statistics at once (one "output" of the runner).
STATS_CHUNK = 64
#: Memory for the chips read before they are added (bytes of chips in their source dtype and masks).
STATS_BATCH_BYTES = 512 * 1024**2


def read_index_chips(rows: pa.Table, config: StatsConfig, acc: StatsAccumulator, workers: int = 1) -> None:
    """Add the chips of index ``rows`` to ``acc``, read in this process by prechip's runner
    (:func:`stacchip.export.locality.run_plan`): item by item in COG block order, tiles
    decoded in the tile engine's threads, chunks of :data:`STATS_CHUNK` chips reduced in
    ``workers`` threads (one at a time into ``acc``)."""
    spec = platform_bands(config.platform)
    chip_size = int(rows.column("chip_size")[0].as_py())
    chunks = [(k, np.arange(start, min(start + STATS_CHUNK, rows.num_rows), dtype=np.int64))
              for k, start in enumerate(range(0, rows.num_rows, STATS_CHUNK))]
    per_batch = max(1, STATS_BATCH_BYTES // (STATS_CHUNK * spec.count * chip_size * chip_size * 5))
    plan = locality.batched_plan(rows, chunks, per_batch)
    read_item = item_reader(str(config.data), config.platform, rows, config.mountpath)
    lock = threading.Lock()

    def add(chunk: int, chunk_rows: np.ndarray, chips: list[tuple[np.ndarray, np.ndarray]]) -> str:
        pixels = np.stack([p for p, _ in chips])
        mask = np.stack([m for _, m in chips])
        with lock:
            acc.update(pixels, mask)
        return str(chunk)

    try:
        locality.run_plan(plan, {k for k, _ in chunks}, read_item, add, workers)
    finally:
        close_open_items()


def share_settings(config: StatsConfig) -> dict[str, Any]:
    """The settings that decide how the source is cut into job shares (recorded in each partial)."""
    if config.source == "cubes":
        return {"source": "cubes", "cubes_per_job": config.cubes_per_job, "max_cubes": config.max_cubes}
    return {
        "source": config.source, "chips_per_job": config.chips_per_job, "max_chips": config.max_chips,
        "seed": config.seed, "max_nodata": config.max_nodata, "max_cloud": config.max_cloud,
    }


def write_partial(job_index: int, config: StatsConfig, workers: int = 1) -> str | None:
    """Run job ``job_index`` and write its partial result; returns its URL.

    A job beyond the source's shares logs one warning line, writes nothing and returns
    None (a partial of a job the run does not have would stop the merge); an empty
    source raises :class:`EmptySelectionError` unless ``allow_empty``.
    """
    started = time.time()
    acc, n_jobs = _job_stats(job_index, config, workers)
    if job_index >= n_jobs:
        if n_jobs:  # (an empty source as a whole was reported by _job_stats)
            logger.warning("job %d: nothing to do: the source makes jobs 0..%d of %d %s (the array is larger "
                           "than the work)", job_index, n_jobs - 1, config.cubes_per_job if config.source == "cubes"
                           else config.chips_per_job, "cubes" if config.source == "cubes" else "chips")
        return None
    record = acc.to_dict()
    record.update({"platform": config.platform, "source": config.source, "job": job_index, "jobs": n_jobs,
                   "settings": share_settings(config)})
    url = partial_url(config.output, config.platform, job_index)
    storage.remove_stale_temps(url, before=started)
    storage.write_bytes(url, json.dumps(record).encode())
    logger.info("job %d: %s pixels per band -> %s", job_index, acc.count.tolist(), url)
    return url


def _read_record(url: str) -> dict[str, Any]:
    try:
        record = json.loads(storage.read_bytes(url))
    except ValueError as exc:
        raise ConfigError(f"partial statistics {url!r} are not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ConfigError(f"partial statistics {url!r} are not a JSON object")
    return record


def check_partials(records: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Raise :class:`ConfigError` unless the partials are one complete run.

    Every partial must record the same job count and share settings, and the
    jobs ``0 .. jobs-1`` must each be there once: a partial left over from an
    earlier run with other settings, or a missing (failed) job, would
    otherwise be merged silently into wrong statistics.
    """
    if not records or not all("jobs" in r for _, r in records):
        return  # partials of an older format carry no job count
    runs = {(int(r["jobs"]), json.dumps(r.get("settings"), sort_keys=True)) for _, r in records}
    if len(runs) > 1:
        detail = "; ".join(f"{u}: job {r.get('job')} of {r['jobs']}, {r.get('settings')}" for u, r in records)
        raise ConfigError(
            "the partial statistics come from runs with different settings (remove the stale "
            f"partial_*.json files and re-run): {detail}"
        )
    n_jobs = int(records[0][1]["jobs"])
    jobs_seen = sorted(int(r.get("job", -1)) for _, r in records)
    if jobs_seen != list(range(n_jobs)):
        missing = sorted(set(range(n_jobs)) - set(jobs_seen))
        extra = [u for u, r in records if not 0 <= int(r.get("job", -1)) < n_jobs]
        raise ConfigError(
            f"the partial statistics do not cover jobs 0..{n_jobs - 1} once each: missing jobs {missing}, "
            f"stale or repeated files {extra or sorted(u for u, _ in records)}; re-run the missing jobs "
            "or remove the stale files"
        )


def merge_partials(urls: Iterable[str]) -> StatsAccumulator:
    """Merge partial result files (order does not matter beyond float round-off).

    The partials must be one complete run (see :func:`check_partials`).
    """
    records = [(url, _read_record(url)) for url in urls]
    check_partials(records)
    acc: StatsAccumulator | None = None
    for _, record in records:
        part = StatsAccumulator.from_dict(record)
        acc = part if acc is None else acc.merge(part)
    if acc is None:
        raise ConfigError("no partial statistics to merge")
    return acc


def metadata_entry(acc: StatsAccumulator, spec: PlatformBands) -> dict[str, Any]:
    """One platform's entry in the layout of Clay's ``configs/metadata.yaml``."""
    summary = acc.summary()
    entry: dict[str, Any] = {"band_order": list(spec.band_order)}
    if spec.rgb_indices is not None:
        entry["rgb_indices"] = list(spec.rgb_indices)
    entry["gsd"] = spec.gsd
    entry["bands"] = {
        "mean": {b: summary[b]["mean"] for b in spec.band_order},
        "std": {b: summary[b]["std"] for b in spec.band_order},
        "wavelength": {b: spec.wavelength.get(b) for b in spec.band_order},
    }
    return entry


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        return repr(float(value))
    return json.dumps(str(value))


def to_yaml(data: dict[str, Any], indent: int = 0) -> str:
    """Block-style YAML of nested dicts, lists of scalars and scalars."""
    pad = "  " * indent
    lines = []
    for key, value in data.items():
        name = str(key)
        if isinstance(value, dict):
            lines.append(f"{pad}{name}:")
            lines.append(to_yaml(value, indent + 1).rstrip("\n"))
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{name}:")
            lines.extend(f"{pad}  - {_yaml_scalar(v)}" for v in value)
        else:
            lines.append(f"{pad}{name}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def write_merged(config: StatsConfig, urls: Sequence[str] | None = None) -> dict[str, Any]:
    """Merge the partial results of ``config`` and write ``stats.json`` and ``metadata.yaml``."""
    started = time.time()
    folder = stats_dir(config.output, config.platform)
    for name in ("stats.json", "metadata.yaml"):
        storage.remove_stale_temps(storage.join(folder, name), before=started)
    if urls is None:
        try:
            urls = [u for u in storage.list_files(folder, ".json") if u.rsplit("/", 1)[-1].startswith("partial_")]
        except StorageError as exc:
            raise ConfigError(f"no partial statistics under {folder!r}: {exc}") from exc
    acc = merge_partials(sorted(urls))
    spec = platform_bands(config.platform)
    result = {
        "platform": config.platform,
        "source": config.source,
        "partials": len(urls),
        "std_ddof": 0,
        "nodata": "excluded (cube nodata_mask, else the asset/platform nodata value and NaN)",
        "bands": acc.summary(config.percentiles),
        "state": acc.to_dict(),
    }
    storage.write_bytes(storage.join(folder, "stats.json"), json.dumps(result, indent=2).encode())
    yaml_text = to_yaml({config.platform: metadata_entry(acc, spec)})
    storage.write_bytes(storage.join(folder, "metadata.yaml"), yaml_text.encode())
    logger.info("merged %d partial results into %s", len(urls), folder)
    return result


# --- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``stacchip-stats`` (from the table :class:`StatsConfig`)."""
    p = ArgumentParser(
        prog="stacchip-stats",
        description="Per-band count/mean/std/min/max(/percentiles) of a platform; "
        "array jobs write partial JSON, --merge combines them.",
    )
    settings.add_arguments(p, StatsConfig)
    p.add_argument("--merge", action="store_true",
                   help="merge the partial results and write stats.json + metadata.yaml")
    p.add_argument("--all", action="store_true", help="run every job locally, then merge")
    jobs.add_job_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> StatsConfig:
    """A :class:`StatsConfig` from parsed flags and the environment."""
    return settings.resolve(StatsConfig, args)


def run(argv: Sequence[str] | None = None) -> jobs.RunSummary | int:
    """Parse ``argv`` and run jobs, the merge, or both."""
    args = build_parser().parse_args(argv)
    jobs.setup_logging(args.verbose, args.quiet)
    config = config_from_args(args)
    if args.merge:
        result = write_merged(config)
        echo(json.dumps(result["bands"], indent=2))
        return 0
    workers = jobs.resolve_workers(args.workers)
    if args.all:
        indices = list(range(job_count(config)))
        if not indices:
            # (an empty index selection was reported by job_count; this is an empty cube folder)
            where = storage.join(_chips(config), VERSION, config.platform) if config.source == "cubes" \
                else config.index
            chip_selection.empty_selection(f"no {config.source} to compute statistics of {config.platform!r} "
                                    f"from under {where!r}", config.allow_empty)
            return 0
    else:
        indices = jobs.resolve_indices(args.index, args.range_spec)
    if len(indices) == 1:
        summary = jobs.run_tasks(functools.partial(write_partial, config=config, workers=workers), indices, 1,
                                 desc="stats jobs")
    else:
        summary = jobs.run_tasks(functools.partial(write_partial, config=config, workers=1), indices, workers,
                                 desc="stats jobs")
    if args.all and summary.ok:
        result = write_merged(config, [o.result for o in summary.outcomes if o.result])
        echo(json.dumps(result["bands"], indent=2))
    return summary


def process() -> None:
    """Console script ``stacchip-stats`` (upstream's entry point name)."""
    raise SystemExit(jobs.main(run, prog="stacchip-stats"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stacchip-stats`` with ``argv``; returns the exit status."""
    return jobs.main(run, argv, prog="stacchip-stats")


if __name__ == "__main__":  # pragma: no cover
    process()
