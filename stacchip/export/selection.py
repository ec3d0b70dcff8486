"""Which chips an export uses, in which order: selection, shuffle, fingerprint.

:func:`select_chips` keeps the chips of an index that pass the filters
(platform, any of its catalog names; largest nodata and cloud fractions, 0-1),
sorted by ``chipid``; :func:`prepare` leaves out the items lacking one of the
platform's bands (:func:`items_lacking_bands`), refuses unsafe item ids
(:func:`check_item_ids`) and shuffles the rest with a permutation seeded by
``seed`` (:func:`permutation`, numpy PCG64). Cube ``k`` of ``cube_size``
chips holds permutation entries ``k*cube_size .. (k+1)*cube_size``
(:func:`cube_members`): every chip lands in at most one cube, and a cube's
members depend only on the index, the filters and the seed. The selection's
``fingerprint`` (SHA-256 of the seed, cube size, platform and chip ids)
identifies that membership.

An empty selection is an :class:`~stacchip.errors.EmptySelectionError`
saying how many rows were read and what each filter kept
(:func:`explain_selection`, :func:`check_selection`), unless allowed.

What a selection depends on is read from a settings object
(:class:`SelectionSettings`: ``index``, ``data``, ``platform``,
``max_nodata``, ``max_cloud``, ``seed``, ``cube_size``, ``partial``,
``allow_empty``; optionally ``mode``, ``items_per_job`` and ``mix_items``
of prechip's locality mode, :mod:`stacchip.export.locality`), such as
:class:`SelectionConfig` or prechip's ``PrechipConfig``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stacchip import storage
from stacchip.errors import (
    AssetNotFoundError,
    ConfigError,
    EmptySelectionError,
    IndexFileError,
    UnsafePathError,
)
from stacchip.export import locality
from stacchip.export.cube import CUBESIZE
from stacchip.export.locality import Dealing
from stacchip.index import check_fraction, open_index
from stacchip.platforms import canonical_platform, platform_aliases, platform_bands
from stacchip.utils import load_item_under

logger = logging.getLogger(__name__)

#: Seed of the shuffle (upstream used 42).
DEFAULT_SEED = 42
#: Largest nodata fraction of a chip by default.
DEFAULT_MAX_NODATA = 0.05
#: Index columns an export reads.
COLUMNS = [
    "chipid", "item_id", "platform", "datetime", "chip_index_x", "chip_index_y",
    "chip_size", "cloud_cover_percentage", "nodata_percentage", "bbox",
]
#: Parallel item reads when checking which items hold the platform's bands.
ITEM_CHECK_THREADS = 16


class SelectionSettings(Protocol):
    """What a selection depends on (prechip's ``PrechipConfig`` has all of it)."""

    @property
    def index(self) -> Any: ...
    @property
    def data(self) -> str: ...
    @property
    def platform(self) -> str | None: ...
    @property
    def max_nodata(self) -> float | None: ...
    @property
    def max_cloud(self) -> float | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def cube_size(self) -> int: ...
    @property
    def partial(self) -> bool: ...
    @property
    def allow_empty(self) -> bool: ...


@dataclass(frozen=True)
class SelectionConfig:
    """:class:`SelectionSettings` of an export that is not prechip (e.g. statistics over the
    index): ``data`` holds ``{platform}/{item_id}/stac_item.json``, ``index`` the index
    file(s), directory or prefix; fractions are 0-1 (``None``: no filter); ``cube_size``
    chips make one share of the shuffle."""

    index: Any
    data: str
    platform: str | None = None
    max_nodata: float | None = DEFAULT_MAX_NODATA
    max_cloud: float | None = None
    seed: int = DEFAULT_SEED
    cube_size: int = CUBESIZE
    partial: bool = False
    allow_empty: bool = False


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
    0.05 is below float32(0.05), so a chip stored with exactly the limit would be dropped.
    A limit that is no fraction 0-1 (``20`` for 20 %) is a :class:`ConfigError`."""
    limit = check_fraction(limit, {"nodata_percentage": "max_nodata"}.get(column, "max_cloud"))
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
    #: locality mode: the items dealt to each task (:mod:`stacchip.export.locality`); None in global mode
    dealing: Dealing | None = None


def prepare(config: SelectionSettings) -> Selection:
    """Select, sort and shuffle the chips of ``config``."""
    if config.cube_size < 1:
        raise ConfigError(f"cube size must be >= 1, got {config.cube_size}")
    mode = getattr(config, "mode", locality.GLOBAL)
    items_per_job = int(getattr(config, "items_per_job", locality.DEFAULT_ITEMS_PER_JOB))
    mix_items = int(getattr(config, "mix_items", locality.DEFAULT_MIX_ITEMS))
    locality.check_settings(mode, items_per_job, mix_items)
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
    membership = fingerprint(table, config.seed, config.cube_size, platform)
    dealing = None
    if mode == locality.LOCALITY:
        dealing = locality.deal(table, config.seed, config.cube_size, items_per_job, config.partial)
        n = dealing.n_cubes
        membership = locality.fingerprint(membership, items_per_job, mix_items, config.partial,
                                          int(getattr(config, "strip_px", locality.STRIP_PX)))
        logger.info("locality mode: %d items dealt to %d tasks of %d, cubes mix %d items",
                    sum(len(t) for t in dealing.tasks), len(dealing.tasks), items_per_job, mix_items)
    logger.info(
        "%d chips pass the filters (max nodata %s, max cloud %s): %d cubes of %d, seed %d",
        table.num_rows, config.max_nodata, config.max_cloud, n, config.cube_size, config.seed,
    )
    return Selection(table=table, order=order, platform=platform, n_cubes=n, fingerprint=membership,
                     excluded=excluded, dealing=dealing)


def fingerprint(table: pa.Table, seed: int, cube_size: int, platform: str) -> str:
    """SHA-256 (hex) of what decides cube membership: seed, cube size, platform and the
    ``chipid`` column of the sorted selection."""
    digest = hashlib.sha256(f"seed={seed};cube_size={cube_size};platform={platform}\n".encode())
    ids = table.column("chipid").combine_chunks().cast(pa.large_string())
    if len(ids):
        # value lengths and bytes, read from the Arrow buffers (no Python strings)
        offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + len(ids) + 1]
        digest.update(np.diff(offsets).astype("<i8").tobytes())
        digest.update(memoryview(ids.buffers()[2])[int(offsets[0]):int(offsets[-1])])
    return digest.hexdigest()


def items_lacking_bands(table: pa.Table, data: str, platform: str) -> dict[str, str]:
    """``{item_id: why}`` for the items of ``table`` whose STAC item lacks an asset the
    platform's band order needs (the platform's bands are a contract: such items are
    left out of the selection up front, never by dropping whole cubes later).

    Reads every item's JSON under ``data`` (in parallel); an item that cannot be
    read at all is an error naming it.
    """
    spec = platform_bands(platform)
    distinct = table.select(["platform", "item_id"]).group_by(["platform", "item_id"]).aggregate([])
    pairs = sorted(zip(distinct.column("platform").to_pylist(), distinct.column("item_id").to_pylist(), strict=True))

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


def check_selection(config: SelectionSettings, selection: Selection) -> None:
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


def cube_members(selection: Selection, cube_id: int, cube_size: int) -> np.ndarray:
    """Row numbers (into ``selection.table``) of cube ``cube_id``'s chips, in cube order."""
    return selection.order[cube_id * cube_size:(cube_id + 1) * cube_size]
