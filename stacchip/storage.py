"""Local paths, ``file://`` and ``s3://``: read, write atomically, exists, list, path safety.

The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` variables (boto3 reads them itself), so one setting points
a whole job at any S3-compatible store.

Writes
------
Every write is whole or not at all: local files are written to a temporary
``.{name}.{8 random [a-z0-9_]}.part`` beside the target and renamed onto it;
S3 ``PutObject`` is atomic by itself. Temporary files are created with mode
``0o666`` and the process umask applies, so a written file has the permissions
``open()`` would give it (``0644`` under umask ``022``, ``0664`` under ``002``);
S3 objects are unchanged. A killed run can leave temporary files behind;
:func:`remove_stale_temps` removes those of one output (older than a given
time): the processors call it when they take up an item, prechip when a job
starts on its cubes, stats before it writes its results.

Checksum records
----------------
:func:`write_recorded` writes a file together with a record of its size and
SHA-256, ``.{name}.sha256.json`` beside it (``{"file", "size", "sha256"}``;
the record is written first, so a file never lacks the record of what it
should be). On S3 the object also carries its SHA-256 (``ChecksumSHA256``,
verified by S3 on upload). :func:`verify` compares a file with its record: the
size first, then the checksum (S3's stored checksum when it has one, else the
content is hashed). Re-runs use it to tell a finished output from a damaged one.
Record names start with ``.``, so directory readers that skip hidden files
(pyarrow.dataset, GDAL, ``*.npz`` globs) never see them.

Path safety
-----------
Names that come from outside data -- STAC item ids, asset file names, asset
keys, an index's ``item_id`` and ``platform`` -- become path segments only
through :func:`safe_segment` / :func:`join_under`. A name is a safe segment
when it is a non-empty string of at most 255 UTF-8 bytes and

* is not ``.`` or ``..``,
* holds no ``/`` or ``\\``, no control character (NUL, ``\\n``, DEL, C1 controls)
  and no line or paragraph separator,
* does not start with ``.`` (hidden names are kept for the temporary files and
  checksum records above) or ``-`` (it would read as an option to the
  command-line tools that get paths),

both as written and once percent-decoded (``%2e%2e`` is ``..``, ``%2F`` a
``/``). Anything else raises :class:`~stacchip.errors.UnsafePathError`, before
anything is read or written. Hrefs re-rooted under a directory (``mountpath``)
go through :func:`under_root`: the href's path is normalised lexically (``.``
and empty steps dropped, ``..`` steps taken back) and refused when a ``..``
would climb above the root -- as written or percent-decoded -- or when it holds
a backslash or a control character. The check is lexical: symbolic links inside
a root the user gave are the user's.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import unquote, urlparse

from stacchip.errors import StorageError, StorageNotFoundError, UnsafePathError

logger = logging.getLogger(__name__)

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


# --- path safety ----------------------------------------------------------------------

#: Longest path segment, in UTF-8 bytes (NAME_MAX of the common filesystems).
MAX_SEGMENT_BYTES = 255
#: Unicode categories refused in names: control characters, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


def _decodings(text: str) -> list[str]:
    """``text`` and its percent-decodings, decoded again while they change (at most 4 times)."""
    forms = [text]
    for _ in range(4):
        decoded = unquote(forms[-1], errors="replace")
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _control(text: str) -> str | None:
    for ch in text:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return ch
    return None


def _segment_problem(name: str) -> str | None:
    if name == "":
        return "is empty"
    if name in (".", ".."):
        return "is a relative step"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    ch = _control(name)
    if ch is not None:
        return f"holds the control character {ch!r}"
    if name.startswith("."):
        return "starts with '.' (hidden names are kept for temporary files and checksum records)"
    if name.startswith("-"):
        return "starts with '-' (it would read as a command-line option)"
    return None


def safe_segment(name: Any, what: str = "path segment") -> str:
    """``name`` when it is a safe single path segment (see the module docstring), else
    :class:`~stacchip.errors.UnsafePathError` naming ``what`` (e.g. ``"item id"``)."""
    if not isinstance(name, str):
        raise UnsafePathError(f"{what} {name!r} is not a string")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafePathError(f"{what} {name!r} is not valid Unicode text") from None
    if size > MAX_SEGMENT_BYTES:
        raise UnsafePathError(
            f"{what} {name[:40]!r}... is {size} bytes long; at most {MAX_SEGMENT_BYTES} fit a path segment"
        )
    for form in _decodings(name):
        problem = _segment_problem(form)
        if problem is not None:
            how = "" if form == name else f" (percent-decoded {form!r})"
            raise UnsafePathError(f"{what} {name!r}{how} is not a safe path segment: it {problem}")
    return name


def join_under(root: str | os.PathLike[str], *segments: str, what: str = "path segment") -> str:
    """``root/segment/segment`` (local path or URL) after checking every segment with
    :func:`safe_segment`: the result always lies inside ``root``."""
    if str(root) == "":
        raise UnsafePathError("empty root directory")
    for segment in segments:
        safe_segment(segment, what)
    return join(root, *segments)


def _lexical_parts(form: str, original: str, root: str, what: str) -> list[str]:
    if "\\" in form:
        raise UnsafePathError(f"{what} {original!r} holds a backslash; refused under {root!r}")
    ch = _control(form)
    if ch is not None:
        raise UnsafePathError(f"{what} {original!r} holds the control character {ch!r}; refused under {root!r}")
    parts: list[str] = []
    for step in form.split("/"):
        if step in ("", "."):
            continue
        if step == "..":
            if not parts:
                shown = "" if form == original else f" (percent-decoded {form!r})"
                raise UnsafePathError(f"{what} {original!r}{shown} leads outside {root!r}")
            parts.pop()
        else:
            parts.append(step)
    return parts


def under_root(root: str | os.PathLike[str], path: str, what: str = "path") -> str:
    """``root`` joined with the relative ``path`` (a leading ``/`` counts from ``root``),
    normalised lexically; :class:`~stacchip.errors.UnsafePathError` when ``path`` would leave
    ``root`` (as written or percent-decoded), holds a backslash or a control character, or names
    nothing below ``root``. The returned path keeps ``path``'s own spelling (not decoded)."""
    text = str(path)
    top = str(root)
    if top == "":
        raise UnsafePathError("empty root directory")
    forms = _decodings(text)
    parts = _lexical_parts(forms[0], text, top, what)
    for form in forms:
        if not _lexical_parts(form, text, top, what):
            shown = "" if form == text else f" (percent-decoded {form!r})"
            raise UnsafePathError(f"{what} {text!r}{shown} names no file under {top!r}")
    return join(top, *parts)


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


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (the variables
    boto3 reads), else None (AWS). The one place stacchip reads them: boto3 clients, pyarrow
    filesystems and GDAL's ``/vsis3/`` (:func:`stacchip.reader.gdal_options`) all follow it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    """The AWS region from ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else None."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_client() -> object:
    """A boto3 S3 client for the configured endpoint (one per process)."""
    return _client(s3_endpoint(), os.getpid())


