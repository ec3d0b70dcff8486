"""prechip's plan, written once beside the outputs: what every array task reads and writes.

Preparing a selection reads the whole index and every item's STAC JSON (the band
check, :func:`stacchip.export.selection.items_lacking_bands`); on a catalog of
10⁵ items that fixed cost would dominate every task. So the first task to start
(or ``stacchip-prechip --plan``, or ``--all``) prepares it once and writes the
**plan**; every other task reads only the plan's summary and its own share, then
the STAC items of the chips it reads.

Where: ``{output}/{VERSION}/prechip_plan/{key}/``, holding

* ``plan.json``: the plan's key and settings, the selection's membership
  fingerprint, the items left out and why, the platform, the number of outputs
  (cubes or shards) and, per task, its first output, how many it makes and how
  many chips it reads (``tasks``), and the manifest record the outputs get;
* ``task_{j:06d}.parquet``: task ``j``'s share, the index rows it reads (in the
  selection's order, sorted by ``chipid``) with the output each goes to and its
  position there (``output``, ``position``; -1 for chips a locality task leaves
  out), written with a checksum record (verified when read); in locality mode its
  items in dealt order are in the file's metadata.

**Key.** The folder is named by the plan's key: SHA-256 of the settings that
decide the plan (index location, data root, platform, filters, seed, cube size,
mode and its settings, cubes per job, format) and of the index's identity (its
files' names, sizes and versions -- S3 ETags, local modification times -- from
one listing). A task computes the key (one listing, no index read) and uses the
plan under it: a changed index or setting names another folder, so its plan is
made afresh (the old folder stays, a few small files). Whether the outputs
already there may be completed is then the manifest's call: outputs of another
membership (other chips, seed, cube size, mode, format) are refused (exit 2)
unless ``--overwrite``, as before.

**Concurrency.** Tasks of an array start together. The first to create
``claim.json`` (a conditional create, :func:`stacchip.storage.create_if_absent`)
makes the plan; the others poll for ``plan.json`` (every :data:`POLL_SECONDS`)
for up to ``plan_wait`` seconds after the claim was made, then make it
themselves (a claimant that died must not stop the array). The shares are
written first, then ``plan.json`` by a conditional create: whoever makes it
first wins, and as the plan is a function of its key, any two are the same.
The STAC items are read when the plan is made: changing an item's assets
afterwards is not seen (remove the plan folder to make it again).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stacchip import storage
from stacchip.errors import ConfigError, EmptySelectionError, IndexFileError, StorageError, StorageNotFoundError
from stacchip.export import locality, selection
from stacchip.export.cube import VERSION, manifest_url
from stacchip.export.outputs import NPZ, output_format
from stacchip.platforms import canonical_platform

logger = logging.getLogger(__name__)

#: Format of ``plan.json`` and the shares (part of the key).
PLAN_VERSION = 1
#: Folder of the plans under ``{output}/{VERSION}``.
PLAN_FOLDER = "prechip_plan"
#: Seconds a task waits for the plan another task claimed before making it itself.
DEFAULT_PLAN_WAIT = 1200.0
#: Seconds between two looks for a claimed plan.
POLL_SECONDS = 2.0
#: Parallel writes of the shares.
SHARE_THREADS = 16
#: Metadata key of a share file's own facts (task, items in dealt order).
SHARE_META = b"stacchip_plan"


class PlanSettings(selection.SelectionSettings, Protocol):
    """What a plan depends on (prechip's ``PrechipConfig`` has all of it)."""

    @property
    def output(self) -> str: ...
    @property
    def cubes_per_job(self) -> int: ...
    @property
    def mode(self) -> str: ...
    @property
    def items_per_job(self) -> int: ...
    @property
    def mix_items(self) -> int: ...
    @property
    def strip_px(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def compress_level(self) -> int: ...
    @property
    def overwrite(self) -> bool: ...
    @property
    def dry_run(self) -> bool: ...
    @property
    def plan_wait(self) -> float: ...


# --- the key ---------------------------------------------------------------------------------------


def plan_settings(config: PlanSettings) -> dict[str, Any]:
    """The settings that decide a plan (recorded in it, hashed into its key)."""
    index = config.index
    sources = [str(index)] if isinstance(index, (str, os.PathLike)) else sorted(str(s) for s in index)
    record: dict[str, Any] = {
        "plan_version": PLAN_VERSION, "index": sources, "data": str(config.data),
        "platform": canonical_platform(config.platform) if config.platform else None,
        "max_nodata": config.max_nodata, "max_cloud": config.max_cloud, "seed": int(config.seed),
        "cube_size": int(config.cube_size), "partial": bool(config.partial), "mode": config.mode,
        "format": config.format,
    }
    if config.mode == locality.LOCALITY:
        record.update(items_per_job=int(config.items_per_job), mix_items=int(config.mix_items),
                      strip_px=int(config.strip_px))
    else:
        record["cubes_per_job"] = int(config.cubes_per_job)
    if config.format != NPZ:
        record["compressed"] = bool(config.compress_level)
    return record


def index_identity(index: Any) -> dict[str, Any]:
    """``{"files", "sha256"}``: how many files the index has and a SHA-256 of their names,
    sizes and versions (one listing per source; nothing is read)."""
    sources = [index] if isinstance(index, (str, os.PathLike)) else list(index)
    digest = hashlib.sha256()
    count = 0
    for source in sources:
        try:
            infos = storage.list_file_infos(source)
        except StorageNotFoundError as exc:
            raise IndexFileError(f"index {str(source)!r}: {exc}") from exc
        base = str(source).rstrip("/")
        for info in infos:
            name = info.url[len(base):] if info.url.startswith(base) else info.url
            digest.update(f"{name}\t{info.size}\t{info.version}\n".encode())
            count += 1
    if count == 0:
        raise IndexFileError(f"no index files under {sources!r}")
    return {"files": count, "sha256": digest.hexdigest()}


def plan_key(config: PlanSettings) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(key, settings, index identity)`` of the plan of ``config`` (see the module docstring)."""
    settings = plan_settings(config)
    identity = index_identity(config.index)
    text = json.dumps({"settings": settings, "index": identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), settings, identity


def plan_folder(output: str, key: str) -> str:
    """Folder of the plan with ``key`` under ``output``."""
    return storage.join(output, VERSION, PLAN_FOLDER, key[:32])


def share_name(task: int) -> str:
    """File name of task ``task``'s share."""
    return f"task_{int(task):06d}.parquet"


# --- the plan --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A plan (see the module docstring): ``record`` is ``plan.json``; ``shares`` holds the shares
    of a plan made in this process (read from files otherwise)."""

    key: str
    folder: str
    record: dict[str, Any]
    shares: dict[int, pa.Table] | None = field(default=None, repr=False)

    @property
    def platform(self) -> str:
        return str(self.record["platform"])

    @property
    def n_tasks(self) -> int:
        return len(self.record["tasks"]["first_output"])

    @property
    def n_outputs(self) -> int:
        return int(self.record["outputs"])

    @property
    def empty(self) -> str | None:
        """Why the selection makes no output, or None."""
        return self.record.get("empty")

    def task_outputs(self, task: int) -> list[int]:
        """Output ids task ``task`` makes (none for a task beyond the plan)."""
        if not 0 <= task < self.n_tasks:
            return []
        first = int(self.record["tasks"]["first_output"][task])
        return list(range(first, first + int(self.record["tasks"]["outputs"][task])))

    def task_chips(self, task: int) -> int:
        """Chips task ``task``'s items hold (locality) or its outputs hold (global)."""
        return int(self.record["tasks"]["chips"][task]) if 0 <= task < self.n_tasks else 0

    def share(self, task: int) -> tuple[pa.Table, dict[str, Any]]:
        """Task ``task``'s share (index rows with ``output`` and ``position``) and its facts
        (``task``, ``first_output``; ``items`` in dealt order in locality mode). A share file
        that does not match its checksum record is a :class:`ConfigError` naming it."""
        if self.shares is not None and task in self.shares:
            table = self.shares[task]
            return table, json.loads(table.schema.metadata[SHARE_META])
        url = storage.join(self.folder, share_name(task))
        check = storage.verify_retry(url)
        if not check.ok:
            raise ConfigError(f"the plan's share {url} cannot be used ({check.status}: {check.detail}); "
                              f"remove {self.folder} and run the tasks again to make the plan afresh")
        try:
            # (ParquetFile: pq.read_table would import pyarrow.dataset, and pandas, a quarter second)
            table = pq.ParquetFile(io.BytesIO(storage.read_bytes_retry(url))).read()
            facts = json.loads((table.schema.metadata or {})[SHARE_META])
        except (pa.ArrowException, KeyError, ValueError) as exc:
            raise ConfigError(f"the plan's share {url} is not a plan share: {exc}") from exc
        if int(facts.get("task", -1)) != task:
            raise ConfigError(f"the plan's share {url} is task {facts.get('task')}'s, not task {task}'s")
        missing = [c for c in (*selection.COLUMNS, "output", "position") if c not in table.column_names]
        if missing:
            raise ConfigError(f"the plan's share {url} lacks columns {missing}")
        selection.check_item_ids(table, url)  # its ids become paths, as an index's do
        return table, facts


def _share_table(table: pa.Table, rows: np.ndarray, output: np.ndarray, position: np.ndarray,
                 facts: dict[str, Any]) -> pa.Table:
    order = np.argsort(rows, kind="stable")  # the selection's order (sorted by chipid)
    share = table.take(pa.array(rows[order]))
    share = share.append_column("output", pa.array(output[order], pa.int64()))
    share = share.append_column("position", pa.array(position[order], pa.int32()))
    return share.replace_schema_metadata({SHARE_META: json.dumps(facts).encode()})


def _global_shares(config: PlanSettings, sel: selection.Selection) -> tuple[dict[int, pa.Table], dict[str, list[int]]]:
    size = int(config.cube_size)
    used = min(len(sel.order), sel.n_cubes * size)
    rows = np.asarray(sel.order[:used], dtype=np.int64)
    output = np.arange(used, dtype=np.int64) // size
    position = (np.arange(used) % size).astype(np.int32)
    per = int(config.cubes_per_job)
    n_tasks = math.ceil(sel.n_cubes / per) if sel.n_cubes else 0
    shares: dict[int, pa.Table] = {}
    summary: dict[str, list[int]] = {"first_output": [], "outputs": [], "chips": []}
    for task in range(n_tasks):
        first, end = task * per, min(sel.n_cubes, (task + 1) * per)
        lo, hi = first * size, min(used, end * size)
        shares[task] = _share_table(sel.table, rows[lo:hi], output[lo:hi], position[lo:hi],
                                    {"task": task, "first_output": first})
        summary["first_output"].append(first)
        summary["outputs"].append(end - first)
        summary["chips"].append(hi - lo)
    return shares, summary


def _locality_shares(config: PlanSettings, sel: selection.Selection,
                     dealing: locality.Dealing) -> tuple[dict[int, pa.Table], dict[str, list[int]]]:
    items, codes = np.unique(np.asarray(sel.table.column("item_id").to_pylist(), dtype=object).astype(str),
                             return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(items) + 1))
    where = {str(item): order[bounds[k]:bounds[k + 1]] for k, item in enumerate(items)}
    shares: dict[int, pa.Table] = {}
    summary: dict[str, list[int]] = {"first_output": [], "outputs": [], "chips": []}
    for task, members in enumerate(dealing.tasks):
        rows = np.sort(np.concatenate([where[m] for m in members])) if members else np.zeros(0, np.int64)
        part = sel.table.take(pa.array(rows))
        plan = locality.plan_items(part, members, dealing.first_cube[task], task, config.seed, config.cube_size,
                                   config.mix_items, config.partial, config.strip_px)
        output = np.full(len(rows), -1, dtype=np.int64)
        position = np.full(len(rows), -1, dtype=np.int32)
        for rnd in plan.rounds:
            for cube_id, local in rnd.cubes:
                output[local] = cube_id
                position[local] = np.arange(len(local), dtype=np.int32)
        shares[task] = _share_table(sel.table, rows, output, position,
                                    {"task": task, "first_output": dealing.first_cube[task], "items": list(members)})
        summary["first_output"].append(dealing.first_cube[task])
        summary["outputs"].append(plan.n_cubes)
        summary["chips"].append(len(rows))
    return shares, summary


def membership(config: PlanSettings, sel: selection.Selection) -> str:
    """Fingerprint of which chips go to which output in which file format (the manifest's)."""
    if config.format == NPZ:
        return sel.fingerprint  # the cubes' fingerprint as before
    text = f"{sel.fingerprint};format={config.format};compressed={bool(config.compress_level)}"
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_record(config: PlanSettings, sel: selection.Selection, outputs: dict[str, list[int]]) -> dict[str, Any]:
    """What ``prechip_manifest.json`` says about the outputs of ``sel``: the selection (settings,
    chips, items left out) and every output's file name, samples and task."""
    fmt = output_format(config.format)
    record: dict[str, Any] = {
        "fingerprint": membership(config, sel), "seed": config.seed, "cube_size": config.cube_size,
        "chips": sel.table.num_rows, "cubes": sel.n_cubes,
        "max_nodata": config.max_nodata, "max_cloud": config.max_cloud, "partial": config.partial,
        "excluded_items": dict(sorted(sel.excluded.items())), "format": fmt.name,
    }
    if sel.dealing is not None:
        record.update(mode=locality.LOCALITY, items_per_job=config.items_per_job, mix_items=config.mix_items,
                      tasks=len(sel.dealing.tasks))
    files = []
    for task, (first, count) in enumerate(zip(outputs["first_output"], outputs["outputs"], strict=True)):
        for k in range(first, first + count):
            samples = min(config.cube_size, sel.table.num_rows - k * config.cube_size) \
                if sel.dealing is None else None
            files.append({"name": fmt.url(".", sel.platform or "x", k, config.compress_level).rsplit("/", 1)[-1],
                          "task": task, **({"samples": samples} if samples is not None else {})})
    if sel.dealing is not None:  # sizes of locality outputs: full cubes but each task's last
        sizes = _locality_sizes(config, sel, outputs)
        for entry, n in zip(files, sizes, strict=True):
            entry["samples"] = n
    record["outputs"] = files
    return record


def _locality_sizes(config: PlanSettings, sel: selection.Selection, outputs: dict[str, list[int]]) -> list[int]:
    sizes = []
    for count, chips in zip(outputs["outputs"], outputs["chips"], strict=True):
        for k in range(count):
            sizes.append(min(config.cube_size, chips - k * config.cube_size))
    return sizes


def build(config: PlanSettings, key: str, settings: dict[str, Any], identity: dict[str, Any],
          sel: selection.Selection | None = None) -> Plan:
    """Make the plan of ``config`` in memory (prepares the selection unless given one)."""
    started = time.perf_counter()
    sel = sel or selection.prepare(config)
    empty = None
    if sel.n_cubes == 0:
        try:
            selection.check_selection(_NotAllowed(config), sel)
        except EmptySelectionError as exc:
            empty = str(exc).split("; pass --allow-empty")[0]
    if sel.dealing is not None:
        shares, summary = _locality_shares(config, sel, sel.dealing)
    else:
        shares, summary = _global_shares(config, sel)
    record = {
        "key": key, "settings": settings, "index": identity, "platform": sel.platform,
        "membership": membership(config, sel), "chips": sel.table.num_rows, "outputs": sel.n_cubes,
        "format": config.format, "mode": config.mode, "excluded_items": dict(sorted(sel.excluded.items())),
        "empty": empty, "tasks": summary, "manifest": manifest_record(config, sel, summary),
        "made_by": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()},
    }
    logger.info("plan %s: %d chips, %d %ss, %d tasks (made in %.1f s)", key[:12], sel.table.num_rows,
                sel.n_cubes, output_format(config.format).noun, len(summary["outputs"]),
                time.perf_counter() - started)
    return Plan(key, plan_folder(config.output, key), record, shares)


