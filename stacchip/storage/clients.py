"""The clients that move remote bytes, one per root, all configured by
:func:`stacchip.storage.config.settings`.

* :class:`ObstoreClient` -- obstore's store for the root (``s3://bucket``,
  ``http(s)://host``, a signed ``https://...?...`` URL, ``gs://bucket``,
  ``az://container``): one connection pool per root, shared by every thread of
  the process, sync and async calls, the one retry policy, credentials and region
  from boto3's session, CA bundle, proxies, requester-pays.
* :class:`SyncClient` -- the synchronous client of a process forked after its parent
  used obstore's runtime (a DataLoader worker, a fork-based pool): obstore's runtime
  threads do not exist in such a child, and its requests would hang. GETs and HEADs
  go through urllib3 (S3 URLs presigned by botocore, locally, from the same
  credentials), received straight into the caller's buffer; S3 writes and listings
  through a botocore client. Same settings, same retry policy (urllib3 also waits
  for a server's ``Retry-After``).

:func:`client_for` picks one. Errors leave every client as one classification
(:func:`translate`): :class:`~stacchip.errors.StorageNotFoundError`,
:class:`~stacchip.errors.StoragePreconditionError` (``If-Match`` or create-if-absent
lost), :class:`~stacchip.errors.StorageRefusedError` (exit 2: credentials,
permissions, certificates, region, clock skew, other 4xx -- never retried), plain
:class:`~stacchip.errors.StorageError` (exit 1: the network or the service, after
the retries).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from stacchip.errors import (
    ConfigError,
    StorageError,
    StorageNotFoundError,
    StoragePreconditionError,
    StorageRangeError,
    StorageRefusedError,
)
from stacchip.storage.config import IOSettings, settings
from stacchip.storage.rawfile import PositionalFile

logger = logging.getLogger(__name__)

#: Schemes obstore reads (``file://`` and local paths are read directly).
REMOTE_SCHEMES = ("s3", "http", "https", "gs", "az", "abfs", "abfss")


# --- where an URL lives ------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """An object URL split into the root a client serves and the path inside it."""

    url: str
    scheme: str  # "s3", "http", "https", "gs", "az", ...
    root: str  # "s3://bucket", "https://host:port", the whole URL when it carries a query
    path: str  # the object's path under ``root`` (S3 keys as written, HTTP paths decoded)

    @property
    def bucket(self) -> str:
        return urlsplit(self.root).netloc


def locate(url: str) -> Location:
    """The :class:`Location` of a remote URL; :class:`~stacchip.errors.StorageError` for
    anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in REMOTE_SCHEMES or not parts.netloc:
        raise StorageError(f"not a remote URL stacchip reads: {url!r}")
    if scheme in ("http", "https"):
        if parts.query:  # a signed URL: the query belongs to the object
            return Location(url, scheme, url, "")
        return Location(url, scheme, f"{scheme}://{parts.netloc}", unquote(parts.path.lstrip("/")))
    return Location(url, scheme, f"{scheme}://{parts.netloc}", parts.path.lstrip("/"))


# --- obstore's runtime and forks -----------------------------------------------------------

#: pid of the process that started obstore's runtime (its first request, signing included).
_runtime_pid: int | None = None


def runtime_started() -> None:
    """Note that this process uses obstore's runtime (before any call that may start it)."""
    global _runtime_pid
    if _runtime_pid is None:
        _runtime_pid = os.getpid()


def obstore_usable() -> bool:
    """False in a child forked after its parent started obstore's runtime."""
    return _runtime_pid is None or _runtime_pid == os.getpid()


# --- errors --------------------------------------------------------------------------------

_STATUS = re.compile(r"\bstatus(?: code)?:? (\d{3})\b|\b(\d{3}) (?:[A-Z][a-z]+ ?)+(?::|$)")
#: Words (lower case) of failures a retry cannot fix: TLS verification, refused signatures,
#: clock skew, the wrong region or endpoint.
_REFUSED_WORDS = ("certificate", "unknown issuer", "self signed", "self-signed", "requesttimetooskewed",
                  "authorizationheadermalformed", "signaturedoesnotmatch", "invalidaccesskeyid",
                  "permanentredirect", "accessdenied", "invalidtoken", "expiredtoken")


