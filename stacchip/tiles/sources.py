"""Byte sources for the tile reader: local files (``pread``) and objects over
``s3://`` and ``http(s)://``. Tile bytes of remote files come with plain ranged
GETs (:mod:`stacchip.tiles.http`: S3 URLs presigned by obstore, one pool of
keep-alive connections per origin); with ``STACCHIP_REMOTE_CLIENT=obstore``, or
when the environment sets a proxy, with obstore's client (one connection pool
per bucket or origin, shared by every file and thread of the process).

Every source tells the file's identity (size plus ETag, or for a local file
modification time, inode and status-change time) so a cached layout is checked
against the file it describes: a local file at open and after every tile read
(one ``fstat``), a remote one with every response (``Content-Range`` size and
``ETag``), which costs no request of its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from stacchip.errors import AssetReadError

#: Largest gap (bytes) between two tiles fetched with one request, and the most
#: bytes one coalesced request may carry (beyond it, requests run in parallel).
COALESCE_GAP = 64 * 1024
COALESCE_MAX = 16 * 2**20


class StaleLayoutError(AssetReadError):
    """The file changed since its layout was read (size or ETag differ)."""


class ForkedRuntimeError(AssetReadError):
    """obstore's I/O runtime was started by a parent process: its threads do not
    exist in this forked child, so remote reads here must go another way (GDAL)."""


#: pid of the process that started obstore's runtime (its first request).
_runtime_pid: int | None = None


def remote_usable() -> bool:
    """False in a child forked after its parent used obstore's runtime (requests or S3 signing)."""
    return _runtime_pid is None or _runtime_pid == os.getpid()


def _runtime_started() -> None:
    global _runtime_pid
    if _runtime_pid is None:
        _runtime_pid = os.getpid()


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

_stores: dict[tuple[str, str, str], Any] = {}
_stores_lock = threading.Lock()
_stores_pid = os.getpid()


def _retry() -> dict[str, Any]:
    from datetime import timedelta

    return {"max_retries": 5, "retry_timeout": timedelta(seconds=120),
            "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=10),
                        "base": 2}}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("YES", "TRUE", "1", "ON")


def _s3_store(bucket: str) -> Any:
    from obstore.store import S3Store

    from stacchip.reader import s3_endpoint

    kwargs: dict[str, Any] = {}
    client: dict[str, Any] = {"timeout": "60s", "connect_timeout": "10s"}
    endpoint = s3_endpoint()
    if endpoint:
        if "://" not in endpoint:
            endpoint = f"https://{endpoint}"
        kwargs["endpoint"] = endpoint.rstrip("/")
        kwargs["virtual_hosted_style_request"] = False
        if endpoint.startswith("http://"):
            client["allow_http"] = True
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs["region"] = region or "us-east-1"
    if _truthy(os.environ.get("AWS_NO_SIGN_REQUEST")):
        kwargs["skip_signature"] = True
    if os.environ.get("AWS_REQUEST_PAYER", "").lower() == "requester":
        kwargs["request_payer"] = True
    provider = None
    if not kwargs.get("skip_signature") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        provider = _boto3_credentials()
    return S3Store(bucket, client_options=client, credential_provider=provider,
                   retry_config=_retry(), **kwargs)


def _boto3_credentials() -> Any:
    """Credentials from boto3's chain (``~/.aws``, SSO, ...), as GDAL would find them;
    ``None`` lets obstore look itself (instance metadata, web identity)."""
    try:
        import boto3

        creds = boto3.session.Session().get_credentials()
    except Exception:  # noqa: BLE001 - no boto3 session: obstore's own chain
        return None
    if creds is None:
        return None

    # obstore keeps a credential until its expires_at (None: for good). Temporary ones
    # (SSO, assume-role, container and instance roles) are asked of boto3 again every
    # CREDENTIALS_TTL s, which refreshes them when they near their end; a long job
    # then never signs with expired keys.
    refreshable = callable(getattr(creds, "refresh_needed", None))

    def provide() -> dict[str, Any]:
        from datetime import datetime, timedelta, timezone

        frozen = creds.get_frozen_credentials()
        expires = datetime.now(timezone.utc) + timedelta(seconds=CREDENTIALS_TTL) if refreshable else None
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": expires}

    return provide


#: How long obstore keeps temporary credentials from boto3 before asking again, s.
CREDENTIALS_TTL = 600


def _http_store(origin: str) -> Any:
    from obstore.store import HTTPStore

    client: dict[str, Any] = {"timeout": "60s", "connect_timeout": "10s"}
    if origin.startswith("http://"):
        client["allow_http"] = True
    return HTTPStore.from_url(origin, client_options=client,
                              retry_config=_retry())


