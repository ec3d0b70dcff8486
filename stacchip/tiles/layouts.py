"""The layout cache: each raster file's :class:`~stacchip.tiles.tiff.Layout`, read
once and kept (in memory for the process, and in a versioned JSON file when
asked: an index's sidecar ``index_{item}.layouts.json``, the index file's own
``layouts`` metadata, or any path).

A cached layout is never trusted blindly:

* Stored layouts carry a digest of their content and href; one that is not a
  layout, fails its digest or its checks (offsets and counts inside the file,
  bounded counts, known dtype/codec/predictor/planar configuration, array
  lengths) is dropped with one warning per file per process, and the file's
  header is read again. Layouts of an older version are read again quietly.
* Every layout is checked against the file before use: a local file's size,
  ``mtime_ns``, inode and ``ctime_ns`` when it is opened (and after every tile
  read, see :class:`~stacchip.tiles.sources.LocalSource`); a remote file by the
  size and ETag of every ranged response. A remote layout without an ETag
  cannot be checked that way: it is read again from the header once per
  process before use. A mismatch reads the header again; it never gives pixels.

JSON form::

    {"format": "stacchip-layouts", "version": 2,
     "layouts": {href: Layout.to_json(href), ...}}
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from stacchip.errors import LayoutError, LayoutVersionError
from stacchip.tiles.sources import Identity, LocalSource, RemoteSource, StaleLayoutError
from stacchip.tiles.tiff import LAYOUT_VERSION, Layout, parse_layout

logger = logging.getLogger(__name__)

FORMAT = "stacchip-layouts"
#: Key of the layouts in an index file's ``stacchip`` metadata.
INDEX_METADATA_KEY = "layouts"
#: Times a local header is read again when the file changes while it is read.
HEADER_ATTEMPTS = 3

_lock = threading.Lock()
#: What this process already warned about (hrefs and layout files): one warning each.
_warned: set[str] = set()
#: href -> fingerprint of the layout read from its header in this process (remote
#: layouts without an ETag are trusted once confirmed so).
_confirmed: dict[str, str] = {}


def _warn_once(key: str, message: str, *args: Any) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message, *args)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
                "layouts": {h: self._layouts[h].to_json(h) for h in keys}}

    def update_from_json(self, doc: Any, where: str = "layouts") -> int:
        """Add the layouts of a JSON document; returns how many were taken. Layouts
        of another version are skipped quietly, corrupt or edited ones (and documents
        that are no layout document) with one warning each per process: their
        files' headers are read again."""
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            _warn_once(f"doc:{where}", "%s: not a stacchip layout document; its layouts are not used "
                       "(the files' headers are read instead)", where)
            return 0
        layouts = doc.get("layouts")
        if not isinstance(layouts, Mapping):
            _warn_once(f"doc:{where}", "%s: its 'layouts' is %s, not an object; not used "
                       "(the files' headers are read instead)", where, type(layouts).__name__)
            return 0
        taken = 0
        for href, d in layouts.items():
            if not isinstance(href, str):
                continue  # (JSON object keys are text; not reached for parsed JSON)
            try:
                layout = Layout.from_json(d, href)
            except LayoutVersionError as exc:
                logger.info("%s: layout of %s not used (%s); its header is read again", where, href, exc)
                continue
            except LayoutError as exc:
                _warn_once(href, "%s: the stored layout of %s is not used (%s); its header is read again",
                           where, href, exc)
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
            except (FileNotFoundError, StacchipError, OSError, ValueError) as exc:
                logger.info("%s: no layouts read (%s)", path, exc)
                return 0
            return self.update_from_json(doc, str(path)) if doc is not None else 0
        try:
            raw = storage.read_bytes(str(path))
        except (FileNotFoundError, StorageError):
            return 0
        try:
            doc = json.loads(raw)
        except ValueError:
            _warn_once(f"doc:{path}", "%s: unreadable layout file; not used (the files' headers are read "
                       "instead)", path)
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


def _local_identity(layout: Layout) -> Identity:
    return Identity(layout.size, None, layout.mtime, layout.inode, layout.ctime)


def open_layout(href: str, source: LocalSource | RemoteSource, store: LayoutStore) -> Layout:
    """The layout of ``href`` (opened as ``source``): the cached one when it passes
    its checks and matches the file, else read from the file's header (and cached)."""
    cached = store.get(href)
    if cached is not None:
        problems = cached.problems()
        if problems:
            _warn_once(href, "the cached layout of %s is not used (%s); its header is read again",
                       href, "; ".join(problems))
        elif source.remote:
            if cached.etag or _confirmed.get(href) == cached.fingerprint:
                return cached  # checked against every response (size, ETag)
            logger.info("layout of %s has no ETag to check it by; reading its header again "
                        "(once per process)", href)
        else:
            ident = source.identity
            if ident is not None and _local_identity(cached).same_local_file(ident):
                return cached
            logger.info("layout of %s is stale (file changed); reading its header again", href)
    return read_layout(href, source, store)


def read_layout(href: str, source: LocalSource | RemoteSource, store: LayoutStore) -> Layout:
    """Read ``href``'s header (ignoring any cached layout) and cache it.

    A local file is checked again once its header is parsed; one that changed
    meanwhile is read again (:data:`HEADER_ATTEMPTS` times, then
    :class:`~stacchip.tiles.sources.StaleLayoutError`)."""
    for _ in range(HEADER_ATTEMPTS):
        first, ident = source.head()
        layout = parse_layout(source.read, first, size=ident.size).with_identity(
            ident.size, ident.etag, ident.mtime, inode=ident.inode, ctime=ident.ctime)
        if not isinstance(source, LocalSource) or ident.same_local_file(source.stat()):
            break
    else:
        raise StaleLayoutError(f"{source.what}href {href!r} kept changing while its header was read")
    store.put(href, layout)
    with _lock:
        _confirmed[href] = layout.fingerprint
    return layout


def item_layouts(item: Any, keys: Iterable[str] | None = None, mountpath: str | None = None,
                 store: LayoutStore | None = None) -> LayoutStore:
    """Read the layout of every raster asset of ``item`` (or of ``keys``) into a store
    (what ``stacchip index`` may keep beside the index; see :func:`sidecar_path`)."""
    from stacchip.errors import AssetReadError
    from stacchip.platforms import is_raster_asset
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
