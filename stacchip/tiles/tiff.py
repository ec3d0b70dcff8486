"""TIFF header parsing: the layout of a tiled GeoTIFF, read from its first bytes.

:func:`parse_layout` walks the IFD chain of a classic TIFF or BigTIFF (little or
big endian) and records, for the full-resolution image, what a tile reader needs:
size, tile size, dtype, bands, planar configuration, compression, predictor,
``GDAL_NODATA``, ``JPEGTables``, LERC parameters and the byte offsets and counts of
every tile, plus enough of the GeoTIFF keys (EPSG code, pixel scale and tie
point or model transformation) to check the file against an item's grid without
opening it with GDAL. What the tile reader cannot decode exactly as GDAL does is
named in :attr:`Layout.unsupported` (the GDAL path then reads the file).

Only the bytes the header needs are fetched (``fetch(offset, length)``): the
first ``HEADER_BYTES``, then any tag array or IFD lying beyond them.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from stacchip.errors import AssetReadError

#: Version of :meth:`Layout.to_json`; layouts of another version are re-read.
LAYOUT_VERSION = 1
#: Bytes read with the first request (COG headers of Sentinel-2 bands are ~2-20 KB).
HEADER_BYTES = 65536

# Tag numbers (TIFF 6.0, GeoTIFF 1.1, GDAL private tags).
NEW_SUBFILE_TYPE = 254
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
EXTRA_SAMPLES = 338
SAMPLE_FORMAT = 339
JPEG_TABLES = 347
YCBCR_SUBSAMPLING = 530
MODEL_PIXEL_SCALE = 33550
MODEL_TIEPOINT = 33922
MODEL_TRANSFORMATION = 34264
GEO_KEY_DIRECTORY = 34735
GEO_DOUBLE_PARAMS = 34736
GEO_ASCII_PARAMS = 34737
GDAL_METADATA = 42112
GDAL_NODATA = 42113
LERC_PARAMETERS = 50674

#: Compression codes the tile reader decodes (names as GDAL's COMPRESS option).
COMPRESSIONS = {1: "NONE", 5: "LZW", 7: "JPEG", 8: "DEFLATE", 32946: "DEFLATE",
                34887: "LERC", 50000: "ZSTD", 50001: "WEBP"}
COMPRESSION_NAMES = {**COMPRESSIONS, 2: "CCITTRLE", 3: "CCITTFAX3", 4: "CCITTFAX4",
                     6: "OJPEG", 32773: "PACKBITS", 34712: "JPEG2000", 34925: "LZMA",
                     34892: "LOSSY-JPEG", 50002: "JXL", 52546: "JXL"}

# field type -> (struct code, size in bytes)
_TYPES = {1: ("B", 1), 2: ("s", 1), 3: ("H", 2), 4: ("I", 4), 5: ("II", 8), 6: ("b", 1),
          7: ("B", 1), 8: ("h", 2), 9: ("i", 4), 10: ("ii", 8), 11: ("f", 4), 12: ("d", 8),
          13: ("I", 4), 16: ("Q", 8), 17: ("q", 8), 18: ("Q", 8)}
_NUMPY_TYPES = {1: "u1", 3: "u2", 4: "u4", 6: "i1", 7: "u1", 8: "i2", 9: "i4", 11: "f4",
                12: "f8", 13: "u4", 16: "u8", 17: "i8", 18: "u8"}
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


def _unb64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<u8").astype(np.uint64)


@dataclass(frozen=True, eq=False)
class Layout:
    """The full-resolution image of a tiled TIFF: what a tile reader needs.

    Sizes are pixels; ``offsets``/``counts`` are bytes, one per tile in TIFF
    order (for ``planar == 2``: all tiles of band 1, then band 2, ...).
    ``size``/``etag``/``mtime`` identify the file the layout was read from
    (``mtime`` in nanoseconds for local files; ``etag`` for remote ones).
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
    has_mask: bool = False
    epsg: int | None = None
    geotransform: tuple[float, ...] | None = None  # (a, b, c, d, e, f), GDAL/affine order
    georeferenced: bool = False  # any GeoTIFF tag present
    geo_exact: bool = False  # epsg + geotransform describe the georeferencing fully
    unsupported: str | None = None
    size: int | None = None
    etag: str | None = None
    mtime: int | None = None

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
        return (self.size, self.etag, self.mtime)

    def with_identity(self, size: int | None, etag: str | None, mtime: int | None) -> Layout:
        return replace(self, size=size, etag=etag, mtime=mtime)

    # --- compact JSON form -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (tile offsets and counts as base64 little-endian uint64)."""
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

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        """Inverse of :meth:`to_json`; raises ``ValueError`` for another version."""
        if d.get("version") != LAYOUT_VERSION:
            raise ValueError(f"layout version {d.get('version')!r}, expected {LAYOUT_VERSION}")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = d[f.name]
            if f.name in ("offsets", "counts"):
                v = _unb64(v)
            elif f.name == "jpeg_tables" and v is not None:
                v = base64.b64decode(v)
            elif f.name in ("lerc_params", "geotransform") and v is not None:
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)


