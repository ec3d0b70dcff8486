"""The layout cache: each raster file's :class:`~stacchip.tiles.tiff.Layout`, read
once and kept (in memory for the process, and in a versioned JSON file when
asked: an index's sidecar ``index_{item}.layouts.json``, or any path).

A cached layout is never trusted blindly: a local file's size and modification
time are compared when it is opened, a remote file's size and ETag with every
ranged response; a layout that no longer matches is read again.

JSON form::

    {"format": "stacchip-layouts", "version": 1,
     "layouts": {href: Layout.to_json(), ...}}
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from stacchip.tiles.sources import Identity, LocalSource, RemoteSource
from stacchip.tiles.tiff import LAYOUT_VERSION, Layout, parse_layout

logger = logging.getLogger(__name__)

FORMAT = "stacchip-layouts"
#: Key of the layouts in an index file's ``stacchip`` metadata.
INDEX_METADATA_KEY = "layouts"


class LayoutStore:
    """``href -> Layout`` (thread-safe). ``path`` loads a JSON file if it exists."""

    def __init__(self, layouts: Mapping[str, Layout] | None = None,
                 path: str | os.PathLike[str] | None = None) -> None:
        self._layouts: dict[str, Layout] = dict(layouts or {})
        self._lock = threading.Lock()
        self.path = None if path is None else str(path)
        self.dirty = False
        if self.path is not None:
            self.load(self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {"layouts": dict(self._layouts), "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._layouts = state["layouts"]
        self.path = state["path"]
        self._lock = threading.Lock()
        self.dirty = False

    def get(self, href: str) -> Layout | None:
        return self._layouts.get(href)

    def put(self, href: str, layout: Layout) -> None:
        with self._lock:
            self._layouts[href] = layout
            self.dirty = True

    def drop(self, href: str) -> None:
        with self._lock:
            self._layouts.pop(href, None)

    def __len__(self) -> int:
        return len(self._layouts)

    def __contains__(self, href: object) -> bool:
        return href in self._layouts

    def hrefs(self) -> list[str]:
        return sorted(self._layouts)

    # --- JSON ----------------------------------------------------------------------------
    def to_json(self, hrefs: Iterable[str] | None = None) -> dict[str, Any]:
        keys = self.hrefs() if hrefs is None else [h for h in hrefs if h in self._layouts]
        return {"format": FORMAT, "version": LAYOUT_VERSION,
                "layouts": {h: self._layouts[h].to_json() for h in keys}}

    def update_from_json(self, doc: Mapping[str, Any], where: str = "layouts") -> int:
        """Add the layouts of a JSON document; returns how many were taken (layouts
        of another version, or unreadable ones, are skipped: they are read again)."""
        if doc.get("format") != FORMAT:
            logger.warning("%s: not a stacchip layout file; ignored", where)
            return 0
        taken = 0
        for href, d in (doc.get("layouts") or {}).items():
            try:
                layout = Layout.from_json(d)
            except (ValueError, KeyError, TypeError) as exc:
                logger.info("%s: layout of %s not used (%s); it is read again", where, href, exc)
                continue
            with self._lock:
                self._layouts[href] = layout
            taken += 1
        return taken

    def load(self, path: str | os.PathLike[str]) -> int:
        """Layouts from a JSON file (local, ``file://`` or ``s3://``), or from an index
        file's ``stacchip`` metadata (``layouts`` key, as ``stacchip index`` keeps
        them); a missing file is none."""
        from stacchip import storage
        from stacchip.errors import StacchipError, StorageError

        if str(path).endswith(".parquet"):
            from stacchip.index import read_metadata

            try:
                doc = read_metadata(path).get(INDEX_METADATA_KEY)
            except (FileNotFoundError, StacchipError, OSError) as exc:
                logger.info("%s: no layouts read (%s)", path, exc)
                return 0
            return self.update_from_json(doc, str(path)) if doc else 0
        try:
            raw = storage.read_bytes(str(path))
        except (FileNotFoundError, StorageError):
            return 0
        try:
            doc = json.loads(raw)
        except ValueError:
            logger.warning("%s: unreadable layout file; ignored", path)
            return 0
        return self.update_from_json(doc, str(path))

    def save(self, path: str | os.PathLike[str] | None = None, hrefs: Iterable[str] | None = None) -> str:
        """Write the layouts (all, or those of ``hrefs``) as JSON, atomically."""
        from stacchip import storage

        dest = str(path if path is not None else self.path)
        if dest == "None":
            raise ValueError("no path to save layouts to")
        storage.write_bytes(dest, json.dumps(self.to_json(hrefs), separators=(",", ":")).encode())
        self.dirty = False
        return dest


#: The process-wide layout cache (every Chipper shares it unless given its own).
DEFAULT_STORE = LayoutStore()


def sidecar_path(index_path: str | os.PathLike[str]) -> str:
    """``index_X.layouts.json`` beside ``index_X.parquet``."""
    s = str(index_path)
    return (s.removesuffix(".parquet")) + ".layouts.json"


def open_layout(href: str, source: LocalSource | RemoteSource, store: LayoutStore) -> Layout:
    """The layout of ``href`` (opened as ``source``): the cached one when it matches
    the file, else read from the file's header (and cached)."""
    cached = store.get(href)
    if cached is not None:
        if source.remote:
            if cached.etag:
                return cached  # every GET carries If-Match with it (a replaced object answers 412)
            if href in _fresh_here:
                return cached  # no ETag to check: read again once in this process, then kept
            logger.info("layout of %s has no ETag to check; reading its header again", href)
        ident = source.identity
        if ident is not None and cached.size is not None and cached.mtime is not None and \
                Identity(cached.size, cached.etag, cached.mtime).matches(ident.size, None, ident.mtime):
            return cached
        logger.info("layout of %s is stale (file changed); reading its header again", href)
    return read_layout(href, source, store)


