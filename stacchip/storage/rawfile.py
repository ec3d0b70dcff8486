"""One read-only, seekable raw file whose reads are positional: what pyarrow, tifffile and
``io.BufferedReader`` take, over whatever serves bytes at an offset (a local descriptor, the
ranged GETs of a client, a TIFF header's cached blocks)."""

from __future__ import annotations

import io
from typing import Any


class PositionalFile(io.RawIOBase):
    """Subclasses give :meth:`pread_into` (bytes at an offset into a buffer) and
    :meth:`length` (the file's size in bytes, or None when unknown); this keeps the position."""

    #: Where ``seek(0, SEEK_END)`` goes when the size is unknown.
    UNKNOWN_END = 2**62

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0

    def length(self) -> int | None:
        raise NotImplementedError

    def pread_into(self, view: memoryview, offset: int) -> int:
        """Read up to ``len(view)`` bytes at ``offset`` into ``view``; how many (0 at the end)."""
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = self.length()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
                io.SEEK_END: self.UNKNOWN_END if size is None else size}.get(whence)
        if base is None or base + int(offset) < 0:
            raise OSError(f"invalid seek ({offset}, {whence})")
        self._pos = base + int(offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        size = self.length()
        if size is not None:
            view = view[:max(0, size - self._pos)]
        if not len(view):
            return 0
        n = self.pread_into(view, self._pos)
        self._pos += n
        return n
