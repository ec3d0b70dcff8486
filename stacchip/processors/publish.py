"""Putting one STAC item into the bucket: assets, item JSON, chip index -- in that order.

Bucket layout (upstream's)::

    {root}/{platform}/{item_id}/{asset file}
    {root}/{platform}/{item_id}/stac_item.json          hrefs point at the copies
    {root}/index/{platform}/{item_id}/index_{item_id}.parquet
    {root}/_claims/{platform}/{item_id}.json            which task owns the item

Promises:

* Every object is written whole or not at all (server-side copy, multipart
  upload, or temp file + rename), with retries on transient errors; local
  files get the permissions the umask gives.
* The index is written last, with a checksum record of its size and SHA-256
  (``.index_{item_id}.parquet.sha256.json`` beside it, see
  :func:`stacchip.storage.write_recorded`): an index that matches its record
  marks the item done. A re-run skips done items and finishes unfinished ones
  (objects already there are whole, so they are kept; the rest is written);
  an index that does not match its record (truncated, overwritten) or, without
  a record, does not read as Parquet, is written again.
* Temporary files a killed run left in the item's folders (and of its claim)
  are removed when the item is taken up again.
* Item ids, asset keys and asset file names come from the STAC API: each must
  be a safe path segment (:func:`stacchip.storage.safe_segment`), checked
  before anything of the item is written. An item that fails the check fails
  alone (status ``failed``, an ``UnsafePathError`` note), like any bad item.
* Two tasks never write the same key: before writing, a task creates the
  item's claim with a create-if-absent write; an item claimed by another task
  is left to that task (which finishes it when it is re-run).
* Assets are copied byte for byte unless the publisher is given an
  :class:`~stacchip.processors.layout.AlignedLayout`: GeoTIFF assets are then
  re-tiled to the chip grid (see :mod:`stacchip.processors.layout`).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import pystac

from stacchip import storage
from stacchip.errors import ConfigError, StorageNotFoundError
from stacchip.index import index_bytes
from stacchip.indexer import ChipIndexer
from stacchip.processors.layout import AlignedLayout, AlignedWriter

logger = logging.getLogger(__name__)

INDEX_PREFIX = "index"
CLAIM_PREFIX = "_claims"
ITEM_FILE = "stac_item.json"


@dataclass
class CopyAsset:
    """An asset copied byte for byte from the first of ``sources`` that exists."""

    sources: list[str]
    filename: str
    request_payer: bool = False


@dataclass
class RenderedAsset:
    """An asset produced by ``render(local_path)`` (e.g. a resampled COG), then uploaded."""

    render: Callable[[str], None]
    filename: str
    source: str = ""


AssetPlan = CopyAsset | RenderedAsset


@dataclass
class Outcome:
    """What happened to one item: ``status`` is done, skipped-done, skipped-claimed, planned or failed."""

    platform: str
    item_id: str
    status: str
    assets: dict[str, str] = field(default_factory=dict)
    chips: int | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (what the console scripts print)."""
        out: dict[str, Any] = {"platform": self.platform, "item_id": self.item_id, "status": self.status}
        if self.assets:
            out["assets"] = self.assets
        if self.chips is not None:
            out["chips"] = self.chips
        if self.note:
            out["note"] = self.note
        return out


def filename_of(href: str) -> str:
    """File name of an href without query string (SAS tokens) or fragment."""
    return Path(urlparse(href).path).name