def _status_in(text: str) -> int | None:
    match = _STATUS.search(text)
    if not match:
        return None
    return int(match.group(1) or match.group(2))


def translate(exc: BaseException, url: str, action: str) -> StorageError:
    """One :class:`~stacchip.errors.StorageError` for a failure of any client (see the
    module docstring); already translated errors and configuration errors pass through."""
    if isinstance(exc, StorageError):
        return exc
    text = _one_line(str(exc))
    name = type(exc).__name__
    where = f"cannot {action} {url!r}"
    if name == "NotFoundError" or isinstance(exc, FileNotFoundError):
        return StorageNotFoundError(f"{where}: not found")
    if name in ("PreconditionError", "AlreadyExistsError", "NotModifiedError"):
        return StoragePreconditionError(f"{where}: precondition failed ({_short(text)})")
    if name in ("PermissionDeniedError", "UnauthenticatedError"):
        return StorageRefusedError(f"{where}: refused ({_short(text)})")
    if name == "NotSupportedError" and "Range" in text:
        return StorageRangeError(f"{where}: the server ignores Range requests")
    if name in ("InvalidPathError", "UnknownConfigurationKeyError"):
        return StorageRefusedError(f"{where}: {_short(text)}")
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        status = _status_in(text)
    if status == 404:
        return StorageNotFoundError(f"{where}: not found (HTTP 404)")
    if status == 412:
        return StoragePreconditionError(f"{where}: precondition failed (HTTP 412)")
    if status == 416:
        return StorageRangeError(f"{where}: range not satisfiable (HTTP 416)")
    lowered = text.lower()
    if "certificate" in lowered or "unknown issuer" in lowered or _tls_error(exc):
        found = re.search(r"InvalidCertificate\(\s*(\w+)", text)
        reason = found.group(1) if found else "verification failed"
        return StorageRefusedError(
            f"{where}: the server's TLS certificate is not trusted ({reason}); a private CA's bundle "
            "goes in AWS_CA_BUNDLE (or REQUESTS_CA_BUNDLE, SSL_CERT_FILE)")
    if any(word in lowered for word in _REFUSED_WORDS):
        return StorageRefusedError(f"{where}: {_short(text)}")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return StorageRefusedError(f"{where}: HTTP {status} ({_short(text)})")
    return StorageError(f"{where}: {_short(text)}")


def _tls_error(exc: BaseException) -> bool:
    import ssl

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError) or type(current).__name__ == "SSLError":
            return True
        current = current.__cause__ or current.__context__ or getattr(current, "reason", None)
        if current is not None and not isinstance(current, BaseException):
            break
    return False


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _short(text: str, limit: int = 400) -> str:
    text = text.split(" Debug source:")[0]
    return text if len(text) <= limit else text[:limit] + "..."


# --- what a read returns --------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    """An object's size (bytes), ETag and, where asked, its attributes (user metadata)."""

    size: int | None
    etag: str | None
    attributes: Mapping[str, str] = field(default_factory=dict)


def _meta(raw: Mapping[str, Any], attributes: Mapping[str, Any] | None = None) -> Meta:
    size = raw.get("size")
    return Meta(int(size) if size is not None else None, raw.get("e_tag"),
                {str(k).lower(): str(v) for k, v in (attributes or {}).items()})


# --- obstore ---------------------------------------------------------------------------------


