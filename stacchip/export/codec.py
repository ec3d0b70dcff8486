"""The DEFLATE codec of exported files: ISA-L (``isal``), in standard containers.

Cubes are npz files (zip archives of ``.npy`` members) and shards gzip-compressed
tar files; both are DEFLATE streams that ``np.load``, ``unzip``, ``tar -xzf``,
``gzip -t`` and every zlib read unchanged. They are written by the standard
library's :mod:`zipfile` and :mod:`tarfile`; only the compressor is ISA-L's
(through the ``isal`` binding: its ``isal_zlib`` is zlib-compatible, its
``igzip`` a ``gzip.GzipFile``), which compresses chip pixels about 5x faster
than zlib level 1, to about the same size.

Levels: ``0`` stores without compression; ``1`` (the default), ``2`` and ``3``
are ISA-L's levels 1-3 (slower, smaller); ``4``-``9`` are accepted for
compatibility with zlib levels and mean ISA-L's level 3, its smallest.
"""

from __future__ import annotations

import logging
import zipfile
from typing import IO, Any

from isal import igzip, isal_zlib

from stacchip.errors import ConfigError

logger = logging.getLogger(__name__)

#: Level of exported files by default (ISA-L level 1).
DEFAULT_LEVEL = 1
#: Earliest date a zip member can carry: members get it, so a file is the same bytes on every run.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_warned = False


def check_level(level: int) -> int:
    """``level`` when it is 0-9, else :class:`ConfigError`."""
    if not 0 <= int(level) <= 9:
        raise ConfigError(f"compression level must be 0..9, got {level}")
    return int(level)


def isal_level(level: int) -> int:
    """ISA-L's level (1-3) for a level 1-9 (see the module docstring)."""
    return min(3, max(1, check_level(level)))


def compressobj(level: int) -> Any:
    """A raw-DEFLATE compressor (no zlib header, as zip members hold) at ``level`` (1-9)."""
    return isal_zlib.compressobj(isal_level(level), isal_zlib.DEFLATED, -15)


def crc32(data: Any, value: int = 0) -> int:
    """CRC-32 of ``data`` (as :func:`zlib.crc32`), ISA-L's implementation."""
    return int(isal_zlib.crc32(data, value))


def zip_member(zf: zipfile.ZipFile, name: str, level: int) -> IO[bytes]:
    """Open member ``name`` of ``zf`` (opened for writing) as a writable stream: DEFLATE at
    ``level`` (stored at 0), dated :data:`ZIP_EPOCH`, ZIP64 headers.

    :mod:`zipfile` writes the archive (headers, CRC-32, sizes, central directory); only
    the member's compressor is replaced by ISA-L's raw-DEFLATE one before any data is
    written. On a Python whose :mod:`zipfile` keeps no replaceable compressor, zlib
    compresses (the same format, slower; logged once).
    """
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED if check_level(level) else zipfile.ZIP_STORED
    member = zf.open(info, "w", force_zip64=True)
    if level:
        if hasattr(member, "_compressor") and member._compressor is not None:
            member._compressor = compressobj(level)
        else:  # pragma: no cover - a future zipfile
            global _warned
            if not _warned:
                logger.warning("zipfile keeps no replaceable compressor here; npz members are compressed by zlib")
                _warned = True
    return member


def gzip_writer(sink: IO[bytes], level: int) -> igzip.IGzipFile:
    """A gzip stream (RFC 1952, header time 0 and no file name: the same bytes on every run)
    writing into ``sink`` at ``level`` (1-9), compressed by ISA-L."""
    return igzip.IGzipFile(fileobj=sink, mode="wb", compresslevel=isal_level(level), mtime=0)


def gunzip(data: bytes) -> bytes:
    """The content of gzip ``data`` (checked against its CRC-32 and length)."""
    return igzip.decompress(data)


def is_gzip(data: bytes | memoryview) -> bool:
    """True when ``data`` starts with the gzip magic number."""
    return bytes(data[:2]) == b"\x1f\x8b"


__all__ = ["DEFAULT_LEVEL", "check_level", "compressobj", "crc32", "gunzip", "gzip_writer", "is_gzip",
           "isal_level", "zip_member"]