Fetch = Callable[[int, int], bytes]


class _Reader:
    """Bytes of a file from a first chunk plus on-demand fetches (``fetch(offset, length)``)."""

    def __init__(self, fetch: Fetch, first: bytes | None = None) -> None:
        self._fetch = fetch
        self._head = first if first is not None else fetch(0, HEADER_BYTES)
        self.requests = 0 if first is not None else 1

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if end <= len(self._head):
            return self._head[offset:end]
        self.requests += 1
        data = self._fetch(offset, length)
        if len(data) < length:
            raise TiffError(f"truncated TIFF: wanted {length} bytes at {offset}, got {len(data)}")
        return data


class _IFD:
    def __init__(self, entries: dict[int, tuple[int, int, bytes | int]], next_offset: int) -> None:
        self.entries = entries  # tag -> (type, count, inline bytes or offset)
        self.next_offset = next_offset


def parse_layout(fetch: Fetch, first: bytes | None = None) -> Layout:  # noqa: C901 - flat dispatch over TIFF tags
    """The :class:`Layout` of the full-resolution image of a tiled TIFF.

    ``fetch(offset, length)`` returns bytes of the file; ``first`` (optional)
    is its start, already read. Raises :class:`TiffError` for a file that is
    not a TIFF. A TIFF the tile reader cannot decode gets a layout whose
    ``unsupported`` names why.
    """
    r = _Reader(fetch, first)
    head = r.read(0, 16) if len(r._head) >= 16 else r._head
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        raise TiffError("not a TIFF file (no II/MM byte order mark)")
    bo = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(bo + "H", head[2:4])[0]
    if magic == 42:
        bigtiff = False
        first_ifd = struct.unpack(bo + "I", head[4:8])[0]
    elif magic == 43:
        bigtiff = True
        if len(head) < 16:
            raise TiffError("truncated BigTIFF header")
        bytesize, _, first_ifd = struct.unpack(bo + "HHQ", head[4:16])
        if bytesize != 8:
            raise TiffError(f"BigTIFF offset size {bytesize}, expected 8")
    else:
        raise TiffError(f"not a TIFF file (magic number {magic})")

    def read_ifd(offset: int) -> _IFD:
        if bigtiff:
            n = struct.unpack(bo + "Q", r.read(offset, 8))[0]
            size, head_len, off_code, off_len = 20, 8, "Q", 8
        else:
            n = struct.unpack(bo + "H", r.read(offset, 2))[0]
            size, head_len, off_code, off_len = 12, 2, "I", 4
        if n > 4096:
            raise TiffError(f"IFD at {offset} claims {n} entries")
        raw = r.read(offset + head_len, n * size + off_len)
        entries: dict[int, tuple[int, int, bytes | int]] = {}
        count_code = "Q" if bigtiff else "I"
        for i in range(n):
            e = raw[i * size:(i + 1) * size]
            tag, typ = struct.unpack(bo + "HH", e[:4])
            count = struct.unpack(bo + count_code, e[4:4 + off_len])[0]
            value = e[4 + off_len:]
            if typ not in _TYPES:
                continue  # unknown type: skip (TIFF 6.0 says readers ignore it)
            nbytes = _TYPES[typ][1] * count
            if nbytes <= off_len:
                entries[tag] = (typ, count, value[:nbytes])
            else:
                entries[tag] = (typ, count, struct.unpack(bo + off_code, value)[0])
        next_offset = struct.unpack(bo + off_code, raw[n * size:n * size + off_len])[0]
        return _IFD(entries, next_offset)

    def raw_value(ifd: _IFD, tag: int) -> tuple[int, int, bytes] | None:
        entry = ifd.entries.get(tag)
        if entry is None:
            return None
        typ, count, value = entry
        if isinstance(value, int):
            value = r.read(value, _TYPES[typ][1] * count)
        return typ, count, value

    def values(ifd: _IFD, tag: int) -> np.ndarray | None:
        got = raw_value(ifd, tag)
        if got is None:
            return None
        typ, _count, data = got
        if typ in (5, 10):
            pairs = np.frombuffer(data, dtype=bo + ("u4" if typ == 5 else "i4")).astype(np.float64)
            return pairs[0::2] / np.where(pairs[1::2] == 0, 1, pairs[1::2])
        if typ == 2:
            return np.frombuffer(data, dtype="u1")
        return np.frombuffer(data, dtype=bo + _NUMPY_TYPES[typ])

    def scalar(ifd: _IFD, tag: int, default: int | None = None) -> int | None:
        v = values(ifd, tag)
        return default if v is None or len(v) == 0 else int(v[0])

    def text(ifd: _IFD, tag: int) -> str | None:
        got = raw_value(ifd, tag)
        if got is None:
            return None
        return got[2].split(b"\0", 1)[0].decode("latin-1")

    main = read_ifd(first_ifd)
    # Walk the rest of the chain for an internal mask of the full-resolution image.
    width = scalar(main, IMAGE_WIDTH)
    height = scalar(main, IMAGE_LENGTH)
    if width is None or height is None:
        raise TiffError("first IFD has no ImageWidth/ImageLength")
    has_mask = False
    seen = {first_ifd}
    offset = main.next_offset
    while offset and offset not in seen and len(seen) < 64:
        seen.add(offset)
        ifd = read_ifd(offset)
        subtype = scalar(ifd, NEW_SUBFILE_TYPE, 0) or 0
        if subtype & 4 and scalar(ifd, IMAGE_WIDTH) == width and scalar(ifd, IMAGE_LENGTH) == height:
            has_mask = True
            break
        offset = ifd.next_offset

    reasons: list[str] = []
    spp = scalar(main, SAMPLES_PER_PIXEL, 1) or 1
    bps = values(main, BITS_PER_SAMPLE)
    bits = {int(b) for b in bps} if bps is not None else {1}
    fmt_v = values(main, SAMPLE_FORMAT)
    formats = {int(f) for f in fmt_v} if fmt_v is not None else {1}
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
    compression = scalar(main, COMPRESSION, 1) or 1
    predictor = scalar(main, PREDICTOR, 1) or 1
    photometric = scalar(main, PHOTOMETRIC, 1 if spp == 1 else 2)
    planar = scalar(main, PLANAR_CONFIG, 1) or 1
    tile_w = scalar(main, TILE_WIDTH)
    tile_h = scalar(main, TILE_LENGTH)
    if compression not in COMPRESSIONS:
        reasons.append(f"compression {COMPRESSION_NAMES.get(compression, compression)}")
    if tile_w is None or tile_h is None:
        reasons.append("striped (not tiled) layout")
        tile_w = tile_w or width
        tile_h = tile_h or height
    if planar not in (1, 2):
        reasons.append(f"planar configuration {planar}")
    if predictor not in (1, 2, 3):
        reasons.append(f"predictor {predictor}")
    elif predictor == 2 and dtype.startswith("float"):
        reasons.append("predictor 2 on floating-point samples")
    elif predictor == 3 and not dtype.startswith("float"):
        reasons.append("predictor 3 on integer samples")
    if (scalar(main, ORIENTATION, 1) or 1) != 1:
        reasons.append("orientation other than top-left")
    if (scalar(main, FILL_ORDER, 1) or 1) != 1:
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

    offsets = values(main, TILE_OFFSETS if tile_w is not None else STRIP_OFFSETS)
    counts = values(main, TILE_BYTE_COUNTS)
    if offsets is None or counts is None:
        reasons.append("no tile offsets")
        offsets = np.zeros(0, np.uint64)
        counts = np.zeros(0, np.uint64)
    offsets = np.asarray(offsets, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.uint64)
    n_tiles = (-(-width // tile_w)) * (-(-height // tile_h)) * (spp if planar == 2 else 1)
    if not reasons and (len(offsets) != n_tiles or len(counts) != n_tiles):
        reasons.append(f"{len(offsets)} tile offsets for {n_tiles} tiles")

    nodata: float | None = None
    nodata_text = text(main, GDAL_NODATA)
    if nodata_text is not None:
        try:
            nodata = float(nodata_text.strip())
        except ValueError:
            reasons.append(f"GDAL_NODATA {nodata_text!r}")
    jpeg_tables = None
    if compression == 7:
        got = raw_value(main, JPEG_TABLES)
        jpeg_tables = bytes(got[2]) if got is not None else None
    lerc_params = None
    if compression == 34887:
        lp = values(main, LERC_PARAMETERS)
        lerc_params = tuple(int(v) for v in lp) if lp is not None else (2, 0)
        if len(lerc_params) > 1 and lerc_params[1] not in (0, 1, 2):
            reasons.append(f"LERC additional compression {lerc_params[1]}")

    epsg, geotransform, georeferenced, geo_exact = _georeferencing(
        values(main, GEO_KEY_DIRECTORY), values(main, MODEL_PIXEL_SCALE),
        values(main, MODEL_TIEPOINT), values(main, MODEL_TRANSFORMATION),
    )
    return Layout(
        width=width, height=height, tile_width=int(tile_w), tile_height=int(tile_h), bands=spp,
        dtype=dtype, little_endian=bo == "<", bigtiff=bigtiff, planar=planar,
        compression=compression, predictor=predictor, photometric=int(photometric or 0),
        offsets=offsets, counts=counts, nodata=nodata, jpeg_tables=jpeg_tables,
        lerc_params=lerc_params, has_mask=has_mask, epsg=epsg, geotransform=geotransform,
        georeferenced=georeferenced, geo_exact=geo_exact,
        unsupported="; ".join(reasons) or None,
    )


def _georeferencing(
    keys: np.ndarray | None,
    scale: np.ndarray | None,
    tiepoint: np.ndarray | None,
    matrix: np.ndarray | None,
) -> tuple[int | None, tuple[float, ...] | None, bool, bool]:
    """``(epsg, (a, b, c, d, e, f), georeferenced, exact)`` from the GeoTIFF tags.

    ``exact`` is true only for the plain case GDAL reads the same way: an EPSG
    code (projected or geographic), pixel-is-area, no other defining keys, and
    a pixel scale with one tie point or a model transformation.
    """
    georeferenced = any(v is not None for v in (keys, scale, tiepoint, matrix))
    epsg = None
    exact = keys is not None
    if keys is not None and len(keys) >= 4:
        n = int(keys[3])
        entries = np.asarray(keys[4:4 + 4 * n], dtype=np.int64).reshape(-1, 4)
        for key_id, location, _count, value in entries.tolist():
            if key_id == _GT_RASTER_TYPE and location == 0 and value != 1:
                exact = False  # pixel-is-point: GDAL shifts by half a pixel
            if key_id in (_PROJECTED_CS_TYPE, _GEOGRAPHIC_TYPE) and location == 0:
                if 1 <= value < 32767 and (key_id == _PROJECTED_CS_TYPE or epsg is None):
                    epsg = int(value)
            elif key_id not in _BENIGN_KEYS:
                exact = False
        if epsg is None:
            exact = False
    else:
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