class ObstoreClient:
    """obstore's store of one root (see the module docstring)."""

    blocking = False

    def __init__(self, root: str, store: Any) -> None:
        self.root = root
        self.store = store

    def get(self, path: str, start: int | None = None, end: int | None = None, *, if_match: str | None = None,
            out: Any = None) -> tuple[Any, Meta]:
        """Bytes ``start:end`` (all without a range) and the object's :class:`Meta`."""
        import obstore

        runtime_started()
        result = obstore.get(self.store, path, options=_options(start, end, if_match))
        return result.bytes(), _meta(result.meta)

    async def get_async(self, path: str, start: int, end: int, *, if_match: str | None = None) -> tuple[Any, Meta]:
        import obstore

        runtime_started()
        result = await obstore.get_async(self.store, path, options=_options(start, end, if_match))
        data = await result.bytes_async()
        return data, _meta(result.meta)

    def get_head(self, path: str) -> Meta:
        """Size, ETag and attributes (user metadata) with one HEAD request."""
        import obstore

        runtime_started()
        result = obstore.get(self.store, path, options={"head": True})
        return _meta(result.meta, result.attributes)

    def stream(self, path: str) -> Iterator[Any]:
        """The whole object in chunks (for copies: never held in memory at once); the
        request is made at once (a missing object fails here, not while iterating)."""
        import obstore

        runtime_started()
        return iter(obstore.get(self.store, path).stream(min_chunk_size=8 * 2**20))

    def put(self, path: str, data: Any, *, create: bool = False,
            attributes: Mapping[str, str] | None = None) -> None:
        """Write an object whole (``create``: only if absent, else
        :class:`~stacchip.errors.StoragePreconditionError`). ``data`` is bytes, a local
        :class:`~pathlib.Path` (multipart, streamed) or an iterator of chunks."""
        import obstore

        runtime_started()
        multipart = not isinstance(data, (bytes, bytearray, memoryview))
        obstore.put(self.store, path, data, mode="create" if create else "overwrite",
                    attributes=dict(attributes) if attributes else None, use_multipart=multipart)

    def list(self, prefix: str) -> Iterator[tuple[str, int, int, str | None]]:
        """``(path, size, last modified in ns, ETag)`` of every object under ``prefix``."""
        import obstore

        runtime_started()
        for chunk in obstore.list(self.store, prefix=prefix or None, chunk_size=1000):
            for obj in chunk:
                yield str(obj["path"]), int(obj["size"]), _ns(obj.get("last_modified")), obj.get("e_tag")

    def delete(self, path: str) -> None:
        import obstore

        runtime_started()
        obstore.delete(self.store, path)

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy within the root."""
        import obstore

        runtime_started()
        obstore.copy(self.store, src, dst, overwrite=True)

    def rename(self, src: str, dst: str) -> None:
        """Move within the root (S3: a server-side copy, then the source is deleted)."""
        import obstore

        runtime_started()
        obstore.rename(self.store, src, dst, overwrite=True)

    def open_reader(self, path: str, buffer_size: int = 1024 * 1024) -> Any:
        """A seekable, read-only file object over ranged GETs (for pyarrow)."""
        return open_reader(self, path, buffer_size)

    def sign(self, path: str, seconds: int = 3600) -> str:
        """A presigned GET URL of ``path`` (S3, GCS, Azure)."""
        from datetime import timedelta

        import obstore

        runtime_started()
        return str(obstore.sign(self.store, "GET", path, timedelta(seconds=seconds)))


def _ns(when: Any) -> int:
    """Nanoseconds since the epoch of a listing's modification time (0 when it has none)."""
    if when is None:
        return 0
    return int(when.timestamp()) * 1_000_000_000 + int(getattr(when, "microsecond", 0)) * 1000


