"""The WebDataset format: tar shards of samples, one sample per chip.

Shards go to ``{output}/{VERSION}/{platform}/shard-{k:06d}.tar.gz`` (``.tar`` at
compression level 0; :func:`shard_url`), beside where cubes would be: shard ``k``
holds exactly the chips of cube ``k`` in the same order (same membership, shuffle
and locality). Numbered with six digits, so a brace pattern such as
``shard-{000000..000099}.tar.gz`` names them for ``webdataset``.

Each sample is three tar members sharing the sample's key (``{k:06d}-{i:05d}``,
shard ``k``, position ``i``; chip ids may hold dots, which WebDataset reads as the
start of an extension, so they are not the key):

==================  =============================================================
``{key}.npy``       pixels ``(C, H, W)`` in the platform's band order, in the
                    dtype the scenes hold (what ``Chipper`` returns: uint16 for
                    Sentinel-2, float32 for Sentinel-1 ...); nodata pixels keep
                    their source value
``{key}.mask.npy``  bool ``(C, H, W)``, True where a pixel is nodata
``{key}.json``      ``chipid``, ``item_id``, ``platform``, ``datetime`` (ISO 8601
                    UTC), ``lon``, ``lat`` (chip centre, degrees), ``bbox``
                    (``[xmin, ymin, xmax, ymax]`` degrees), ``cloud_fraction`` and
                    ``nodata_fraction`` (0-1, the index's
                    ``cloud_cover_percentage`` / ``nodata_percentage``),
                    ``chip_index_x``, ``chip_index_y``, ``chip_size`` (pixels),
                    ``bands`` and upstream's encodings ``lat_norm``, ``lon_norm``,
                    ``week_norm``, ``hour_norm`` (``[sin, cos]``, as in cubes)
==================  =============================================================

The tar is written by :mod:`tarfile` (USTAR, members dated 0, owner 0, mode
0444: the same chips give the same bytes on every run) and compressed as one gzip
stream by ISA-L (:mod:`stacchip.export.codec`); ``tar -xzf``, ``webdataset`` and
Hugging Face ``datasets``' ``webdataset`` loader read it as it is. A shard is
written whole or not at all with a checksum record beside it, like a cube.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from stacchip import storage
from stacchip.encodings import bbox_centres, latlon_norm, time_norm
from stacchip.export import codec
from stacchip.export.cube import VERSION
from stacchip.index import bbox_array

#: Members of one sample (after its key and a dot), in the order they are written.
SAMPLE_MEMBERS = ("json", "mask.npy", "npy")
#: Date, owner and mode of every member.
MEMBER_MTIME = 0
MEMBER_MODE = 0o444


def shard_name(shard_id: int, level: int) -> str:
    """File name of shard ``shard_id``: ``.tar.gz`` when compressed, ``.tar`` at level 0."""
    return f"shard-{int(shard_id):06d}.tar" + (".gz" if codec.check_level(level) else "")


def shard_url(output: str, platform: str, shard_id: int, level: int = codec.DEFAULT_LEVEL) -> str:
    """Where shard ``shard_id`` is written."""
    return storage.join_under(output, VERSION, storage.safe_segment(platform, "platform"), shard_name(shard_id, level))


def sample_key(shard_id: int, position: int) -> str:
    """WebDataset key of the sample at ``position`` of shard ``shard_id``."""
    return f"{int(shard_id):06d}-{int(position):05d}"


def sample_records(rows: pa.Table, bands: Sequence[str]) -> list[dict[str, Any]]:
    """The ``.json`` of each sample (see the module docstring), from its index rows."""
    box = bbox_array(rows)
    lon, lat = bbox_centres(box)
    lat_n, lon_n = latlon_norm(lon, lat)
    times = rows.column("datetime").cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False)
    times = np.asarray(times).astype("datetime64[us]")
    week_n, hour_n = time_norm(times)
    stamps = np.datetime_as_string(times, unit="us")
    columns = {name: rows.column(name).to_pylist() for name in (
        "chipid", "item_id", "platform", "chip_index_x", "chip_index_y", "chip_size",
        "cloud_cover_percentage", "nodata_percentage")}
    band_list = [str(b) for b in bands]
    out = []
    for i in range(rows.num_rows):
        out.append({
            "chipid": columns["chipid"][i], "item_id": columns["item_id"][i], "platform": columns["platform"][i],
            "datetime": f"{stamps[i]}Z", "lon": float(lon[i]), "lat": float(lat[i]),
            "bbox": [float(v) for v in box[i]],
            "cloud_fraction": _number(columns["cloud_cover_percentage"][i]),
            "nodata_fraction": _number(columns["nodata_percentage"][i]),
            "chip_index_x": int(columns["chip_index_x"][i]), "chip_index_y": int(columns["chip_index_y"][i]),
            "chip_size": int(columns["chip_size"][i]), "bands": band_list,
            "lat_norm": [float(v) for v in lat_n[i]], "lon_norm": [float(v) for v in lon_n[i]],
            "week_norm": [float(v) for v in week_n[i]], "hour_norm": [float(v) for v in hour_n[i]],
        })
    return out


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _npy(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.lib.format.write_array(sink, np.ascontiguousarray(array), allow_pickle=False)
    return sink.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = MEMBER_MTIME
    info.mode = MEMBER_MODE
    tar.addfile(info, io.BytesIO(payload))


def shard_bytes(
    shard_id: int,
    rows: pa.Table,
    chips: Sequence[tuple[np.ndarray, np.ndarray]],
    bands: Sequence[str],
    level: int = codec.DEFAULT_LEVEL,
) -> bytes:
    """Bytes of shard ``shard_id``: one sample per row of ``rows`` (index rows, shard order)
    with its chip ``(pixels (C, H, W), nodata mask)`` (see the module docstring)."""
    if len(chips) != rows.num_rows:
        raise ValueError(f"shard {shard_id}: {rows.num_rows} rows but {len(chips)} chips")
    records = sample_records(rows, bands)
    sink = io.BytesIO()
    stream = codec.gzip_writer(sink, level) if codec.check_level(level) else sink
    try:
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for i, ((pixels, mask), record) in enumerate(zip(chips, records, strict=True)):
                key = sample_key(shard_id, i)
                _add(tar, f"{key}.json", json.dumps(record, separators=(",", ":")).encode())
                _add(tar, f"{key}.mask.npy", _npy(np.asarray(mask, dtype=bool)))
                _add(tar, f"{key}.npy", _npy(pixels))
    finally:
        if stream is not sink:
            stream.close()
    return sink.getvalue()


def read_shard(data: bytes) -> list[dict[str, Any]]:
    """The samples of shard ``data`` (``{"__key__", "npy", "mask.npy", "json"}`` decoded), in order.

    For checks and tests; training reads shards with ``webdataset`` or ``datasets``.
    """
    samples: dict[str, dict[str, Any]] = {}
    raw = codec.gunzip(data) if codec.is_gzip(data) else data
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            handle = tar.extractfile(member)
            if handle is None or suffix not in SAMPLE_MEMBERS:
                raise ValueError(f"unexpected member {member.name!r}")
            payload = handle.read()
            sample = samples.setdefault(key, {"__key__": key})
            if suffix == "json":
                sample[suffix] = json.loads(payload)
            else:
                sample[suffix] = np.lib.format.read_array(io.BytesIO(payload), allow_pickle=False)
    return list(samples.values())


def shard_damage(data: bytes) -> str | None:
    """Why ``data`` is not a whole shard (a gzip stream failing its CRC or length, a truncated
    tar, a sample lacking a member), or None."""
    try:
        samples = read_shard(data)
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    if not samples:
        return "it holds no sample"
    for sample in samples:
        missing = [m for m in SAMPLE_MEMBERS if m not in sample]
        if missing:
            return f"sample {sample['__key__']} lacks {', '.join(missing)}"
    return None


def existing_shard_ok(url: str) -> bool:
    """True when the shard at ``url`` is there and whole (its checksum record, else
    :func:`shard_damage`); a damaged one is logged (it is then written again)."""
    return storage.whole_or_damaged(url, lambda u: shard_damage(storage.read_bytes_retry(u)), "shard")
