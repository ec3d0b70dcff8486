"""Byte sources for the tile reader: local files (``pread``) and remote objects
(``s3://``, ``http(s)://``, ``gs://``, ``az://``) through the client of their root
(:mod:`stacchip.storage.clients`: obstore's store, one connection pool per bucket
or origin shared by every file and thread of the process; in a child forked after
its parent used obstore, the synchronous client, which receives tile bytes straight
into the decoder's buffer).

Every source tells the file's identity so a cached layout is checked against the
file it describes: a local file (size, modification time, inode and status-change
time) at open and after every tile read (one ``fstat``), a remote one with every
request -- each GET carries ``If-Match`` with the layout's ETag (a replaced object
answers 412), and the response's size and ETag are compared too -- which costs no
request of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from stacchip.errors import (
    AssetReadError,
    StorageError,
    StorageNotFoundError,
    StoragePreconditionError,
    StorageRangeError,
)
from stacchip.storage import clients

logger = logging.getLogger(__name__)

#: Largest gap (bytes) between two tiles fetched with one request, and the most
#: bytes one coalesced request may carry (beyond it, requests run in parallel).
COALESCE_GAP = 64 * 1024
COALESCE_MAX = 16 * 2**20


class StaleLayoutError(AssetReadError):
    """The file changed since its layout was read (size or ETag differ)."""


class ForkedRuntimeError(AssetReadError):
    """No client can read this href in a child forked after its parent used obstore's
    runtime (``gs://``, ``az://``): it is read through GDAL there."""


@dataclass(frozen=True)
class Identity:
    """What identifies one version of a file: bytes, ETag (remote files), and for
    local files the modification and status-change times (ns) and the inode.

    ``ctime`` and ``inode`` catch what size and ``mtime`` miss: a file rewritten at
    the same size with its modification time put back (``os.utime``), in place or
    replaced under the same name; no call sets a file's ``ctime``.
    """

    size: int | None
    etag: str | None = None
    mtime: int | None = None
    inode: int | None = None
    ctime: int | None = None

    @classmethod
    def of_stat(cls, st: os.stat_result) -> Identity:
        """The identity of a local file from its ``os.stat``/``os.fstat``."""
        return cls(st.st_size, None, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def matches(self, size: int | None, etag: str | None, mtime: int | None, *,
                inode: int | None = None, ctime: int | None = None) -> bool:
        """False when a field known on both sides differs (ETags compared without quotes)."""
        if self.etag and etag and self.etag.strip('"') != etag.strip('"'):
            return False
        for mine, theirs in ((self.size, size), (self.mtime, mtime), (self.inode, inode), (self.ctime, ctime)):
            if mine is not None and theirs is not None and mine != theirs:
                return False
        return True

    def same_local_file(self, other: Identity) -> bool:
        """True when ``other`` (a local file's identity now) is exactly this one:
        size, mtime, inode and ctime all known and equal."""
        mine = (self.size, self.mtime, self.inode, self.ctime)
        return None not in mine and mine == (other.size, other.mtime, other.inode, other.ctime)


def coalesce(ranges: list[tuple[int, int]], gap: int = COALESCE_GAP,
             limit: int = COALESCE_MAX) -> list[tuple[int, int, list[int]]]:
    """Merge byte ranges ``(start, end)`` closer than ``gap`` into requests.

    Returns ``(start, end, members)`` per request, ``members`` indexing ``ranges``.
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    out: list[tuple[int, int, list[int]]] = []
    for i in order:
        s, e = ranges[i]
        if out and s - out[-1][1] <= gap and max(e, out[-1][1]) - out[-1][0] <= limit:
            ps, pe, members = out[-1]
            out[-1] = (ps, max(pe, e), members + [i])
        else:
            out.append((s, e, [i]))
    return out


class LocalSource:
    """A local file read with ``os.pread`` (thread-safe, no shared offset).

    :meth:`read_checked` (every tile read) compares the open file's identity
    (``fstat``: size, mtime, inode, ctime) after reading with the identity the
    layout was read with, and raises :class:`StaleLayoutError` when they differ:
    bytes of a file changed since its layout was read are never decoded.
    """

    remote = False

    def __init__(self, path: str, what: str = "") -> None:
        self.path = path
        self.what = what
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise AssetReadError(f"cannot open {what}href {path!r}: {exc}") from exc
        # Closed by close(), or when the source is dropped unclosed (a Chipper per item,
        # never closed, as upstream code makes them, holds no descriptor once gone).
        self._closer = weakref.finalize(self, _close_fd, self._fd)
        try:
            self.identity = self.stat()
        except AssetReadError:
            self.close()
            raise

    def stat(self) -> Identity:
        """The open file's identity now (one ``fstat``)."""
        try:
            return Identity.of_stat(os.fstat(self._fd))
        except OSError as exc:
            raise AssetReadError(f"cannot open {self.what}href {self.path!r}: {exc}") from exc

    def read(self, start: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, start)
        except OSError as exc:
            raise AssetReadError(f"cannot read {self.what}href {self.path!r}: {exc}") from exc

    def read_checked(self, start: int, length: int, expect: Identity | None) -> bytes:
        """Bytes ``start:start+length``, then :class:`StaleLayoutError` unless the file
        is still ``expect`` (checked after the read: a change that reached the bytes
        read is seen)."""
        data = self.read(start, length)
        if expect is not None:
            now = self.stat()
            if not expect.same_local_file(now):
                raise StaleLayoutError(f"{self.what}href {self.path!r} changed since its layout was read")
        return data

    def read_ranges(self, ranges: list[tuple[int, int]], expect: Identity | None = None) -> list[bytes]:
        return [self.read_checked(s, e - s, expect) for s, e in ranges]

    def head(self) -> tuple[bytes, Identity]:
        """The first bytes of the file and its identity now (``fstat`` again: the
        file may have changed since it was opened)."""
        from stacchip.tiles.tiff import HEADER_BYTES

        self.identity = self.stat()
        return self.read(0, HEADER_BYTES), self.identity

    def close(self) -> None:
        self._fd = -1
        self._closer()  # at most once


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# --- remote ------------------------------------------------------------------------------

#: A file on a server that ignores ``Range`` is fetched whole, once per process, into
#: an unlinked temporary file (``TMPDIR``), up to this size (bytes).
WHOLE_MAX = 4 * 2**30


class NoRangeSupportError(AssetReadError):
    """The server ignores ``Range`` requests and the file is too large to fetch whole."""


class RemoteSource:
    """An object over ``s3://``, ``http(s)://``, ``gs://`` or ``az://``, read with ranged
    GETs through the client of its root (:mod:`stacchip.storage.clients`: obstore, or
    the synchronous client in a forked child). Every GET carries ``If-Match`` with the
    ETag the caller expects, so a replaced object is noticed by the request that
    would have read it (:class:`StaleLayoutError`), at no request of its own."""

    remote = True

    def __init__(self, href: str, what: str = "") -> None:
        self.href = href
        self.path = href
        self.what = what
        try:
            self.client, self.key = clients.client_for(href)
        except clients.ForkedClientError as exc:
            raise ForkedRuntimeError(f"{what}href {href!r}: {exc}") from exc
        except StorageError as exc:
            raise AssetReadError(f"cannot open {what}href {href!r}: {exc}") from exc
        #: Whether reads block (fetch threads) rather than run on obstore's event loop.
        self.blocking = bool(self.client.blocking)
        self.identity: Identity | None = None
        self.requests = 0
        self._whole: tuple[int, Identity] | None = None  # a server ignoring Range: the file, spooled
        self._count = threading.Lock()

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """One counted request; its failure an :class:`AssetReadError` naming the href
        (:class:`StaleLayoutError` when the object changed)."""
        try:
            yield
        except AssetReadError:
            raise
        except Exception as exc:
            err = clients.translate(exc, self.href, "read")
            if isinstance(err, StoragePreconditionError):
                raise StaleLayoutError(f"{self.what}href {self.href!r} changed since its layout was read") from exc
            if isinstance(err, StorageNotFoundError):
                raise AssetReadError(f"cannot open {self.what}href {self.href!r}: not found") from exc
            if isinstance(err, StorageRangeError) and "416" in str(err):
                raise StaleLayoutError(f"{self.what}href {self.href!r} is shorter than its layout says") from exc
            raise AssetReadError(f"cannot read {self.what}href {self.href!r}: {err}") from exc
        finally:
            with self._count:  # fetch threads share one source
                self.requests += 1

    def _get(self, start: int, end: int, out: Any = None, expect: Identity | None = None) -> tuple[Any, Identity]:
        """Bytes ``start:end`` and the object's identity (received into ``out`` where the
        client can: a ``uint8`` array of at least ``end - start`` bytes)."""
        if self._whole is not None:
            fd, ident = self._whole
            return os.pread(fd, end - start, start), ident
        etag = expect.etag if expect is not None else None
        with self._request():
            data, meta = self.client.get(self.key, start, end, if_match=etag, out=out)
        return data, Identity(meta.size, meta.etag, None)

    def read(self, start: int, length: int) -> bytes:
        data, _ident = self._get(start, start + length)
        return bytes(data)

    def read_into(self, start: int, end: int, out: Any, expect: Identity | None = None) -> Any:
        """Bytes ``start:end`` with one GET (received into ``out`` where the client can);
        :class:`StaleLayoutError` when the object is not the one ``expect`` describes."""
        data, ident = self._get(start, end, out, expect)
        self._check(expect, ident)
        return data

    def _check(self, expect: Identity | None, got: Identity) -> None:
        """:class:`StaleLayoutError` when a response contradicts the identity the layout was read with."""
        if expect is not None and not expect.matches(got.size, got.etag, None):
            raise StaleLayoutError(f"{self.what}href {self.href!r} changed since its layout was read")

    async def read_async(self, start: int, end: int, expect: Identity | None = None) -> Any:
        """Bytes ``start:end`` with one GET on obstore's own runtime (no thread of ours
        waits); :class:`StaleLayoutError` when the object is not the one ``expect`` describes."""
        if self._whole is not None:
            return self._get(start, end, None, expect)[0]
        etag = expect.etag if expect is not None else None
        with self._request():
            data, meta = await self.client.get_async(self.key, start, end, if_match=etag)
        self._check(expect, Identity(meta.size, meta.etag, None))
        return data

    def head(self) -> tuple[bytes, Identity]:
        """The first bytes of the file (one request) and its identity. A file on a server
        that ignores ``Range`` is fetched whole once (see :data:`WHOLE_MAX`)."""
        from stacchip.tiles.tiff import HEADER_BYTES

        self.close()
        try:
            data, ident = self._get(0, HEADER_BYTES)
        except AssetReadError as exc:
            if not isinstance(exc.__cause__, Exception) or not _ignores_range(exc.__cause__, self.href):
                raise
            ident = self._fetch_whole()
            data = self._get(0, HEADER_BYTES)[0]
        self.identity = ident
        return bytes(data[:HEADER_BYTES]), ident

    def _fetch_whole(self) -> Identity:
        """Stream the whole file into an unlinked temporary file read with ``pread`` from
        then on (forked children share it); its identity."""
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix="stacchip-whole-")
        os.unlink(tmp)  # gone with the descriptor, whatever happens
        total = 0
        try:
            with self._request():
                meta = self.client.get_head(self.key)
                if meta.size is not None and meta.size > WHOLE_MAX:
                    raise NoRangeSupportError(
                        f"{self.what}href {self.href!r}: the server ignores Range requests and the file is "
                        f"{meta.size} bytes, more than the {WHOLE_MAX} fetched whole")
                for chunk in self.client.stream(self.key):
                    view = memoryview(chunk).cast("B")
                    total += len(view)
                    if total > WHOLE_MAX:
                        raise NoRangeSupportError(
                            f"{self.what}href {self.href!r}: the server ignores Range requests and the file is "
                            f"more than the {WHOLE_MAX} bytes fetched whole")
                    while len(view):
                        view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            raise
        logger.warning("%s ignores Range requests: the file (%d bytes) was fetched whole", self.href, total)
        ident = Identity(total, meta.etag, None)
        self._whole = (fd, ident)
        self._closer = weakref.finalize(self, _close_fd, fd)
        return ident

    def read_ranges(self, ranges: list[tuple[int, int]], expect: Identity | None = None) -> list[Any]:
        """Bytes of each range, one GET per coalesced group (callers run groups in parallel)."""
        out: list[Any] = [None] * len(ranges)
        for start, end, members in coalesce(ranges):
            data, ident = self._get(start, end, None, expect)
            self._check(expect, ident)
            view = memoryview(data)
            for i in members:
                s, e = ranges[i]
                out[i] = view[s - start:e - start]
        return out

    def close(self) -> None:
        whole, self._whole = self._whole, None
        if whole is not None:
            self._closer()


def _ignores_range(exc: Exception, href: str) -> bool:
    err = clients.translate(exc, href, "read")
    return isinstance(err, StorageRangeError) and "416" not in str(err)


def tile_href(href: str, mountpath: str | os.PathLike[str] | None = None) -> str | None:
    """What the tile reader opens for an asset href: a local path, or a remote URL
    (``s3://``, ``http(s)://`` -- signed ones with their query too --, ``gs://``,
    ``az://``); ``None`` for what only GDAL opens (``/vsi...`` paths, other schemes,
    URLs carrying credentials or a fragment)."""
    if mountpath is not None and str(mountpath) != "":
        from stacchip.reader import resolve_href

        return resolve_href(href, mountpath)
    url = urlparse(href)
    scheme = url.scheme.lower()
    if scheme == "file":
        return url.path
    if scheme in REMOTE_SCHEMES:
        if url.fragment or url.username or url.password or not url.netloc:
            return None
        if not url.path.strip("/"):
            return None
        if url.query and scheme not in ("http", "https"):
            return None
        return href
    if scheme and len(scheme) > 1:
        return None  # other schemes: GDAL's
    if href.startswith("/vsi"):
        return None
    return href


REMOTE_SCHEMES = ("s3", "http", "https", "gs", "az", "abfs", "abfss")


def open_source(path: str, what: str = "") -> LocalSource | RemoteSource:
    """The byte source for a resolved href (local path, ``file://`` or a remote URL)."""
    url = urlparse(path)
    scheme = url.scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return RemoteSource(path, what)
    if scheme == "file":
        return LocalSource(url.path, what)
    return LocalSource(path, what)