@dataclass(frozen=True)
class _NotAllowed:
    """``config`` with ``allow_empty`` off (to get the message of an empty selection)."""

    config: Any

    def __getattr__(self, name: str) -> Any:
        return False if name == "allow_empty" else getattr(self.config, name)


def _share_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def publish(plan: Plan) -> Plan:
    """Write ``plan``'s shares, then ``plan.json`` by a conditional create; returns the plan that
    is there afterwards (``plan``, or the same plan another task published first)."""
    shares = plan.shares
    if shares is None:
        raise ConfigError(f"plan {plan.key[:12]} was read from {plan.folder}, not made here: there are no shares "
                          "to publish")
    url = storage.join(plan.folder, "plan.json")

    def write(item: tuple[int, pa.Table]) -> None:
        storage.write_recorded_retry(storage.join(plan.folder, share_name(item[0])), _share_bytes(item[1]))

    with ThreadPoolExecutor(max(1, min(SHARE_THREADS, len(shares)))) as pool:
        list(pool.map(write, sorted(shares.items(), key=lambda kv: kv[0])))
    if not storage.create_if_absent(url, json.dumps(plan.record).encode()):
        found = _read_plan(url, plan.key)
        if found is not None:
            logger.info("plan %s was published by another task meanwhile; using it", plan.key[:12])
            return Plan(plan.key, plan.folder, found, plan.shares)
    return plan


