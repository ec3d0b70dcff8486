"""Files of a catalog on a local disk or ``s3://``: pyarrow filesystems, listings with sizes, removal.

Reads and writes of whole objects, and the pyarrow filesystem for Parquet reads
(:func:`stacchip.storage.arrow_filesystem`), come from :mod:`stacchip.storage`;
this adds what compaction needs besides: listings that carry size and
modification time, and deletes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Iterable

from stacchip import storage
from stacchip.errors import StorageError, StorageNotFoundError
from stacchip.storage import arrow_filesystem, arrow_path  # noqa: F401  (moved to the core; importable here)


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its URL (local absolute path or ``s3://``), size in bytes, mtime in ns."""

    url: str
    size: int
    mtime_ns: int


def normalise(url: str | os.PathLike[str]) -> str:
    """``s3://`` URLs unchanged (trailing ``/`` dropped), local paths and ``file://`` made absolute."""
    text = str(url)
    if storage.is_s3(text):
        return text.rstrip("/")
    return os.path.abspath(storage.local_path(text))


def _url(fs_path: str, s3: bool) -> str:
    return f"s3://{fs_path}" if s3 else fs_path


def list_files(root: str, suffix: str = ".parquet") -> list[FileEntry]:
    """Files under ``root`` (a file, directory or ``s3://`` prefix), recursively, ending with
    ``suffix``; names starting with ``.`` or ``_`` (temporary files, manifests) are left out.

    Raises :class:`StorageNotFoundError` when ``root`` does not exist.
    """
    from pyarrow import fs as pafs

    root = normalise(root)
    filesystem, path = arrow_filesystem(root)
    s3 = storage.is_s3(root)
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.NotFound and not s3:
            raise StorageNotFoundError(f"cannot list {root!r}: no such file or directory")
        else:  # on S3 a prefix is no object: list it
            infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot list {root!r}: {exc}") from exc
    out = []
    for entry in infos:
        name = entry.base_name
        if entry.type != pafs.FileType.File or not name.endswith(suffix) or name.startswith((".", "_")):
            continue
        mtime = entry.mtime_ns if entry.mtime_ns is not None else 0
        out.append(FileEntry(_url(entry.path, s3), int(entry.size or 0), int(mtime)))
    if not out and s3 and not infos:
        raise StorageNotFoundError(f"cannot list {root!r}: no objects under this prefix")
    out.sort(key=lambda e: e.url)
    return out


def remove(url: str) -> None:
    """Delete a file or object (missing is fine)."""
    storage.delete(url)


def under(url: str, roots: Iterable[str]) -> bool:
    """True when ``url`` lies inside one of ``roots`` (normalised URLs)."""
    for root in roots:
        root = root.rstrip("/")
        if url == root or url.startswith(root + "/"):
            return True
    return False