def _options(start: int | None, end: int | None, if_match: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if start is not None and end is not None:
        options["range"] = (int(start), int(end))
    if if_match:
        options["if_match"] = if_match
    return options


def _obstore_store(location: Location, conf: IOSettings, request_payer: bool) -> Any:
    from obstore import store as stores

    retry = conf.retry.for_obstore()
    if location.scheme == "s3":
        endpoint = conf.endpoint
        kwargs: dict[str, Any] = {"region": conf.region}
        if endpoint:
            kwargs["endpoint"] = endpoint.rstrip("/")
            kwargs["virtual_hosted_style_request"] = False
        if conf.requester_pays or request_payer:
            kwargs["request_payer"] = True
        if conf.signs():
            kwargs["credential_provider"] = conf.credential_provider()
        else:
            kwargs["skip_signature"] = True
        return stores.S3Store(location.bucket, client_options=conf.client_options(conf.s3_base()),
                              retry_config=retry, **kwargs)
    if location.scheme in ("http", "https"):
        return stores.HTTPStore.from_url(location.root, client_options=conf.client_options(location.root),
                                         retry_config=retry)
    # gs://, az://: their own credential chains (GOOGLE_*, AZURE_* variables)
    return stores.from_url(location.root, client_options=conf.client_options("https://"), retry_config=retry)


# --- the synchronous client of forked children ------------------------------------------------


class SyncClient:
    """urllib3 for GETs and HEADs (S3 presigned by botocore), botocore for S3 writes and
    listings; for processes where obstore cannot run (see the module docstring)."""

    blocking = True

    def __init__(self, location: Location, conf: IOSettings, request_payer: bool) -> None:
        if location.scheme not in ("s3", "http", "https"):
            raise ForkedClientError(
                f"{location.url!r}: this process was forked after its parent used obstore's runtime, "
                f"and {location.scheme}:// has no synchronous client here"
            )
        self.root = location.root
        self.location = location
        self.conf = conf
        self.request_payer = request_payer or conf.requester_pays
        self._s3: Any = None
        self._signed: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    # S3 -------------------------------------------------------------------------------------
    def _boto(self) -> Any:
        if self._s3 is None:
            with self._lock:
                if self._s3 is None:
                    self._s3 = self.conf.boto3_client("s3")
        return self._s3

    def _payer(self) -> dict[str, str]:
        return {"RequestPayer": "requester"} if self.request_payer else {}

    def _url(self, path: str, method: str = "get_object") -> str:
        if self.location.scheme != "s3":
            return self.location.url if not path else f"{self.root}/{_quote(path)}"
        key = (method, path)
        now = time.monotonic()
        signed = self._signed.get(key)
        if signed is not None and signed[1] > now:
            return signed[0]
        url = self._boto().generate_presigned_url(
            method, Params={"Bucket": self.location.bucket, "Key": path, **self._payer()}, ExpiresIn=SIGN_SECONDS)
        self._signed[key] = (url, now + SIGN_SECONDS - SIGN_MARGIN)
        return str(url)

    # reads ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, headers: dict[str, str]) -> Any:
        url = self._url(path, "head_object" if method == "HEAD" else "get_object")
        return pool_for(url, self.conf).request(
            method, url, headers=headers, preload_content=False, retries=self.conf.retry.for_urllib3(),
            timeout=_timeout(self.conf), redirect=True,
        )

    def get(self, path: str, start: int | None = None, end: int | None = None, *, if_match: str | None = None,
            out: Any = None) -> tuple[Any, Meta]:
        """Bytes ``start:end`` (all without a range), received into ``out`` when given."""
        headers = {"User-Agent": "stacchip"}
        n: int | None = None
        if start is not None and end is not None:
            n = int(end) - int(start)
            headers["Range"] = f"bytes={start}-{int(end) - 1}"
        ranged = n is not None
        if if_match:
            headers["If-Match"] = if_match
        response = self._request("GET", path, headers)
        try:
            _check_status(response, self.location.url if not path else f"{self.root}/{path}")
            etag = response.headers.get("ETag")
            if ranged and response.status == 200:
                raise StorageRangeError(f"cannot read {self.location.url!r}: the server ignores Range requests")
            total = _total_size(response, ranged)
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit():  # a range past the end comes back clipped
                if n is not None and int(length) > n:
                    raise StorageError(f"cannot read {self.location.url!r}: {length} bytes for a range of {n}")
                n = int(length)
            data = _read_body(response, n, out)
            return data, Meta(total, etag)
        finally:
            response.release_conn()

    async def get_async(self, path: str, start: int, end: int, *, if_match: str | None = None) -> tuple[Any, Meta]:
        raise NotImplementedError("the synchronous client has no async API")

    def get_head(self, path: str) -> Meta:
        response = self._request("HEAD", path, {"User-Agent": "stacchip"})
        try:
            _check_status(response, f"{self.root}/{path}")
            size = response.headers.get("Content-Length")
            attrs = {k[len("x-amz-meta-"):].lower(): v for k, v in response.headers.items()
                     if k.lower().startswith("x-amz-meta-")}
            return Meta(int(size) if size is not None else None, response.headers.get("ETag"), attrs)
        finally:
            response.release_conn()

    def stream(self, path: str) -> Iterator[Any]:
        response = self._request("GET", path, {"User-Agent": "stacchip"})
        try:
            _check_status(response, f"{self.root}/{path}")
        except BaseException:
            response.release_conn()
            raise

        def chunks() -> Iterator[Any]:
            try:
                yield from response.stream(8 * 2**20)
            finally:
                response.release_conn()

        return chunks()

    # writes (S3 only) -----------------------------------------------------------------------------
    def _s3_only(self, what: str) -> None:
        if self.location.scheme != "s3":
            raise StorageRefusedError(f"cannot {what} {self.location.url!r}: http(s) is read-only")

    def put(self, path: str, data: Any, *, create: bool = False,
            attributes: Mapping[str, str] | None = None) -> None:
        self._s3_only("write")
        extra: dict[str, Any] = {"Metadata": dict(attributes)} if attributes else {}
        if create:
            extra["IfNoneMatch"] = "*"
        if isinstance(data, Path):
            if create:
                data = data.read_bytes()
            else:
                self._boto().upload_file(str(data), self.location.bucket, path,
                                         ExtraArgs=extra or None)
                return
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = b"".join(bytes(chunk) for chunk in data)
        self._boto().put_object(Bucket=self.location.bucket, Key=path, Body=bytes(data), **extra)

    def list(self, prefix: str) -> Iterator[tuple[str, int, int, str | None]]:
        self._s3_only("list")
        paginator = self._boto().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix or "", **self._payer()):
            for obj in page.get("Contents", []):
                yield obj["Key"], int(obj["Size"]), _ns(obj.get("LastModified")), obj.get("ETag")

    def rename(self, src: str, dst: str) -> None:
        self.copy(src, dst)
        self.delete(src)

    def delete(self, path: str) -> None:
        self._s3_only("delete")
        self._boto().delete_object(Bucket=self.location.bucket, Key=path)

    def copy(self, src: str, dst: str) -> None:
        self._s3_only("copy")
        self._boto().copy({"Bucket": self.location.bucket, "Key": src}, self.location.bucket, dst,
                          ExtraArgs=self._payer() or None)

    def open_reader(self, path: str, buffer_size: int = 1024 * 1024) -> Any:
        return open_reader(self, path, buffer_size)

    def sign(self, path: str, seconds: int = 3600) -> str:
        return self._url(path)