def _read_object(url: str, what: str, advice: str = "") -> dict[str, Any] | None:
    """The JSON object at ``url`` (None when there is none); anything else is a
    :class:`ConfigError` saying it is not ``what``."""
    try:
        raw = storage.read_bytes_retry(url)
    except StorageNotFoundError:
        return None
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{url!r} is not {what}: {exc}{advice}") from exc
    if not isinstance(record, dict):
        raise ConfigError(f"{url!r} is not {what}: not a JSON object{advice}")
    return dict(record)


def _read_plan(url: str, key: str) -> dict[str, Any] | None:
    advice = "; remove its folder and run again"
    record = _read_object(url, "a prechip plan", advice)
    if record is not None and (record.get("key") != key or "tasks" not in record):
        raise ConfigError(f"{url!r} is not a prechip plan: not the plan of this key{advice}")
    return record


def obtain(config: PlanSettings, sel: selection.Selection | None = None) -> Plan:
    """The plan of ``config``: read when published, else made here (first claimant, or after
    waiting ``config.plan_wait`` seconds for the claimant) and published. In a dry run a plan
    not yet there is made in memory and nothing is written."""
    key, settings, identity = plan_key(config)
    folder = plan_folder(config.output, key)
    url = storage.join(folder, "plan.json")
    found = _read_plan(url, key)
    if found is not None:
        return Plan(key, folder, found)
    if config.dry_run:
        return build(config, key, settings, identity, sel)
    claim = storage.join(folder, "claim.json")
    fresh = not storage.exists(config.output)  # (local: nothing to leave behind if making the plan fails)
    while True:
        mine = storage.create_if_absent(claim, json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode())
        if mine:
            break
        deadline = _claim_time(claim) + float(config.plan_wait)
        logger.info("waiting for the plan %s another task claimed (up to %.0f s)", key[:12],
                    max(0.0, deadline - time.time()))
        while time.time() < deadline and storage.exists(claim):
            found = _read_plan(url, key)
            if found is not None:
                return Plan(key, folder, found)
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.time())) or 0.01)
        found = _read_plan(url, key)
        if found is not None:
            return Plan(key, folder, found)
        if storage.exists(claim):
            logger.warning("the plan %s claimed at %s is not there after %.0f s; making it here", key[:12],
                           claim, float(config.plan_wait))
            break
        # the claimant gave up (its selection failed): claim it here and try
    try:
        plan = build(config, key, settings, identity, sel)
        if not plan.empty:
            return publish(plan)
    except BaseException:
        _give_up(claim, config.output, fresh)
        raise
    _give_up(claim, config.output, fresh)  # an empty selection writes nothing
    return plan


