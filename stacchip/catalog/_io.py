"""Files of a catalog on a local disk or ``s3://``: listings with sizes, URL normalisation.

Every read, write, listing, move and delete goes through :mod:`stacchip.storage`
(:func:`~stacchip.storage.list_info`, :func:`~stacchip.storage.remove`,
:func:`~stacchip.storage.move`, :func:`~stacchip.storage.open_input`, ...); this adds
the catalog's view of a listing: index files only, hidden and ``_`` names left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from stacchip import storage
from stacchip.storage import FileInfo as FileEntry  # noqa: F401  (the name compaction uses)
from stacchip.storage import arrow_filesystem, arrow_path, remove  # noqa: F401  (importable here)


def normalise(url: str | os.PathLike[str]) -> str:
    """``s3://`` URLs unchanged (trailing ``/`` dropped), local paths and ``file://`` made absolute."""
    text = str(url)
    if storage.is_s3(text):
        return text.rstrip("/")
    return os.path.abspath(storage.local_path(text))


def _hidden(url: str, root: str) -> bool:
    """True when a path step below ``root`` starts with ``.`` or ``_`` (temporary files, manifests,
    staging directories): what ``pyarrow.dataset`` leaves out of a directory."""
    rel = url[len(root):].lstrip("/") if url.startswith(root) else url.rsplit("/", 1)[-1]
    return any(step.startswith((".", "_")) for step in rel.replace(os.sep, "/").split("/"))


def list_files(root: str, suffix: str = ".parquet") -> list[FileEntry]:
    """Files under ``root`` (a file, directory or ``s3://`` prefix), recursively, ending with
    ``suffix``; names (and directories below ``root``) starting with ``.`` or ``_`` are left out.

    Raises :class:`~stacchip.errors.StorageNotFoundError` when ``root`` does not exist.
    """
    root = normalise(root)
    found = storage.list_info(root, suffix)
    return [e for e in found if not _hidden(e.url, root) and not e.url.rsplit("/", 1)[-1].startswith((".", "_"))]


def under(url: str, roots: Iterable[str]) -> bool:
    """True when ``url`` lies inside one of ``roots`` (normalised URLs)."""
    for root in roots:
        root = root.rstrip("/")
        if url == root or url.startswith(root + "/"):
            return True
    return False