class Bucket:
    """Keys of the bucket layout under ``root`` (``s3://bucket/prefix`` or a local directory)."""

    def __init__(self, root: str) -> None:
        self.root = root if (storage.is_s3(root) or "://" in root) else str(Path(root).resolve())

    def check(self) -> None:
        """Raise :class:`ConfigError` when the root is an S3 bucket that does not exist.

        Run before any task: otherwise every item of every task fails (and is
        retried) on the first write. A bucket the credentials may not inspect
        (403) is left to the writes to judge.
        """
        if not storage.is_s3(self.root):
            return
        try:
            exists = storage.bucket_exists(self.root)
        except Exception as exc:  # noqa: BLE001 - still unreachable after retries: the writes will tell
            logger.warning("cannot check output bucket %s: %s", self.root, exc)
            return
        if exists is False:
            bucket, _ = storage.split_s3(self.root)
            raise ConfigError(f"output bucket {bucket!r} (STACCHIP_BUCKET / --bucket {self.root}) does not exist")

    def url(self, *parts: str) -> str:
        """``root/part/part``; every part must be a safe path segment (raises
        :class:`~stacchip.errors.UnsafePathError`)."""
        return storage.join_under(self.root, *parts)

    @staticmethod
    def _names(platform: str, item_id: str) -> tuple[str, str]:
        return storage.safe_segment(platform, "platform"), storage.safe_segment(item_id, "item id")

    def asset_url(self, platform: str, item_id: str, filename: str) -> str:
        """Where an asset file of an item goes."""
        platform, item_id = self._names(platform, item_id)
        return self.url(platform, item_id, storage.safe_segment(filename, f"item {item_id!r}: asset file name"))

    def item_url(self, platform: str, item_id: str) -> str:
        """Where the item's JSON goes."""
        return self.url(*self._names(platform, item_id), ITEM_FILE)

    def index_url(self, platform: str, item_id: str) -> str:
        """Where the item's chip index goes (written last)."""
        platform, item_id = self._names(platform, item_id)
        return self.url(INDEX_PREFIX, platform, item_id, f"index_{item_id}.parquet")

    def claim_url(self, platform: str, item_id: str) -> str:
        """The item's claim: which task owns (writes) it."""
        platform, item_id = self._names(platform, item_id)
        return self.url(CLAIM_PREFIX, platform, f"{item_id}.json")

    def is_done(self, platform: str, item_id: str) -> bool:
        """True when the item's index is there and whole: it matches its checksum record,
        or (an index written without one) reads as Parquet. A damaged index is logged and
        the item counts as not done, so it is written again."""
        url = self.index_url(platform, item_id)
        return storage.whole_or_damaged(url, _unreadable_parquet, f"{platform}/{item_id}: the index")