class ForkedClientError(StorageError):
    """No client can serve this URL in a child forked after its parent used obstore."""


#: Lifetime of a presigned S3 URL, and how long before its end it is signed again, s.
SIGN_SECONDS = 3600
SIGN_MARGIN = 600


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/~!$&'()*+,;=:@")


def _timeout(conf: IOSettings) -> Any:
    from urllib3.util.timeout import Timeout

    return Timeout(connect=conf.connect_timeout, read=conf.read_timeout)


def _check_status(response: Any, url: str) -> None:
    status = int(response.status)
    if status in (200, 206):
        return
    body = response.read(64 * 1024, decode_content=True) if status >= 400 else b""
    detail = f"HTTP {status}"
    code = re.search(rb"<Code>([^<]{1,100})</Code>", body or b"")
    if code:
        detail += f" {code.group(1).decode('ascii', 'replace')}"
    raise translate(_HTTPStatus(status, detail), url, "read")


class _HTTPStatus(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _total_size(response: Any, ranged: bool) -> int | None:
    content_range = response.headers.get("Content-Range")
    if ranged and content_range:
        total = content_range.rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def _read_body(response: Any, n: int | None, out: Any) -> Any:
    """The body (``n`` bytes when known), received into ``out`` when it is given."""
    if n is None or out is None:
        data = response.read(decode_content=False)
        if n is not None and len(data) != n:
            raise StorageError(f"short body: {len(data)} of {n} bytes")
        return data
    view = memoryview(out).cast("B")[:n]
    got = 0
    while got < n:
        k = response.readinto(view[got:])
        if not k:
            raise StorageError(f"connection closed after {got} of {n} bytes")
        got += k
    return view


class RangeFile(PositionalFile):
    """A seekable, read-only raw file over ranged GETs of one object (one GET per read;
    :func:`open_reader` puts a buffer in front): what pyarrow and tifffile take."""

    def __init__(self, client: Any, path: str, size: int | None = None) -> None:
        super().__init__()
        self._client, self._path = client, path
        if size is None:
            try:
                size = client.get_head(path).size or 0
            except Exception as exc:  # noqa: BLE001 - one classification
                raise translate(exc, f"{client.root}/{path}", "open") from exc
        self._size = int(size)

    def size(self) -> int:
        return self._size

    def length(self) -> int:
        return self._size

    def pread_into(self, view: memoryview, offset: int) -> int:
        n = len(view)
        try:
            data, _ = self._client.get(self._path, offset, offset + n, out=view)
        except Exception as exc:  # noqa: BLE001 - one classification: a StorageError, never a bare OSError
            raise translate(exc, f"{self._client.root}/{self._path}", "read") from exc
        got = memoryview(data).cast("B")
        if len(got) != n:
            raise StorageError(f"short read of {self._path!r}: {len(got)} of {n} bytes at {offset}")
        if got.obj is not view.obj:  # the client brought its own memory
            view[:n] = got
        return n


def open_reader(client: Any, path: str, buffer_size: int = 1024 * 1024) -> Any:
    """A buffered, seekable file object over ranged GETs of ``path`` (one HEAD for its size)."""
    return io.BufferedReader(RangeFile(client, path), buffer_size=buffer_size)


# --- pools and clients per process ---------------------------------------------------------------

_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}
_pools: dict[tuple[Any, ...], Any] = {}


