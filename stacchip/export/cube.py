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
``prechip_manifest.json`` beside the cubes (:func:`manifest_url`,
:func:`check_manifest`) records the selection they come from.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from stacchip import storage
from stacchip.encodings import bbox_centres, latlon_norm, time_norm
from stacchip.errors import ConfigError, StorageNotFoundError
from stacchip.index import bbox_array

if TYPE_CHECKING:
    from stacchip.export.selection import Selection

logger = logging.getLogger(__name__)

#: Folder under the chip bucket that holds the cubes (upstream's value).
VERSION = "mode_v1_chipper_v2"
#: Chips per cube.
CUBESIZE = 128
#: zlib level of the npz members (see :func:`cube_bytes`).
DEFAULT_COMPRESS_LEVEL = 1


def cube_url(output: str, platform: str, cube_id: int) -> str:
    """Where cube ``cube_id`` is written."""
    return storage.join_under(output, VERSION, storage.safe_segment(platform, "platform"), f"cube_{int(cube_id)}.npz")


def manifest_url(output: str, platform: str) -> str:
    """The record of which selection the cubes under ``output`` were made from."""
    return storage.join_under(output, VERSION, storage.safe_segment(platform, "platform"), "prechip_manifest.json")


def check_manifest(config: Any, selection: Selection) -> None:
    """Refuse to add cubes next to cubes of another selection (see
    :class:`~stacchip.export.selection.Selection`).

    ``config`` carries ``output``, ``seed``, ``cube_size``, ``max_nodata``,
    ``max_cloud``, ``partial`` and ``overwrite`` (prechip's ``PrechipConfig``).

    The first job writes the manifest; later jobs (and re-runs) compare. With
    ``overwrite`` a different selection is allowed and the manifest replaced.
    """
    url = manifest_url(config.output, selection.platform)
    record = {
        "fingerprint": selection.fingerprint, "seed": config.seed, "cube_size": config.cube_size,
        "chips": selection.table.num_rows, "cubes": selection.n_cubes,
        "max_nodata": config.max_nodata, "max_cloud": config.max_cloud, "partial": config.partial,
        "excluded_items": dict(sorted(selection.excluded.items())),
    }
    if selection.dealing is not None:
        record.update(mode="locality", items_per_job=config.items_per_job, mix_items=config.mix_items,
                      tasks=len(selection.dealing.tasks))
    try:
        existing = json.loads(storage.read_bytes(url))
    except StorageNotFoundError:
        existing = None
    except ValueError as exc:
        raise ConfigError(f"{url!r} is not a prechip manifest: {exc}") from exc
    if existing is not None and existing.get("fingerprint") == selection.fingerprint:
        return
    if existing is not None and not config.overwrite:
        raise ConfigError(
            f"the cubes under {storage.join(config.output, VERSION, selection.platform)!r} were made from "
            f"another selection ({ {k: existing.get(k) for k in record if k != 'fingerprint'} }) than this run "
            f"({ {k: v for k, v in record.items() if k != 'fingerprint'} }): the index, filters, seed or cube "
            "size changed, so new cubes would repeat or miss chips of the old ones. Write to another "
            "--chips location, or pass --overwrite to replace the cubes"
        )
    storage.write_bytes(url, json.dumps(record, indent=2).encode())


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
    ``allow_pickle=False``), at zlib level ``level`` (0 = stored, 1 fastest,
    9 smallest; numpy's default is 6, about 6x slower than 1 on chip pixels
    for ~15 % smaller files).
    """
    if not 0 <= level <= 9:
        raise ConfigError(f"compression level must be 0..9, got {level}")
    sink = io.BytesIO()
    method = zipfile.ZIP_STORED if level == 0 else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(sink, "w", compression=method, compresslevel=level or None, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return sink.getvalue()


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
