"""``stacchip-prechip``: shuffled npz "cubes" of chips for training.

Reads the chips of a merged index (or a directory / ``s3://`` prefix of index
files) from the scenes in the data bucket and writes cubes of ``CUBESIZE``
chips to ``{chip bucket}/{VERSION}/{platform}/cube_{k}.npz``, the layout the
Clay training data module loads.

What a cube holds (the keys upstream wrote, plus masks and provenance):

=================  ==================  ============================================
``pixels``         (N, C, H, W) f32    chip pixels in the platform's band order
                                       (:mod:`stacchip.platforms`);
                                       nodata pixels keep their source value
``nodata_mask``    (N, C, H, W) bool   True where a pixel is nodata (the asset's
                                       nodata value, NaN, or outside the asset)
``lat_norm``       (N, 2) f32          ``(sin, cos)`` of the chip centre latitude
``lon_norm``       (N, 2) f32          ``(sin, cos)`` of the chip centre longitude
``week_norm``      (N, 2) f32          ``(sin, cos)`` of the position in the year
``hour_norm``      (N, 2) f32          ``(sin, cos)`` of the UTC time of day
``chipids``        (N,) str            index ``chipid`` of each chip
``item_ids``       (N,) str            STAC item id of each chip
``datetimes``      (N,) datetime64[us] item timestamp (UTC)
``lon``, ``lat``   (N,) f64            chip centre in degrees
``bands``          (C,) str            band names of the channels
=================  ==================  ============================================

Time encodings (``t`` the item's UTC timestamp):

* ``hour_norm``: ``a = 2*pi * (hours + minutes/60 + seconds/3600) / 24``.
* ``week_norm``: ``a = 2*pi * (t - Jan 1 00:00 of t's year) / (length of that
  year)``; the continuous form of the week number (week ``w`` lies near
  ``2*pi*(w-1)/52.18``). Every instant of a year has its own angle, so ISO week
  53 no longer lands on week 1 as with upstream's ``2*pi*week/52``; Dec 31 and
  Jan 1 are neighbours, as they should be.

Sampling: the filtered index is sorted by ``chipid`` and shuffled with a
permutation seeded by ``seed``; cube ``k`` holds permutation entries
``k*N .. (k+1)*N``. Every chip lands in at most one cube, and a cube's members
depend only on the index, the filters and the seed, never on which job makes
it. Job ``j`` makes cubes ``j*cubes_per_job .. (j+1)*cubes_per_job - 1``;
within a job the chips are read item by item (each item's assets opened once
per worker) in row order, so blocks are decoded once, then put back in their
random cube slots. A cube is written whole or not at all, with a checksum
record of its size and SHA-256 (``.cube_{k}.npz.sha256.json`` beside it, see
:func:`stacchip.storage.write_recorded`). Existing cubes are skipped when they
match their record (a cube without one, e.g. written by upstream, when its zip
members pass their CRC check); a truncated or otherwise damaged cube is written
again. Temporary files a killed job left for its cubes are removed when the
job starts. ``prechip_manifest.json`` beside the cubes records the selection they
come from (a fingerprint of the chip ids, seed and cube size): a run with
another index, filters, seed or cube size into the same place is refused
(unless ``--overwrite``), since its cubes would repeat or miss chips of the
existing ones.

Item ids and the platform of the index become paths
(``{data}/{platform}/{item_id}/stac_item.json``): each must be a safe path
segment (:func:`stacchip.storage.safe_segment`), or the run is refused
(:class:`~stacchip.errors.ConfigError`, exit 2) before any item is read.

Nothing to do is an error unless allowed: an index and filters that select no
cube, or a job index beyond the cubes the selection makes, stop with exit
status 2 and a line saying how many rows were read and what each filter
(``--platform``, ``--max-nodata``, ``--max-cloud``, ``--cube-size``) kept;
``--allow-empty`` (``STACCHIP_ALLOW_EMPTY=1``) makes such a run exit 0.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import rasterio
from tqdm import tqdm

from stacchip import storage
from stacchip.chipper import Chipper
from stacchip.console import ArgumentParser
from stacchip.encodings import (  # noqa: F401  (moved; importable from here as before)
    bbox_centres,
    latlon_norm,
    normalize_latlon,
    normalize_timestamp,
    sincos,
    time_angles,
    time_norm,
)
from stacchip.errors import (
    AssetNotFoundError,
    ConfigError,
    EmptySelectionError,
    IndexFileError,
    ItemError,
    StorageNotFoundError,
    UnsafePathError,
)
from stacchip.index import open_index
from stacchip.indexer import ChipIndexer
from stacchip.processors import jobs
from stacchip.platforms import (  # noqa: F401  (upstream names)
    LINZ_BANDS,
    LS_BANDS,
    NAIP_BANDS,
    S1_BANDS,
    S2_BANDS,
    PlatformBands,
    canonical_platform,
    is_nodata,
    platform_aliases,
    platform_bands,
)
from stacchip.reader import gdal_env
from stacchip.utils import load_item_under

logger = logging.getLogger(__name__)

#: Folder under the chip bucket that holds the cubes (upstream's value).
VERSION = "mode_v1_chipper_v2"
#: Chips per cube.
CUBESIZE = 128
#: Seed of the shuffle (upstream used 42).
DEFAULT_SEED = 42
#: Largest nodata fraction of a chip by default.
DEFAULT_MAX_NODATA = 0.05
#: Memory for the pixels of the cubes assembled at once, bytes (two batches
#: can be in memory: one compressing while the next is read).
DEFAULT_BATCH_BYTES = 1024**3
#: Largest number of chips one worker task reads (one item's chips are split
#: into tasks of at most this many, in row order).
TASK_CHIPS = 64
#: zlib level of the npz members (see :func:`cube_bytes`).
DEFAULT_COMPRESS_LEVEL = 1
#: Items whose chipper a worker keeps open.
CHIPPER_CACHE = 8

#: Index columns prechip reads.
COLUMNS = [
    "chipid", "item_id", "platform", "datetime", "chip_index_x", "chip_index_y",
    "chip_size", "cloud_cover_percentage", "nodata_percentage", "bbox",
]


# --- selecting and shuffling chips -----------------------------------------------------------


def select_chips(
    index_sources: Any,
    platform: str | None = None,
    max_nodata: float | None = DEFAULT_MAX_NODATA,
    max_cloud: float | None = None,
) -> pa.Table:
    """Chips that pass the filters, sorted by ``chipid`` (a stable order for the shuffle).

    ``max_nodata`` / ``max_cloud`` are fractions (0 keeps only chips with none;
    ``None`` means no filter).
    """
    dataset = open_index(index_sources)
    expr = pc.scalar(True)
    if platform is not None:  # any catalog's name of the platform (stacchip.platforms)
        expr &= pc.field("platform").isin(platform_aliases(platform))
    for column, limit in (("nodata_percentage", max_nodata), ("cloud_cover_percentage", max_cloud)):
        if limit is not None:
            expr &= pc.field(column) <= _limit_scalar(dataset.schema, column, limit)
    try:
        # only the columns prechip needs (no geometry): the merged index can be large
        table = dataset.to_table(columns=COLUMNS, filter=expr)
    except (pa.ArrowException, OSError) as exc:
        raise IndexFileError(f"cannot read index {index_sources!r}: {exc}") from exc
    if table.num_rows and len({canonical_platform(p) for p in pc.unique(table.column("platform")).to_pylist()}) > 1:
        raise ConfigError(
            "the index holds several platforms "
            f"({sorted(set(pc.unique(table.column('platform')).to_pylist()))}); "
            "choose one with --platform / STACCHIP_PLATFORM"
        )
    order = pc.sort_indices(table, sort_keys=[("chipid", "ascending")])
    table = table.take(order)
    dupes = table.num_rows - len(pc.unique(table.column("chipid")))
    if dupes:
        raise IndexFileError(f"the index holds {dupes} duplicate chipid rows; merge it without duplicates")
    return table


def _limit_scalar(schema: pa.Schema, column: str, limit: float) -> pa.Scalar:
    """``limit`` in the column's own float type: the fractions are float32, and a float64
    0.05 is below float32(0.05), so a chip stored with exactly the limit would be dropped."""
    index = schema.get_field_index(column)
    typ = schema.field(index).type if index >= 0 else pa.float64()
    if not pa.types.is_floating(typ):
        typ = pa.float64()
    return pa.scalar(float(limit), typ)


def explain_selection(
    index_sources: Any,
    platform: str | None = None,
    max_nodata: float | None = DEFAULT_MAX_NODATA,
    max_cloud: float | None = None,
) -> str:
    """Why :func:`select_chips` keeps what it keeps: rows read and what each filter kept (one line).

    Reads only row counts (and the platform column when the platform filter
    matches nothing); meant for the message of an empty selection.
    """
    dataset = open_index(index_sources)
    where = f"index {index_sources!r}"
    try:
        total = dataset.count_rows()
        if total == 0:
            return f"{where} holds no rows"
        expr = pc.field("chipid").is_valid() & pc.field("platform").is_valid()
        usable = dataset.count_rows(filter=expr)
        if usable == 0:
            return (f"none of the {total} rows read from {where} is a chip-index row (no chipid or "
                    "platform: not stacchip index files?)")
        steps = [f"{total} rows read from {where}"]
        if usable < total:
            steps.append(f"{usable} of them chip-index rows")
        if platform is not None:
            expr &= pc.field("platform") == platform
            kept = dataset.count_rows(filter=expr)
            if kept == 0:
                held = sorted(str(p) for p in pc.unique(
                    dataset.to_table(columns=["platform"]).column("platform")).to_pylist() if p is not None)
                return (f"platform {platform!r} (--platform / STACCHIP_PLATFORM) matches none of the "
                        f"{usable} rows of {where}; it holds platforms {held}")
            steps.append(f"platform {platform!r} kept {kept}")
        for column, limit, flag in (("nodata_percentage", max_nodata, "--max-nodata"),
                                    ("cloud_cover_percentage", max_cloud, "--max-cloud")):
            if limit is not None:
                expr &= pc.field(column) <= _limit_scalar(dataset.schema, column, limit)
                steps.append(f"{flag} {limit:g} kept {dataset.count_rows(filter=expr)}")
    except (pa.ArrowException, OSError) as exc:
        raise IndexFileError(f"cannot read {where}: {exc}") from exc
    return ", ".join(steps)


def permutation(n: int, seed: int) -> np.ndarray:
    """The seeded shuffle of ``n`` rows (numpy PCG64)."""
    return np.random.default_rng(seed).permutation(n)


def cube_count(n_chips: int, cube_size: int = CUBESIZE, partial: bool = False) -> int:
    """Number of cubes ``n_chips`` make (a last partial cube only with ``partial``)."""
    return math.ceil(n_chips / cube_size) if partial else n_chips // cube_size


def cube_url(output: str, platform: str, cube_id: int) -> str:
    """Where cube ``cube_id`` is written."""
    return storage.join_under(output, VERSION, storage.safe_segment(platform, "platform"), f"cube_{int(cube_id)}.npz")


# --- reading chips, item by item -------------------------------------------------------------


@dataclass(frozen=True)
class ReadTask:
    """One worker task: chips of one item, in row order, with their output slots."""

    data: str
    platform: str
    item_id: str
    chip_size: int
    slots: tuple[int, ...]
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    mountpath: str | None = None


class _OpenItem:
    """A chipper over one item plus its channel assets and nodata values."""

    def __init__(self, task: ReadTask) -> None:
        item = load_item_under(task.data, task.platform, task.item_id)
        self.spec: PlatformBands = platform_bands(task.platform)
        self.keys = self.spec.asset_keys(item)
        # edge="keep": an index made with --edge keep holds the partial edge chips;
        # their pixels beyond the grid read as the fill value and are marked nodata.
        indexer = ChipIndexer(item, chip_size=task.chip_size, platform=task.platform, edge="keep")
        self.chipper = Chipper(indexer, mountpath=task.mountpath, assets=sorted(set(self.keys)))
        self.nodata = [self._nodata(item, key, band) for key, (_, band) in zip(self.keys, self.spec.sources)]

    def _nodata(self, item: Any, key: str, band: int) -> float | None:
        bands = item.assets[key].extra_fields.get("raster:bands") or []
        if band < len(bands) and bands[band].get("nodata") is not None:
            return float(bands[band]["nodata"])
        with gdal_env(), rasterio.open(self.chipper.path(key)) as ds:
            if band < len(ds.nodatavals) and ds.nodatavals[band] is not None:
                return float(ds.nodatavals[band])
        return self.spec.default_nodata

    def _stack(self, chip: dict[str, np.ndarray], item_id: str, x: int, y: int) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.spec.stack(item_id, chip, self.keys)
        mask = np.stack([is_nodata(pixels[i], nd) for i, nd in enumerate(self.nodata)])
        # a partial edge chip: pixels beyond the grid are nodata whatever value filled them
        rows, cols = self.chipper.indexer.grid.shape
        size = self.chipper.indexer.chip_size
        inside_y, inside_x = int(rows) - y * size, int(cols) - x * size
        if inside_y < size:
            mask[:, max(inside_y, 0) * mask.shape[1] // size:, :] = True
        if inside_x < size:
            mask[:, :, max(inside_x, 0) * mask.shape[2] // size:] = True
        return pixels, mask

    def read(self, x: int, y: int, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and nodata mask of one chip."""
        return self._stack(self.chipper.chip(x, y), item_id, x, y)

    def read_many(
        self, xs: Sequence[int], ys: Sequence[int], item_id: str
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(x, y, pixels, mask)`` of many chips, in COG block order where the chipper
        offers it (each block decoded once), read ahead in parallel."""
        many = getattr(self.chipper, "chips", None)
        if many is None:
            for x, y in zip(xs, ys):
                yield (x, y, *self.read(x, y, item_id))
            return
        try:
            chips = many(list(zip(xs, ys)), order="block")
        except TypeError:  # a chipper without block ordering
            chips = many(list(zip(xs, ys)))
        for x, y, chip in chips:
            yield (x, y, *self._stack(chip, item_id, x, y))

    def close(self) -> None:
        self.chipper.close()


_OPEN: OrderedDict[tuple[Any, ...], _OpenItem] = OrderedDict()


def _open_item(task: ReadTask) -> _OpenItem:
    key = (task.data, task.platform, task.item_id, task.chip_size, task.mountpath, os.getpid())
    opened = _OPEN.get(key)
    if opened is None:
        opened = _OpenItem(task)
        _OPEN[key] = opened
        while len(_OPEN) > CHIPPER_CACHE:
            _, old = _OPEN.popitem(last=False)
            old.close()
    else:
        _OPEN.move_to_end(key)
    return opened


def close_open_items() -> None:
    """Close every item this process keeps open."""
    while _OPEN:
        _, opened = _OPEN.popitem()
        opened.close()


class ReadResult(NamedTuple):
    """Chips of one :class:`ReadTask`: pixels ``(n, C, H, W)`` in the source dtype and
    nodata mask, or ``None`` for both and ``missing`` naming why the item lacks a band."""

    slots: tuple[int, ...]
    pixels: np.ndarray | None
    mask: np.ndarray | None
    missing: str | None = None


def read_task(task: ReadTask) -> ReadResult:
    """Read the chips of ``task`` (see :class:`ReadResult`).

    An item without an asset (or band) the platform's band order needs is
    reported in ``missing`` instead of failing the job (upstream skipped such
    cubes too, e.g. single-polarisation Sentinel-1 scenes); read errors raise.
    """
    slot_of = {(x, y): slot for x, y, slot in zip(task.xs, task.ys, task.slots)}
    slots = []
    pixels = []
    masks = []
    try:
        opened = _open_item(task)
        for x, y, p, m in opened.read_many(task.xs, task.ys, task.item_id):
            slots.append(slot_of[(x, y)])
            pixels.append(p)
            masks.append(m)
    except AssetNotFoundError as exc:
        return ReadResult(task.slots, None, None, str(exc))
    return ReadResult(tuple(slots), np.stack(pixels), np.stack(masks))


def plan_reads(
    rows: pa.Table,
    data: str,
    platform: str,
    mountpath: str | None = None,
    task_chips: int = TASK_CHIPS,
) -> list[ReadTask]:
    """Worker tasks for ``rows`` (slot ``i`` is row ``i``): grouped by item, row order inside."""
    item_ids = np.asarray(rows.column("item_id").to_pylist(), dtype=object)
    xs = rows.column("chip_index_x").to_numpy().astype(np.int64)
    ys = rows.column("chip_index_y").to_numpy().astype(np.int64)
    sizes = rows.column("chip_size").to_numpy().astype(np.int64)
    tasks = []
    for item_id in sorted(set(item_ids)):
        slots = np.nonzero(item_ids == item_id)[0]
        if len(set(sizes[slots].tolist())) > 1:
            raise IndexFileError(f"item {item_id!r}: the index mixes chip sizes {sorted(set(sizes[slots]))}")
        order = np.lexsort((xs[slots], ys[slots]))
        slots = slots[order]
        for start in range(0, len(slots), task_chips):
            part = slots[start:start + task_chips]
            tasks.append(
                ReadTask(
                    data=data, platform=platform, item_id=str(item_id), chip_size=int(sizes[part[0]]),
                    slots=tuple(int(s) for s in part), xs=tuple(int(v) for v in xs[part]),
                    ys=tuple(int(v) for v in ys[part]), mountpath=mountpath,
                )
            )
    return tasks


class _Done:
    """A finished result with the ``AsyncResult.get`` interface."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self, timeout: float | None = None) -> Any:
        return self.value


class ChipReader:
    """Runs :class:`ReadTask` s inline or over a process pool (kept for the reader's life)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))
        self._pool: Any = None

    def __enter__(self) -> ChipReader:
        if self.workers > 1:
            # spawn: GDAL and boto3 state of the parent are not fork-safe.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        close_open_items()

    def submit(self, func: Any, *args: Any) -> Any:
        """Run ``func(*args)`` in the pool (an ``AsyncResult``) or inline (a finished stand-in)."""
        if self._pool is not None:
            return self._pool.apply_async(func, args)
        return _Done(func(*args))

    def run(self, tasks: Sequence[ReadTask], desc: str = "chips") -> Iterator[ReadResult]:
        """Results of ``tasks`` as they finish, with a progress bar counting chips."""
        total = sum(len(t.slots) for t in tasks)
        results = (
            self._pool.imap_unordered(read_task, tasks) if self._pool is not None else map(read_task, tasks)
        )
        with tqdm(total=total, desc=desc, unit="chip", disable=total == 0 or None) as bar:
            for result in results:
                bar.update(len(result[0]))
                yield result


# --- making cubes ----------------------------------------------------------------------------------


@dataclass
class PrechipConfig:
    """Everything a prechip job needs.

    ``data``: root holding ``{platform}/{item_id}/stac_item.json`` (local path,
    ``s3://`` URL); ``index``: index file(s), directory or prefix; ``output``:
    where ``{VERSION}/{platform}/cube_{k}.npz`` go. Fractions are 0-1.
    """

    data: str
    index: Any
    output: str
    platform: str | None = None
    cube_size: int = CUBESIZE
    cubes_per_job: int = 10
    seed: int = DEFAULT_SEED
    max_nodata: float | None = DEFAULT_MAX_NODATA
    max_cloud: float | None = None
    overwrite: bool = False
    partial: bool = False
    mountpath: str | None = None
    batch_bytes: int = DEFAULT_BATCH_BYTES
    dry_run: bool = False
    compress_level: int = DEFAULT_COMPRESS_LEVEL
    #: Accept a selection that makes no cube (else :class:`EmptySelectionError`).
    allow_empty: bool = False


@dataclass
class Selection:
    """The filtered, sorted index and its shuffle.

    ``fingerprint`` identifies the cube membership (chip ids, seed, cube size):
    cubes made under one fingerprint never mix with cubes of another.
    """

    table: pa.Table
    order: np.ndarray
    platform: str
    n_cubes: int
    fingerprint: str = ""
    #: items left out because they lack one of the platform's bands: ``{item_id: why}``
    excluded: dict[str, str] = field(default_factory=dict)


def prepare(config: PrechipConfig) -> Selection:
    """Select, sort and shuffle the chips of ``config``."""
    if config.cube_size < 1:
        raise ConfigError(f"cube size must be >= 1, got {config.cube_size}")
    if config.platform:
        platform_bands(config.platform)  # an unknown platform is named before the index is read
    table = select_chips(config.index, config.platform, config.max_nodata, config.max_cloud)
    if table.num_rows == 0:
        platform = canonical_platform(config.platform or "")
    else:
        platform = canonical_platform(str(table.column("platform")[0].as_py()))
    if config.platform and platform != canonical_platform(config.platform):
        raise ConfigError(f"platform {config.platform!r} is not in the index")
    if platform:
        platform_bands(platform)
    check_item_ids(table, config.index)
    excluded: dict[str, str] = {}
    if platform and table.num_rows:
        excluded = items_lacking_bands(table, config.data, platform)
        if excluded:
            keep = pc.invert(pc.is_in(table.column("item_id"), pa.array(sorted(excluded), pa.string())))
            before = table.num_rows
            table = table.filter(keep)
            names = ", ".join(sorted(excluded)[:10]) + (" ..." if len(excluded) > 10 else "")
            logger.warning(
                "%d item(s) lack bands of platform %s and are left out (%d of %d chips): %s; e.g. %s",
                len(excluded), platform, before - table.num_rows, before, names,
                next(iter(excluded.values())),
            )
    order = permutation(table.num_rows, config.seed)
    n = cube_count(table.num_rows, config.cube_size, config.partial)
    digest = hashlib.sha256(f"seed={config.seed};cube_size={config.cube_size};platform={platform}\n".encode())
    ids = table.column("chipid").combine_chunks().cast(pa.large_string())
    if len(ids):
        # value lengths and bytes, read from the Arrow buffers (no Python strings)
        offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + len(ids) + 1]
        digest.update(np.diff(offsets).astype("<i8").tobytes())
        digest.update(memoryview(ids.buffers()[2])[int(offsets[0]):int(offsets[-1])])
    logger.info(
        "%d chips pass the filters (max nodata %s, max cloud %s): %d cubes of %d, seed %d",
        table.num_rows, config.max_nodata, config.max_cloud, n, config.cube_size, config.seed,
    )
    return Selection(table=table, order=order, platform=platform, n_cubes=n, fingerprint=digest.hexdigest(),
                     excluded=excluded)


#: Parallel item reads when checking which items hold the platform's bands.
ITEM_CHECK_THREADS = 16


def items_lacking_bands(table: pa.Table, data: str, platform: str) -> dict[str, str]:
    """``{item_id: why}`` for the items of ``table`` whose STAC item lacks an asset the
    platform's band order needs (the platform's bands are a contract: such items are
    left out of the selection up front, never by dropping whole cubes later).

    Reads every item's JSON under ``data`` (in parallel); an item that cannot be
    read at all is an error naming it.
    """
    from concurrent.futures import ThreadPoolExecutor

    spec = platform_bands(platform)
    pairs = sorted(set(zip(table.column("platform").to_pylist(), table.column("item_id").to_pylist(), strict=True)))

    def check(pair: tuple[str, str]) -> tuple[str, str | None]:
        row_platform, item_id = pair
        item = load_item_under(data, row_platform, item_id)
        try:
            spec.asset_keys(item)
        except AssetNotFoundError as exc:
            return item_id, str(exc)
        return item_id, None

    with ThreadPoolExecutor(max(1, min(ITEM_CHECK_THREADS, len(pairs)))) as pool:
        results = list(pool.map(check, pairs))
    return {item_id: why for item_id, why in results if why is not None}


def check_item_ids(table: pa.Table, index: Any) -> None:
    """Refuse an index whose ``item_id`` or ``platform`` values are not safe path segments.

    They name ``{data}/{platform}/{item_id}/stac_item.json``: an item id such as
    ``../../elsewhere/evil`` would read outside the data root. Raises
    :class:`ConfigError` naming the index and the value.
    """
    for column, what in (("platform", "platform"), ("item_id", "item id")):
        if column not in table.column_names or table.num_rows == 0:
            continue
        for value in pc.unique(table.column(column)).to_pylist():
            try:
                storage.safe_segment(value, f"index row {what}")
            except UnsafePathError as exc:
                raise ConfigError(f"index {index!r}: {exc}; refusing to read items from it") from exc

def check_selection(config: PrechipConfig, selection: Selection) -> None:
    """Refuse a selection that makes no cube (unless ``config.allow_empty``), saying how many
    rows were read and what each filter kept; see :func:`explain_selection`."""
    if selection.n_cubes:
        return
    counts = explain_selection(config.index, config.platform, config.max_nodata, config.max_cloud)
    rows = selection.table.num_rows
    if rows == 0:
        why = f"no chip passes the filters: {counts}"
    else:
        why = (f"only {rows} chips pass the filters ({counts}), fewer than one cube of "
               f"{config.cube_size} (--cube-size); --partial writes the incomplete cube")
    empty_selection(why, config.allow_empty)


def empty_selection(why: str, allow_empty: bool) -> None:
    """Raise :class:`EmptySelectionError` with ``why``, or only log it when an empty run is fine."""
    if allow_empty:
        logger.warning("%s; nothing to do (allowed by --allow-empty)", why)
        return
    raise EmptySelectionError(f"{why}; pass --allow-empty (STACCHIP_ALLOW_EMPTY=1) if nothing to do is fine")


def manifest_url(output: str, platform: str) -> str:
    """The record of which selection the cubes under ``output`` were made from."""
    return storage.join_under(output, VERSION, storage.safe_segment(platform, "platform"), "prechip_manifest.json")


def check_manifest(config: PrechipConfig, selection: Selection) -> None:
    """Refuse to add cubes next to cubes of another selection (see :class:`Selection`).

    The first job writes the manifest; later jobs (and re-runs) compare. With
    ``overwrite`` a different selection is allowed and the manifest replaced.
    """
    url = manifest_url(config.output, selection.platform)
    record = {
        "fingerprint": selection.fingerprint, "seed": config.seed, "cube_size": config.cube_size,
        "chips": selection.table.num_rows, "cubes": selection.n_cubes,
        "max_nodata": config.max_nodata, "max_cloud": config.max_cloud, "partial": config.partial,
        "excluded_items": dict(sorted(selection.excluded.items())),
    }
    try:
        existing = json.loads(storage.read_bytes(url))
    except StorageNotFoundError:
        existing = None
    except ValueError as exc:
        raise ConfigError(f"{url!r} is not a prechip manifest: {exc}") from exc
    if existing is not None and existing.get("fingerprint") == selection.fingerprint:
        return
    if existing is not None and not config.overwrite:
        raise ConfigError(
            f"the cubes under {storage.join(config.output, VERSION, selection.platform)!r} were made from "
            f"another selection ({ {k: existing.get(k) for k in record if k != 'fingerprint'} }) than this run "
            f"({ {k: v for k, v in record.items() if k != 'fingerprint'} }): the index, filters, seed or cube "
            "size changed, so new cubes would repeat or miss chips of the old ones. Write to another "
            "--chips location, or pass --overwrite to replace the cubes"
        )
    storage.write_bytes(url, json.dumps(record, indent=2).encode())


def cube_members(selection: Selection, cube_id: int, cube_size: int) -> np.ndarray:
    """Row numbers (into ``selection.table``) of cube ``cube_id``'s chips, in cube order."""
    return selection.order[cube_id * cube_size:(cube_id + 1) * cube_size]


def job_cubes(job_index: int, cubes_per_job: int, n_cubes: int) -> list[int]:
    """Cube ids job ``job_index`` makes."""
    return [k for k in range(job_index * cubes_per_job, (job_index + 1) * cubes_per_job) if k < n_cubes]


def job_count(n_cubes: int, cubes_per_job: int) -> int:
    """Array size needed to make ``n_cubes`` cubes."""
    return math.ceil(n_cubes / cubes_per_job)


def cube_arrays(rows: pa.Table, pixels: np.ndarray, mask: np.ndarray, bands: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of one cube from its index rows and its pixels and mask."""
    bbox = rows.column("bbox").combine_chunks() if rows.num_rows else None
    if bbox is not None:
        bounds = np.column_stack([bbox.field(f).to_numpy(zero_copy_only=False) for f in ("xmin", "ymin", "xmax", "ymax")])
    else:
        bounds = np.zeros((0, 4))
    lon, lat = bbox_centres(bounds)
    lat_n, lon_n = latlon_norm(lon, lat)
    times = rows.column("datetime").cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False)
    times = np.asarray(times).astype("datetime64[us]")
    week_n, hour_n = time_norm(times)
    return {
        "pixels": pixels.astype(np.float32, copy=False),
        "nodata_mask": mask.astype(bool, copy=False),
        "lon_norm": lon_n,
        "lat_norm": lat_n,
        "week_norm": week_n,
        "hour_norm": hour_n,
        "chipids": np.asarray(rows.column("chipid").to_pylist(), dtype=str),
        "item_ids": np.asarray(rows.column("item_id").to_pylist(), dtype=str),
        "datetimes": times,
        "lon": lon,
        "lat": lat,
        "bands": np.asarray(list(bands), dtype=str),
    }


def cube_bytes(arrays: dict[str, np.ndarray], level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """npz bytes of a cube, each array a DEFLATE-compressed ``.npy`` member.

    The same format as ``np.savez_compressed`` (``np.load`` reads it, with
    ``allow_pickle=False``), at zlib level ``level`` (0 = stored, 1 fastest,
    9 smallest; numpy's default is 6, about 6x slower than 1 on chip pixels
    for ~15 % smaller files).
    """
    if not 0 <= level <= 9:
        raise ConfigError(f"compression level must be 0..9, got {level}")
    sink = io.BytesIO()
    method = zipfile.ZIP_STORED if level == 0 else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(sink, "w", compression=method, compresslevel=level or None, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return sink.getvalue()


def write_cube(url: str, arrays: dict[str, np.ndarray], level: int = DEFAULT_COMPRESS_LEVEL) -> str:
    """Compress and write one cube whole (atomic) with its checksum record; returns ``url``."""
    storage.write_recorded(url, cube_bytes(arrays, level))
    return url


def cube_damage(data: bytes) -> str | None:
    """Why ``data`` is not a whole cube (not a zip, a member failing its CRC, no ``pixels``), or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            bad = zf.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check"
            if "pixels.npy" not in zf.namelist():
                return "it holds no pixels array"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def existing_cube_ok(url: str) -> bool:
    """True when the cube at ``url`` is there and whole (see the module docstring); a damaged
    one is logged (it is then written again)."""
    check = storage.verify_retry(url)
    if check.ok:
        return True
    if check.status == storage.MISSING:
        return False
    if check.status == storage.UNRECORDED:
        problem = cube_damage(storage.read_bytes_retry(url))
        if problem is None:
            return True
        logger.warning("cube %s is damaged (%s); writing it again", url, problem)
        return False
    logger.warning("cube is damaged (%s); writing it again", check.detail)
    return False


def make_cubes(
    config: PrechipConfig,
    cube_ids: Sequence[int],
    workers: int = 1,
    selection: Selection | None = None,
) -> list[str]:
    """Make cubes ``cube_ids`` (skipping existing ones unless ``overwrite``); returns written URLs."""
    selection = selection or prepare(config)
    platform = selection.platform
    ids = [k for k in cube_ids if 0 <= k < selection.n_cubes]
    if len(ids) < len(cube_ids):
        logger.info("%d of the requested cubes are beyond the %d cubes the index makes",
                    len(cube_ids) - len(ids), selection.n_cubes)
    started = time.time()
    if ids and not config.dry_run:
        # leftovers of a killed job of these cubes (older than this run)
        for url in [manifest_url(config.output, platform)] + [cube_url(config.output, platform, k) for k in ids]:
            storage.remove_stale_temps(url, before=started)
            storage.remove_stale_temps(storage.record_url(url), before=started)
    todo = []
    for k in ids:
        url = cube_url(config.output, platform, k)
        if not config.overwrite and existing_cube_ok(url):
            logger.info("cube %d exists at %s and matches its record; skipped", k, url)
            continue
        todo.append(k)
    if ids and not config.dry_run:
        check_manifest(config, selection)
    if not todo:
        return []
    spec = platform_bands(platform)
    first = selection.table.slice(0, 1)
    chip_size = int(first.column("chip_size")[0].as_py())
    per_cube = config.cube_size * spec.count * chip_size * chip_size * 5  # f32 pixels + bool mask
    per_batch = max(1, int(config.batch_bytes // max(per_cube, 1)))
    if config.dry_run:
        for k in todo:
            logger.info("dry run: would write cube %d (%d chips) to %s", k,
                        len(cube_members(selection, k, config.cube_size)), cube_url(config.output, platform, k))
        return []
    written: list[str] = []
    pending: list[Any] = []  # writes of the previous batch, compressing in the pool

    def finish(results: list[Any]) -> None:
        for result in results:
            url = result.get()
            logger.info("wrote %s", url)
            written.append(url)

    with ChipReader(workers) as reader:
        for start in range(0, len(todo), per_batch):
            batch = todo[start:start + per_batch]
            members = [cube_members(selection, k, config.cube_size) for k in batch]
            rows_idx = np.concatenate(members)
            rows = selection.table.take(pa.array(rows_idx))
            tasks = plan_reads(rows, config.data, platform, config.mountpath)
            pixels = np.zeros((len(rows_idx), spec.count, chip_size, chip_size), dtype=np.float32)
            mask = np.zeros(pixels.shape, dtype=bool)
            for result in reader.run(tasks, desc=f"cubes {batch[0]}-{batch[-1]}"):
                idx = np.asarray(result.slots)
                if result.pixels is None:
                    # items lacking a band asset were left out by prepare(); what remains
                    # (a band number beyond an asset's bands) is bad input, not a cube to drop
                    raise ItemError(f"{result.missing}; the platform's bands are a contract "
                                    "(fix the item or leave it out of the index)")
                pixels[idx] = result.pixels
                mask[idx] = result.mask
            finish(pending)  # at most two batches in memory
            pending = []
            offset = 0
            for k, member in zip(batch, members, strict=True):
                n = len(member)
                arrays = cube_arrays(
                    rows.slice(offset, n), pixels[offset:offset + n], mask[offset:offset + n], spec.band_order
                )
                url = cube_url(config.output, platform, k)
                pending.append(reader.submit(write_cube, url, arrays, config.compress_level))
                offset += n
        finish(pending)
    return written


def run_job(job_index: int, config: PrechipConfig, workers: int = 1) -> list[str]:
    """Array-job task ``job_index``: make its ``cubes_per_job`` cubes."""
    selection = prepare(config)
    check_selection(config, selection)
    ids = job_cubes(job_index, config.cubes_per_job, selection.n_cubes)
    if not ids:
        if selection.n_cubes:  # (no cube at all was reported by check_selection)
            empty_selection(
                f"job {job_index} makes no cube: the selection makes {selection.n_cubes} cubes, i.e. jobs "
                f"0..{job_count(selection.n_cubes, config.cubes_per_job) - 1} of {config.cubes_per_job} "
                "(--cubes-per-job)", config.allow_empty)
        return []
    return make_cubes(config, ids, workers=workers, selection=selection)


# --- command line ------------------------------------------------------------------------------------


def _fraction_or_none(text: str, var: str) -> float | None:
    if text.strip().lower() in ("none", "off", ""):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{var}={text!r} is not a fraction between 0 and 1 (or 'none')") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{var}={text!r} is not a fraction between 0 and 1")
    return value


def fraction_setting(value: str | None, var: str, default: float | None, flag: str = "") -> float | None:
    """A 0-1 fraction from a flag or environment variable; ``none`` disables it; ``0`` means 0."""
    text = jobs.env_str(value, var, None)
    if text is None:
        return default
    return _fraction_or_none(text, (flag or "flag") if value is not None else var)


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``stacchip-prechip``."""
    p = ArgumentParser(
        prog="stacchip-prechip",
        description="Write shuffled npz cubes of indexed chips (array job or local process pool).",
    )
    p.add_argument("--data", help="scenes root: bucket name, s3:// URL or path (env STACCHIP_DATA_BUCKET)")
    p.add_argument("--indexpath", help="merged index, directory or s3:// prefix of index files (env STACCHIP_INDEXPATH)")
    p.add_argument("--chips", help="where cubes go: bucket name, s3:// URL or path (env STACCHIP_CHIP_BUCKET)")
    p.add_argument("--platform", help="platform to cube (env STACCHIP_PLATFORM)")
    p.add_argument("--cubes-per-job", type=int, help="cubes per array task (env STACCHIP_CUBES_PER_JOB, default 10)")
    p.add_argument("--cube-size", type=int, help=f"chips per cube (env STACCHIP_CUBE_SIZE, default {CUBESIZE})")
    p.add_argument("--max-nodata", help="largest nodata fraction, 0-1 or 'none' (env STACCHIP_MAX_NODATA, "
                   f"default {DEFAULT_MAX_NODATA})")
    p.add_argument("--max-cloud", help="largest cloud fraction, 0-1 or 'none' (env STACCHIP_MAX_CLOUD, default none)")
    p.add_argument("--seed", type=int, help=f"shuffle seed (env STACCHIP_SEED, default {DEFAULT_SEED})")
    p.add_argument("--mountpath", help="re-root asset hrefs under this local directory (env STACCHIP_MOUNTPATH)")
    p.add_argument("--overwrite", action="store_true", default=None, help="rewrite cubes that exist")
    p.add_argument("--partial", action="store_true", default=None,
                   help="also write the last, incomplete cube (env STACCHIP_PARTIAL_CUBES)")
    p.add_argument("--compress-level", type=int, help="zlib level of the npz, 0-9 (env STACCHIP_COMPRESS_LEVEL, "
                   f"default {DEFAULT_COMPRESS_LEVEL})")
    p.add_argument("--all", action="store_true", help="run every job of the array locally")
    p.add_argument("--allow-empty", action="store_true", default=None,
                   help="exit 0 when the index and filters select no cube, or this job has none "
                   "(env STACCHIP_ALLOW_EMPTY; default: exit 2 saying why)")
    jobs.add_job_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> PrechipConfig:
    """A :class:`PrechipConfig` from parsed flags and the environment."""
    data = jobs.env_str(args.data, "STACCHIP_DATA_BUCKET", required=True, flag="--data")
    indexpath = jobs.env_str(args.indexpath, "STACCHIP_INDEXPATH", required=True, flag="--indexpath")
    chips = jobs.env_str(args.chips, "STACCHIP_CHIP_BUCKET", required=True, flag="--chips")
    return PrechipConfig(
        data=jobs.output_root(str(data)),
        index=str(indexpath) if "://" in str(indexpath) else os.path.expanduser(str(indexpath)),
        output=jobs.output_root(str(chips)),
        platform=jobs.env_str(args.platform, "STACCHIP_PLATFORM", None),
        cube_size=jobs.env_int(args.cube_size, "STACCHIP_CUBE_SIZE", CUBESIZE, flag="--cube-size", minimum=1) or CUBESIZE,
        cubes_per_job=jobs.env_int(args.cubes_per_job, "STACCHIP_CUBES_PER_JOB", 10, flag="--cubes-per-job",
                                   minimum=1) or 10,
        seed=jobs.env_int(args.seed, "STACCHIP_SEED", DEFAULT_SEED, flag="--seed", minimum=0) or 0,
        max_nodata=fraction_setting(args.max_nodata, "STACCHIP_MAX_NODATA", DEFAULT_MAX_NODATA, "--max-nodata"),
        max_cloud=fraction_setting(args.max_cloud, "STACCHIP_MAX_CLOUD", None, "--max-cloud"),
        overwrite=jobs.env_bool(args.overwrite, "STACCHIP_OVERWRITE", False),
        partial=jobs.env_bool(args.partial, "STACCHIP_PARTIAL_CUBES", False),
        mountpath=jobs.env_str(args.mountpath, "STACCHIP_MOUNTPATH", None),
        dry_run=jobs.env_bool(args.dry_run, "STACCHIP_DRY_RUN", False),
        compress_level=_level(jobs.env_int(args.compress_level, "STACCHIP_COMPRESS_LEVEL", DEFAULT_COMPRESS_LEVEL,
                                           flag="--compress-level", minimum=0)),
        allow_empty=jobs.env_bool(args.allow_empty, "STACCHIP_ALLOW_EMPTY", False),
    )


def _level(value: int | None) -> int:
    level = DEFAULT_COMPRESS_LEVEL if value is None else int(value)
    if level > 9:
        raise ConfigError(f"compression level must be 0..9, got {level}")
    return level


def run(argv: Sequence[str] | None = None) -> jobs.RunSummary:
    """Parse ``argv`` and run the requested jobs."""
    args = build_parser().parse_args(argv)
    jobs.setup_logging(args.verbose, args.quiet)
    config = config_from_args(args)
    workers = jobs.resolve_workers(args.workers)
    if args.all:
        selection = prepare(config)
        check_selection(config, selection)
        indices = list(range(job_count(selection.n_cubes, config.cubes_per_job)))
    else:
        indices = jobs.resolve_indices(args.index, args.range_spec)
    if len(indices) == 1:
        # One task: the pool reads chips inside it.
        return jobs.run_tasks(functools.partial(run_job, config=config, workers=workers), indices, 1,
                              desc="prechip jobs")
    # Many tasks locally: one process per job, each reading its chips inline.
    return jobs.run_tasks(functools.partial(run_job, config=config, workers=1), indices, workers,
                          desc="prechip jobs")


def process() -> None:
    """Console script ``stacchip-prechip`` (upstream's entry point name)."""
    raise SystemExit(jobs.main(run, prog="stacchip-prechip"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stacchip-prechip`` with ``argv``; returns the exit status."""
    return jobs.main(run, argv, prog="stacchip-prechip")


if __name__ == "__main__":  # pragma: no cover
    process()
