"""How a compaction changes a compacted index: one writer at a time, files staged out of
sight, the manifest as the commit point, then the files moved into place.

1. **Lock.** A run first creates ``{dest}/_lock.json`` -- only if it does not exist
   (:func:`stacchip.storage.create_if_absent`: an ``If-None-Match: *`` PUT on S3, an
   exclusive hard link locally), holding who runs (host, process id, start time, run id).
   A second writer finds it there and stops with :class:`~stacchip.errors.IndexLockedError`
   (exit status 2) naming the holder. A lock whose holder is gone (killed, its machine
   lost) stays until someone breaks it: ``stacchip compact --break-lock`` (``break_lock=True``)
   removes it first. There is no automatic expiry: a long compaction may hold the lock for
   hours, and only its operator knows it is dead. On the holder's own host the error says
   when its process no longer runs.
2. **Stage.** New part files are written under ``{dest}/_staging/{run}/`` named
   ``part-*.pq``: ``pyarrow.dataset`` (and geopandas) skip ``_`` directories and DuckDB's
   ``**/*.parquet`` does not match ``.pq``, so directory readers never see them. A run that
   fails before its manifest is written removes its staging directory and leaves the
   destination as it was (a killed run leaves it behind; the next run removes it).
3. **Commit.** The manifest is written (whole, one PUT or one rename), listing the new files
   and, under ``pending``, that they may still be staged. From this point the run is done:
   stacchip's readers find every file (staged or moved).
4. **Move.** Staged files are moved into ``{platform}/year={year}/`` (a rename locally, a
   server-side copy then delete on S3), then files no longer listed (old part files of
   rewritten partitions, the old provenance file) are removed and the manifest is written
   again without ``pending``. A run stopped during this step is finished by the next run
   (before anything else) -- or by nobody, and readers keep finding the staged files.

While step 4 runs, a directory reader (DuckDB ``**/*.parquet``, pyarrow) can see the new
files of a rewritten partition beside its old ones; stacchip's readers, which follow the
manifest, never do.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from stacchip import compacted as mf
from stacchip import storage
from stacchip.errors import IndexLockedError, StorageNotFoundError

logger = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"


def staging_dir(run: str) -> str:
    """The staging directory of ``run``, relative to the index root."""
    return f"{mf.STAGING_DIR}/{run}"


def staged_url(dest: str, run: str, rel: str) -> str:
    """Where ``run`` stages the part file ``rel`` (relative to the index root)."""
    return storage.join(dest, staging_dir(run), mf.staged_name(rel))


# --- the lock ----------------------------------------------------------------------------------


def _holder(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _describe(holder: Mapping[str, Any]) -> str:
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}",
             f"started {holder.get('started', '?')}", f"run {holder.get('run', '?')}"]
    text = ", ".join(parts)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            text += f"; no process {holder['pid']} runs on this host: the lock is stale"
        except PermissionError:
            pass
    return text


@dataclass
class Lock:
    """The lock of one compaction run (see the module docstring)."""

    url: str
    token: str
    holder: dict[str, Any]

    def held(self) -> bool:
        """True while the lock object is still this run's (nobody broke it)."""
        try:
            return _holder(storage.read_bytes(self.url)).get("token") == self.token
        except StorageNotFoundError:
            return False

    def check(self, dest: str) -> None:
        """:class:`IndexLockedError` when someone broke this run's lock (the commit stops)."""
        if not self.held():
            raise IndexLockedError(
                f"{dest}: this run's lock {self.url} was removed or taken over by another writer; "
                "nothing was committed")

    def release(self) -> None:
        """Remove the lock object if it is still this run's."""
        try:
            if self.held():
                storage.remove(self.url)
            else:
                logger.warning("lock %s is no longer this run's; left as it is", self.url)
        except Exception:  # noqa: BLE001 - releasing must not hide the run's own outcome
            logger.warning("could not remove lock %s", self.url, exc_info=True)


def acquire(dest: str, run: str, break_lock: bool = False) -> Lock:
    """Take the lock of ``dest`` for ``run``; :class:`IndexLockedError` naming the holder when
    another writer has it. ``break_lock`` removes an existing lock first (for a holder known
    to be dead)."""
    url = storage.join(dest, LOCK_NAME)
    token = secrets.token_hex(16)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "run": run, "token": token,
              "started": dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")}
    if break_lock:
        try:
            old = _holder(storage.read_bytes(url))
            logger.warning("breaking the lock of %s held by %s", dest, _describe(old))
            storage.remove(url)
        except StorageNotFoundError:
            pass
    for _ in range(3):
        if storage.create_if_absent(url, json.dumps(holder).encode()):
            return Lock(url, token, holder)
        try:
            other = _holder(storage.read_bytes(url))
        except StorageNotFoundError:  # released between the two calls: try again
            continue
        raise IndexLockedError(
            f"{dest} is being compacted by another writer ({_describe(other)}); its lock is {url}. "
            "Wait for it, or if that process is gone, run again with --break-lock")
    raise IndexLockedError(f"{dest}: could not take the lock {url} (it keeps changing hands)")


# --- staging, commit, moves ------------------------------------------------------------------


def clean_staging(dest: str, keep: str | None = None) -> list[str]:
    """Remove the staging directories runs left under ``dest`` (all but ``keep``, a relative
    staging directory still pending). Returns those removed."""
    root = storage.join(dest, mf.STAGING_DIR)
    try:
        found = storage.list_info(root)
    except StorageNotFoundError:
        return []
    runs = sorted({info.url[len(root.rstrip("/")) + 1:].replace(os.sep, "/").split("/", 1)[0] for info in found})
    removed = []
    for run in runs:
        rel = f"{mf.STAGING_DIR}/{run}"
        if rel == keep:
            continue
        storage.remove_tree(storage.join(dest, rel))
        removed.append(rel)
    if not keep:
        storage.remove_tree(root)
    return removed


def write_manifest(dest: str, manifest: Mapping[str, Any]) -> None:
    """Write the manifest whole (the commit point)."""
    storage.write_bytes(storage.join(dest, mf.MANIFEST_NAME), json.dumps(manifest, separators=(",", ":")).encode())


def finish(dest: str, manifest: dict[str, Any]) -> list[str]:
    """Step 4 of the protocol for a committed manifest with ``pending`` moves: move the staged
    files into place, remove what the manifest no longer names (``pending.remove``), write
    the manifest without ``pending``, drop the staging directory. Returns the removed paths."""
    pending = manifest.get("pending")
    if not pending:
        return []
    staging = mf.check_relative(pending["staging"], "manifest 'pending'")
    for rel in pending.get("files", []):
        rel = mf.check_relative(rel, "manifest 'pending'")
        src = storage.join(dest, staging, mf.staged_name(rel))
        dst = storage.join(dest, rel)
        try:
            storage.move(src, dst)
        except StorageNotFoundError:
            if not storage.exists(dst):
                raise
    removed = []
    named = {f["path"] for p in manifest["partitions"].values() for f in p["files"]}
    items = (manifest.get("items") or {}).get("path")
    for rel in pending.get("remove", []):
        rel = mf.check_relative(rel, "manifest 'pending'")
        if rel in named or rel == items:
            continue
        storage.remove(storage.join(dest, rel))
        removed.append(rel)
    del manifest["pending"]
    write_manifest(dest, manifest)
    storage.remove_tree(storage.join(dest, staging))
    clean_staging(dest)
    return removed
