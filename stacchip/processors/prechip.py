"""``stacchip-prechip``: shuffled npz "cubes" (or WebDataset shards) of chips for training.

Reads the chips of a merged index (or a directory / ``s3://`` prefix of index
files) from the scenes in the data bucket and writes cubes of ``CUBESIZE``
chips to ``{chip bucket}/{VERSION}/{platform}/cube_{k}.npz``, the layout the
Clay training data module loads; with ``--format webdataset`` tar shards
``shard-{k:06d}.tar.gz`` holding the same chips in the same order, one sample
per chip (:mod:`stacchip.export.shards`). Both are compressed by ISA-L
(:mod:`stacchip.export.codec`).

What a cube holds (upstream's arrays ``pixels``, ``lat_norm``, ``lon_norm``,
``week_norm``, ``hour_norm``, plus ``nodata_mask``, ``chipids``, ``item_ids``,
``datetimes``, ``lon``, ``lat`` and ``bands``): :mod:`stacchip.export.cube`;
the encodings: :mod:`stacchip.encodings`. This module is the command (flags,
environment variables, array jobs); selection, reading and the cube format
live in :mod:`stacchip.export`, and every name that moved there is importable
from here as before.

Sampling: the filtered index is sorted by ``chipid`` and shuffled with a
permutation seeded by ``seed``; cube ``k`` holds permutation entries
``k*N .. (k+1)*N``. Every chip lands in at most one cube, and a cube's members
depend only on the index, the filters and the seed, never on which job makes
it. Job ``j`` makes cubes ``j*cubes_per_job .. (j+1)*cubes_per_job - 1``;
within a job the chips of a batch of cubes (``batch_bytes`` of chips) are read
item by item (each item's assets opened once) in block order, so blocks are
decoded once, then put back in their random cube slots; tiles decode in the
tile engine's threads (one per core) and cubes are compressed and written in
``--workers`` threads beside the reading (``--all`` with several global jobs:
``--workers`` processes, one job each). The selection is made once, by the first
task (or ``--plan``), and written beside the outputs as the plan; the other tasks
read their share of it and the STAC items they touch
(:mod:`stacchip.export.plan`). A cube is written whole or not at all, with a checksum
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

Locality mode (``--mode locality``): instead of one shuffle over the whole
selection, the items are dealt to tasks by a seeded shuffle (``--items-per-job``
items each; the array has one task per share), each task reads each of its
items once in tile order, and its cubes shuffle chips across ``--mix-items``
items read side by side. Much faster on a large catalog (no chip shares a tile
in global mode there), at the price of cubes that mix a few items rather than
the whole catalog; details and memory in :mod:`stacchip.export.locality`.
``--cubes-per-job`` does not apply there; ``--all`` and ``--range`` run the
tasks one after another in this process.

Item ids and the platform of the index become paths
(``{data}/{platform}/{item_id}/stac_item.json``): each must be a safe path
segment (:func:`stacchip.storage.safe_segment`), or the run is refused
(:class:`~stacchip.errors.ConfigError`, exit 2) before any item is read.

Nothing to do is an error unless allowed: an index and filters that select no
cube stop with exit status 2 and a line saying how many rows were read and what
each filter (``--platform``, ``--max-nodata``, ``--max-cloud``, ``--cube-size``)
kept; ``--allow-empty`` (``STACCHIP_ALLOW_EMPTY=1``) makes such a run exit 0.
A task whose share is empty (beyond the plan's tasks, or a locality share whose
chips make no whole cube) has done its job: one warning line, exit 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from stacchip import storage
from stacchip.console import ArgumentParser, echo
from stacchip.encodings import (  # noqa: F401  (moved; importable from here as before)
    bbox_centres,
    latlon_norm,
    normalize_latlon,
    normalize_timestamp,
    sincos,
    time_angles,
    time_norm,
)
from stacchip.errors import ConfigError, StacchipError
from stacchip.export.chip_reader import (  # noqa: F401  (moved; importable from here as before)
    CHIPPER_CACHE,
    TASK_CHIPS,
    ChipReader,
    item_reader,
    ReadResult,
    ReadTask,
    _open_item,
    _OpenItem,
    close_open_items,
    plan_reads,
    read_task,
)
from stacchip.export import locality
from stacchip.export import plan as plans
from stacchip.export.cube import (  # noqa: F401  (moved; importable from here as before)
    CUBESIZE,
    DEFAULT_COMPRESS_LEVEL,
    VERSION,
    cube_arrays,
    cube_bytes,
    cube_damage,
    cube_url,
    existing_cube_ok,
    manifest_url,
    write_cube,
)
from stacchip.export.outputs import FORMATS, NPZ, WEBDATASET, output_format  # noqa: F401
from stacchip.export.plan import check_manifest  # noqa: F401  (moved; importable from here as before)
from stacchip.export.selection import (  # noqa: F401  (moved; importable from here as before)
    COLUMNS,
    DEFAULT_MAX_NODATA,
    DEFAULT_SEED,
    ITEM_CHECK_THREADS,
    Selection,
    check_item_ids,
    check_selection,
    cube_count,
    cube_members,
    empty_selection,
    explain_selection,
    fingerprint,
    items_lacking_bands,
    permutation,
    prepare,
    select_chips,
)
from stacchip.processors import jobs, settings
from stacchip.utils import load_item_under
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

logger = logging.getLogger(__name__)

#: Seconds after which a temporary file of the shared manifest is a killed task's leftover
#: (array tasks running side by side write the manifest too).
MANIFEST_TEMP_AGE = 3600.0
#: Memory for the chips of one global-mode batch of cubes (read before their cubes are
#: assembled), bytes: 3 GiB holds the default 10 cubes of 128 10-band 256 px uint16 chips
#: (~0.25 GB each with masks), so a task decodes each tile once; besides it, ``--workers + 1``
#: cubes are being written (float32 pixels and masks: ~0.4 GB per cube).
DEFAULT_BATCH_BYTES = 3 * 1024**3


# --- making cubes ----------------------------------------------------------------------------------


def _compress_level(text: str, label: str) -> int:
    level = settings.Integer(minimum=0).read(text, label)
    if level > 9:
        raise ConfigError(f"compression level must be 0..9, got {level} ({label})")
    return level


def _format(text: str, label: str) -> str:
    value = text.strip().lower()
    if value not in FORMATS:
        raise ConfigError(f"prechip format must be one of {sorted(FORMATS)}, got {text!r} ({label})")
    return value


def _mode(text: str, label: str) -> str:
    value = text.strip().lower()
    if value not in locality.MODES:
        raise ConfigError(f"prechip mode must be one of {list(locality.MODES)}, got {text!r} ({label})")
    return value


@dataclass(frozen=True)
class PrechipConfig:
    """Everything a prechip job needs; also the table of ``stacchip-prechip``'s settings (flag,
    environment variable, type, default, unit, help: :mod:`stacchip.processors.settings`).

    ``data``: root holding ``{platform}/{item_id}/stac_item.json`` (local path,
    ``s3://`` URL); ``index``: index file(s), directory or prefix; ``output``:
    where ``{VERSION}/{platform}/cube_{k}.npz`` go. Fractions are 0-1.
    """

    data: str = settings.setting(
        flag="--data", env="STACCHIP_DATA_BUCKET", kind=settings.Location(), required=True,
        help="scenes root: bucket name, s3:// URL or path")
    index: Any = settings.setting(
        flag="--indexpath", env="STACCHIP_INDEXPATH", kind=settings.IndexPath(), required=True,
        help="merged index, directory or s3:// prefix of index files")
    output: str = settings.setting(
        flag="--chips", env="STACCHIP_CHIP_BUCKET", kind=settings.Location(), required=True,
        help="where cubes go: bucket name, s3:// URL or path")
    platform: str | None = settings.setting(None, flag="--platform", env="STACCHIP_PLATFORM", help="platform to cube")
    cube_size: int = settings.setting(
        CUBESIZE, flag="--cube-size", env="STACCHIP_CUBE_SIZE", kind=settings.Integer(1), unit="chips",
        help="chips per cube")
    cubes_per_job: int = settings.setting(
        10, flag="--cubes-per-job", env="STACCHIP_CUBES_PER_JOB", kind=settings.Integer(1), unit="cubes",
        help="cubes per array task")
    seed: int = settings.setting(
        DEFAULT_SEED, flag="--seed", env="STACCHIP_SEED", kind=settings.Integer(0), help="shuffle seed")
    max_nodata: float | None = settings.setting(
        DEFAULT_MAX_NODATA, flag="--max-nodata", env="STACCHIP_MAX_NODATA", kind=settings.Fraction(optional=True),
        unit="fraction 0-1 or 'none'", help="largest nodata fraction of a chip")
    max_cloud: float | None = settings.setting(
        None, flag="--max-cloud", env="STACCHIP_MAX_CLOUD", kind=settings.Fraction(optional=True),
        unit="fraction 0-1 or 'none'", help="largest cloud fraction of a chip")
    overwrite: bool = settings.setting(
        False, flag="--overwrite", env="STACCHIP_OVERWRITE", kind=settings.Bool(), help="rewrite cubes that exist")
    partial: bool = settings.setting(
        False, flag="--partial", env="STACCHIP_PARTIAL_CUBES", kind=settings.Bool(),
        help="also write the last, incomplete cube (locality mode: of every task; without it up to "
             "cube-size - 1 chips per task are left out)")
    mountpath: str | None = settings.setting(
        None, flag="--mountpath", env="STACCHIP_MOUNTPATH", help="re-root asset hrefs under this local directory")
    #: Memory for the pixels of the cubes assembled at once (not a flag).
    batch_bytes: int = DEFAULT_BATCH_BYTES
    dry_run: bool = settings.setting(
        False, flag="--dry-run", env="STACCHIP_DRY_RUN", kind=settings.Bool(), shared=True,
        help="print what would be written; write nothing")
    compress_level: int = settings.setting(
        DEFAULT_COMPRESS_LEVEL, flag="--compress-level", env="STACCHIP_COMPRESS_LEVEL",
        kind=settings.Custom(_compress_level, "integer"),
        unit="0 stored, 1-3 ISA-L DEFLATE levels (4-9 as 3)",
        help="compression of the npz members and the shards (0: .tar shards, else .tar.gz)")
    format: str = settings.setting(
        NPZ, flag="--format", env="STACCHIP_PRECHIP_FORMAT", kind=settings.Custom(_format, "npz|webdataset"),
        help="npz: upstream's cubes; webdataset: tar shards of one sample per chip (.npy pixels, .mask.npy, "
             ".json), the same chips in the same order as the cubes")
    plan_wait: float = settings.setting(
        plans.DEFAULT_PLAN_WAIT, flag="--plan-wait", env="STACCHIP_PLAN_WAIT", kind=settings.Number(0),
        unit="seconds", help="how long a task waits for the plan another task is making before making it itself")
    mode: str = settings.setting(
        locality.GLOBAL, flag="--mode", env="STACCHIP_PRECHIP_MODE",
        kind=settings.Custom(_mode, "global|locality"),
        help="global: shuffle over the whole selection (upstream); locality: items dealt to tasks, read once "
             "in tile order, cubes mixing --mix-items items")
    items_per_job: int = settings.setting(
        locality.DEFAULT_ITEMS_PER_JOB, flag="--items-per-job", env="STACCHIP_ITEMS_PER_JOB",
        kind=settings.Integer(1), unit="items", help="locality mode: items dealt to each array task")
    mix_items: int = settings.setting(
        locality.DEFAULT_MIX_ITEMS, flag="--mix-items", env="STACCHIP_MIX_ITEMS", kind=settings.Integer(1),
        unit="items", help="locality mode: items a cube mixes (read side by side; memory grows with it)")
    #: Locality mode: height of the strip of each item read per round, pixels (not a flag).
    strip_px: int = locality.STRIP_PX
    #: Accept a selection that makes no cube (else :class:`EmptySelectionError`).
    allow_empty: bool = settings.setting(
        False, flag="--allow-empty", env="STACCHIP_ALLOW_EMPTY", kind=settings.Bool(),
        help="exit 0 when the index and filters select no cube (else exit 2 saying why)")


def job_cubes(job_index: int, cubes_per_job: int, n_cubes: int) -> list[int]:
    """Cube ids job ``job_index`` makes."""
    return [k for k in range(job_index * cubes_per_job, (job_index + 1) * cubes_per_job) if k < n_cubes]


def job_count(n_cubes: int, cubes_per_job: int) -> int:
    """Array size needed to make ``n_cubes`` cubes."""
    return math.ceil(n_cubes / cubes_per_job)


def _outputs_to_make(config: PrechipConfig, platform: str, ids: Sequence[int]) -> list[int]:
    """The outputs of ``ids`` to write: all but the existing whole ones (unless ``overwrite``);
    removes a killed job's leftovers first."""
    fmt = output_format(config.format)
    started = time.time()
    if ids and not config.dry_run:
        # leftovers of a killed job of these outputs (older than this run); the manifest is
        # written by every task, so only temps far older than any write under way are its leftovers
        storage.remove_stale_temps(manifest_url(config.output, platform), before=started - MANIFEST_TEMP_AGE)
        for url in [fmt.url(config.output, platform, k, config.compress_level) for k in ids]:
            storage.remove_stale_temps(url, before=started)
            storage.remove_stale_temps(storage.record_url(url), before=started)
    todo = []
    for k in ids:
        url = fmt.url(config.output, platform, k, config.compress_level)
        if not config.overwrite and fmt.existing_ok(url):
            logger.info("%s %d exists at %s and matches its record; skipped", fmt.noun, k, url)
            continue
        todo.append(k)
    return todo


def _cubes_to_make(config: PrechipConfig, selection: Selection, cube_ids: Sequence[int]) -> list[int]:
    """The cubes of ``cube_ids`` to write: those the selection makes, less the existing whole ones
    (unless ``overwrite``); removes a killed job's leftovers and checks the manifest first."""
    ids = [k for k in cube_ids if 0 <= k < selection.n_cubes]
    if len(ids) < len(cube_ids):
        logger.info("%d of the requested cubes are beyond the %d cubes the index makes",
                    len(cube_ids) - len(ids), selection.n_cubes)
    todo = _outputs_to_make(config, selection.platform, ids)
    if ids and not config.dry_run:
        plan = plans.Plan("", "", {"platform": selection.platform, "manifest": plans.manifest_record(
            config, selection, _summary(config, selection))})
        check_manifest(config, plan)
    return todo


def _summary(config: PrechipConfig, selection: Selection) -> dict[str, list[int]]:
    """Per task: first output, outputs, chips (as a plan records them)."""
    dealing = selection.dealing
    if dealing is not None:
        ends = list(dealing.first_cube[1:]) + [dealing.n_cubes]
        return {"first_output": list(dealing.first_cube),
                "outputs": [e - f for f, e in zip(dealing.first_cube, ends, strict=True)],
                "chips": list(dealing.chips)}
    n = jobs_of(config, selection)
    firsts = [j * config.cubes_per_job for j in range(n)]
    counts = [len(job_cubes(j, config.cubes_per_job, selection.n_cubes)) for j in range(n)]
    return {"first_output": firsts, "outputs": counts,
            "chips": [min(c * config.cube_size, selection.table.num_rows - f * config.cube_size)
                      for f, c in zip(firsts, counts, strict=True)]}


def make_cubes(
    config: PrechipConfig,
    cube_ids: Sequence[int],
    workers: int = 1,
    selection: Selection | None = None,
) -> list[str]:
    """Make outputs (cubes, or shards with ``format="webdataset"``) ``cube_ids`` of a prepared
    selection (skipping existing ones unless ``overwrite``); returns the written URLs. Array
    tasks use :func:`run_job` (through the plan) instead."""
    selection = selection or prepare(config)
    todo = _cubes_to_make(config, selection, cube_ids)
    if not todo:
        return []
    wanted = set(todo)
    written: list[str] = []
    read_item, write = _plan_io(config, selection.platform, selection.table)
    try:
        for plan in _plans(config, selection, todo):
            mine = {k for rnd in plan.rounds for k, _ in rnd.cubes} & wanted
            if config.dry_run:
                _dry_run(config, selection.platform, plan, mine)
                continue
            written += locality.run_plan(plan, mine, read_item, write, workers)
    finally:
        close_open_items()
    return written


def _dry_run(config: PrechipConfig, platform: str, plan: locality.TaskPlan, mine: set[int]) -> None:
    fmt = output_format(config.format)
    for rnd in plan.rounds:
        for k, rows in rnd.cubes:
            if k in mine:
                logger.info("dry run: would write %s %d (%d chips) to %s", fmt.noun, k, len(rows),
                            fmt.url(config.output, platform, k, config.compress_level))


def _per_batch(config: PrechipConfig, platform: str, table: pa.Table) -> int:
    """Outputs of a global-mode task read per round: ``batch_bytes`` of chips, held in their
    source dtype (its size from the first item's ``raster:bands``, else 4 bytes) with their
    masks until their output is whole. A round reads its chips item by item in block order:
    the fewer rounds, the fewer tiles decoded again in the next one."""
    spec = platform_bands(platform)
    chip_size = int(table.column("chip_size")[0].as_py()) if table.num_rows else 256
    itemsize = _pixel_bytes(config, platform, table)
    per_cube = config.cube_size * spec.count * chip_size * chip_size * (itemsize + 1)
    return max(1, int(config.batch_bytes // max(per_cube, 1)))


def _pixel_bytes(config: PrechipConfig, platform: str, table: pa.Table) -> int:
    """Bytes per pixel of the platform's bands in the first item of ``table`` (its STAC
    ``raster:bands`` ``data_type``; 4 when it does not say)."""
    if not table.num_rows:
        return 4
    try:
        item = load_item_under(config.data, platform, str(table.column("item_id")[0].as_py()))
        spec = platform_bands(platform)
        sizes = []
        for key, (_, band) in zip(spec.asset_keys(item), spec.sources, strict=True):
            bands = item.assets[key].extra_fields.get("raster:bands") or []
            sizes.append(np.dtype(bands[band]["data_type"]).itemsize if band < len(bands) else 4)
        return max(sizes, default=4)
    except (StacchipError, KeyError, TypeError, ValueError, IndexError):
        return 4  # (the read itself names what is wrong with the item)


def _plans(config: PrechipConfig, selection: Selection, todo: Sequence[int]) -> Iterator[locality.TaskPlan]:
    """What reads which chips for cubes ``todo``: in locality mode the plan of every task that
    makes one of them (:mod:`stacchip.export.locality`); in global mode one plan reading the
    cubes in batches of ``batch_bytes`` of chips, item by item."""
    dealing = selection.dealing
    if dealing is not None:
        for task_index in sorted({dealing.task_of_cube(k) for k in todo}):
            plan = locality.plan_task(selection.table, dealing, task_index, config.seed, config.cube_size,
                                      config.mix_items, config.partial, config.strip_px)
            logger.info("%s", locality.describe(plan, config.mix_items))
            yield plan
        return
    yield locality.batched_plan(
        selection.table, [(k, cube_members(selection, k, config.cube_size)) for k in todo],
        _per_batch(config, selection.platform, selection.table))


def _plan_io(config: PrechipConfig, platform: str, table: pa.Table) -> tuple[locality.ReadItem, locality.WriteCube]:
    """How a task plan reads the chips of one item (rows of ``table``, in block order, in this
    process: tiles decode in the tile engine's threads) and writes one output (in a writer
    thread: conversion, compression, checksum and upload beside the reading)."""
    spec = platform_bands(platform)
    fmt = output_format(config.format)
    open_limit = max(CHIPPER_CACHE, config.mix_items)

    read_item = item_reader(config.data, platform, table, config.mountpath, open_limit)

    def write(output_id: int, rows: np.ndarray, chips: list[tuple[np.ndarray, np.ndarray]]) -> str:
        data = fmt.encode(output_id, table.take(pa.array(rows)), chips, spec.band_order, config.compress_level)
        url = fmt.url(config.output, platform, output_id, config.compress_level)
        storage.write_recorded(url, data)
        logger.info("wrote %s", url)
        return url

    return read_item, write


def job_ids(job_index: int, config: PrechipConfig, selection: Selection) -> list[int]:
    """Cube ids array task ``job_index`` makes: ``--cubes-per-job`` consecutive cubes in global
    mode, the cubes of the task's items in locality mode."""
    if selection.dealing is not None:
        dealing = selection.dealing
        if not 0 <= job_index < len(dealing.tasks):
            return []
        first = dealing.first_cube[job_index]
        end = dealing.first_cube[job_index + 1] if job_index + 1 < len(dealing.tasks) else dealing.n_cubes
        return list(range(first, end))
    return job_cubes(job_index, config.cubes_per_job, selection.n_cubes)


def jobs_of(config: PrechipConfig, selection: Selection) -> int:
    """Array size that makes every cube of ``selection``."""
    if selection.dealing is not None:
        return len(selection.dealing.tasks)
    return job_count(selection.n_cubes, config.cubes_per_job)


def run_job(job_index: int, config: PrechipConfig, workers: int = 1,
            selection: Selection | None = None, plan: plans.Plan | None = None,
            timings: dict[str, float] | None = None) -> list[str]:
    """Array-job task ``job_index``: make its outputs, as the plan says (read, or made and
    published when not there yet: :mod:`stacchip.export.plan`); ``selection``: the prepared
    selection of ``config``, if at hand (used only when the plan has to be made here).

    A selection that makes no output is :class:`EmptySelectionError` (unless ``allow_empty``);
    a task with nothing to do (beyond the plan's tasks, or a locality share whose chips make
    no whole cube) logs one warning line and succeeds. ``timings``, if given, gets the task's
    set-up (``setup_s``: plan, share, manifest, existing outputs; seconds) and whole run (``run_s``).
    """
    started = time.perf_counter()
    plan = plan or plans.obtain(config, selection)
    fmt = output_format(config.format)
    if plan.empty:
        empty_selection(plan.empty, config.allow_empty)
        return []
    ids = plan.task_outputs(job_index)
    if not ids:
        if 0 <= job_index < plan.n_tasks:
            logger.warning("task %d: its %d chips make no %s of %d (--partial keeps them); nothing to do",
                           job_index, plan.task_chips(job_index), fmt.noun, config.cube_size)
        else:
            logger.warning("task %d: nothing to do: the plan makes %d %ss in tasks 0..%d (the array is larger "
                           "than the work)", job_index, plan.n_outputs, fmt.noun, plan.n_tasks - 1)
        return []
    platform = plan.platform
    todo = _outputs_to_make(config, platform, ids)
    if not config.dry_run:
        plans.check_manifest(config, plan)
    if not todo:
        return []
    share, facts = plan.share(job_index)
    task_plan = plans.task_plan(config, share, facts, _per_batch(config, platform, share))
    if config.mode == locality.LOCALITY:
        logger.info("%s", locality.describe(task_plan, config.mix_items))
    if config.dry_run:
        _dry_run(config, platform, task_plan, set(todo))
        return []
    read_item, write = _plan_io(config, platform, share)
    if timings is not None:
        timings["setup_s"] = time.perf_counter() - started
    try:
        return locality.run_plan(task_plan, set(todo), read_item, write, workers)
    finally:
        close_open_items()
        if timings is not None:
            timings["run_s"] = time.perf_counter() - started


# --- command line ------------------------------------------------------------------------------------


#: A 0-1 fraction from a flag or environment variable (``none`` disables it); see
#: :func:`stacchip.processors.jobs.env_fraction`.
fraction_setting = jobs.env_fraction


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``stacchip-prechip`` (from the table :class:`PrechipConfig`)."""
    p = ArgumentParser(
        prog="stacchip-prechip",
        description="Write shuffled npz cubes (or WebDataset shards) of indexed chips (array job, or --all locally).",
    )
    settings.add_arguments(p, PrechipConfig)
    p.add_argument("--all", action="store_true", help="run every job of the array locally")
    p.add_argument("--plan", action="store_true",
                   help="only make the plan (the first step of an array job) and print the array size")
    jobs.add_job_arguments(p, workers_help=(
        "threads compressing and writing cubes beside the reading of one task (tiles decode on every "
        "core); with --all/--range over several global-mode tasks, processes running one task each"))
    return p


def config_from_args(args: argparse.Namespace) -> PrechipConfig:
    """A :class:`PrechipConfig` from parsed flags and the environment."""
    return settings.resolve(PrechipConfig, args)


def run(argv: Sequence[str] | None = None) -> jobs.RunSummary | int:
    """Parse ``argv`` and run the requested jobs (or, with ``--plan``, only make the plan)."""
    args = build_parser().parse_args(argv)
    jobs.setup_logging(args.verbose, args.quiet)
    config = config_from_args(args)
    workers = jobs.resolve_workers(args.workers)
    plan = None
    if args.plan or args.all:
        plan = plans.obtain(config)
        if plan.empty:
            empty_selection(plan.empty, config.allow_empty)
            return 0
        if args.plan:
            echo(f"plan {plan.folder}: {plan.n_outputs} {output_format(config.format).noun}s of "
                 f"{config.cube_size} chips in {plan.n_tasks} tasks (array indices 0..{plan.n_tasks - 1})")
            return 0
        indices = list(range(plan.n_tasks))
    else:
        indices = jobs.resolve_indices(args.index, args.range_spec)
    if len(indices) == 1 or config.mode == locality.LOCALITY:
        # One task, or locality tasks (each holds strips of several items): one after
        # another, each reading with the tile engine's threads and writing in ``workers``.
        return jobs.run_tasks(functools.partial(run_job, config=config, workers=workers, plan=plan),
                              indices, 1, desc="prechip jobs")
    # Many tasks locally: one process per job, each reading the published plan and its chips inline.
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
