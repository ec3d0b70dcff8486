"""Upstream helpers: load an item's indexer from a bucket or a local mount.

Bucket layout: ``{platform}/{item_id}/stac_item.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pystac
from pystac.utils import make_absolute_href

from stacchip import storage
from stacchip.errors import ItemError
from stacchip.indexer import ChipIndexer, indexer_class


def item_key(platform: str, item_id: str) -> str:
    """Key of an item's JSON in the bucket layout."""
    return f"{platform}/{item_id}/stac_item.json"


def load_item(url: str | os.PathLike[str]) -> pystac.Item:
    """A STAC item from a local path, ``file://`` or ``s3://`` URL.

    Relative asset hrefs (static catalogs) are resolved against the item's own
    location, not the working directory.
    """
    raw = storage.read_bytes(url)
    try:
        item = pystac.Item.from_dict(json.loads(raw), migrate=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise ItemError(f"{str(url)!r} is not a STAC item: {exc}") from exc
    base = str(url)
    if "://" not in base:
        base = str(storage.local_path(base).resolve())
    for asset in item.assets.values():
        href = asset.href or ""
        if href and "://" not in href and not href.startswith("/"):
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
    extra keyword arguments go to it (``chip_size=``, ...).
    """
    bucket = bucket[len("s3://"):] if bucket.startswith("s3://") else bucket
    item = load_item(f"s3://{bucket.rstrip('/')}/{item_key(platform, item_id)}")
    return indexer_class(indexer)(item, **kwargs)


def load_indexer_local(
    mountpath: str | os.PathLike[str],
    platform: str,
    item_id: str,
    indexer: str | type[ChipIndexer] = ChipIndexer,
    **kwargs: Any,
) -> ChipIndexer:
    """Indexer for ``{mountpath}/{platform}/{item_id}/stac_item.json``."""
    item = load_item(Path(mountpath) / item_key(platform, item_id))
    return indexer_class(indexer)(item, **kwargs)