@functools.lru_cache(maxsize=8)
def _arrow_s3(endpoint: str | None, region: str | None, pid: int) -> Any:
    from pyarrow import fs

    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest or scheme
        kwargs["scheme"] = scheme if rest else "https"
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


def arrow_path(url: str | os.PathLike[str]) -> str:
    """The path a pyarrow filesystem takes for ``url``: ``bucket/key`` on S3, an absolute local path."""
    text = str(url)
    if is_s3(text):
        return text[len("s3://"):]
    return os.path.abspath(local_path(text))


def arrow_filesystem(url: str | os.PathLike[str]) -> tuple[Any, str]:
    """A pyarrow filesystem for ``url`` and :func:`arrow_path` of it: for ``s3://`` one
    ``S3FileSystem`` per endpoint (:func:`s3_endpoint`), region and process; locally the
    local filesystem."""
    from pyarrow import fs

    if is_s3(url):
        return _arrow_s3(s3_endpoint(), s3_region(), os.getpid()), arrow_path(url)
    return fs.LocalFileSystem(), arrow_path(url)


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


def write_bytes(url: str | os.PathLike[str], data: bytes, *, sha256: bytes | None = None) -> None:
    """Write ``data`` whole or not at all (temp file + rename; S3 PutObject).

    Local files get the permissions the umask gives. ``sha256`` (the digest of
    ``data``) is sent to S3 as ``ChecksumSHA256``: S3 refuses a body that does not
    match and stores the checksum with the object.
    """
    text = str(url)
    if is_s3(text):
        bucket, key = split_s3(text)
        extra = {} if sha256 is None else {
            "ChecksumAlgorithm": "SHA256", "ChecksumSHA256": base64.b64encode(sha256).decode(),
        }
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)  # type: ignore[attr-defined]
        except Exception as exc:
            raise _s3_error(exc, text, "cannot write") from exc
        return
    path = local_path(text)
    try:
        fd, tmp = _new_temp(path)
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


