"""Local paths, ``file://`` and ``s3://``: read, write atomically, exists, list.

The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` variables (boto3 reads them itself), so one setting points
a whole job at any S3-compatible store. Every write is whole or not at all:
local files are written to a temporary name in the same directory and renamed;
S3 ``PutObject`` is atomic by itself.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from stacchip.errors import StorageError, StorageNotFoundError

S3_RETRIES = {"max_attempts": 10, "mode": "standard"}
_client_lock = threading.Lock()


def is_s3(url: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URLs."""
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``("bucket", "key/with/slashes")`` from ``s3://bucket/key/with/slashes``."""
    parsed = urlparse(str(url))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(url: str | os.PathLike[str]) -> Path:
    """Filesystem path of a local path or ``file://`` URL."""
    text = str(url)
    if text.startswith("file://"):
        return Path(urlparse(text).path)
    return Path(text)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or URL with ``/``."""
    text = str(base)
    if is_s3(text) or "://" in text:
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(text, *parts))


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, pid: int) -> object:
    import boto3
    from botocore.config import Config

    with _client_lock:
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=endpoint or None,
            config=Config(retries=_s3_retries()),
        )


def _s3_retries() -> dict[str, Any]:
    """:data:`S3_RETRIES`, less what the standard ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``
    variables set (botocore reads those itself only when the client config leaves them out)."""
    env = {"max_attempts": "AWS_MAX_ATTEMPTS", "mode": "AWS_RETRY_MODE"}
    return {k: v for k, v in S3_RETRIES.items() if not os.environ.get(env.get(k, ""), "").strip()}


def s3_client() -> object:
    """A boto3 S3 client for the configured endpoint (one per process)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return _client(endpoint, os.getpid())


def _s3_error(exc: Exception, url: str, action: str) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        return StorageNotFoundError(f"{action} {url!r}: not found ({code})")
    return StorageError(f"{action} {url!r}: {exc}")


def read_bytes(url: str | os.PathLike[str]) -> bytes:
    """Whole content of a local file or S3 object."""
    text = str(url)
    if is_s3(text):
        bucket, key = split_s3(text)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
        except Exception as exc:  # botocore errors carry no common base we can import lazily
            raise _s3_error(exc, text, "cannot read") from exc
    path = local_path(text)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise StorageNotFoundError(f"cannot read {text!r}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {text!r}: {exc}") from exc