def read_layout(href: str, source: LocalSource | RemoteSource, store: LayoutStore) -> Layout:
    """Read ``href``'s header (ignoring any cached layout) and cache it."""
    first, ident = source.head()
    layout = parse_layout(source.read, first).with_identity(ident.size, ident.etag, ident.mtime)
    store.put(href, layout)
    if source.remote:
        _fresh_here.add(href)
    return layout


#: Remote hrefs whose header this process read itself (a layout without an ETag is
#: trusted only then: nothing else tells a replaced file of the same size).
_fresh_here: set[str] = set()


def item_layouts(item: Any, keys: Iterable[str] | None = None, mountpath: str | None = None,
                 store: LayoutStore | None = None) -> LayoutStore:
    """Read the layout of every raster asset of ``item`` (or of ``keys``) into a store
    (what ``stacchip index`` may keep beside the index; see :func:`sidecar_path`)."""
    from stacchip.chipper import is_raster_asset
    from stacchip.errors import AssetReadError
    from stacchip.tiles.sources import open_source, tile_href

    store = store if store is not None else LayoutStore()
    keys = list(keys) if keys is not None else [k for k, a in item.assets.items() if is_raster_asset(a)]
    for key in keys:
        href = tile_href(item.assets[key].href, mountpath)
        if href is None:
            continue
        try:
            source = open_source(href, f"item {item.id!r} asset {key!r} ")
            try:
                open_layout(href, source, store)
            finally:
                source.close()
        except AssetReadError as exc:  # not a TIFF, unreachable: its reader finds out later
            logger.info("item %r asset %r: no layout kept (%s)", item.id, key, exc)
    return store


def index_layouts(item: Any, mountpath: str | None = None) -> dict[str, Any]:
    """The layouts of ``item``'s raster assets as the JSON document an index file
    keeps under ``stacchip`` metadata key ``layouts`` (see :meth:`LayoutStore.load`)."""
    store = item_layouts(item, mountpath=mountpath)
    return store.to_json()