class Publisher:
    """Writes items of one task into a :class:`Bucket`.

    ``owner`` names the task (``"sentinel-2/17"``); it is stored in each claim.
    With ``dry_run`` nothing is written and :meth:`publish` returns the plan.
    ``layout`` None copies assets byte for byte; an :class:`AlignedLayout`
    re-tiles GeoTIFF assets to the chip grid.
    """

    def __init__(
        self, bucket: Bucket, owner: str, dry_run: bool = False, layout: AlignedLayout | None = None
    ) -> None:
        self.bucket = bucket
        self.owner = owner
        self.dry_run = dry_run
        #: When this task started: temporary files older than this are left by killed runs.
        self.started = time.time()
        self.layout = layout

    # --- ownership ---------------------------------------------------------------------------

    def claim(self, platform: str, item_id: str) -> str | None:
        """Claim the item for this task; returns None if ours, else the other owner."""
        url = self.bucket.claim_url(platform, item_id)
        body = json.dumps(
            {"owner": self.owner, "claimed": dt.datetime.now(dt.timezone.utc).isoformat()}
        ).encode()
        if storage.create_if_absent(url, body):
            return None
        try:
            owner = json.loads(storage.read_bytes_retry(url)).get("owner")
        except (StorageNotFoundError, ValueError):
            owner = None
        if owner == self.owner:
            return None
        return str(owner)

    # --- one item ------------------------------------------------------------------------------

    def skip_or_plan(self, platform: str, item_id: str, sources: Mapping[str, str]) -> Outcome | None:
        """The outcome without any work when the item is done or this is a dry run, else None.

        For processors that compute something expensive (resampling,
        reprojection) before :meth:`publish`.
        """
        shown = {key: _without_query(href) for key, href in sources.items()}
        if self.bucket.is_done(platform, item_id):
            logger.info("%s/%s is done; skipping", platform, item_id)
            return Outcome(platform, item_id, "skipped-done", shown)
        if self.dry_run:
            return Outcome(platform, item_id, "planned", shown)
        return None

    def publish(
        self,
        item: pystac.Item,
        platform: str,
        plan: Mapping[str, AssetPlan],
        make_indexer: Callable[[pystac.Item], ChipIndexer],
    ) -> Outcome:
        """Write ``plan``'s assets, the item JSON and its chip index; skip done or foreign items.

        ``item`` keeps only the assets in ``plan``; their hrefs are rewritten to
        the copies. ``make_indexer`` builds the indexer from the rewritten item
        (so the index is computed from what landed in the bucket). An error is
        logged and returned as a ``failed`` outcome so the task's other items
        still run; :func:`raise_failures` then fails the task (its index is not
        written, so a re-run redoes the item).
        """
        return self.guard(platform, item.id, lambda: self._publish(item, platform, plan, make_indexer))

    @staticmethod
    def guard(platform: str, item_id: str, work: Callable[[], Outcome]) -> Outcome:
        """``work()``, or a ``failed`` outcome (logged) when it raises anything but :class:`ConfigError`.

        Processors wrap each item's preparation (reading, resampling) in it so
        one bad scene fails that item only, not the rest of the task.
        """
        try:
            return work()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the task's others
            logger.exception("%s/%s failed", platform, item_id)
            return Outcome(platform, item_id, "failed", note=f"{type(exc).__name__}: {exc}")

    def _publish(
        self,
        item: pystac.Item,
        platform: str,
        plan: Mapping[str, AssetPlan],
        make_indexer: Callable[[pystac.Item], ChipIndexer],
    ) -> Outcome:
        item_id = item.id
        sources = {
            key: _without_query(p.sources[0] if isinstance(p, CopyAsset) else (p.source or "rendered"))
            for key, p in plan.items()
        }
        # every name from the STAC API is checked before anything of the item is read or
        # written (also in a dry run)
        names = _unique_filenames(plan)
        dsts = {key: self.bucket.asset_url(platform, item_id, names[key]) for key in sorted(plan)}
        early = self.skip_or_plan(platform, item_id, sources)
        if early is not None:
            return early
        other = self.claim(platform, item_id)
        if other is not None:
            logger.warning("%s/%s is claimed by task %s; leaving it to that task", platform, item_id, other)
            return Outcome(platform, item_id, "skipped-claimed", sources, note=f"claimed by {other}")

        self._clean_partials(platform, item_id)
        for key in list(item.assets):
            if key not in plan:
                del item.assets[key]
        aligned = AlignedWriter(self.layout, item) if self.layout is not None else None
        for key, dst in dsts.items():
            fields = self._write_asset(plan[key], dst, f"{item_id} asset {key!r}", key, aligned)
            asset = item.assets[key]
            asset.href = dst
            if fields is not None:  # a new file: the source's size and checksum no longer apply
                asset.extra_fields.pop("file:size", None)
                asset.extra_fields.pop("file:checksum", None)
                asset.extra_fields.update(fields)
            asset.extra_fields.pop("alternate", None)
            asset.extra_fields.pop("alternate:name", None)
        item.clear_links()
        storage.write_bytes_retry(
            self.bucket.item_url(platform, item_id), json.dumps(item.to_dict(transform_hrefs=False)).encode()
        )
        indexer = make_indexer(item)
        table = indexer.create_full_index()
        meta = {
            "item_href": self.bucket.item_url(platform, item_id),
            "item_id": item_id,
            "platform": platform,
            "indexer": type(indexer).__name__,
            "chip_size": indexer.chip_size,
            "writer": self.owner,
        }
        storage.write_recorded_retry(self.bucket.index_url(platform, item_id), index_bytes(table, meta))
        logger.info("%s/%s done: %d assets, %d chips", platform, item_id, len(plan), table.num_rows)
        return Outcome(platform, item_id, "done", sources, chips=table.num_rows)

    def _clean_partials(self, platform: str, item_id: str) -> None:
        """Remove temp files a killed run left in the item's folders and of its claim (local output only).

        Only the owner of the claim writes there, so any temporary file older than
        this task is a leftover. S3 objects appear only when complete: nothing to clean.
        """
        item_folder = storage.local_path(self.bucket.item_url(platform, item_id)).parent
        index_folder = storage.local_path(self.bucket.index_url(platform, item_id)).parent
        for folder in (item_folder, index_folder):
            storage.remove_stale_temps_in(str(folder), before=self.started)
        storage.remove_stale_temps(self.bucket.claim_url(platform, item_id), before=self.started)

    def _write_asset(
        self, plan: AssetPlan, dst: str, what: str, key: str = "", aligned: AlignedWriter | None = None
    ) -> dict[str, Any] | None:
        """Write one asset at ``dst``; returns the asset fields of a re-encoded file
        (aligned layout), None for a byte-for-byte copy."""
        if storage.exists_retry(dst):  # whole by construction: written atomically by an earlier run
            logger.info("%s: %s already there", what, dst)
            return {} if aligned is not None and aligned.retiles(plan.filename) else None
        if aligned is not None and aligned.retiles(plan.filename):
            return aligned.write(key, plan.filename, lambda tmp: self._produce(plan, tmp, what), dst, what)
        self._produce(plan, dst, what)
        return None

    @staticmethod
    def _produce(plan: AssetPlan, dst: str, what: str) -> None:
        """Copy (from the first source that exists) or render the asset's bytes to ``dst``."""
        if isinstance(plan, CopyAsset):
            last: Exception | None = None
            for src in plan.sources:
                try:
                    logger.info("%s: copy %s -> %s", what, src, dst)
                    storage.copy(src, dst, request_payer=plan.request_payer)
                    return
                except StorageNotFoundError as exc:
                    logger.info("%s: %s not found, trying the next source", what, src)
                    last = exc
            raise StorageNotFoundError(
                f"{what}: none of the sources exists: {', '.join(plan.sources)}"
            ) from last
        suffix = Path(plan.filename).suffix or ".tif"
        fd, tmp = tempfile.mkstemp(prefix="stacchip-", suffix=suffix)
        os.close(fd)
        try:
            logger.info("%s: render %s -> %s", what, plan.source or "asset", dst)
            plan.render(tmp)
            storage.put_file(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _unreadable_parquet(url: str) -> str | None:
    """Why ``url`` does not read as a Parquet table, or None when it does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = storage.read_bytes_retry(url)  # storage errors are not damage: they propagate
    try:
        pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _unique_filenames(plan: Mapping[str, AssetPlan]) -> dict[str, str]:
    """Asset file names, prefixed with the asset key where two assets share one."""
    counts: dict[str, int] = {}
    for p in plan.values():
        counts[p.filename] = counts.get(p.filename, 0) + 1
    return {key: (p.filename if counts[p.filename] == 1 else f"{key}_{p.filename}") for key, p in plan.items()}


_S3_HOSTS = (
    # virtual-hosted style: bucket.s3.region.amazonaws.com / bucket.s3.amazonaws.com
    r"^(?P<bucket>[a-z0-9][a-z0-9.\-]*)\.s3(?:[.\-][a-z0-9\-]+)?\.amazonaws\.com$",
)


def s3_form(href: str) -> str | None:
    """``s3://bucket/key`` for an https URL of an S3 object (virtual-hosted or path style), else None."""
    import re

    parsed = urlparse(href)
    if parsed.scheme == "s3":
        return href
    if parsed.scheme not in ("http", "https"):
        return None
    host = parsed.netloc.lower()
    for pattern in _S3_HOSTS:
        match = re.match(pattern, host)
        if match:
            return f"s3://{match.group('bucket')}{parsed.path}"
    if re.match(r"^s3(?:[.\-][a-z0-9\-]+)?\.amazonaws\.com$", host):
        bucket, _, key = parsed.path.lstrip("/").partition("/")
        if bucket and key:
            return f"s3://{bucket}/{key}"
    return None


def copy_plan(
    asset: pystac.Asset,
    dest_is_s3: bool,
    requester_pays: bool = False,
    extra_sources: list[str] | None = None,
    filename: str | None = None,
) -> CopyAsset:
    """How to copy one asset: candidate sources in the order worth trying.

    For an S3 destination, S3 forms come first (``alternate.s3.href``, the
    https URL of an S3 object as ``s3://``, ``extra_sources``) so the copy is
    server-side; then the href itself (streamed). For a local destination the
    href comes first. ``requester_pays`` (or ``storage:requester_pays`` on the
    asset or its alternate) sends ``RequestPayer=requester``.
    """
    href = asset.href
    s3_sources: list[str] = []
    alternate = (asset.extra_fields.get("alternate") or {}).get("s3") or {}
    if alternate.get("href"):
        s3_sources.append(str(alternate["href"]))
    s3_sources.extend(extra_sources or [])
    direct = s3_form(href)
    if direct:
        s3_sources.append(direct)
    ordered = s3_sources + [href] if dest_is_s3 else [href] + s3_sources
    seen: list[str] = []
    for src in ordered:
        if src not in seen:
            seen.append(src)
    pays = bool(
        requester_pays
        or asset.extra_fields.get("storage:requester_pays")
        or alternate.get("storage:requester_pays")
    )
    return CopyAsset(seen, filename or filename_of(href), pays)


def _without_query(href: str) -> str:
    """``href`` for logs and records: signed URLs (Planetary Computer SAS) lose their token."""
    return href.split("?", 1)[0]