def write_bytes(url: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` whole or not at all (temp file + rename; S3 PutObject)."""
    text = str(url)
    if is_s3(text):
        bucket, key = split_s3(text)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)  # type: ignore[attr-defined]
        except Exception as exc:
            raise _s3_error(exc, text, "cannot write") from exc
        return
    path = local_path(text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {text!r}: {exc}") from exc


def exists(url: str | os.PathLike[str]) -> bool:
    """True when the file or object exists."""
    text = str(url)
    if is_s3(text):
        bucket, key = split_s3(text)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
            return True
        except Exception as exc:
            err = _s3_error(exc, text, "cannot stat")
            if isinstance(err, StorageNotFoundError):
                return False
            raise err from exc
    return local_path(text).exists()


def list_files(prefix: str | os.PathLike[str], suffix: str = "") -> Iterator[str]:
    """Every file or object under ``prefix`` (recursively) whose name ends with ``suffix``."""
    text = str(prefix)
    if is_s3(text):
        bucket, key = split_s3(text)
        paginator = s3_client().get_paginator("list_objects_v2")  # type: ignore[attr-defined]
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(suffix):
                        yield f"s3://{bucket}/{obj['Key']}"
        except Exception as exc:
            raise _s3_error(exc, text, "cannot list") from exc
        return
    root = local_path(text)
    if root.is_file():
        if root.name.endswith(suffix):
            yield str(root)
        return
    if not root.exists():
        raise StorageNotFoundError(f"cannot list {text!r}: no such directory")
    for path in sorted(root.rglob(f"*{suffix}")):
        if path.is_file() and not path.name.startswith("."):
            yield str(path)


# --- copies, retries and claims (processors) ------------------------------------------
#
# Added for the batch processors: whole-object copies between local paths,
# s3:// and http(s):// sources, retried with exponential backoff on transient
# errors, and create-if-absent "claims" so two tasks never write one key.

_logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Attempts (including the first) for :func:`retry`; env ``STACCHIP_RETRIES`` overrides.
RETRY_ATTEMPTS = 8
#: First backoff delay in seconds (doubled per attempt, with jitter), and the cap.
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 30.0
#: HTTP timeout in seconds for streamed copies from http(s) sources.
HTTP_TIMEOUT = 60.0
_CHUNK = 8 * 1024 * 1024

_TRANSIENT_CODES = {
    "500", "502", "503", "504", "429", "InternalError", "ServiceUnavailable", "SlowDown",
    "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "BadGateway", "GatewayTimeout",
}


def is_http(url: str | os.PathLike[str]) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return str(url).startswith(("http://", "https://"))


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is worth retrying: 5xx, throttling, dropped connections."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageNotFoundError):
            return False
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            err = response.get("Error", {})
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if str(err.get("Code", "")) in _TRANSIENT_CODES or status in _TRANSIENT_CODES:
                return True
        if isinstance(current, urllib.error.HTTPError):
            return current.code in (429, 500, 502, 503, 504)
        name = type(current).__name__
        if name in (
            "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
            "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
            "ProtocolError", "RemoteDisconnected", "IncompleteRead",
        ):
            return True
        if isinstance(current, (ConnectionError, TimeoutError, urllib.error.URLError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def retry(
    func: Callable[..., T],
    *args: Any,
    attempts: int | None = None,
    what: str = "",
    **kwargs: Any,
) -> T:
    """Call ``func(*args, **kwargs)``, retrying transient errors with exponential backoff.

    Delays start at :data:`RETRY_BASE_DELAY` seconds, double per attempt (with
    jitter) up to :data:`RETRY_MAX_DELAY`. Non-transient errors and the last
    transient one are raised as they are.
    """
    if attempts is None:
        try:
            attempts = int(os.environ.get("STACCHIP_RETRIES", RETRY_ATTEMPTS))
        except ValueError:
            attempts = RETRY_ATTEMPTS
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2
            _logger.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.1f s",
                what or getattr(func, "__name__", "call"), attempt, attempts, exc, delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _payer(request_payer: bool) -> dict[str, str]:
    return {"RequestPayer": "requester"} if request_payer else {}


def _local_tmp(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return tmp


def _into_local(path: Path, fill: Callable[[str], Any]) -> None:
    """Run ``fill(tmp_path)`` then rename the temp file onto ``path`` (whole or nothing)."""
    tmp = _local_tmp(path)
    try:
        fill(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_http(url: str) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": "stacchip"})
    return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)  # noqa: S310 - http(s) only


def _copy_once(src: str, dst: str, request_payer: bool) -> None:
    payer = _payer(request_payer)
    if is_s3(dst):
        bucket, key = split_s3(dst)
        client = s3_client()
        if is_s3(src):
            # Server-side copy (multipart for large objects): the object appears whole on completion.
            sbucket, skey = split_s3(src)
            client.copy({"Bucket": sbucket, "Key": skey}, bucket, key, ExtraArgs=payer or None)  # type: ignore[attr-defined]
        elif is_http(src):
            with _open_http(src) as response:  # streamed: multipart upload, never held in memory
                client.upload_fileobj(response, bucket, key)  # type: ignore[attr-defined]
        else:
            client.upload_file(str(local_path(src)), bucket, key)  # type: ignore[attr-defined]
        return
    target = local_path(dst)
    if is_s3(src):
        sbucket, skey = split_s3(src)
        _into_local(
            target,
            lambda tmp: s3_client().download_file(sbucket, skey, tmp, ExtraArgs=payer or None),  # type: ignore[attr-defined]
        )
    elif is_http(src):
        def fetch(tmp: str) -> None:
            with _open_http(src) as response, open(tmp, "wb") as fh:
                shutil.copyfileobj(response, fh, _CHUNK)
        _into_local(target, fetch)
    else:
        source = local_path(src)
        if not source.exists():
            raise StorageNotFoundError(f"cannot copy {src!r}: no such file")
        _into_local(target, lambda tmp: shutil.copyfile(source, tmp))


def copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    request_payer: bool = False,
    attempts: int | None = None,
) -> None:
    """Copy one object or file from ``src`` to ``dst``, whole or not at all.

    ``src`` is a local path, ``file://``, ``s3://`` or ``http(s)://`` URL;
    ``dst`` a local path, ``file://`` or ``s3://`` URL. S3 to S3 is a
    server-side copy; HTTP sources are streamed; ``request_payer`` sends
    ``RequestPayer=requester`` for requester-pays source buckets. Transient
    errors are retried with backoff (:func:`retry`).
    """
    source, target = str(src), str(dst)

    def once() -> None:
        try:
            _copy_once(source, target, request_payer)
        except StorageError:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise StorageNotFoundError(f"cannot copy {source!r}: not found (HTTP 404)") from exc
            if exc.code in (429, 500, 502, 503, 504):
                raise
            raise StorageError(f"cannot copy {source!r} to {target!r}: {exc}") from exc
        except Exception as exc:
            if is_transient(exc):
                raise
            err = _s3_error(exc, source, "cannot copy")
            if isinstance(err, StorageNotFoundError):
                raise err from exc
            raise StorageError(f"cannot copy {source!r} to {target!r}: {exc}") from exc

    try:
        retry(once, attempts=attempts, what=f"copy {source} -> {target}")
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"cannot copy {source!r} to {target!r}: {exc}") from exc


def put_file(local: str | os.PathLike[str], dst: str | os.PathLike[str], *, attempts: int | None = None) -> None:
    """Upload (or copy) a local file to ``dst``, whole or not at all, with retries."""
    copy(local, dst, attempts=attempts)


def write_bytes_retry(url: str | os.PathLike[str], data: bytes, *, attempts: int | None = None) -> None:
    """:func:`write_bytes` retried with backoff on transient errors."""
    retry(write_bytes, url, data, attempts=attempts, what=f"write {url}")


def exists_retry(url: str | os.PathLike[str], *, attempts: int | None = None) -> bool:
    """:func:`exists` retried with backoff on transient errors."""
    return retry(exists, url, attempts=attempts, what=f"stat {url}")


def read_bytes_retry(url: str | os.PathLike[str], *, attempts: int | None = None) -> bytes:
    """:func:`read_bytes` (local, s3:// or http(s)://) retried with backoff on transient errors."""
    text = str(url)
    if is_http(text):
        def fetch() -> bytes:
            try:
                with _open_http(text) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise StorageNotFoundError(f"cannot read {text!r}: not found (HTTP 404)") from exc
                raise
        return retry(fetch, attempts=attempts, what=f"read {text}")
    return retry(read_bytes, text, attempts=attempts, what=f"read {text}")


def bucket_exists(url: str | os.PathLike[str], *, attempts: int | None = None) -> bool | None:
    """Whether the bucket of an ``s3://`` URL exists: True, False, or None when the credentials
    may not tell (HeadBucket refused). Transient errors are retried."""
    bucket, _ = split_s3(str(url))

    def head() -> bool | None:
        try:
            s3_client().head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
            return True
        except Exception as exc:
            if is_transient(exc):
                raise
            if isinstance(_s3_error(exc, str(url), "cannot find"), StorageNotFoundError):
                return False
            _logger.debug("cannot inspect bucket %s: %s", bucket, exc)
            return None

    return retry(head, attempts=attempts, what=f"check bucket {bucket}")


def create_if_absent(url: str | os.PathLike[str], data: bytes) -> bool:
    """Create ``url`` with ``data`` only if nothing is there; True if this call created it.

    Local files are written aside and hard-linked into place; S3 uses a conditional ``PutObject``
    (``If-None-Match: *``), so of two concurrent callers exactly one wins.
    """
    text = str(url)
    if is_s3(text):
        bucket, key = split_s3(text)

        def put() -> bool:
            try:
                s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")  # type: ignore[attr-defined]
                return True
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise

        try:
            return retry(put, what=f"claim {text}")
        except Exception as exc:
            raise _s3_error(exc, text, "cannot create") from exc
    path = local_path(text)
    try:
        tmp = _local_tmp(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # atomic, and fails if the name exists
        finally:
            Path(tmp).unlink(missing_ok=True)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot create {text!r}: {exc}") from exc
    return True