def _give_up(claim: str, output: str, fresh: bool) -> None:
    """Remove ``claim`` (so a waiting task tries at once) and, when this run made ``output``,
    the empty folders it left there."""
    storage.remove(claim)
    if fresh:
        storage.prune_empty_dirs(output)


def _claim_time(url: str) -> float:
    try:
        return float(json.loads(storage.read_bytes_retry(url))["time"])
    except (StorageError, ValueError, KeyError, TypeError):
        return time.time()


# --- the manifest beside the outputs ----------------------------------------------------------------


def check_manifest(config: PlanSettings, plan: Plan) -> None:
    """Refuse to add outputs next to outputs of another selection; else record the plan's.

    The first task writes ``prechip_manifest.json`` (a conditional create); later tasks and
    re-runs compare its fingerprint with the plan's membership. With ``overwrite`` a
    different selection is allowed and the manifest replaced.
    """
    record = dict(plan.record["manifest"])
    url = manifest_url(config.output, plan.platform)
    existing = _read_manifest(url)
    if existing is None:
        if storage.create_if_absent(url, json.dumps(record, indent=2).encode()):
            return
        existing = _read_manifest(url)
    if existing is not None and existing.get("fingerprint") == record["fingerprint"]:
        return
    if existing is not None and not config.overwrite:
        shown = [k for k in record if k not in ("fingerprint", "outputs", "excluded_items")]
        raise ConfigError(
            f"the outputs under {storage.join(config.output, VERSION, plan.platform)!r} were made from "
            f"another selection ({ {k: existing.get(k) for k in shown} }) than this run "
            f"({ {k: record[k] for k in shown} }): the index, filters, seed, cube size, mode or format "
            "changed, so new outputs would repeat or miss chips of the old ones. Write to another "
            "--chips location, or pass --overwrite to replace them"
        )
    storage.write_bytes_retry(url, json.dumps(record, indent=2).encode())


