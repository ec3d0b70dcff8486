"""Whole files and objects: read, write atomically, exists, list, copy, claims, checksum records.

Local paths and ``file://`` are read and written directly; ``s3://``, ``http(s)://``,
``gs://`` and ``az://`` through the client of their root
(:mod:`stacchip.storage.clients`), with the one configuration and retry policy of
:mod:`stacchip.storage.config`. Nothing here retries on its own: the clients do.

Writes
------
Every write is whole or not at all: local files are written to a temporary
``.{stem}.{8 random [a-z0-9_]}.part`` beside the target (``stem``: 16 hex digits of the
SHA-1 of the target's name, so a temporary name is 31 bytes whatever the target's) and
renamed onto it;
object stores' ``PUT`` is atomic by itself (large files go up as one multipart
upload that appears on completion). Temporary files are created with mode
``0o666`` and the process umask applies, so a written file has the permissions
``open()`` would give it (``0644`` under umask ``022``, ``0664`` under ``002``).
A killed run can leave temporary files behind; :func:`remove_stale_temps`
removes those of one output (older than a given time): the processors call it
when they take up an item, prechip when a job starts on its cubes, stats before
it writes its results.

Checksum records
----------------
:func:`write_recorded` writes a file together with a record of its size and
SHA-256, ``.{name}.sha256.json`` beside it (``{"file", "size", "sha256"}``;
the record is written first, so a file never lacks the record of what it
should be). An object also carries its SHA-256 as user metadata (``sha256``;
``x-amz-meta-sha256`` on S3). :func:`verify` compares a file with its record:
the size first, then the checksum (the object's metadata when it has it, else
the content is hashed). Re-runs use it to tell a finished output from a
damaged one. Record names start with ``.``, so directory readers that skip
hidden files (pyarrow.dataset, GDAL, ``*.npz`` globs) never see them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from stacchip.errors import StorageError, StorageNotFoundError, StoragePreconditionError, StorageRefusedError
from stacchip.storage import clients
from stacchip.storage.config import settings
from stacchip.storage.paths import is_http, is_remote, is_s3, local_path, split_s3
from stacchip.storage.rawfile import PositionalFile

logger = logging.getLogger(__name__)

#: Chunk size of streamed copies and hashes, bytes.
_CHUNK = 8 * 1024 * 1024
#: Attribute (user metadata) holding an object's SHA-256, hex.
SHA256_ATTRIBUTE = "sha256"


def s3_endpoint() -> str | None:
    """The S3 endpoint URL (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``), or None for AWS."""
    return settings().endpoint


def s3_region() -> str:
    """The AWS region every client signs for (see :mod:`stacchip.storage.config`)."""
    return settings().region


def s3_client() -> Any:
    """A boto3 S3 client built from the same settings, for callers' own use (scripts,
    tests); stacchip moves its bytes through :mod:`stacchip.storage.clients`."""
    return settings().boto3_client("s3")


def _client(url: str, action: str, request_payer: bool = False) -> tuple[Any, str]:
    try:
        return clients.client_for(url, request_payer=request_payer)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - configuration errors pass through translate
        if type(exc).__name__ == "ConfigError":
            raise
        raise clients.translate(exc, url, action) from exc


def _remote(url: str, action: str, call: Callable[[Any, str], Any], request_payer: bool = False) -> Any:
    """``call(client, path)`` for a remote URL, its failure translated to a
    :class:`~stacchip.errors.StorageError` naming the URL."""
    client, path = _client(url, action, request_payer)
    try:
        return call(client, path)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client's errors end as one classification
        raise clients.translate(exc, url, action) from exc


# --- reads and writes --------------------------------------------------------------------------


def read_bytes(url: str | os.PathLike[str]) -> bytes:
    """Whole content of a local file or an object (``s3://``, ``http(s)://``, ...)."""
    text = str(url)
    if is_remote(text):
        return bytes(_remote(text, "read", lambda c, p: c.get(p)[0]))
    path = local_path(text)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise StorageNotFoundError(f"cannot read {text!r}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {text!r}: {exc}") from exc


def open_input(url: str | os.PathLike[str]) -> Any:
    """A seekable, read-only binary file object of a local file or an object (ranged
    reads, a few MB buffered): what ``pyarrow.parquet.ParquetFile`` and ``tifffile`` take."""
    text = str(url)
    if is_remote(text):
        return _remote(text, "open", lambda c, p: c.open_reader(p))
    return io.BufferedReader(_LocalFile(text), buffer_size=1024 * 1024)


class _LocalFile(PositionalFile):
    """A read-only, seekable local file whose failures are :class:`~stacchip.errors.StorageError`
    (never a bare ``OSError``: a storage failure stays apart from bad content)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        try:
            self._fd = os.open(local_path(url), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._size = os.fstat(self._fd).st_size
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"cannot open {url!r}: no such file") from exc
        except OSError as exc:
            raise StorageError(f"cannot open {url!r}: {exc}") from exc

    def size(self) -> int:
        return self._size

    def length(self) -> int:
        return self._size

    def pread_into(self, view: memoryview, offset: int) -> int:
        try:
            return os.preadv(self._fd, [view], offset)
        except OSError as exc:
            raise StorageError(f"cannot read {self.url!r}: {exc}") from exc

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            except OSError:
                pass
        super().close()


def write_bytes(url: str | os.PathLike[str], data: bytes, *, sha256: bytes | None = None) -> None:
    """Write ``data`` whole or not at all (temp file + rename; one PUT).

    Local files get the permissions the umask gives. ``sha256`` (the digest of
    ``data``) is kept with an object as its ``sha256`` metadata.
    """
    text = str(url)
    if is_remote(text):
        attributes = {SHA256_ATTRIBUTE: sha256.hex()} if sha256 is not None else None
        _remote(text, "write", lambda c, p: c.put(p, data, attributes=attributes))
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
    if is_remote(text):
        try:
            _remote(text, "stat", lambda c, p: c.get_head(p))
        except StorageNotFoundError:
            return False
        return True
    return local_path(text).exists()


def list_files(prefix: str | os.PathLike[str], suffix: str = "") -> Iterator[str]:
    """Every file or object under ``prefix`` (recursively) whose name ends with ``suffix``.

    Local listings skip hidden names (temporary files, checksum records)."""
    text = str(prefix)
    if is_remote(text):
        client, path = _client(text, "list")
        root = client.root
        try:
            for key, _size, _mtime, _etag in client.list(path):
                if key.endswith(suffix):
                    yield f"{root}/{key}"
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - one classification
            raise clients.translate(exc, text, "list") from exc
        return
    root_path = local_path(text)
    if root_path.is_file():
        if root_path.name.endswith(suffix):
            yield str(root_path)
        return
    if not root_path.exists():
        raise StorageNotFoundError(f"cannot list {text!r}: no such directory")
    for found in sorted(root_path.rglob(f"*{suffix}")):
        if found.is_file() and not found.name.startswith("."):
            yield str(found)


@dataclass(frozen=True)
class FileInfo:
    """One listed file or object: its URL (local absolute path or remote URL), size in bytes,
    modification time in nanoseconds since the epoch (object stores: ``Last-Modified``) and,
    for objects, the ETag."""

    url: str
    size: int
    mtime_ns: int
    etag: str | None = None

    @property
    def version(self) -> str:
        """What changes when the content is replaced: the ETag, else the modification time."""
        return self.etag or str(self.mtime_ns)


def list_info(prefix: str | os.PathLike[str], suffix: str = "") -> list[FileInfo]:
    """Every file or object under ``prefix`` (a file, a directory or a remote prefix; recursively,
    hidden names included) whose name ends with ``suffix``, with size and modification time,
    sorted by URL. A remote prefix lists whole path segments (``s3://b/a`` does not list
    ``s3://b/ab``). Local symbolic links are followed.
    :class:`~stacchip.errors.StorageNotFoundError` when nothing is there."""
    text = str(prefix)
    if is_remote(text):
        found = _list_remote_info(text, suffix)
        if not found:
            raise StorageNotFoundError(f"cannot list {text!r}: no objects under this prefix")
    else:
        try:
            found = _list_local_info(Path(os.path.abspath(local_path(text))), text, suffix)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot list {text!r}: {exc}") from exc
    return sorted(found, key=lambda f: f.url)


def _list_remote_info(text: str, suffix: str) -> list[FileInfo]:
    client, path = _client(text, "list")
    exact = path.rstrip("/")
    out = []
    try:
        for key, size, mtime, etag in client.list(exact):
            inside = not exact or key == exact or key.startswith(exact + "/")
            if inside and key.endswith(suffix) and not key.endswith("/"):
                out.append(FileInfo(f"{client.root}/{key}", size, mtime, etag))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - one classification
        raise clients.translate(exc, text, "list") from exc
    return out


def _list_local_info(root: Path, text: str, suffix: str) -> list[FileInfo]:
    if root.is_file():
        st = root.stat()
        return [FileInfo(str(root), st.st_size, st.st_mtime_ns)] if root.name.endswith(suffix) else []
    if not root.is_dir():
        raise StorageNotFoundError(f"cannot list {text!r}: no such file or directory")
    out = []
    for dirpath, _dirs, names in os.walk(root, followlinks=True):
        for name in names:
            if not name.endswith(suffix):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(FileInfo(full, st.st_size, st.st_mtime_ns))
    return out


def remove(url: str | os.PathLike[str]) -> bool:
    """Delete a file or object if it is there; True when something was deleted (an object is
    looked up first: a delete of a missing object succeeds silently)."""
    text = str(url)
    if is_remote(text) and not exists(text):
        return False
    try:
        delete(text, missing_ok=False)
    except StorageNotFoundError:
        return False
    return True


def list_file_infos(source: str | os.PathLike[str], suffix: str = "") -> list[FileInfo]:
    """:func:`list_info` less hidden names (a ``.`` at the start of any name below ``source``):
    the files of an index or output folder, each with its :attr:`FileInfo.version`."""
    text = str(source).rstrip("/")
    out = []
    for info in list_info(source, suffix):
        below = info.url[len(text):] if info.url.startswith(text) else info.url.rsplit("/", 1)[-1]
        if not any(part.startswith(".") for part in below.split("/") if part):
            out.append(info)
    return out


def presign(url: str | os.PathLike[str], expires: float = 3600.0) -> str:
    """A URL any HTTP client reads ``url`` at: for an object a presigned GET URL (S3, GCS,
    Azure; at the configured endpoint, valid ``expires`` seconds, signed by the client of its
    root); local paths and ``http(s)://`` URLs as they are."""
    text = str(url)
    if not is_remote(text) or is_http(text):
        return text
    return str(_remote(text, "sign", lambda c, p: c.sign(p, int(expires))))


def prune_empty_dirs(root: str | os.PathLike[str]) -> None:
    """Remove the empty folders under the local folder ``root`` (deepest first) and ``root``
    itself when it ends up empty; nothing for object stores (they have no folders)."""
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


def move(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move a file or object to ``dst`` in the same store (both local, or both remote).

    ``dst`` appears whole (local: ``os.replace``, atomic within one filesystem, parent folders
    made; objects: a server-side copy, then the source is deleted). An existing ``dst`` is
    replaced; after a failure ``src`` is still there."""
    source, target = str(src), str(dst)
    if is_remote(source) != is_remote(target):
        raise StorageError(f"cannot move {source!r} to {target!r}: not the same store")
    if is_remote(source):
        scheme_root = clients.locate(source).root
        if scheme_root == clients.locate(target).root:
            spath = clients.locate(source).path
            _remote(target, f"move {source!r} to", lambda c, p: c.rename(spath, p))
        else:
            copy(source, target)
            delete(source)
        return
    path = local_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path(source), path)
    except FileNotFoundError as exc:
        if not local_path(source).exists():
            raise StorageNotFoundError(f"cannot move {source!r}: no such file") from exc
        raise StorageError(f"cannot move {source!r} to {target!r}: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot move {source!r} to {target!r}: {exc}") from exc


def remove_tree(url: str | os.PathLike[str]) -> None:
    """Delete every file or object under ``url`` (a folder or remote prefix) and, locally, the
    folders themselves; nothing there is fine. Not atomic: a failure can leave part of it."""
    text = str(url).rstrip("/")
    if is_remote(text):
        try:
            found = list_info(text)
        except StorageNotFoundError:
            return
        for info in found:
            remove(info.url)
        return
    path = local_path(text)
    if not path.exists() and not path.is_symlink():
        return
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot delete {text!r}: {exc}") from exc


def delete(url: str | os.PathLike[str], *, missing_ok: bool = True) -> None:
    """Remove a file or object (nothing when it is not there, unless ``missing_ok`` is False)."""
    text = str(url)
    try:
        if is_remote(text):
            _remote(text, "delete", lambda c, p: c.delete(p))
        else:
            try:
                local_path(text).unlink()
            except FileNotFoundError:
                raise StorageNotFoundError(f"cannot delete {text!r}: no such file") from None
            except OSError as exc:
                raise StorageError(f"cannot delete {text!r}: {exc}") from exc
    except StorageNotFoundError:
        if not missing_ok:
            raise


# --- pyarrow ---------------------------------------------------------------------------------


def arrow_path(url: str | os.PathLike[str]) -> str:
    """The path a pyarrow filesystem from :func:`arrow_filesystem` takes for ``url``:
    ``bucket/key`` for objects, an absolute local path."""
    text = str(url)
    if is_remote(text):
        return text.split("://", 1)[1]
    return os.path.abspath(local_path(text))


_arrow: dict[Any, Any] = {}


def arrow_filesystem(url: str | os.PathLike[str]) -> tuple[Any, str]:
    """A pyarrow filesystem for ``url`` and :func:`arrow_path` of it: objects go through
    obstore (its fsspec adapter, from the same settings as every other client), local
    paths through pyarrow's local filesystem."""
    from pyarrow import fs

    text = str(url)
    if not is_remote(text):
        return fs.LocalFileSystem(), arrow_path(text)
    if not clients.obstore_usable():
        raise clients.ForkedClientError(
            f"{text!r}: no pyarrow filesystem in a child forked after its parent used obstore; "
            "use storage.open_input instead")
    scheme = text.split("://", 1)[0].lower()
    conf = settings()
    key = (conf.key, scheme, os.getpid())
    filesystem = _arrow.get(key)
    if filesystem is None:
        from obstore.fsspec import FsspecStore

        clients.runtime_started()
        kwargs: dict[str, Any] = {"retry_config": conf.retry.for_obstore()}
        if scheme == "s3":
            config: dict[str, Any] = {"region": conf.region}
            if conf.endpoint:
                config.update(endpoint=conf.endpoint.rstrip("/"), virtual_hosted_style_request=False)
            if conf.requester_pays:
                config["request_payer"] = True
            if conf.signs():
                kwargs["credential_provider"] = conf.credential_provider()
            else:
                config["skip_signature"] = True
            kwargs["config"] = config
            kwargs["client_options"] = conf.client_options(conf.s3_base())
        else:
            kwargs["client_options"] = conf.client_options(f"{scheme}://")
        handler = fs.FSSpecHandler(FsspecStore(scheme, **kwargs))
        filesystem = _arrow[key] = fs.PyFileSystem(handler)
    return filesystem, arrow_path(text)


# --- temporary files ----------------------------------------------------------------------------

_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
#: ``.{stem}.{8 chars}.part`` (:func:`temp_stem`; earlier versions wrote ``.{name}.{8 chars}.part``,
#: still recognised), plus the ``.{8 hex}`` boto3 added while it downloaded into one.
_TEMP_TAIL = r"\.[a-z0-9_]{8}\.part(?:\.[0-9A-Fa-f]{8})?"
_ANY_TEMP = re.compile(r"\..+" + _TEMP_TAIL)


def temp_stem(name: str) -> str:
    """The fixed-length stand-in of a file name in the names of its temporary files: the first
    16 hex digits of the name's SHA-1 (a 255-byte target name stays writable:
    ``.{name}.{token}.part`` would exceed NAME_MAX)."""
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _new_temp(path: Path) -> tuple[int, str]:
    """Create ``.{stem}.{random}.part`` beside ``path`` (:func:`temp_stem`; mode ``0o666`` less
    the umask, as ``open()`` creates files); returns its descriptor and path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        token = "".join(secrets.choice(_TEMP_CHARS) for _ in range(8))
        tmp = path.parent / f".{temp_stem(path.name)}.{token}.part"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def _is_local(text: str) -> bool:
    return not is_remote(text)


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
    modified before ``before`` -- a write under way keeps touching its file. Objects
    have no temporary objects: nothing to do. Returns the removed paths.
    """
    text = str(url)
    if not _is_local(text):
        return []
    path = local_path(text)
    names = f"(?:{re.escape(f'.{path.name}')}|{re.escape(f'.{temp_stem(path.name)}')})"
    return _remove_temps(path.parent, re.compile(names + _TEMP_TAIL), before)


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


# --- checksum records -----------------------------------------------------------------------------

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


def _stat(text: str) -> tuple[int, str | None] | None:
    """``(size, stored sha256 hex or None)`` of a file or object; None when it does not exist."""
    if is_remote(text):
        try:
            meta = _remote(text, "stat", lambda c, p: c.get_head(p))
        except StorageNotFoundError:
            return None
        stored = meta.attributes.get(SHA256_ATTRIBUTE)
        sha = stored.lower() if stored and re.fullmatch(r"[0-9a-fA-F]{64}", stored) else None
        return int(meta.size or 0), sha
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
    if is_remote(text):
        def hash_all(client: Any, path: str) -> None:
            for chunk in client.stream(path):
                digest.update(chunk)

        _remote(text, "read", hash_all)
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

    The size is compared first (a stat); the SHA-256 then comes from the object's
    metadata when it has it, else from hashing the content.
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


def whole_or_damaged(url: str, unrecorded_damage: Callable[[str], str | None], what: str) -> bool:
    """True when ``url`` is there and whole: it matches its checksum record, or (written
    without one) ``unrecorded_damage(url)`` finds nothing wrong. Damage is logged as
    ``what`` and the output counts as missing, so it is written again."""
    check = verify(url)
    if check.ok:
        return True
    if check.status == MISSING:
        return False
    problem = unrecorded_damage(url) if check.status == UNRECORDED else check.detail
    if problem is None:
        return True
    logger.warning("%s %s is damaged (%s); writing it again", what, url, problem)
    return False


# --- copies and claims -------------------------------------------------------------------------


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


def _download(source: str, path: Path, request_payer: bool = False) -> None:
    """Stream a remote object into the local file ``path`` (chunks of a few MB)."""
    def write_all(client: Any, key: str) -> None:
        with open(path, "wb") as fh:
            for chunk in client.stream(key):
                fh.write(chunk)

    _remote(source, "read", write_all, request_payer)


def _copy_s3_buckets(source: str, target: str, request_payer: bool) -> None:
    """A server-side copy between two S3 buckets: the bytes never pass through this
    machine. obstore copies within one store only, so this one request goes through a
    boto3 client made from the same settings (its managed copy, multipart past 5 GB)."""
    sbucket, skey = split_s3(source)
    bucket, key = split_s3(target)
    extra = {"RequestPayer": "requester"} if request_payer else None
    try:
        settings().boto3_client("s3").copy({"Bucket": sbucket, "Key": skey}, bucket, key, ExtraArgs=extra)
    except Exception as exc:  # noqa: BLE001 - one classification
        raise clients.translate(_boto_status(exc), source, f"copy to {target!r}") from exc


def _boto_status(exc: Exception) -> Exception:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            status = 404
        if status:
            err = clients._HTTPStatus(int(status), f"HTTP {status} {code}: {exc}")
            return err
    return exc


def copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    request_payer: bool = False,
    attempts: int | None = None,
) -> None:
    """Copy one object or file from ``src`` to ``dst``, whole or not at all.

    ``src`` is a local path, ``file://`` or a remote URL; ``dst`` a local path,
    ``file://`` or a writable store URL (``s3://``, ``gs://``, ``az://``). Within one
    bucket, and between S3 buckets, the copy is server-side; otherwise the bytes are
    streamed (never held in memory whole). ``request_payer`` sends
    ``RequestPayer=requester`` for requester-pays source buckets. Retries are the
    clients' (``attempts`` is accepted for compatibility and not used).
    """
    source, target = str(src), str(dst)
    if is_remote(target):
        if is_s3(source) and is_s3(target):
            if split_s3(source)[0] == split_s3(target)[0] and not request_payer:
                skey = split_s3(source)[1]
                _remote(target, f"copy {source!r} to", lambda c, p: c.copy(skey, p))
            else:
                _copy_s3_buckets(source, target, request_payer)
            return
        if is_remote(source):  # through a temporary file: streamed down, then up as one upload
            import tempfile

            with tempfile.TemporaryDirectory(prefix="stacchip-copy-") as folder:
                spool = Path(folder) / "object"
                _download(source, spool, request_payer)
                _remote(target, "write", lambda c, p: c.put(p, spool))
            return
        upload = local_path(source)
        if not upload.is_file():
            raise StorageNotFoundError(f"cannot copy {source!r}: no such file")
        _remote(target, "write", lambda c, p: c.put(p, upload))
        return
    out = local_path(target)
    if is_remote(source):
        try:
            _into_local(out, lambda tmp: _download(source, Path(tmp), request_payer))
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot copy {source!r} to {target!r}: {exc}") from exc
        return
    path = local_path(source)
    if not path.exists():
        raise StorageNotFoundError(f"cannot copy {source!r}: no such file")
    try:
        _into_local(out, lambda tmp: shutil.copyfile(path, tmp))
    except OSError as exc:
        raise StorageError(f"cannot copy {source!r} to {target!r}: {exc}") from exc


def put_file(local: str | os.PathLike[str], dst: str | os.PathLike[str], *, attempts: int | None = None) -> None:
    """Upload (or copy) a local file to ``dst``, whole or not at all."""
    copy(local, dst)


def bucket_exists(url: str | os.PathLike[str], *, attempts: int | None = None) -> bool | None:
    """Whether the bucket of a remote URL exists: True, False, or None when the credentials
    may not tell (listing it refused)."""
    text = str(url)
    root = text.split("://", 1)[0] + "://" + text.split("://", 1)[1].split("/", 1)[0]
    try:
        client, _ = _client(root + "/", "find")
        next(iter(client.list("")), None)
    except StorageError as exc:
        if isinstance(exc, StorageNotFoundError):
            return False
        if isinstance(exc, StorageRefusedError):
            logger.debug("cannot inspect bucket %s: %s", root, exc)
            return None
        raise
    except Exception as exc:  # noqa: BLE001 - one classification
        err = clients.translate(exc, root, "find")
        if isinstance(err, StorageNotFoundError):
            return False
        if isinstance(err, StorageRefusedError):
            return None
        raise err from exc
    return True


def create_if_absent(url: str | os.PathLike[str], data: bytes) -> bool:
    """Create ``url`` with ``data`` only if nothing is there; True if this call created it.

    Local files are written aside and hard-linked into place; objects use a conditional
    ``PUT`` (``If-None-Match: *``), so of two concurrent callers exactly one wins.
    """
    text = str(url)
    if is_remote(text):
        try:
            _remote(text, "create", lambda c, p: c.put(p, data, create=True))
        except StoragePreconditionError:
            return False
        return True
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


# --- compatibility names --------------------------------------------------------------------------
# Earlier versions retried around each call; the clients retry now (one policy), so
# these are the plain operations. ``attempts`` is accepted and not used.


def read_bytes_retry(url: str | os.PathLike[str], *, attempts: int | None = None) -> bytes:
    """:func:`read_bytes` (kept name)."""
    return read_bytes(url)


def write_bytes_retry(url: str | os.PathLike[str], data: bytes, *, attempts: int | None = None) -> None:
    """:func:`write_bytes` (kept name)."""
    write_bytes(url, data)


def exists_retry(url: str | os.PathLike[str], *, attempts: int | None = None) -> bool:
    """:func:`exists` (kept name)."""
    return exists(url)


def write_recorded_retry(url: str | os.PathLike[str], data: bytes, *, attempts: int | None = None) -> None:
    """:func:`write_recorded` (kept name)."""
    write_recorded(url, data)


def verify_retry(url: str | os.PathLike[str], *, attempts: int | None = None) -> Verification:
    """:func:`verify` (kept name)."""
    return verify(url)
