"""TIFF headers: the layout of a tiled GeoTIFF, read with tifffile.

:func:`parse_layout` hands tifffile a read-only file object serving the file's
bytes from its first chunk and ranged fetches (``fetch(offset, length)``), and
keeps, for the first image (a COG's full resolution), what a tile reader
needs in a compact :class:`Layout`: size, tile size, dtype, bands, planar
configuration, compression, predictor, ``GDAL_NODATA``, ``JPEGTables``, LERC
parameters and the byte offsets and counts of every tile, plus enough of the
GeoTIFF keys (EPSG code, pixel scale and tie point or model transformation) to
check the file against an item's grid without opening it with GDAL.

Only the bytes the header needs are fetched: tifffile reads the first IFD and
the tag arrays it refers to, never the rest of the IFD chain (overviews,
masks). A header inside the first :data:`HEADER_BYTES` (every Sentinel-2 COG)
costs that one request; bytes beyond it are fetched in blocks of
:data:`FETCH_BLOCK`, at most :data:`MAX_HEADER_BYTES` in all and never past
the file's size.

What tifffile cannot read is a :class:`TiffError` (the GDAL path then opens
the file). What the tile reader cannot decode exactly as GDAL does -- a codec
or sample type it lacks, a striped file, tile sizes or offsets that do not fit
the file (:meth:`Layout.problems`) -- is named in :attr:`Layout.unsupported`,
and GDAL reads that file.

Stored layouts (:meth:`Layout.to_json`) carry a digest of their content and of
the href they describe; :meth:`Layout.from_json` refuses one whose digest,
version, types or values do not hold (:class:`~stacchip.errors.LayoutError`).
The digest detects corrupted and edited layouts; it is not a signature (whoever
can write an index can also rewrite its ``item_href``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import IO, Any, cast

import numpy as np

from stacchip.errors import AssetReadError, LayoutError
from stacchip.storage.rawfile import PositionalFile

#: Version of :meth:`Layout.to_json`; layouts of another version are read again.
#: 2: a digest, local identity by inode and ctime, no mask flag.
LAYOUT_VERSION = 2
#: Bytes read with the first request (COG headers of Sentinel-2 bands are ~2-20 KB).
HEADER_BYTES = 65536
#: Bytes fetched at least per request when a header reaches beyond the first chunk.
FETCH_BLOCK = 65536
#: Most bytes one header may take beyond the first chunk (tile arrays of ~2 million tiles).
MAX_HEADER_BYTES = 32 * 2**20
#: Largest tile side (pixels) and decoded tile (bytes) the tile reader takes.
MAX_TILE_SIDE = 65536
MAX_TILE_BYTES = 256 * 2**20
#: A tile's compressed bytes may exceed its decoded size by this factor plus slack
#: (codecs expand incompressible data a little; nothing legitimate doubles it).
COUNT_FACTOR = 2
COUNT_SLACK = 65536

# Tag numbers (TIFF 6.0, GeoTIFF 1.1, GDAL private tags).
IMAGE_WIDTH = 256
IMAGE_LENGTH = 257
BITS_PER_SAMPLE = 258
COMPRESSION = 259
PHOTOMETRIC = 262
FILL_ORDER = 266
STRIP_OFFSETS = 273
ORIENTATION = 274
SAMPLES_PER_PIXEL = 277
PLANAR_CONFIG = 284
PREDICTOR = 317
TILE_WIDTH = 322
TILE_LENGTH = 323
TILE_OFFSETS = 324
TILE_BYTE_COUNTS = 325
SAMPLE_FORMAT = 339
JPEG_TABLES = 347
MODEL_PIXEL_SCALE = 33550
MODEL_TIEPOINT = 33922
MODEL_TRANSFORMATION = 34264
GEO_KEY_DIRECTORY = 34735
GDAL_NODATA = 42113
LERC_PARAMETERS = 50674

#: Compression codes the tile reader decodes (names as GDAL's COMPRESS option).
COMPRESSIONS = {1: "NONE", 5: "LZW", 7: "JPEG", 8: "DEFLATE", 32946: "DEFLATE",
                34887: "LERC", 50000: "ZSTD", 50001: "WEBP"}
COMPRESSION_NAMES = {**COMPRESSIONS, 2: "CCITTRLE", 3: "CCITTFAX3", 4: "CCITTFAX4",
                     6: "OJPEG", 32773: "PACKBITS", 34712: "JPEG2000", 34925: "LZMA",
                     34892: "LOSSY-JPEG", 50002: "JXL", 52546: "JXL"}
#: Sample types the tile reader returns (numpy names).
DTYPES = frozenset({"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                    "float32", "float64"})

# GeoKey ids
_GT_MODEL_TYPE = 1024
_GT_RASTER_TYPE = 1025
_GEOGRAPHIC_TYPE = 2048
_PROJECTED_CS_TYPE = 3072
#: GeoKeys that only describe what the EPSG code already says (or cite it).
_BENIGN_KEYS = {_GT_MODEL_TYPE, _GT_RASTER_TYPE, 1026, _GEOGRAPHIC_TYPE, 2049, 2054, 3073, 3076}


class TiffError(AssetReadError):
    """A file that is not a TIFF, or a TIFF header that cannot be read."""


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<u8").tobytes()).decode()


def _unb64(s: Any, name: str) -> np.ndarray:
    if not isinstance(s, str):
        raise LayoutError(f"field {name!r} is {type(s).__name__}, expected base64 text")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise LayoutError(f"field {name!r} is not base64 ({exc})") from None
    if len(raw) % 8:
        raise LayoutError(f"field {name!r} holds {len(raw)} bytes, not 8-byte integers")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


@dataclass(frozen=True, eq=False)
class Layout:
    """The full-resolution image of a tiled TIFF: what a tile reader needs.

    Sizes are pixels; ``offsets``/``counts`` are bytes, one per tile in TIFF
    order (for ``planar == 2``: all tiles of band 1, then band 2, ...).
    ``size`` (bytes), ``etag`` (remote files), ``mtime``/``ctime`` (ns) and
    ``inode`` (local files) identify the file version the layout was read from.
    """

    width: int
    height: int
    tile_width: int
    tile_height: int
    bands: int
    dtype: str  # numpy name, native order (e.g. "uint16")
    little_endian: bool
    bigtiff: bool
    planar: int  # 1 pixel interleaved (chunky), 2 band interleaved (planar)
    compression: int
    predictor: int
    photometric: int
    offsets: np.ndarray
    counts: np.ndarray
    nodata: float | None = None
    jpeg_tables: bytes | None = None
    lerc_params: tuple[int, ...] | None = None
    epsg: int | None = None
    geotransform: tuple[float, ...] | None = None  # (a, b, c, d, e, f), GDAL/affine order
    georeferenced: bool = False  # any GeoTIFF tag present
    geo_exact: bool = False  # epsg + geotransform describe the georeferencing fully
    unsupported: str | None = None
    size: int | None = None
    etag: str | None = None
    mtime: int | None = None
    inode: int | None = None
    ctime: int | None = None

    # --- derived ----------------------------------------------------------------------
    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)

    @property
    def samples_per_tile(self) -> int:
        """Samples per pixel in one tile: all bands (chunky) or one (planar)."""
        return self.bands if self.planar == 1 else 1

    @property
    def planes(self) -> int:
        return 1 if self.planar == 1 else self.bands

    @property
    def tile_nbytes(self) -> int:
        """Bytes of one decoded tile."""
        return self.tile_width * self.tile_height * self.samples_per_tile * np.dtype(self.dtype).itemsize

    @property
    def file_dtype(self) -> np.dtype:
        """The sample dtype in the file's byte order."""
        return np.dtype(self.dtype).newbyteorder("<" if self.little_endian else ">")

    def tile_index(self, plane: int, row: int, col: int) -> int:
        return (plane * self.tiles_down + row) * self.tiles_across + col

    def identity(self) -> tuple[Any, ...]:
        """The file version this layout describes (part of every tile cache key)."""
        return (self.size, self.etag, self.mtime, self.inode, self.ctime)

    def with_identity(self, size: int | None, etag: str | None, mtime: int | None, *,
                      inode: int | None = None, ctime: int | None = None) -> Layout:
        return replace(self, size=size, etag=etag, mtime=mtime, inode=inode, ctime=ctime)

    # --- checks ---------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Why the tile reader cannot use this layout (empty when it can): tile sizes,
        sample type, codec, predictor and tile byte ranges checked against each other
        and against the file's size. A layout already ``unsupported`` has none."""
        return list(self._problems)

    @cached_property
    def _problems(self) -> tuple[str, ...]:
        if self.unsupported is not None:
            return ()
        return self._value_problems() or self._byte_problems()

    def _value_problems(self) -> tuple[str, ...]:
        """Sizes, sample type, codec, predictor and planar configuration."""
        out: list[str] = []
        if not 1 <= self.width < 2**32 or not 1 <= self.height < 2**32:
            out.append(f"image of {self.width}x{self.height} px")
        if not (1 <= self.tile_width <= MAX_TILE_SIDE and 1 <= self.tile_height <= MAX_TILE_SIDE):
            out.append(f"tiles of {self.tile_width}x{self.tile_height} px")
        if not 1 <= self.bands <= 65535:
            out.append(f"{self.bands} bands")
        if self.dtype not in DTYPES:
            out.append(f"sample type {self.dtype!r}")
        if self.planar not in (1, 2):
            out.append(f"planar configuration {self.planar}")
        if self.compression not in COMPRESSIONS:
            out.append(f"compression {self.compression}")
        floats = self.dtype.startswith("float")
        if self.predictor not in (1, 2, 3) or (self.predictor == 2 and floats) or \
                (self.predictor == 3 and not floats):
            out.append(f"predictor {self.predictor} on {self.dtype} samples")
        if not out and self.tile_nbytes > MAX_TILE_BYTES:
            out.append(f"decoded tiles of {self.tile_nbytes} bytes")
        return tuple(out)

    def _byte_problems(self) -> tuple[str, ...]:
        """Tile offsets and counts: one per tile, bounded, inside the file."""
        n_tiles = self.tiles_across * self.tiles_down * self.planes
        offsets, counts = self.offsets, self.counts
        for name, a in (("offsets", offsets), ("counts", counts)):
            if not isinstance(a, np.ndarray) or a.dtype != np.uint64 or a.ndim != 1:
                return (f"tile {name} are not an array of uint64",)
            if len(a) != n_tiles:
                return (f"{len(a)} tile {name} for {n_tiles} tiles",)
        out: list[str] = []
        limit = COUNT_FACTOR * self.tile_nbytes + COUNT_SLACK
        if int(counts.max()) > limit:
            out.append(f"a tile of {int(counts.max())} bytes (decoded tiles are {self.tile_nbytes})")
        used = counts > 0
        if used.any() and int(offsets[used].min()) < 8:
            out.append("tile bytes inside the TIFF header")
        if self.size is not None and (int(offsets.max()) > self.size or
                                      bool(np.any(counts > np.uint64(self.size) - offsets))):
            out.append(f"tile bytes beyond the end of the file ({self.size} bytes)")
        return tuple(out)

    # --- compact JSON form -------------------------------------------------------------
    def _body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": LAYOUT_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("offsets", "counts"):
                v = _b64(v)
            elif f.name == "jpeg_tables" and v is not None:
                v = base64.b64encode(v).decode()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @cached_property
    def fingerprint(self) -> str:
        """:meth:`digest` without an href (what this layout says), computed once."""
        return self.digest(None)

    def digest(self, href: str | None = None) -> str:
        """``sha256:<hex>`` of this layout's canonical JSON form and ``href``."""
        canonical = json.dumps({"href": href, "layout": self._body()}, sort_keys=True,
                               separators=(",", ":"), ensure_ascii=True, allow_nan=True)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self, href: str | None = None) -> dict[str, Any]:
        """A JSON-able dict (tile offsets and counts as base64 little-endian uint64)
        with the digest of its content and of ``href`` (the file it describes)."""
        body = self._body()
        body["digest"] = self.digest(href)
        return body

    @classmethod
    def from_json(cls, d: Any, href: str | None = None) -> Layout:
        """Inverse of :meth:`to_json` (with the same ``href``). Raises
        :class:`~stacchip.errors.LayoutVersionError` for another version and
        :class:`~stacchip.errors.LayoutError` for anything else that does not hold:
        not an object, a missing or extra field, a wrong type, a digest that does not
        match, values the tile reader cannot use (:meth:`problems`)."""
        from stacchip.errors import LayoutVersionError

        if not isinstance(d, Mapping):
            raise LayoutError(f"a layout is a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != LAYOUT_VERSION:
            raise LayoutVersionError(f"layout version {version!r}, expected {LAYOUT_VERSION}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in [*names, "digest"] if n not in d]
        if missing:
            raise LayoutError(f"layout lacks field(s) {', '.join(missing)}")
        extra = sorted(str(k) for k in d if k not in names and k not in ("version", "digest"))
        if extra:
            raise LayoutError(f"layout has unknown field(s) {', '.join(extra)}")
        kw = {name: _field(name, d[name]) for name in names}
        layout = cls(**kw)
        digest = d["digest"]
        if not isinstance(digest, str) or digest != layout.digest(href):
            raise LayoutError("its digest does not match its content (edited or corrupted)")
        problems = layout.problems()
        if problems:
            raise LayoutError("; ".join(problems))
        return layout


def _int(name: str, v: Any, optional: bool = False, lo: int = -2**63, hi: int = 2**64) -> int | None:
    if v is None and optional:
        return None
    if type(v) is not int or not lo <= v < hi:
        raise LayoutError(f"field {name!r} is {v!r:.40}, expected an integer" + (" or null" if optional else ""))
    return v


def _bool(name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise LayoutError(f"field {name!r} is {v!r:.40}, expected true or false")
    return v


def _text(name: str, v: Any, optional: bool = True, longest: int = 4096) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > longest:
        raise LayoutError(f"field {name!r} is {v!r:.40}, expected text")
    return v


_INTS = {"width", "height", "tile_width", "tile_height", "bands", "planar", "compression", "predictor",
         "photometric"}
_OPTIONAL_INTS = {"epsg", "size", "mtime", "inode", "ctime"}


def _field(name: str, v: Any) -> Any:  # noqa: C901 - one branch per field type
    """One field of a stored layout, type-checked (:class:`LayoutError` otherwise)."""
    if name in _INTS:
        return _int(name, v, lo=0, hi=2**32)
    if name in _OPTIONAL_INTS:
        return _int(name, v, optional=True, lo=0 if name in ("size", "inode", "epsg") else -2**63)
    if name in ("little_endian", "bigtiff", "georeferenced", "geo_exact"):
        return _bool(name, v)
    if name in ("offsets", "counts"):
        return _unb64(v, name)
    if name == "dtype":
        if v not in DTYPES:
            raise LayoutError(f"field 'dtype' is {v!r:.40}, expected one of {', '.join(sorted(DTYPES))}")
        return v
    if name == "nodata":
        if v is None:
            return None
        if type(v) not in (int, float):
            raise LayoutError(f"field 'nodata' is {v!r:.40}, expected a number or null")
        return float(v)
    if name == "jpeg_tables":
        if v is None:
            return None
        text = _text(name, v, longest=1 << 20)
        try:
            return base64.b64decode(text or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LayoutError(f"field 'jpeg_tables' is not base64 ({exc})") from None
    if name == "lerc_params":
        if v is None:
            return None
        if not isinstance(v, list) or len(v) > 16:
            raise LayoutError(f"field 'lerc_params' is {v!r:.40}, expected a list of integers")
        return tuple(_int(name, x, lo=0, hi=2**32) for x in v)
    if name == "geotransform":
        if v is None:
            return None
        if not isinstance(v, list) or len(v) != 6 or any(type(x) not in (int, float) for x in v) or \
                not all(math.isfinite(x) for x in v):
            raise LayoutError(f"field 'geotransform' is {v!r:.60}, expected 6 finite numbers")
        return tuple(float(x) for x in v)
    if name in ("unsupported", "etag"):
        return _text(name, v)
    raise LayoutError(f"unknown field {name!r}")  # not reached: names come from the dataclass


# --- reading a header ------------------------------------------------------------------------

logger = logging.getLogger(__name__)
_parsing = threading.local()


class _TifffileNotes(logging.Filter):
    """tifffile's complaints about a header :func:`parse_layout` is reading in this
    thread (tags it skips, values it repairs) are kept for the layout's reasons and
    stacchip's debug log instead of going to the user's handlers one by one; other
    threads' records of tifffile pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(_parsing, "notes", None)
        if notes is None:
            return True
        notes.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_TifffileNotes())

Fetch = Callable[[int, int], bytes]
#: The size tifffile is told when the file's size is not known.
_UNKNOWN_SIZE = PositionalFile.UNKNOWN_END


class _HeaderFile(PositionalFile):
    """A read-only file for tifffile: the bytes of ``first``, and of ranged
    ``fetch(offset, length)`` calls (at least :data:`FETCH_BLOCK` bytes each, kept),
    at most ``limit`` bytes fetched in all and nothing past ``size``. A failure of
    ``fetch`` or the limit is kept in :attr:`failure` (tifffile swallows some)."""

    name = "header.tif"

    def __init__(self, fetch: Fetch, first: bytes, size: int | None, limit: int | None = None) -> None:
        super().__init__()
        self._fetch = fetch
        self._segments: list[tuple[int, bytes]] = [(0, first)] if first else []
        self.size = size
        self.limit = MAX_HEADER_BYTES if limit is None else limit
        self.fetched = 0
        self.requests = 0
        self.failure: BaseException | None = None

    def length(self) -> int | None:
        return self.size

    def pread_into(self, view: memoryview, offset: int) -> int:
        data = self._range(offset, len(view))
        view[:len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = (_UNKNOWN_SIZE if self.size is None else self.size) - self._pos
        data = self._range(self._pos, size)
        self._pos += len(data)
        return data

    def _range(self, start: int, length: int) -> bytes:
        end = start + max(0, length)
        if self.size is not None:
            end = min(end, self.size)
        pieces = []
        pos = start
        while pos < end:
            seg = next(((s, d) for s, d in self._segments if s <= pos < s + len(d)), None)
            if seg is None:
                seg = self._get(pos, end)
                if seg is None:
                    break  # end of file
            s, data = seg
            piece = data[pos - s:end - s]
            pieces.append(piece)
            pos += len(piece)
        return b"".join(pieces)

    def _get(self, pos: int, end: int) -> tuple[int, bytes] | None:
        """Fetch from the block boundary at or before ``pos`` (tags of one IFD lie
        close together, not always in file order) to at least ``end``."""
        start = pos - pos % FETCH_BLOCK
        want = end - start
        if self.fetched + want > self.limit:
            self.failure = TiffError(f"TIFF header needs more than {self.limit} bytes")
            raise self.failure
        length = min(max(want, FETCH_BLOCK), self.limit - self.fetched)
        if self.size is not None:
            length = min(length, self.size - start)
        try:
            data = bytes(self._fetch(start, length))[:length]
        except BaseException as exc:
            self.failure = exc
            raise
        self.requests += 1
        self.fetched += len(data)
        if len(data) <= pos - start:
            return None  # the file ends before pos
        self._segments.append((start, data))
        return start, data


def parse_layout(fetch: Fetch, first: bytes | None = None, *, size: int | None = None) -> Layout:
    """The :class:`Layout` of the first image of a tiled TIFF, read with tifffile.

    ``fetch(offset, length)`` returns bytes of the file; ``first`` (optional) is
    its start, already read (else the first :data:`HEADER_BYTES` are fetched);
    ``size`` is the file's size in bytes when known (no read goes past it, and
    tile byte ranges are checked against it). Raises :class:`TiffError` for a
    file that is not a TIFF or a header tifffile cannot read; failures of
    ``fetch`` propagate as they are. A TIFF the tile reader cannot decode exactly
    gets a layout whose ``unsupported`` names why.
    """
    import tifffile

    if first is None:
        first = bytes(fetch(0, HEADER_BYTES if size is None else min(HEADER_BYTES, size)))
    first = bytes(first)
    if size is None and len(first) < HEADER_BYTES:
        size = len(first)  # a short first read: that is the whole file
    if len(first) < 8 or first[:2] not in (b"II", b"MM"):
        raise TiffError("not a TIFF file (no II/MM byte order mark)")
    magic = int.from_bytes(first[2:4], "little" if first[:2] == b"II" else "big")
    if magic not in (42, 43):
        raise TiffError(f"not a TIFF file (magic number {magic})")
    fh = _HeaderFile(fetch, first, size)
    notes: list[str] = []
    _parsing.notes = notes
    try:
        tif = tifffile.TiffFile(cast(IO[bytes], fh), name=fh.name, size=_UNKNOWN_SIZE if size is None else size,
                                is_lsm=False, is_ndpi=False, is_scanimage=False, is_ome=False)
        try:
            if not tif.pages:
                raise TiffError("the TIFF holds no image (no first IFD)")
            layout = _layout_of(tif.pages.first, tif.tiff.byteorder == "<", tif.tiff.is_bigtiff, size)
        finally:
            tif.close()
    except Exception as exc:
        if fh.failure is not None:
            raise fh.failure from None
        if isinstance(exc, TiffError):
            raise
        raise TiffError(f"cannot read the TIFF header: {type(exc).__name__}: {exc}") from exc
    finally:
        _parsing.notes = None
        for note in notes:
            logger.debug("tifffile: %s", note)
    if fh.failure is not None:  # swallowed by tifffile on the way: the header is incomplete
        raise fh.failure
    if layout.unsupported is not None and notes:
        layout = replace(layout, unsupported=f"{layout.unsupported} (tifffile: {notes[0][:120]})")
    return layout


def _ints(v: Any) -> tuple[int, ...] | None:
    """A tag value as a tuple of integers (``None`` when absent or not integers)."""
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        return tuple(v)
    if isinstance(v, (int, np.integer)):
        return (int(v),)
    try:
        a = np.asarray(v)
    except (TypeError, ValueError):
        return None
    if a.dtype.kind not in "ui" or a.ndim > 1:
        return None
    return tuple(int(x) for x in a.reshape(-1).tolist())


def _array(v: Any) -> np.ndarray | None:
    """Tile offsets or counts as uint64 (``None`` when absent, negative or not integers)."""
    if v is None:
        return None
    a = np.asarray(v)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.dtype.kind not in "ui" or a.ndim != 1 or (a.size and a.dtype.kind == "i" and int(a.min()) < 0):
        return None
    return a.astype(np.uint64)


def _floats(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    return a


def _first(v: Any, default: int) -> int:
    got = _ints(v)
    return got[0] if got else default


def _layout_of(page: Any, little_endian: bool, bigtiff: bool, size: int | None) -> Layout:  # noqa: C901 - flat over tags
    """The layout of a tifffile page (its tags; delay-loaded ones are read here)."""
    tags = page.tags

    def value(code: int) -> Any:
        return tags.valueof(code)

    width = _first(value(IMAGE_WIDTH), -1)
    height = _first(value(IMAGE_LENGTH), -1)
    if width < 0 or height < 0:
        raise TiffError("the first IFD has no ImageWidth/ImageLength")

    reasons: list[str] = []
    spp = _first(value(SAMPLES_PER_PIXEL), 1)
    bits = set(_ints(value(BITS_PER_SAMPLE)) or (1,))
    formats = set(_ints(value(SAMPLE_FORMAT)) or (1,))
    dtype = "uint8"
    if len(bits) != 1 or len(formats) != 1:
        reasons.append("bands of different sample types")
    else:
        b, f = bits.pop(), formats.pop()
        kind = {1: "uint", 2: "int", 3: "float"}.get(f)
        if kind is None or b not in (8, 16, 32, 64) or (kind == "float" and b < 32):
            reasons.append(f"{b}-bit samples of format {f}")
        else:
            dtype = f"{kind}{b}"
    compression = _first(value(COMPRESSION), 1)
    predictor = _first(value(PREDICTOR), 1)
    photometric = _first(value(PHOTOMETRIC), 1 if spp == 1 else 2)
    planar = _first(value(PLANAR_CONFIG), 1)
    tiled = TILE_WIDTH in tags and TILE_LENGTH in tags
    tile_w = _first(value(TILE_WIDTH), 0) if tiled else width
    tile_h = _first(value(TILE_LENGTH), 0) if tiled else height
    if spp < 1:
        reasons.append(f"{spp} samples per pixel")
    if compression not in COMPRESSIONS:
        reasons.append(f"compression {COMPRESSION_NAMES.get(compression, compression)}")
    if not tiled:
        reasons.append("striped (not tiled) layout")
    elif not (1 <= tile_w <= MAX_TILE_SIDE and 1 <= tile_h <= MAX_TILE_SIDE):
        reasons.append(f"tiles of {tile_w}x{tile_h} px")
    if planar not in (1, 2):
        reasons.append(f"planar configuration {planar}")
    if predictor not in (1, 2, 3):
        reasons.append(f"predictor {predictor}")
    elif predictor == 2 and dtype.startswith("float"):
        reasons.append("predictor 2 on floating-point samples")
    elif predictor == 3 and not dtype.startswith("float"):
        reasons.append("predictor 3 on integer samples")
    if _first(value(ORIENTATION), 1) != 1:
        reasons.append("orientation other than top-left")
    if _first(value(FILL_ORDER), 1) != 1:
        reasons.append("fill order 2")
    if compression == 7:
        if photometric == 6:
            reasons.append("JPEG-YCbCr")
        if dtype != "uint8":
            reasons.append(f"JPEG of {dtype} samples")
    if compression == 50001 and (dtype != "uint8" or planar != 1 or spp not in (3, 4)):
        reasons.append("WebP layout other than 3/4-band uint8 pixel interleaved")
    if photometric == 6 and compression != 7:
        reasons.append("YCbCr photometric")

    offsets = _array(value(TILE_OFFSETS if tiled else STRIP_OFFSETS))
    counts = _array(value(TILE_BYTE_COUNTS))
    if offsets is None or counts is None:
        reasons.append("no tile offsets")
        offsets = np.zeros(0, np.uint64)
        counts = np.zeros(0, np.uint64)

    nodata: float | None = None
    nodata_text = value(GDAL_NODATA)
    if nodata_text is not None:
        if isinstance(nodata_text, (bytes, bytearray)):
            nodata_text = bytes(nodata_text).decode("latin-1")
        text = str(nodata_text).split("\0", 1)[0].strip()
        try:
            nodata = float(text)
        except ValueError:
            reasons.append(f"GDAL_NODATA {text[:40]!r}")
    jpeg_tables = None
    if compression == 7:
        got = value(JPEG_TABLES)
        jpeg_tables = bytes(got) if isinstance(got, (bytes, bytearray)) else None
    lerc_params = None
    if compression == 34887:
        lerc_params = _ints(value(LERC_PARAMETERS)) or (2, 0)
        if len(lerc_params) > 1 and lerc_params[1] not in (0, 1, 2):
            reasons.append(f"LERC additional compression {lerc_params[1]}")

    geo = [c in tags for c in (GEO_KEY_DIRECTORY, MODEL_PIXEL_SCALE, MODEL_TIEPOINT, MODEL_TRANSFORMATION)]
    epsg, geotransform, georeferenced, geo_exact = _georeferencing(
        any(geo), _ints(value(GEO_KEY_DIRECTORY)), _floats(value(MODEL_PIXEL_SCALE)),
        _floats(value(MODEL_TIEPOINT)), _floats(value(MODEL_TRANSFORMATION)),
    )
    layout = Layout(
        width=width, height=height, tile_width=tile_w, tile_height=tile_h, bands=spp,
        dtype=dtype, little_endian=little_endian, bigtiff=bool(bigtiff), planar=planar,
        compression=compression, predictor=predictor, photometric=photometric,
        offsets=offsets, counts=counts, nodata=nodata, jpeg_tables=jpeg_tables,
        lerc_params=lerc_params, epsg=epsg, geotransform=geotransform,
        georeferenced=georeferenced, geo_exact=geo_exact,
        unsupported="; ".join(reasons) or None, size=size,
    )
    problems = layout.problems()  # tile counts and byte ranges against the image and the file
    return replace(layout, unsupported="; ".join(problems)) if problems else layout


def _georeferencing(
    georeferenced: bool,
    keys: tuple[int, ...] | None,
    scale: np.ndarray | None,
    tiepoint: np.ndarray | None,
    matrix: np.ndarray | None,
) -> tuple[int | None, tuple[float, ...] | None, bool, bool]:
    """``(epsg, (a, b, c, d, e, f), georeferenced, exact)`` from the GeoTIFF tags.

    ``exact`` is true only for the plain case GDAL reads the same way: an EPSG
    code (projected or geographic), pixel-is-area, no other defining keys, and
    a pixel scale with one tie point or a model transformation. Anything odd
    (a key directory shorter than it says, unreadable tags) is not exact: GDAL
    then reads the georeferencing.
    """
    epsg = None
    exact = keys is not None and len(keys) >= 4 and keys[0] == 1
    if exact and keys is not None:
        n = keys[3]
        entries = keys[4:4 + 4 * n]
        if len(entries) != 4 * n:
            exact = False  # the directory is shorter than it says
        for k in range(0, len(entries) - 3, 4):
            key_id, location, _count, val = entries[k:k + 4]
            if key_id == _GT_RASTER_TYPE and location == 0 and val != 1:
                exact = False  # pixel-is-point: GDAL shifts by half a pixel
            if key_id in (_PROJECTED_CS_TYPE, _GEOGRAPHIC_TYPE) and location == 0:
                if 1 <= val < 32767 and (key_id == _PROJECTED_CS_TYPE or epsg is None):
                    epsg = int(val)
            elif key_id not in _BENIGN_KEYS:
                exact = False
        if epsg is None:
            exact = False
    transform = None
    if matrix is not None and len(matrix) >= 16:
        m = [float(v) for v in matrix[:16]]
        transform = (m[0], m[1], m[3], m[4], m[5], m[7])
    elif scale is not None and tiepoint is not None and len(scale) >= 2 and len(tiepoint) >= 6:
        if len(tiepoint) > 6:
            exact = False  # several tie points: GDAL fits a transform (or uses GCPs)
        i, j, _, x, y, _ = (float(v) for v in tiepoint[:6])
        sx, sy = float(scale[0]), float(scale[1])
        transform = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
    if transform is None or not all(math.isfinite(v) for v in transform):
        exact = False
        transform = None
    return epsg, transform, georeferenced, exact