def _read_manifest(url: str) -> dict[str, Any] | None:
    return _read_object(url, "a prechip manifest")


# --- a task's reads and writes ----------------------------------------------------------------------


def share_outputs(share: pa.Table) -> list[tuple[int, np.ndarray]]:
    """``(output_id, rows)`` of a share: rows of ``share`` in output order."""
    output = share.column("output").to_numpy()
    position = share.column("position").to_numpy()
    inside = np.flatnonzero(output >= 0)
    order = inside[np.lexsort((position[inside], output[inside]))]
    ids, starts = np.unique(output[order], return_index=True)
    ends = list(starts[1:]) + [len(order)]
    return [(int(k), order[s:e].astype(np.int64)) for k, s, e in zip(ids, starts, ends, strict=True)]


def task_plan(config: PlanSettings, share: pa.Table, facts: dict[str, Any], per_batch: int) -> locality.TaskPlan:
    """The reads and outputs of one task from its share: locality mode re-deals its items'
    strips (and checks the result against the share's record), global mode reads its outputs'
    chips in batches of ``per_batch`` outputs, item by item."""
    recorded = share_outputs(share)
    if config.mode != locality.LOCALITY:
        return locality.batched_plan(share, recorded, per_batch)
    items = [str(i) for i in facts.get("items", [])]
    plan = locality.plan_items(share, items, int(facts["first_output"]), int(facts["task"]), config.seed,
                               config.cube_size, config.mix_items, config.partial, config.strip_px)
    made = [(k, rows) for rnd in plan.rounds for k, rows in rnd.cubes]
    if len(made) != len(recorded) or any(a != b or not np.array_equal(x, y)
                                         for (a, x), (b, y) in zip(made, recorded, strict=True)):
        raise ConfigError(f"task {facts.get('task')}: its share of the plan does not give the outputs it "
                          "records (a plan of another version?); remove the plan folder and run again")
    return plan


def rows_of(share: pa.Table, rows: Sequence[int]) -> pa.Table:
    """Index rows ``rows`` of a share (the columns of an index, without the plan's)."""
    return share.take(pa.array(np.asarray(rows, dtype=np.int64))).select(
        [c for c in share.column_names if c not in ("output", "position")])

