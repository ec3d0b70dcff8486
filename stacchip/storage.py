"""Local paths, ``file://`` and ``s3://``: read, write atomically, exists, list.

The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` variables (boto3 reads them itself), so one setting points
a whole job at any S3-compatible store. Every write is whole or not at all:
local files are written to a temporary name in the same directory and renamed;
S3 ``PutObject`` is atomic by itself.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator
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
            config=Config(retries=S3_RETRIES),
        )


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