# --- temporary files -------------------------------------------------------------------

_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
#: ``.{name}.{8 chars}.part`` (ours; also what ``tempfile.mkstemp`` made for earlier
#: versions), plus the ``.{8 hex}`` boto3 adds while it downloads into one.
_TEMP_TAIL = r"\.[a-z0-9_]{8}\.part(?:\.[0-9A-Fa-f]{8})?"
_ANY_TEMP = re.compile(r"\..+" + _TEMP_TAIL)


def _new_temp(path: Path) -> tuple[int, str]:
    """Create ``.{name}.{random}.part`` beside ``path`` (mode ``0o666`` less the umask, as
    ``open()`` creates files); returns its descriptor and path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        token = "".join(secrets.choice(_TEMP_CHARS) for _ in range(8))
        tmp = path.parent / f".{path.name}.{token}.part"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def _is_local(text: str) -> bool:
    return "://" not in text or text.startswith("file://")


def _remove_if_stale(entry: os.DirEntry[str], before: float | None) -> bool:
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
        if before is not None and entry.stat(follow_symlinks=False).st_mtime >= before:
            return False
        os.unlink(entry.path)
    except FileNotFoundError:
        return False
    logger.info("removed %s, left by an interrupted run", entry.path)
    return True


def remove_stale_temps(url: str | os.PathLike[str], before: float | None = None) -> list[str]:
    """Remove the temporary files an interrupted write of ``url`` left beside it.

    Only files named as :func:`write_bytes` and :func:`copy` name their temporary
    files for this very target, and (with ``before``, a ``time.time()`` value) last
    modified before ``before`` -- a write under way keeps touching its file. S3 and
    other URLs have no temporary objects: nothing to do. Returns the removed paths.
    """
    text = str(url)
    if not _is_local(text):
        return []
    path = local_path(text)
    return _remove_temps(path.parent, re.compile(re.escape(f".{path.name}") + _TEMP_TAIL), before)


def _remove_temps(folder: Path, pattern: re.Pattern[str], before: float | None) -> list[str]:
    """Remove the files of ``folder`` named by ``pattern`` and stale (see :func:`_remove_if_stale`)."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [entry.path for entry in entries if pattern.fullmatch(entry.name) and _remove_if_stale(entry, before)]


def remove_stale_temps_in(folder: str | os.PathLike[str], before: float | None = None) -> list[str]:
    """:func:`remove_stale_temps` for every target in ``folder`` (not recursive): for
    folders only one task writes to (a processor's item folders)."""
    text = str(folder)
    if not _is_local(text):
        return []
    return _remove_temps(local_path(text), _ANY_TEMP, before)


# --- checksum records ---------------------------------------------------------------------

#: Outcomes of :func:`verify`.
VERIFIED = "verified"
UNRECORDED = "unrecorded"
DAMAGED = "damaged"
MISSING = "missing"
_RECORD_SUFFIX = ".sha256.json"


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found: ``status`` is one of ``verified`` (size and SHA-256 match the
    record), ``unrecorded`` (the file is there without a record), ``damaged`` (they differ, or
    the record is unreadable) or ``missing``; ``detail`` says what differed."""

    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when the file matches its record."""
        return self.status == VERIFIED


def record_url(url: str | os.PathLike[str]) -> str:
    """Where the checksum record of ``url`` lives: ``.{name}.sha256.json`` beside it."""
    text = str(url)
    if _is_local(text):
        path = local_path(text)
        return str(path.with_name(f".{path.name}{_RECORD_SUFFIX}"))
    head, _, name = text.rpartition("/")
    return f"{head}/.{name}{_RECORD_SUFFIX}"


