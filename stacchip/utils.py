"""Upstream helpers: load an item's indexer from a bucket or a local mount.

Bucket layout: ``{platform}/{item_id}/stac_item.json``. ``platform`` and
``item_id`` must be safe path segments (:func:`stacchip.storage.safe_segment`);
items loaded from a root this way may not point relative hrefs above it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pystac
from pystac.utils import make_absolute_href

from stacchip import storage
from stacchip.errors import ItemError, StorageNotFoundError
from stacchip.indexer import ChipIndexer, indexer_class

#: File name of an item's JSON in the bucket layout.
ITEM_FILE = "stac_item.json"


def item_key(platform: str, item_id: str) -> str:
    """Key of an item's JSON in the bucket layout.

    Raises :class:`~stacchip.errors.UnsafePathError` when ``platform`` or
    ``item_id`` is not a safe path segment (``..``, ``a/b``, ...).
    """
    storage.safe_segment(platform, "platform")
    storage.safe_segment(item_id, "item id")
    return f"{platform}/{item_id}/{ITEM_FILE}"


def item_url(root: str | os.PathLike[str], platform: str, item_id: str) -> str:
    """``{root}/{platform}/{item_id}/stac_item.json``, always inside ``root`` (see :func:`item_key`)."""
    return storage.join_under(
        root, storage.safe_segment(platform, "platform"), storage.safe_segment(item_id, "item id"), ITEM_FILE
    )


def load_item(url: str | os.PathLike[str]) -> pystac.Item:
    """A STAC item from a local path, ``file://``, ``s3://``, ``http(s)://`` (signed ones too),
    ``gs://`` or ``az://`` URL (read through :mod:`stacchip.storage`, its one configuration).

    Relative asset hrefs (static catalogs) are resolved against the item's own
    location, not the working directory.
    """
    return _load(url, None)


def load_item_under(root: str | os.PathLike[str], platform: str, item_id: str) -> pystac.Item:
    """The item at ``{root}/{platform}/{item_id}/stac_item.json``.

    ``platform`` and ``item_id`` come from index rows or callers, so they must be
    safe path segments, and the item's relative asset hrefs must stay inside
    ``root`` (:class:`~stacchip.errors.UnsafePathError` otherwise, before
    anything is read). When no item is under ``platform``, the folders of the
    platform's other catalog names are tried (:func:`stacchip.platforms.platform_aliases`:
    an index stores the canonical ``sentinel-2-l2a`` for an item kept under
    Earth Search's ``sentinel-2-c1-l2a``).
    """
    from stacchip.platforms import platform_aliases

    names = [platform] + [p for p in platform_aliases(platform) if p != platform]
    missing: StorageNotFoundError | None = None
    for name in names:
        url = item_url(root, name, item_id)
        try:
            return _load(url, (str(root), f"{name}/{item_id}", item_id))
        except StorageNotFoundError as exc:
            missing = missing or exc
    if missing is None:  # unreachable: names holds platform itself
        raise StorageNotFoundError(f"no item {item_id!r} under {str(root)!r}")
    raise missing


def _load(url: str | os.PathLike[str], within: tuple[str, str, str] | None) -> pystac.Item:
    raw = storage.read_bytes(url)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ItemError(f"{str(url)!r} is not a STAC item: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ItemError(f"{str(url)!r} is not a STAC item: a JSON {type(data).__name__}, not an object")
    try:
        item = pystac.Item.from_dict(data, migrate=False)
    except Exception as exc:  # noqa: BLE001 - pystac raises many types for malformed dicts
        raise ItemError(f"{str(url)!r} is not a STAC item: {type(exc).__name__}: {exc}") from exc
    base = str(url)
    if "://" not in base:
        base = str(storage.local_path(base).resolve())
    for key, asset in item.assets.items():
        href = asset.href or ""
        if href and "://" not in href and not href.startswith("/"):
            if within is not None:
                root, folder, item_id = within
                storage.under_root(root, f"{folder}/{href}", what=f"item {item_id!r} asset {key!r} href")
            asset.href = make_absolute_href(href, base)
    return item


def load_indexer_s3(
    bucket: str,
    platform: str,
    item_id: str,
    indexer: str | type[ChipIndexer] = ChipIndexer,
    **kwargs: Any,
) -> ChipIndexer:
    """Indexer for ``s3://{bucket}/{platform}/{item_id}/stac_item.json``.

    ``indexer`` is the class (or its short name, e.g. ``"sentinel-2"``) to build;
    extra keyword arguments go to it (``chip_size=``, ...). ``platform`` and
    ``item_id`` must be safe path segments (see :func:`item_key`).
    """
    bucket = bucket[len("s3://"):] if bucket.startswith("s3://") else bucket
    item = load_item_under(f"s3://{bucket.rstrip('/')}", platform, item_id)
    return indexer_class(indexer)(item, **kwargs)


def load_indexer_local(
    mountpath: str | os.PathLike[str],
    platform: str,
    item_id: str,
    indexer: str | type[ChipIndexer] = ChipIndexer,
    **kwargs: Any,
) -> ChipIndexer:
    """Indexer for ``{mountpath}/{platform}/{item_id}/stac_item.json`` (safe segments only)."""
    item = load_item_under(mountpath, platform, item_id)
    return indexer_class(indexer)(item, **kwargs)
