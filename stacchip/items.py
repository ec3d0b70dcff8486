"""A STAC item as stacchip takes it: a :class:`pystac.Item` (or a STAC item dict),
checked for what indexing and reading need before anything else looks at it.

Lower than every module that takes items (``grid``, ``indexer``, ``ml.items``): it
imports only pystac and the exception tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pystac

from stacchip.errors import ItemError


def as_item(item: Any) -> pystac.Item:
    """A :class:`pystac.Item` from an Item or a STAC item dict, checked for what
    indexing needs: a non-empty string id and at least one asset with an href."""
    if isinstance(item, Mapping):
        try:
            item = pystac.Item.from_dict(dict(item), migrate=False)
        except Exception as exc:  # noqa: BLE001 - pystac raises several types for bad dicts
            raise ItemError(f"not a valid STAC item: {type(exc).__name__}: {exc}") from exc
    if not isinstance(item, pystac.Item):
        raise ItemError(f"expected a pystac.Item or STAC item dict, got {type(item).__name__}")
    if not isinstance(item.id, str) or not item.id:
        raise ItemError(f"item id {item.id!r} is not a non-empty string")
    if item.collection_id is not None and not isinstance(item.collection_id, str):
        raise ItemError(f"item {item.id!r}: collection {item.collection_id!r} is not a string")
    if not item.assets:
        raise ItemError(f"item {item.id!r} has no assets")
    for key, asset in item.assets.items():
        if not isinstance(asset.href, str) or not asset.href:
            raise ItemError(f"item {item.id!r}: asset {key!r} has no href (got {asset.href!r})")
    return item
