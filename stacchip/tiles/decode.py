"""Tile decoding with imagecodecs (outside the GIL): DEFLATE, ZSTD, LZW, LERC,
JPEG, WebP and uncompressed tiles, with TIFF predictors 2 (horizontal
differencing) and 3 (floating point).

:func:`decode_tile` returns one tile as a native-order ``(samples, rows, cols)``
array: all bands for pixel-interleaved files, one band for band-interleaved ones.
"""

from __future__ import annotations

import importlib
import zlib
from typing import Any

import numpy as np

from stacchip.tiles.tiff import Layout


def _decompress(layout: Layout, data: bytes | memoryview, nbytes: int) -> bytes | np.ndarray:
    imagecodecs: Any = importlib.import_module("imagecodecs")  # its stubs are narrower than the buffers it takes

    c = layout.compression
    if c == 1:
        return bytes(data)
    # Decoded into a writable array of our own: the predictor then works in place
    # (no copy of a read-only bytes result).
    if c in (8, 32946):
        try:
            return imagecodecs.deflate_decode(data, out=np.empty(nbytes, np.uint8))
        except Exception:  # noqa: BLE001 - libdeflate wants the exact size; zlib does not
            return zlib.decompress(bytes(data))
    if c == 50000:
        return imagecodecs.zstd_decode(data, out=np.empty(nbytes, np.uint8))
    if c == 5:
        return imagecodecs.lzw_decode(data, out=np.empty(nbytes, np.uint8))
    raise ValueError(f"compression {c} is not a byte-stream codec")


def decode_tile(layout: Layout, data: bytes | memoryview) -> np.ndarray:
    """One tile's pixels, ``(samples, tile_height, tile_width)`` in native byte order."""
    imagecodecs: Any = importlib.import_module("imagecodecs")  # its stubs are narrower than the buffers it takes

    th, tw, spp = layout.tile_height, layout.tile_width, layout.samples_per_tile
    dtype = np.dtype(layout.dtype)
    c = layout.compression
    if c == 7:
        arr = imagecodecs.jpeg8_decode(data, tables=layout.jpeg_tables)
        return _to_planes(arr, th, tw, spp, dtype)
    if c == 50001:
        arr = imagecodecs.webp_decode(data, hasalpha=spp == 4)
        return _to_planes(arr, th, tw, spp, dtype)
    if c == 34887:
        extra = layout.lerc_params[1] if layout.lerc_params and len(layout.lerc_params) > 1 else 0
        blob: bytes | memoryview | np.ndarray = data
        if extra == 1:
            blob = zlib.decompress(bytes(data))
        elif extra == 2:
            blob = imagecodecs.zstd_decode(data)
        decoded = imagecodecs.lerc_decode(blob, masks=True)
        arr, mask = decoded if isinstance(decoded, tuple) else (decoded, None)
        arr = np.asarray(arr)
        # One band: (h, w). Several: (h, w, bands) when they share a validity mask,
        # (bands, h, w) when each has its own (the blob then holds bands one after another).
        band_major = arr.ndim == 3 and spp > 1 and arr.shape == (spp, th, tw) and arr.shape[-1] != spp
        if not band_major:
            arr = arr.reshape(th, tw, -1) if arr.ndim == 2 else arr
            arr = np.moveaxis(arr, -1, 0)
        if mask is not None and dtype.kind == "f":
            # Pixels the blob marks invalid are NaN, as libtiff's LERC codec gives them.
            mask = np.asarray(mask, dtype=bool)
            mask = mask.reshape(-1, th, tw) if mask.shape[-2:] == (th, tw) else np.moveaxis(mask, -1, 0)
            arr = np.where(mask, arr, np.array(np.nan, dtype=arr.dtype))
        if arr.shape != (spp, th, tw):
            raise ValueError(f"LERC gave {arr.shape}, the tile is {(spp, th, tw)}")
        return np.ascontiguousarray(arr.astype(dtype, copy=False))
    nbytes = th * tw * spp * dtype.itemsize
    raw = _decompress(layout, data, nbytes)
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size < nbytes:  # a short (truncated) tile: GDAL reads the rest as zeros
        buf = np.concatenate([buf, np.zeros(nbytes - buf.size, np.uint8)])
    arr = buf[:nbytes].view(layout.file_dtype).reshape(th, tw, spp)
    if layout.predictor == 2:
        if not arr.flags.writeable:
            arr = arr.copy()
        arr = imagecodecs.delta_decode(arr, axis=-2, out=arr)
    elif layout.predictor == 3:
        if not arr.flags.writeable:
            arr = arr.copy()
        arr = imagecodecs.floatpred_decode(arr, axis=-2, out=arr)
    if not arr.dtype.isnative:
        arr = arr.astype(dtype)
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0)) if spp > 1 else arr.reshape(1, th, tw)


def _to_planes(arr: np.ndarray, th: int, tw: int, spp: int, dtype: np.dtype) -> np.ndarray:
    """``(samples, th, tw)`` from a codec's ``(th, tw)`` or ``(th, tw, samples)`` output."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[0] != th or arr.shape[1] != tw:
        out = np.zeros((th, tw, arr.shape[2]), dtype=arr.dtype)
        h, w = min(th, arr.shape[0]), min(tw, arr.shape[1])
        out[:h, :w] = arr[:h, :w]
        arr = out
    if arr.shape[2] != spp:
        raise ValueError(f"codec gave {arr.shape[2]} samples per pixel, the file has {spp}")
    arr = arr.astype(dtype, copy=False)
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def fill_tile(layout: Layout, value: float) -> np.ndarray:
    """A sparse tile (no bytes in the file): every sample ``value``."""
    return np.full((layout.samples_per_tile, layout.tile_height, layout.tile_width), value,
                   dtype=np.dtype(layout.dtype))
