"""``stacchip-prechip``: shuffled npz "cubes" of chips for training.

Reads the chips of a merged index (or a directory / ``s3://`` prefix of index
files) from the scenes in the data bucket and writes cubes of ``CUBESIZE``
chips to ``{chip bucket}/{VERSION}/{platform}/cube_{k}.npz``, the layout the
Clay training data module loads.

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
``--workers`` processes, one job each). A cube is written whole or not at all, with a checksum
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
cube, or a job index beyond the cubes the selection makes, stop with exit
status 2 and a line saying how many rows were read and what each filter
(``--platform``, ``--max-nodata``, ``--max-cloud``, ``--cube-size``) kept;
``--allow-empty`` (``STACCHIP_ALLOW_EMPTY=1``) makes such a run exit 0.
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
from stacchip.errors import AssetNotFoundError, ConfigError, IndexFileError, ItemError
from stacchip.export.chip_reader import (  # noqa: F401  (moved; importable from here as before)
    CHIPPER_CACHE,
    TASK_CHIPS,
    ChipReader,
    ReadResult,
    ReadTask,
    _open_item,
    _OpenItem,
    close_open_items,
    plan_reads,
    read_task,
)
from stacchip.export import locality
from stacchip.export.cube import (  # noqa: F401  (moved; importable from here as before)
    CUBESIZE,
    DEFAULT_COMPRESS_LEVEL,
    VERSION,
    check_manifest,
    cube_arrays,
    cube_bytes,
    cube_damage,
    cube_url,
    existing_cube_ok,
    manifest_url,
    write_cube,
)
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
#: assembled), bytes; besides it, ``--workers + 1`` cubes are being written (float32 pixels
#: and masks: ~0.4 GB per 128-chip, 10-band, 256 px cube).
DEFAULT_BATCH_BYTES = 1024**3


# --- making cubes ----------------------------------------------------------------------------------


def _compress_level(text: str, label: str) -> int:
    level = settings.Integer(minimum=0).read(text, label)
    if level > 9:
        raise ConfigError(f"compression level must be 0..9, got {level} ({label})")
    return level


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
        kind=settings.Custom(_compress_level, "integer"), unit="zlib level 0-9", help="compression of the npz")
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
        help="exit 0 when the index and filters select no cube, or this job has none (else exit 2 saying why)")


def job_cubes(job_index: int, cubes_per_job: int, n_cubes: int) -> list[int]:
    """Cube ids job ``job_index`` makes."""
    return [k for k in range(job_index * cubes_per_job, (job_index + 1) * cubes_per_job) if k < n_cubes]


def job_count(n_cubes: int, cubes_per_job: int) -> int:
    """Array size needed to make ``n_cubes`` cubes."""
    return math.ceil(n_cubes / cubes_per_job)


def _cubes_to_make(config: PrechipConfig, selection: Selection, cube_ids: Sequence[int]) -> list[int]:
    """The cubes of ``cube_ids`` to write: those the selection makes, less the existing whole ones
    (unless ``overwrite``); removes a killed job's leftovers and checks the manifest first."""
    platform = selection.platform
    ids = [k for k in cube_ids if 0 <= k < selection.n_cubes]
    if len(ids) < len(cube_ids):
        logger.info("%d of the requested cubes are beyond the %d cubes the index makes",
                    len(cube_ids) - len(ids), selection.n_cubes)
    started = time.time()
    if ids and not config.dry_run:
        # leftovers of a killed job of these cubes (older than this run); the manifest is
        # written by every task, so only temps far older than any write under way are its leftovers
        storage.remove_stale_temps(manifest_url(config.output, platform), before=started - MANIFEST_TEMP_AGE)
        for url in [cube_url(config.output, platform, k) for k in ids]:
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
    return todo