def store_for(href: str) -> tuple[Any, str]:
    """``(obstore store, object path)`` for an ``s3://`` or ``http(s)://`` href;
    stores are shared per bucket / origin (one connection pool each)."""
    global _stores_pid
    url = urlparse(href)
    scheme = url.scheme.lower()
    if scheme == "s3":
        from stacchip.reader import s3_endpoint

        key = ("s3", url.netloc, s3_endpoint() or "")
        path = url.path.lstrip("/")
    elif scheme in ("http", "https"):
        key = ("http", f"{scheme}://{url.netloc}", "")
        path = url.path.lstrip("/")
    else:
        raise ValueError(f"not a remote href: {href!r}")
    with _stores_lock:
        if os.getpid() != _stores_pid:  # forked child: the parent's clients are not ours
            _stores.clear()
            _stores_pid = os.getpid()
        store = _stores.get(key)
        if store is None:
            store = _s3_store(key[1]) if scheme == "s3" else _http_store(key[1])
            _stores[key] = store
    return store, path


def reset_stores() -> None:
    """Forget every store (new connection pools on next use)."""
    with _stores_lock:
        _stores.clear()


class RemoteSource:
    """An object over S3 or HTTP, read with ranged GETs (:mod:`stacchip.tiles.http`
    or obstore's client, see the module)."""

    remote = True

    def __init__(self, href: str, what: str = "") -> None:
        self.href = href
        self.path = href
        self.what = what
        self.store, self.key = store_for(href)
        self.scheme = urlparse(href).scheme.lower()
        self.identity: Identity | None = None
        self.requests = 0
        self._signed: tuple[str, float] | None = None
        #: Tile bytes through :mod:`stacchip.tiles.http` (else obstore's client).
        self.lean = _lean_for(href, self.store)
        self._count = threading.Lock()
        if self.uses_runtime() and not remote_usable():
            raise ForkedRuntimeError(
                f"{what}href {href!r}: this process was forked after its parent used obstore's runtime "
                "(remote reads or S3 signing), which does not survive a fork"
            )

    def uses_runtime(self) -> bool:
        """Whether reads of this object need obstore's runtime: its client, or signing
        S3 URLs (plain http(s) reads of :mod:`stacchip.tiles.http` do not, so they
        also work in a child forked after its parent used that runtime)."""
        if not self.lean:
            return True
        return self.scheme == "s3" and not _unsigned(self.store)

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """One counted request; its failure an :class:`AssetReadError` naming the href."""
        try:
            yield
        except FileNotFoundError as exc:
            raise AssetReadError(f"cannot open {self.what}href {self.href!r}: not found ({exc})") from exc
        except AssetReadError:
            raise
        except Exception as exc:
            raise AssetReadError(f"cannot read {self.what}href {self.href!r}: {exc}") from exc
        finally:
            with self._count:  # fetch threads share one source
                self.requests += 1

    def _get(self, start: int, end: int, out: Any = None) -> tuple[Any, Identity]:
        """Bytes ``start:end`` and the object's identity; the default client receives
        them into ``out`` when given (a ``uint8`` array of at least ``end - start`` bytes)."""
        if self.lean:
            return self._get_lean(start, end, out)
        import obstore

        _runtime_started()
        with self._request():
            result = obstore.get(self.store, self.key, options={"range": (start, end)})
            data = result.bytes()
        meta = result.meta
        return data, Identity(meta.get("size"), meta.get("e_tag"), None)

    def _url(self, fresh: bool = False) -> str:
        """The URL a plain ranged GET of this object goes to: S3 presigned by obstore
        (kept until :data:`SIGN_MARGIN` s before it expires), HTTP the href itself."""
        if self.scheme != "s3":
            return self.href
        signed = self._signed
        now = time.monotonic()
        if signed is not None and not fresh and signed[1] > now:
            return signed[0]
        url = _s3_url(self.store, self.key)
        self._signed = (url, now + SIGN_SECONDS - SIGN_MARGIN)
        return url

    def _get_lean(self, start: int, end: int, out: Any = None) -> tuple[Any, Identity]:
        from stacchip.tiles.http import HTTPStatusError, pool

        with self._request():
            try:
                got = pool().get_range(self._url(), start, end, out)
            except HTTPStatusError as exc:
                if exc.status == 404:
                    raise FileNotFoundError(f"HTTP {exc.status}") from None
                if exc.status == 416:
                    raise StaleLayoutError(f"{self.what}href {self.href!r} is shorter than its layout says "
                                           f"(bytes {start}-{end - 1} not satisfiable)") from None
                if exc.status not in (400, 403) or self.scheme != "s3":
                    raise
                got = pool().get_range(self._url(fresh=True), start, end, out)  # credentials renewed
        return got.data, Identity(got.size, got.etag, None)

    def read(self, start: int, length: int) -> bytes:
        data, _ident = self._get(start, start + length)
        return bytes(data)

    def read_into(self, start: int, end: int, out: Any, expect: Identity | None = None) -> Any:
        """Bytes ``start:end`` with one GET, received into ``out`` (a ``uint8`` array of
        at least ``end - start`` bytes) where this client can; returns them (a view of
        ``out``, or other memory). :class:`StaleLayoutError` when the response
        contradicts ``expect``."""
        data, ident = self._get(start, end, out)
        self._check(expect, ident)
        return data

    def _check(self, expect: Identity | None, got: Identity) -> None:
        """:class:`StaleLayoutError` when a response contradicts the identity the layout was read with."""
        if expect is not None and not expect.matches(got.size, got.etag, None):
            raise StaleLayoutError(f"{self.what}href {self.href!r} changed since its layout was read")

    async def read_async(self, start: int, end: int, expect: Identity | None = None) -> Any:
        """Bytes ``start:end`` with one GET on obstore's own runtime (no thread of ours
        waits); raises :class:`StaleLayoutError` when the response contradicts ``expect``."""
        import obstore

        _runtime_started()
        with self._request():
            result = await obstore.get_async(self.store, self.key, options={"range": (start, end)})
            data = await result.bytes_async()
        meta = result.meta
        self._check(expect, Identity(meta.get("size"), meta.get("e_tag"), None))
        return data

    def head(self) -> tuple[bytes, Identity]:
        """The first bytes of the file (one request) and its identity."""
        from stacchip.tiles.tiff import HEADER_BYTES

        data, ident = self._get(0, HEADER_BYTES)
        self.identity = ident
        return bytes(data), ident

    def read_ranges(self, ranges: list[tuple[int, int]], expect: Identity | None = None) -> list[Any]:
        """Bytes of each range, one GET per coalesced group (callers run groups in parallel)."""
        out: list[Any] = [None] * len(ranges)
        for start, end, members in coalesce(ranges):
            data, ident = self._get(start, end)
            self._check(expect, ident)
            view = memoryview(data)
            for i in members:
                s, e = ranges[i]
                out[i] = view[s - start:e - start]
        return out

    def close(self) -> None:
        pass


