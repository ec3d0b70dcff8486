"""The cube format: npz files of chips for training, their names and the manifest beside them.

Cubes go to ``{output}/{VERSION}/{platform}/cube_{k}.npz`` (:func:`cube_url`),
the layout the Clay training data module loads. What a cube holds (the keys
upstream wrote, plus masks and provenance; :func:`cube_arrays`):

=================  ==================  ============================================
``pixels``         (N, C, H, W) f32    chip pixels in the platform's band order
                                       (:mod:`stacchip.platforms`);
                                       nodata pixels keep their source value
``nodata_mask``    (N, C, H, W) bool   True where a pixel is nodata (the asset's
                                       nodata value, NaN, or outside the asset)
``lat_norm``       (N, 2) f32          ``(sin, cos)`` of the chip centre latitude
``lon_norm``       (N, 2) f32          ``(sin, cos)`` of the chip centre longitude
``week_norm``      (N, 2) f32          ``(sin, cos)`` of the position in the year
``hour_norm``      (N, 2) f32          ``(sin, cos)`` of the UTC time of day
``chipids``        (N,) str            index ``chipid`` of each chip
``item_ids``       (N,) str            STAC item id of each chip
``datetimes``      (N,) datetime64[us] item timestamp (UTC)
``lon``, ``lat``   (N,) f64            chip centre in degrees
``bands``          (C,) str            band names of the channels
=================  ==================  ============================================

The encodings are :mod:`stacchip.encodings`'. A cube is written whole or not
at all, with a checksum record of its size and SHA-256 (``.cube_{k}.npz.sha256.json``
beside it, see :func:`stacchip.storage.write_recorded`); :func:`existing_cube_ok`
accepts an existing cube when it matches its record (a cube without one, e.g.
written by upstream, when its zip members pass their CRC check).
``prechip_manifest.json`` beside the cubes (:func:`manifest_url`, written by
:mod:`stacchip.export.plan`) records the selection they come from.
"""

from __future__ import annotations

import io
import logging
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from stacchip import storage
from stacchip.encodings import bbox_centres, latlon_norm, time_norm
from stacchip.export import codec
from stacchip.index import bbox_array

logger = logging.getLogger(__name__)

#: Folder under the chip bucket that holds the cubes (upstream's value).
VERSION = "mode_v1_chipper_v2"
#: Chips per cube.
CUBESIZE = 128
#: Compression level of the npz members (see :func:`cube_bytes` and :mod:`stacchip.export.codec`).
DEFAULT_COMPRESS_LEVEL = codec.DEFAULT_LEVEL


def cube_url(output: str, platform: str, cube_id: int) -> str:
    """Where cube ``cube_id`` is written."""
    return storage.join_under(output, VERSION, storage.safe_segment(platform, "platform"), f"cube_{int(cube_id)}.npz")


def manifest_url(output: str, platform: str) -> str:
    """The record of which selection the cubes under ``output`` were made from."""
    return storage.join_under(output, VERSION, storage.safe_segment(platform, "platform"), "prechip_manifest.json")


def cube_arrays(rows: pa.Table, pixels: np.ndarray, mask: np.ndarray, bands: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of one cube from its index rows and its pixels and mask."""
    lon, lat = bbox_centres(bbox_array(rows))
    lat_n, lon_n = latlon_norm(lon, lat)
    times = rows.column("datetime").cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False)
    times = np.asarray(times).astype("datetime64[us]")
    week_n, hour_n = time_norm(times)
    return {
        "pixels": pixels.astype(np.float32, copy=False),
        "nodata_mask": mask.astype(bool, copy=False),
        "lon_norm": lon_n,
        "lat_norm": lat_n,
        "week_norm": week_n,
        "hour_norm": hour_n,
        "chipids": np.asarray(rows.column("chipid").to_pylist(), dtype=str),
        "item_ids": np.asarray(rows.column("item_id").to_pylist(), dtype=str),
        "datetimes": times,
        "lon": lon,
        "lat": lat,
        "bands": np.asarray(list(bands), dtype=str),
    }


def cube_bytes(arrays: dict[str, np.ndarray], level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """npz bytes of a cube, each array a DEFLATE-compressed ``.npy`` member.

    The same format as ``np.savez_compressed`` (``np.load`` reads it, with
    ``allow_pickle=False``; any unzip too): :mod:`zipfile` writes the archive, ISA-L
    compresses the members (:mod:`stacchip.export.codec`: level 0 stores, 1 is the
    fastest, 3 the smallest; 4-9 mean 3). Members are dated 1980-01-01, so the same
    arrays give the same bytes on every run.
    """
    codec.check_level(level)
    sink = io.BytesIO()
    method = zipfile.ZIP_STORED if level == 0 else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(sink, "w", compression=method, allowZip64=True) as zf:
        for name, array in arrays.items():
            with codec.zip_member(zf, f"{name}.npy", level) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return sink.getvalue()


def stack_chips(chips: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The cube's float32 pixels ``(N, C, H, W)`` and bool masks from chips ``(pixels, mask)``
    in their source dtype, converted straight into the cube's arrays (no stacked copy in the
    source dtype)."""
    first_pixels, first_mask = chips[0]
    pixels = np.empty((len(chips), *first_pixels.shape), dtype=np.float32)
    mask = np.empty((len(chips), *first_mask.shape), dtype=bool)
    for k, (p, m) in enumerate(chips):
        pixels[k] = p
        mask[k] = m
    return pixels, mask


def encode_cube(rows: pa.Table, chips: Sequence[tuple[np.ndarray, np.ndarray]], bands: Sequence[str],
                level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """npz bytes of the cube of ``rows`` (index rows, cube order) and their chips."""
    pixels, mask = stack_chips(chips)
    return cube_bytes(cube_arrays(rows, pixels, mask, bands), level)


def write_cube(url: str, arrays: dict[str, np.ndarray], level: int = DEFAULT_COMPRESS_LEVEL) -> str:
    """Compress and write one cube whole (atomic) with its checksum record; returns ``url``."""
    storage.write_recorded(url, cube_bytes(arrays, level))
    return url


def cube_damage(data: bytes) -> str | None:
    """Why ``data`` is not a whole cube (not a zip, a member failing its CRC, no ``pixels``), or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            bad = zf.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check"
            if "pixels.npy" not in zf.namelist():
                return "it holds no pixels array"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def existing_cube_ok(url: str) -> bool:
    """True when the cube at ``url`` is there and whole (see the module docstring); a damaged
    one is logged (it is then written again)."""
    return storage.whole_or_damaged(url, lambda u: cube_damage(storage.read_bytes_retry(u)), "cube")