def make_cubes(
    config: PrechipConfig,
    cube_ids: Sequence[int],
    workers: int = 1,
    selection: Selection | None = None,
) -> list[str]:
    """Make cubes ``cube_ids`` (skipping existing ones unless ``overwrite``); returns written URLs."""
    selection = selection or prepare(config)
    todo = _cubes_to_make(config, selection, cube_ids)
    if not todo:
        return []
    wanted = set(todo)
    written: list[str] = []
    read_item, write = _plan_io(config, selection)
    try:
        for plan in _plans(config, selection, todo):
            mine = {k for rnd in plan.rounds for k, _ in rnd.cubes} & wanted
            if config.dry_run:
                for rnd in plan.rounds:
                    for k, rows in rnd.cubes:
                        if k in mine:
                            logger.info("dry run: would write cube %d (%d chips) to %s", k, len(rows),
                                        cube_url(config.output, selection.platform, k))
                continue
            written += locality.run_plan(plan, mine, read_item, write, workers)
    finally:
        close_open_items()
    return written


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
    spec = platform_bands(selection.platform)
    chip_size = int(selection.table.column("chip_size")[0].as_py())
    # chips held in their source dtype (up to 4 bytes) with their masks until their cube is whole
    per_cube = config.cube_size * spec.count * chip_size * chip_size * 5
    per_batch = max(1, int(config.batch_bytes // max(per_cube, 1)))
    yield locality.batched_plan(
        selection.table, [(k, cube_members(selection, k, config.cube_size)) for k in todo], per_batch)


def _plan_io(config: PrechipConfig, selection: Selection) -> tuple[locality.ReadItem, locality.WriteCube]:
    """How a cube plan reads the chips of one item (in block order, in this process: tiles
    decode in the tile engine's threads) and writes one cube."""
    spec = platform_bands(selection.platform)
    table = selection.table
    open_limit = max(CHIPPER_CACHE, config.mix_items)

    def read_item(item_id: str, rows: np.ndarray) -> Any:
        part = table.take(pa.array(rows))
        sizes = set(part.column("chip_size").to_pylist())
        if len(sizes) > 1:
            raise IndexFileError(f"item {item_id!r}: the index mixes chip sizes {sorted(sizes)}")
        xs = [int(v) for v in part.column("chip_index_x").to_pylist()]
        ys = [int(v) for v in part.column("chip_index_y").to_pylist()]
        row_of = {(x, y): int(r) for x, y, r in zip(xs, ys, rows, strict=True)}
        task = ReadTask(data=config.data, platform=selection.platform, item_id=item_id,
                        chip_size=int(sizes.pop()), slots=(), xs=(), ys=(), mountpath=config.mountpath)
        try:
            for x, y, pixels, mask in _open_item(task, open_limit).read_many(xs, ys, item_id):
                yield row_of[(x, y)], pixels, mask
        except AssetNotFoundError as exc:
            # items lacking a band asset were left out by prepare(); what remains (a band
            # number beyond an asset's bands) is bad input, not a cube to drop
            raise ItemError(f"{exc}; the platform's bands are a contract "
                            "(fix the item or leave it out of the index)") from exc

    def write(cube_id: int, rows: np.ndarray, pixels: np.ndarray, mask: np.ndarray) -> str:
        arrays = cube_arrays(table.take(pa.array(rows)), pixels, mask, spec.band_order)
        url = write_cube(cube_url(config.output, selection.platform, cube_id), arrays, config.compress_level)
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
            selection: Selection | None = None) -> list[str]:
    """Array-job task ``job_index``: make its cubes (see :func:`job_ids`); ``selection``:
    the prepared selection of ``config``, if at hand."""
    if selection is None:
        selection = prepare(config)
        check_selection(config, selection)
    ids = job_ids(job_index, config, selection)
    dealing = selection.dealing
    if not ids and dealing is not None and 0 <= job_index < len(dealing.tasks):
        # a share of items whose chips make no whole cube: nothing to write, and nothing wrong
        logger.warning("locality task %d: its %d chips make no cube of %d (--partial keeps them)",
                       job_index, dealing.chips[job_index], config.cube_size)
        return []
    if not ids:
        if selection.n_cubes:  # (no cube at all was reported by check_selection)
            per = ("(--items-per-job, locality mode)" if selection.dealing is not None
                   else f"of {config.cubes_per_job} (--cubes-per-job)")
            empty_selection(
                f"job {job_index} makes no cube: the selection makes {selection.n_cubes} cubes, i.e. jobs "
                f"0..{jobs_of(config, selection) - 1} {per}", config.allow_empty)
        return []
    return make_cubes(config, ids, workers=workers, selection=selection)


# --- command line ------------------------------------------------------------------------------------


#: A 0-1 fraction from a flag or environment variable (``none`` disables it); see
#: :func:`stacchip.processors.jobs.env_fraction`.
fraction_setting = jobs.env_fraction


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``stacchip-prechip`` (from the table :class:`PrechipConfig`)."""
    p = ArgumentParser(
        prog="stacchip-prechip",
        description="Write shuffled npz cubes of indexed chips (array job or local process pool).",
    )
    settings.add_arguments(p, PrechipConfig)
    p.add_argument("--all", action="store_true", help="run every job of the array locally")
    jobs.add_job_arguments(p, workers_help=(
        "threads compressing and writing cubes beside the reading of one task (tiles decode on every "
        "core); with --all/--range over several global-mode tasks, processes running one task each"))
    return p


def config_from_args(args: argparse.Namespace) -> PrechipConfig:
    """A :class:`PrechipConfig` from parsed flags and the environment."""
    return settings.resolve(PrechipConfig, args)


def run(argv: Sequence[str] | None = None) -> jobs.RunSummary:
    """Parse ``argv`` and run the requested jobs."""
    args = build_parser().parse_args(argv)
    jobs.setup_logging(args.verbose, args.quiet)
    config = config_from_args(args)
    workers = jobs.resolve_workers(args.workers)
    selection = None
    if args.all:
        selection = prepare(config)
        check_selection(config, selection)
        indices = list(range(jobs_of(config, selection)))
    else:
        indices = jobs.resolve_indices(args.index, args.range_spec)
    if len(indices) == 1 or config.mode == locality.LOCALITY:
        # One task, or locality tasks (each holds strips of several items): one after
        # another, each reading with the tile engine's threads and writing in ``workers``.
        return jobs.run_tasks(functools.partial(run_job, config=config, workers=workers, selection=selection),
                              indices, 1, desc="prechip jobs")
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
