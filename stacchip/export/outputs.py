"""The formats prechip writes, behind one interface: npz cubes and WebDataset shards.

Output ``k`` of a selection holds the same chips in the same order in either
format (cube ``k``, :mod:`stacchip.export.cube`; shard ``k``,
:mod:`stacchip.export.shards`); what differs is the file: its name, its bytes,
and how an existing one is checked before a re-run skips it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from stacchip.errors import ConfigError
from stacchip.export import cube, shards

#: Format names (``--format``).
NPZ = "npz"
WEBDATASET = "webdataset"

Chips = Sequence[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class OutputFormat:
    """One format: ``noun`` names its files in messages (``cube``, ``shard``)."""

    name: str
    noun: str
    _url: Callable[[str, str, int, int], str]
    _encode: Callable[[int, pa.Table, Chips, Sequence[str], int], bytes]
    existing_ok: Callable[[str], bool]

    def url(self, output: str, platform: str, output_id: int, level: int) -> str:
        """Where output ``output_id`` is written (level 0 may change the name: ``.tar``)."""
        return self._url(output, platform, output_id, level)

    def encode(self, output_id: int, rows: pa.Table, chips: Chips, bands: Sequence[str], level: int) -> bytes:
        """Bytes of output ``output_id``: ``rows`` (index rows, output order) and their chips
        ``(pixels (C, H, W) in the source dtype, nodata mask)``."""
        return self._encode(output_id, rows, chips, bands, level)


FORMATS: dict[str, OutputFormat] = {
    NPZ: OutputFormat(
        NPZ, "cube", lambda out, platform, k, level: cube.cube_url(out, platform, k),
        lambda k, rows, chips, bands, level: cube.encode_cube(rows, chips, bands, level),
        cube.existing_cube_ok),
    WEBDATASET: OutputFormat(
        WEBDATASET, "shard", shards.shard_url, shards.shard_bytes, shards.existing_shard_ok),
}


def output_format(name: str) -> OutputFormat:
    """The format called ``name`` (:class:`ConfigError` naming the known ones otherwise)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"output format must be one of {sorted(FORMATS)}, got {name!r} (--format)") from None