#: Lifetime of a presigned S3 URL, and how long before its end it is signed again, s.
SIGN_SECONDS = 3600
SIGN_MARGIN = 600


def _lean_for(href: str, store: Any) -> bool:
    from stacchip.tiles.http import lean_client_wanted, proxied

    if not lean_client_wanted():
        return False
    if urlparse(href).scheme.lower() == "s3":
        return not proxied(_s3_base(store))
    return not proxied(href)


def _s3_base(store: Any) -> str:
    """Where the S3 requests of ``store`` go (path style): its endpoint, else AWS's for its region."""
    config = store.config
    region = config.get("region") or "us-east-1"
    return str(config.get("endpoint") or f"https://s3.{region}.amazonaws.com").rstrip("/")


def _unsigned(store: Any) -> bool:
    """Whether ``store`` reads a public bucket without signing (``AWS_NO_SIGN_REQUEST``)."""
    return _truthy(str(store.config.get("skip_signature", "")))


def _s3_url(store: Any, key: str) -> str:
    """A presigned GET URL of ``key`` (the plain path-style URL for unsigned access)."""
    from datetime import timedelta
    from urllib.parse import quote

    import obstore

    if _unsigned(store):
        return f"{_s3_base(store)}/{quote(str(store.config['bucket']))}/{quote(key)}"
    _runtime_started()
    return str(obstore.sign(store, "GET", key, timedelta(seconds=SIGN_SECONDS)))


def tile_href(href: str, mountpath: str | os.PathLike[str] | None = None) -> str | None:
    """What the tile reader opens for an asset href: a local path, or an
    ``s3://`` / ``http(s)://`` URL; ``None`` for what only GDAL opens
    (``/vsi...`` paths, other schemes, URLs with a query string)."""
    if mountpath is not None and str(mountpath) != "":
        from stacchip.reader import resolve_href

        return resolve_href(href, mountpath)
    url = urlparse(href)
    scheme = url.scheme.lower()
    if scheme == "file":
        return url.path
    if scheme in ("s3", "http", "https"):
        if url.query or url.fragment or not url.path.strip("/"):
            return None
        return href
    if scheme and len(scheme) > 1:
        return None  # gs://, az://, ... : GDAL's
    if href.startswith("/vsi"):
        return None
    return href


def open_source(path: str, what: str = "") -> LocalSource | RemoteSource:
    """The byte source for a resolved href (local path, ``file://``, ``s3://``, ``http(s)://``)."""
    url = urlparse(path)
    scheme = url.scheme.lower()
    if scheme in ("s3", "http", "https"):
        return RemoteSource(path, what)
    if scheme == "file":
        return LocalSource(url.path, what)
    return LocalSource(path, what)