def write_recorded(url: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``url`` (whole or not at all) with its checksum record.

    The record goes first: a crash between the two leaves a record and no file (the
    output is missing, so it is written again) or a record of the new content beside
    the old file (it fails :func:`verify`, so it is written again).
    """
    text = str(url)
    digest = hashlib.sha256(data)
    record = {"file": text.rstrip("/").rsplit("/", 1)[-1], "size": len(data), "sha256": digest.hexdigest()}
    write_bytes(record_url(text), json.dumps(record).encode())
    write_bytes(text, data, sha256=digest.digest())


def write_recorded_retry(url: str | os.PathLike[str], data: bytes, *, attempts: int | None = None) -> None:
    """:func:`write_recorded` retried with backoff on transient errors."""
    retry(write_recorded, url, data, attempts=attempts, what=f"write {url}")


def _stat(text: str) -> tuple[int, str | None] | None:
    """``(size, stored sha256 hex or None)`` of a file or object; None when it does not exist."""
    if is_s3(text):
        bucket, key = split_s3(text)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")  # type: ignore[attr-defined]
        except Exception as exc:
            err = _s3_error(exc, text, "cannot stat")
            if isinstance(err, StorageNotFoundError):
                return None
            raise err from exc
        stored = head.get("ChecksumSHA256")
        sha = None
        if stored and "-" not in stored:  # "-N": a checksum of part checksums (multipart upload)
            try:
                sha = base64.b64decode(stored, validate=True).hex()
            except (binascii.Error, ValueError):
                sha = None
        return int(head["ContentLength"]), sha
    try:
        return local_path(text).stat().st_size, None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot stat {text!r}: {exc}") from exc


def sha256_of(url: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's or object's content, read in chunks."""
    text = str(url)
    digest = hashlib.sha256()
    if is_s3(text):
        bucket, key = split_s3(text)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]  # type: ignore[attr-defined]
            for chunk in iter(lambda: body.read(_CHUNK), b""):
                digest.update(chunk)
        except Exception as exc:
            raise _s3_error(exc, text, "cannot read") from exc
        return digest.hexdigest()
    try:
        with open(local_path(text), "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise StorageNotFoundError(f"cannot read {text!r}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {text!r}: {exc}") from exc
    return digest.hexdigest()


def verify(url: str | os.PathLike[str]) -> Verification:
    """Compare ``url`` with its checksum record (see :class:`Verification`).

    The size is compared first (a stat); the SHA-256 then comes from S3's stored
    checksum when the object has one, else from hashing the content.
    """
    text = str(url)
    found = _stat(text)
    if found is None:
        return Verification(MISSING, f"{text} does not exist")
    size, stored = found
    where = record_url(text)
    try:
        raw = read_bytes(where)
    except StorageNotFoundError:
        return Verification(UNRECORDED, f"{text} has no checksum record")
    try:
        record = json.loads(raw)
        want_size = int(record["size"])
        want = str(record["sha256"]).lower()
        if len(bytes.fromhex(want)) != 32:
            raise ValueError("not a SHA-256")
    except (ValueError, KeyError, TypeError) as exc:
        return Verification(DAMAGED, f"checksum record {where} is unreadable ({exc})")
    if size != want_size:
        return Verification(DAMAGED, f"{text} is {size} bytes; its record says {want_size}")
    got = stored or sha256_of(text)
    if got != want:
        return Verification(DAMAGED, f"{text} has SHA-256 {got[:16]}...; its record says {want[:16]}...")
    return Verification(VERIFIED)


def verify_retry(url: str | os.PathLike[str], *, attempts: int | None = None) -> Verification:
    """:func:`verify` retried with backoff on transient errors."""
    return retry(verify, url, attempts=attempts, what=f"verify {url}")


def whole_or_damaged(url: str, unrecorded_damage: Callable[[str], str | None], what: str) -> bool:
    """True when ``url`` is there and whole: it matches its checksum record, or (written
    without one) ``unrecorded_damage(url)`` finds nothing wrong. Damage is logged as
    ``what`` and the output counts as missing, so it is written again."""
    check = verify_retry(url)
    if check.ok:
        return True
    if check.status == MISSING:
        return False
    problem = unrecorded_damage(url) if check.status == UNRECORDED else check.detail
    if problem is None:
        return True
    logger.warning("%s %s is damaged (%s); writing it again", what, url, problem)
    return False


def is_http(url: str | os.PathLike[str]) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return str(url).startswith(("http://", "https://"))


# --- copies, retries and claims (processors) ------------------------------------------
#
# Added for the batch processors: whole-object copies between local paths,
# s3:// and http(s):// sources, retried with exponential backoff on transient
# errors, and create-if-absent "claims" so two tasks never write one key.

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
            logger.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.1f s",
                what or getattr(func, "__name__", "call"), attempt, attempts, exc, delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _payer(request_payer: bool) -> dict[str, str]:
    return {"RequestPayer": "requester"} if request_payer else {}


def _local_tmp(path: Path) -> str:
    fd, tmp = _new_temp(path)
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
            logger.debug("cannot inspect bucket %s: %s", bucket, exc)
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


# --- added for issue 22 (to be re-based on the new I/O layer) ---


@dataclass(frozen=True)
class FileInfo:
    """One file of a listing: its URL (or local path), size in bytes and a version tag that
    changes when its content is replaced (S3: the ETag; local: the modification time in ns)."""

    url: str
    size: int
    version: str


def list_file_infos(source: str | os.PathLike[str], suffix: str = "") -> list[FileInfo]:
    """:class:`FileInfo` of the file ``source``, or of every file under the directory or ``s3://``
    prefix ``source`` (recursively; names starting with ``.`` skipped) whose name ends with
    ``suffix``, sorted by URL; one listing, no content read. A ``source`` that is neither is
    :class:`~stacchip.errors.StorageNotFoundError`."""
    text = str(source)
    out: list[FileInfo] = []
    if is_s3(text):
        bucket, key = split_s3(text)
        paginator = s3_client().get_paginator("list_objects_v2")  # type: ignore[attr-defined]
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    name = obj["Key"]
                    inside = name == key or key == "" or key.endswith("/") or name.startswith(key.rstrip("/") + "/")
                    if inside and name.endswith(suffix) and not name.rsplit("/", 1)[-1].startswith("."):
                        out.append(FileInfo(f"s3://{bucket}/{name}", int(obj["Size"]), str(obj.get("ETag", ""))))
        except Exception as exc:
            raise _s3_error(exc, text, "cannot list") from exc
        if not out:
            raise StorageNotFoundError(f"cannot list {text!r}: nothing under it")
        return sorted(out, key=lambda f: f.url)
    root = local_path(text)
    try:
        if root.is_file():
            st = root.stat()
            return [FileInfo(str(root), st.st_size, str(st.st_mtime_ns))]
        if not root.is_dir():
            raise StorageNotFoundError(f"cannot list {text!r}: no such file or directory")
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.startswith(".") or not name.endswith(suffix):
                    continue
                st = os.stat(os.path.join(folder, name))
                out.append(FileInfo(os.path.join(folder, name), st.st_size, str(st.st_mtime_ns)))
    except OSError as exc:
        raise StorageError(f"cannot list {text!r}: {exc}") from exc
    return sorted(out, key=lambda f: f.url)


def presign(url: str | os.PathLike[str], expires: float = 3600.0) -> str:
    """A URL any HTTP client can read ``url`` at: for an ``s3://`` object a presigned GET URL
    (``http(s)://`` at the configured endpoint, valid ``expires`` seconds, no credentials
    needed to use it); local paths and ``http(s)://`` URLs are returned as they are."""
    text = str(url)
    if not is_s3(text):
        return text
    bucket, key = split_s3(text)
    try:
        return str(_signer(s3_endpoint(), os.getpid()).generate_presigned_url(  # type: ignore[attr-defined]
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires)))
    except Exception as exc:
        raise _s3_error(exc, text, "cannot sign") from exc


@functools.lru_cache(maxsize=8)
def _signer(endpoint: str | None, pid: int) -> object:
    """A boto3 S3 client that signs URLs with Signature Version 4 (one per endpoint and process)."""
    import boto3
    from botocore.config import Config

    with _client_lock:
        return boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                              config=Config(signature_version="s3v4", retries=_s3_retries()))


def remove(url: str | os.PathLike[str]) -> bool:
    """Delete the file or object ``url`` if it is there; True when something was deleted."""
    text = str(url)
    if is_s3(text):
        if not exists(text):
            return False
        bucket, key = split_s3(text)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
        except Exception as exc:
            raise _s3_error(exc, text, "cannot delete") from exc
        return True
    try:
        local_path(text).unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot delete {text!r}: {exc}") from exc
    return True


def prune_empty_dirs(root: str | os.PathLike[str]) -> None:
    """Remove the empty directories under the local directory ``root`` (deepest first) and
    ``root`` itself when it ends up empty; nothing for object stores (they have no folders)."""
    text = str(root)
    if not _is_local(text):
        return
    top = local_path(text)
    if not top.is_dir():
        return
    for folder, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        try:
            os.rmdir(folder)
        except OSError:
            continue  # not empty
