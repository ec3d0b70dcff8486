"""prechip's locality mode: each task reads its items once, in tile order, and its cubes mix them.

In the default **global** mode (upstream's semantics) a cube holds chips drawn
from the whole selection, so on a large catalog a job touches about one chip
per item and no two chips it reads share a COG tile. In **locality** mode:

* **Items are dealt to tasks.** The selection's item ids (sorted) are shuffled
  with a permutation seeded by ``seed``; task ``j`` (array index ``j``) gets
  items ``j*items_per_job .. (j+1)*items_per_job - 1`` of that order. The array
  has ``ceil(items / items_per_job)`` tasks (:func:`task_count`).
* **Each item is read once, in tile order.** A task takes its items
  ``mix_items`` at a time (a *window*) and reads them side by side in *rounds*:
  round ``r`` reads, from every item of the window, the chips whose rows fall
  in the ``r``-th strip of :data:`STRIP_PX` pixels of the item's chip grid
  (8 chip rows for 256 px chips), each strip in COG block order. A strip of
  2048 px is a whole number of tile rows for tiles of 256, 512, 1024 or 2048 px
  (also 1024 px tiles of a band at half the resolution), so every tile is
  decoded once.
* **Cubes shuffle chips across the window's items.** After each round the
  round's chips are shuffled (numpy PCG64 seeded by ``seed`` and the task) and,
  after the chips carried over from earlier rounds (fewer than ``cube_size``;
  they go into the round's first cube), cut into cubes of ``cube_size``, each
  shuffled again; a cube thus holds chips of every item of the window (of the
  same strip of each). ``mix_items`` is how many items a cube mixes; memory is
  about ``mix_items`` strips of chips at once (for full Sentinel-2 scenes,
  10 bands, 256 px chips: 344 chips, ~0.7 GB of uint16 pixels and masks per
  item) plus the ``workers + 1`` cubes being compressed (~0.4 GB each as
  float32 pixels and masks) and the tile cache.
* **Cube numbers** run over the tasks in order: task ``j``'s cubes are
  ``first .. first + n - 1`` with ``n = chips // cube_size`` of its chips (plus
  one partial cube of the rest with ``partial``; otherwise the rest, fewer than
  ``cube_size`` chips, is left out and logged). A cube's members depend only on
  the index, the filters, ``seed``, ``cube_size``, ``items_per_job``,
  ``mix_items`` and ``partial`` (all in the selection's fingerprint and the
  manifest), never on which process makes it. A task whose chips make no cube
  (fewer than ``cube_size`` without ``partial``) writes nothing and succeeds.

Compression and writing run in ``workers`` threads beside the reading (zlib and
SHA-256 release the GIL; tiles decode in the tile engine's threads), at most
``workers + 1`` cubes waiting, so reading goes on while cubes are written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stacchip.errors import ConfigError, ItemError

logger = logging.getLogger(__name__)

#: Modes of prechip: ``global`` (upstream's shuffle over the whole selection) and ``locality``.
GLOBAL = "global"
LOCALITY = "locality"
MODES = (GLOBAL, LOCALITY)
#: Items dealt to one task by default.
DEFAULT_ITEMS_PER_JOB = 8
#: Items a cube mixes by default (read side by side).
DEFAULT_MIX_ITEMS = 4
#: Height of the strip of an item read per round, pixels of the chip grid.
STRIP_PX = 2048


def strip_rows(chip_size: int, strip_px: int = STRIP_PX) -> int:
    """Chip rows in one round's strip of ``strip_px`` pixels (at least 1)."""
    return max(1, int(strip_px) // max(1, int(chip_size)))


@dataclass(frozen=True)
class Round:
    """One round of a task: the chips to read (per item, rows of the selection table)
    and the cubes complete after it (``(cube_id, rows)`` in cube order)."""

    reads: tuple[tuple[str, np.ndarray], ...]
    cubes: tuple[tuple[int, np.ndarray], ...]


@dataclass(frozen=True)
class TaskPlan:
    """What locality task ``index`` reads and writes."""

    index: int
    items: tuple[str, ...]
    first_cube: int
    n_cubes: int
    rounds: tuple[Round, ...]
    #: chips of the task in no cube (fewer than one cube; kept only with ``partial``)
    left_out: int


@dataclass(frozen=True)
class Dealing:
    """Items of every task, their chip counts and first cube numbers."""

    tasks: tuple[tuple[str, ...], ...]
    chips: tuple[int, ...]
    first_cube: tuple[int, ...]
    n_cubes: int

    def task_of_cube(self, cube_id: int) -> int:
        """The task that makes cube ``cube_id``."""
        return int(np.searchsorted(np.asarray(self.first_cube), cube_id, side="right")) - 1


def check_settings(mode: str, items_per_job: int, mix_items: int) -> None:
    """Refuse an unknown mode or non-positive counts (:class:`ConfigError`)."""
    if mode not in MODES:
        raise ConfigError(f"prechip mode must be one of {list(MODES)}, got {mode!r} (--mode)")
    if items_per_job < 1:
        raise ConfigError(f"items per job must be >= 1, got {items_per_job} (--items-per-job)")
    if mix_items < 1:
        raise ConfigError(f"items a cube mixes must be >= 1, got {mix_items} (--mix-items)")


def _item_codes(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """Sorted distinct item ids and, per row, the position of its item among them."""
    column = table.column("item_id")
    items = sorted(str(v) for v in pc.unique(column).to_pylist())
    codes = pc.index_in(column, value_set=pa.array(items, pa.string())).to_numpy(zero_copy_only=False)
    return items, np.asarray(codes, dtype=np.int64)


def _cubes_of(chips: int, cube_size: int, partial: bool) -> int:
    return (math.ceil(chips / cube_size) if partial else chips // cube_size) if chips else 0


def deal(table: pa.Table, seed: int, cube_size: int, items_per_job: int, partial: bool) -> Dealing:
    """Deal the items of ``table`` to tasks (see the module docstring)."""
    items, codes = _item_codes(table)
    order = np.random.default_rng(seed).permutation(len(items))
    per_item = np.bincount(codes, minlength=len(items)) if len(items) else np.zeros(0, np.int64)
    tasks, chips, first = [], [], []
    total = 0
    for start in range(0, len(items), items_per_job):
        members = order[start:start + items_per_job]
        tasks.append(tuple(items[i] for i in members))
        n = int(per_item[members].sum())
        chips.append(n)
        first.append(total)
        total += _cubes_of(n, cube_size, partial)
    return Dealing(tuple(tasks), tuple(chips), tuple(first), total)


def fingerprint(global_fingerprint: str, items_per_job: int, mix_items: int, partial: bool,
                chip_strip: int = STRIP_PX) -> str:
    """Fingerprint of a locality selection: the global one (chip ids, seed, cube size,
    platform) and what decides the dealing, the cube numbers (``partial``: every task's
    last cube) and the mixing."""
    text = (f"{global_fingerprint};mode=locality;items_per_job={items_per_job};mix_items={mix_items};"
            f"partial={bool(partial)};strip={chip_strip}")
    return hashlib.sha256(text.encode()).hexdigest()


def _by_item(table: pa.Table, rows: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``rows`` of ``table`` grouped by item (sorted ids): ``(item_id, rows, chip_index_y)``
    with each item's rows in row order (y, then x)."""
    rows = np.asarray(rows, dtype=np.int64)
    part = table.take(pa.array(rows))
    names, codes = np.unique(np.asarray(part.column("item_id").to_pylist(), dtype=str), return_inverse=True)
    ys = part.column("chip_index_y").to_numpy().astype(np.int64)
    xs = part.column("chip_index_x").to_numpy().astype(np.int64)
    order = np.lexsort((xs, ys, codes))
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return [(str(names[k]), rows[order[bounds[k]:bounds[k + 1]]], ys[order[bounds[k]:bounds[k + 1]]])
            for k in range(len(names))]


def _task_rng(seed: int, task: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(task), 0x10CA1])


def plan_task(
    table: pa.Table,
    dealing: Dealing,
    task: int,
    seed: int,
    cube_size: int,
    mix_items: int,
    partial: bool,
    strip_px: int = STRIP_PX,
) -> TaskPlan:
    """Rounds and cubes of locality task ``task`` (rows index ``table``, the sorted selection)."""
    if not 0 <= task < len(dealing.tasks):
        raise ConfigError(f"locality task {task} does not exist: the selection deals its items to "
                          f"{len(dealing.tasks)} tasks (0..{len(dealing.tasks) - 1})")
    return plan_items(table, dealing.tasks[task], dealing.first_cube[task], task, seed, cube_size, mix_items,
                      partial, strip_px)


def plan_items(
    table: pa.Table,
    members: Sequence[str],
    first_cube: int,
    task: int,
    seed: int,
    cube_size: int,
    mix_items: int,
    partial: bool,
    strip_px: int = STRIP_PX,
) -> TaskPlan:
    """:func:`plan_task` from the task's own items ``members`` (in dealt order) and first cube
    number: ``table`` may be the whole sorted selection or only the task's rows of it (in the
    same order); the cubes hold the same chips either way."""
    mask = pc.is_in(table.column("item_id"), value_set=pa.array(list(members), pa.string()))
    rows = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
    sizes = table.column("chip_size")
    groups = {item_id: (own, ys // strip_rows(int(sizes[int(own[0])].as_py()), strip_px))
              for item_id, own, ys in _by_item(table, rows)}
    rng = _task_rng(seed, task)
    carry = np.zeros(0, dtype=np.int64)
    next_cube = first_cube
    rounds: list[Round] = []
    for w in range(0, len(members), mix_items):
        window = [(i, *groups[i]) for i in members[w:w + mix_items] if i in groups]
        present = sorted({int(v) for _, _, strips in window for v in np.unique(strips)})
        for strip in present:
            # each item's chips of this strip, in row order (the chipper reads them in block order)
            reads = [(i, own[strips == strip]) for i, own, strips in window if np.any(strips == strip)]
            # the carry-over first (into the round's first cube), then the round's chips shuffled
            pool = np.concatenate([carry, rng.permutation(np.concatenate([r for _, r in reads]))])
            full = len(pool) // cube_size
            cubes = tuple((next_cube + k, rng.permutation(pool[k * cube_size:(k + 1) * cube_size]))
                          for k in range(full))
            next_cube += full
            carry = pool[full * cube_size:]
            rounds.append(Round(tuple(reads), cubes))
    left_out = len(carry)
    if partial and len(carry) and rounds:
        last = rounds[-1]
        rounds[-1] = Round(last.reads, last.cubes + ((next_cube, carry),))
        next_cube += 1
        left_out = 0
    return TaskPlan(task, tuple(members), first_cube, next_cube - first_cube, tuple(rounds), left_out)


def batched_plan(table: pa.Table, cubes: Sequence[tuple[int, np.ndarray]], per_batch: int) -> TaskPlan:
    """The plan of the global mode's cubes ``cubes`` (``(cube_id, rows)``): rounds of
    ``per_batch`` cubes, each reading its chips item by item in row order."""
    rounds = []
    for start in range(0, len(cubes), max(1, per_batch)):
        batch = tuple(cubes[start:start + per_batch])
        reads = _by_item(table, np.concatenate([r for _, r in batch]))
        rounds.append(Round(tuple((item_id, rows) for item_id, rows, _ in reads), batch))
    first = min((k for k, _ in cubes), default=0)
    items = tuple(sorted({i for rnd in rounds for i, _ in rnd.reads}))
    return TaskPlan(0, items, first, len(cubes), tuple(rounds), 0)


# --- running one task -----------------------------------------------------------------------------


ReadItem = Callable[[str, np.ndarray], Iterator[tuple[int, np.ndarray, np.ndarray]]]
WriteCube = Callable[[int, np.ndarray, list[tuple[np.ndarray, np.ndarray]]], str]


class CubeWriters:
    """``workers`` threads compressing and writing cubes; at most ``workers + 1`` cubes exist at
    once (a slot is reserved before a cube is assembled, freed when it is written)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="stacchip-cube")
        self._slots = threading.BoundedSemaphore(self.workers + 1)
        self._pending: deque[Future[str]] = deque()
        self._done: list[str] = []

    def reserve(self) -> None:
        """Wait for a free slot (before assembling a cube); raises a finished write's failure."""
        self._slots.acquire()
        try:
            self._collect()
        except BaseException:
            self._slots.release()
            raise

    def submit(self, fn: Callable[..., str], *args: Any) -> None:
        """Run ``fn(*args)`` in a writer thread, in the slot :meth:`reserve` took."""
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())
        self._pending.append(fut)

    def _collect(self) -> None:
        while self._pending and self._pending[0].done():
            self._done.append(self._pending.popleft().result())  # a failed write raises here

    def results(self) -> list[str]:
        """Wait for every write; their results in submission order (the first failure raises)."""
        while self._pending:
            self._done.append(self._pending.popleft().result())
        return list(self._done)

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)


def _take(output_id: int, rows: np.ndarray, held: dict[int, tuple[np.ndarray, np.ndarray]]
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The chips ``(pixels, mask)`` of one output, in its order, taken out of ``held``."""
    chips = []
    for row in rows:
        chip = held.pop(int(row), None)
        if chip is None:
            raise ItemError(f"output {output_id}: chip row {int(row)} was not read")
        chips.append(chip)
    return chips


def run_plan(
    plan: TaskPlan,
    todo: set[int],
    read_item: ReadItem,
    write: WriteCube,
    workers: int,
) -> list[str]:
    """Read the chips of ``plan``'s rounds that cubes in ``todo`` need and write those cubes.

    ``read_item(item_id, rows)`` yields ``(row, pixels, mask)`` for the given
    rows of one item (in any order, pixels ``(C, H, W)``); ``write(cube_id,
    rows, chips)`` (``chips``: ``(pixels, mask)`` in cube order) encodes and
    stores one cube (or shard) and returns its URL (run in ``workers`` threads,
    beside the reading).
    """
    wanted = [rows for rnd in plan.rounds for cube_id, rows in rnd.cubes if cube_id in todo]
    needed = np.concatenate(wanted) if wanted else np.zeros(0, np.int64)
    held: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    writers = CubeWriters(workers)
    try:
        for rnd in plan.rounds:
            for item_id, rows in rnd.reads:
                want = rows[np.isin(rows, needed)]
                if len(want) == 0:
                    continue
                for row, pixels, mask in read_item(item_id, want):
                    held[int(row)] = (pixels, mask)
            for cube_id, rows in rnd.cubes:
                if cube_id not in todo:
                    continue
                writers.reserve()
                chips = _take(cube_id, rows, held)
                writers.submit(write, cube_id, rows, chips)
                del chips
        return writers.results()
    finally:
        writers.close()


def describe(plan: TaskPlan, mix_items: int) -> str:
    """One line about a task's plan (for the log)."""
    chips = sum(len(r) for rnd in plan.rounds for _, r in rnd.reads)
    cubes = (f"cubes {plan.first_cube}..{plan.first_cube + plan.n_cubes - 1}" if plan.n_cubes else "no cube")
    return (f"locality task {plan.index}: {len(plan.items)} items, {chips} chips in {len(plan.rounds)} rounds "
            f"({mix_items} items side by side), {cubes}"
            + (f", {plan.left_out} chips left out (fewer than a cube; --partial keeps them)" if plan.left_out else ""))
