"""Where the STAC item of an index row comes from.

An index row names its item by ``platform`` and ``item_id``. :class:`ItemSource`
turns that into a :class:`pystac.Item`, from

* an explicit mapping ``item_id -> Item | STAC dict | path/URL of a JSON``, or
* a data root laid out as the bucket is (``{root}/{platform}/{item_id}/stac_item.json``,
  local path, ``file://`` or ``s3://``; ``platform`` and ``item_id`` must be safe path
  segments, see :func:`stacchip.storage.safe_segment`, or
  :class:`~stacchip.errors.UnsafePathError` is raised before anything is read), or
* the ``item_href`` recorded in each index file's ``stacchip`` metadata
  (what ``stacchip index`` writes).

Loaded items are cached per process; the cache is dropped when the source is
pickled (spawned DataLoader workers reload what they need).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import pystac

from stacchip import storage
from stacchip.errors import ConfigError, ItemError, StorageError
from stacchip.indexer import as_item
from stacchip.utils import item_url, load_item, load_item_under

ItemLike = Any  # pystac.Item | dict | str | os.PathLike


class ItemSource:
    """Resolve ``(platform, item_id)`` to a STAC item.

    ``items`` (a mapping by item id, or an iterable of items) wins over
    ``root``; ``hrefs`` maps item ids to item JSON locations (from index file
    metadata). At least one must be given. At most ``max_cached`` parsed items
    are kept (least recently used dropped), so a pass over an index of many
    items does not grow a process's memory without bound.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        items: Mapping[str, ItemLike] | Iterable[ItemLike] | None = None,
        hrefs: Mapping[str, str] | None = None,
        max_cached: int = 1024,
    ) -> None:
        self.root = None if root in (None, "") else str(root)
        self.items: dict[str, ItemLike] = {}
        if items is not None:
            if isinstance(items, Mapping):
                self.items = dict(items)
            else:
                for item in items:
                    parsed = as_item(item) if not isinstance(item, (str, os.PathLike)) else load_item(item)
                    self.items[parsed.id] = parsed
        self.hrefs = dict(hrefs or {})
        if self.root is None and not self.items and not self.hrefs:
            raise ConfigError(
                "no way to find STAC items: give a data root ({platform}/{item_id}/stac_item.json), "
                "an items mapping, or index files whose metadata records item_href"
            )
        if int(max_cached) < 1:
            raise ConfigError(f"max_cached must be >= 1, got {max_cached}")
        self.max_cached = int(max_cached)
        self._cache: OrderedDict[tuple[str, str], pystac.Item] = OrderedDict()

    @classmethod
    def from_index(
        cls, index: Any, max_cached: int = 1024, item_roots: Iterable[str | os.PathLike[str]] | None = None
    ) -> ItemSource:
        """Items at the ``item_href`` recorded in index files (what ``stacchip index`` writes).

        ``index``: index files, directories or ``s3://`` prefixes. Raises
        :class:`ConfigError` when none of the files records an ``item_href``
        (indexes written by the processors do not: use a data root instead).
        For a compacted index, ``item_roots`` lists where its recorded hrefs may point
        besides the index root (else :class:`~stacchip.errors.UnsafePathError`).
        """
        from stacchip.compacted import hrefs_for
        from stacchip.index import index_files

        # a compacted index: hrefs from its provenance, no footer reads; each must lie under the
        # index root or one of item_roots (UnsafePathError otherwise)
        found = hrefs_for(index, [str(r) for r in item_roots or []])
        if found:
            return cls(hrefs=found, max_cached=max_cached)
        files = index_files(index)
        hrefs = hrefs_from_index(files)
        if not hrefs:
            raise ConfigError(
                f"none of the {len(files)} index file(s) (e.g. {files[0]!r}) records an item_href; "
                "give the data root instead: ItemSource(root=...) or root= "
                "(the bucket layout, {root}/{platform}/{item_id}/stac_item.json)"
            )
        return cls(hrefs=hrefs, max_cached=max_cached)

    def location(self, platform: str, item_id: str) -> str | None:
        """Where the item JSON of ``item_id`` is read from (``None`` for in-memory items)."""
        value = self.items.get(item_id)
        if value is not None:
            return str(value) if isinstance(value, (str, os.PathLike)) else None
        if self.root is not None:
            return item_url(self.root, platform, item_id)
        return self.hrefs.get(item_id)

    def get(self, platform: str, item_id: str) -> pystac.Item:
        """The item ``item_id`` of ``platform`` (raises :class:`ItemError` if unknown)."""
        key = (str(platform), str(item_id))
        item = self._cache.get(key)
        if item is not None:
            self._cache.move_to_end(key)
            return item
        value = self.items.get(item_id)
        if value is not None:
            if isinstance(value, (str, os.PathLike)):
                item = load_item(value)
            else:
                item = as_item(value)
        else:
            location = self.location(platform, item_id)
            if location is None:
                raise ItemError(
                    f"item {item_id!r} (platform {platform!r}) is not in the items mapping "
                    "and no data root or item_href is known for it"
                )
            try:
                if self.root is not None:
                    # index rows name the item: platform and item id must be safe path
                    # segments and its relative hrefs stay under the root (UnsafePathError)
                    item = load_item_under(self.root, platform, item_id)
                else:
                    item = load_item(location)
            except StorageError as exc:
                raise ItemError(f"item {item_id!r}: cannot read {location!r}: {exc}") from exc
        self._cache[key] = item
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state


def hrefs_from_index(files: Iterable[str]) -> dict[str, str]:
    """``item_id -> item_href`` from the ``stacchip`` metadata of index files.

    Files without that metadata are skipped.
    """
    import json

    import pyarrow.parquet as pq

    from stacchip.index import STACCHIP_METADATA_KEY, read_metadata

    hrefs: dict[str, str] = {}
    for path in files:
        try:
            if storage.is_s3(path):
                meta = read_metadata(path)
            else:  # local: read the footer only
                raw = (pq.read_schema(storage.local_path(path)).metadata or {}).get(STACCHIP_METADATA_KEY)
                meta = json.loads(raw) if raw else {}
        except (StorageError, OSError, ValueError):
            continue
        if meta.get("item_id") and meta.get("item_href"):
            hrefs[str(meta["item_id"])] = str(meta["item_href"])
    return hrefs