def pool_for(url: str, conf: IOSettings) -> Any:
    """The urllib3 pool manager for ``url`` (through its proxy, if any), per settings."""
    import urllib3

    proxy = conf.proxies.for_url(url)
    key = (conf.key, proxy)
    manager = _pools.get(key)
    if manager is None:
        with _lock:
            manager = _pools.get(key)
            if manager is None:
                kwargs: dict[str, Any] = {"maxsize": 32, "block": False}
                if conf.ca_bundle:
                    kwargs["ca_certs"] = conf.ca_bundle
                manager = urllib3.ProxyManager(proxy, **kwargs) if proxy else urllib3.PoolManager(**kwargs)
                _pools[key] = manager
    return manager


def client_for(url: str, *, request_payer: bool = False) -> tuple[Any, str]:
    """``(client, path)`` for a remote URL: obstore's store of its root, or the synchronous
    client in a child forked after its parent used obstore (see the module docstring)."""
    location = locate(url)
    conf = settings()
    kind = "obstore" if obstore_usable() else "sync"
    key = (conf.key, kind, location.root, bool(request_payer))
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                if kind == "obstore":
                    try:
                        store = _obstore_store(location, conf, request_payer)
                    except (ValueError, TypeError) as exc:
                        raise ConfigError(f"cannot configure a client for {location.root!r}: {exc}") from exc
                    except Exception as exc:  # noqa: BLE001 - obstore's configuration errors
                        raise translate(exc, location.root, "configure a client for") from exc
                    client = ObstoreClient(location.root, store)
                else:
                    client = SyncClient(location, conf, request_payer)
                if len(_clients) > 256:  # signed URLs each have a root: keep the table bounded
                    _clients.clear()
                _clients[key] = client
    return client, location.path


def reset() -> None:
    """Forget every client and pool (new connections on next use)."""
    with _lock:
        _clients.clear()
        _pools.clear()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _clients.clear()
    _pools.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
