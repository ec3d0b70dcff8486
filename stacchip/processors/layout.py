"""How processors lay scene files out in the bucket: ``copy`` (byte for byte) or ``aligned`` (chip tiles).

``copy`` (the default) keeps every asset file exactly as the source wrote it
(Earth Search's Sentinel-2 COGs have 1024 px DEFLATE tiles). A random 256 px
chip then decodes a whole 1024² tile per 10 m band (16x its pixels) and, for a
20 m band, a tile covering 8x8 chips (64x).

``aligned`` re-tiles each GeoTIFF asset into a COG whose internal tiles match
the chip grid of the index being written, without moving or changing a pixel:

* the item's finest grid (its 10 m bands) gets tiles of the chip size, so the
  grid origin is a tile corner and every chip is exactly one tile;
* a coarser band gets tiles of the chip's footprint in its own pixels when that
  is a whole multiple of 16 px (Sentinel-2's 20 m bands: 128 px tiles, one
  tile per 256 px chip);
* otherwise (Sentinel-2's 60 m bands: 256 / 6 = 42.7 px) the smallest multiple
  of 16 px not smaller than the footprint (48 px): a chip then touches at most
  2 x 2 tiles of that band;
* encoding is ZSTD (``level``, default 9) with predictor 2 for integers and 3
  for floats; no overviews unless asked (chips are read at full resolution, so
  overviews only add write time and ~1/3 to the size).

The chip size must be a multiple of 16 px (GeoTIFF tiles are):
:class:`AlignedLayout` raises :class:`~stacchip.errors.ConfigError` otherwise.
A band whose origin is not on a tile corner of the chip grid (an offset pan
band, say) keeps its pixels where they are: its tiles are chip-sized but the
chips straddle them (logged). Files that are not GeoTIFFs (metadata, JPEG
previews) are copied byte for byte in either layout. The STAC item keeps every
asset's ``proj:shape``/``proj:transform`` (the grid does not change);
``file:size`` is the new file's and ``file:checksum`` its sha2-256 multihash.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import rasterio
from rasterio.errors import RasterioIOError

from stacchip import storage
from stacchip.errors import ConfigError, StacchipError
from stacchip.processors.cog import BLOCK_MULTIPLE, ZSTD_LEVEL, retile_cog

logger = logging.getLogger(__name__)

#: Layout names, and the one used when none is given.
LAYOUTS = ("copy", "aligned")
DEFAULT_LAYOUT = "copy"
#: Environment variables of the layout settings (flags ``--layout``, ``--zstd-level``, ``--overviews``).
LAYOUT_VAR = "STACCHIP_LAYOUT"
ZSTD_LEVEL_VAR = "STACCHIP_ZSTD_LEVEL"
OVERVIEWS_VAR = "STACCHIP_OVERVIEWS"
#: File name endings of assets the aligned layout re-tiles (others are copied as they are).
TIFF_SUFFIXES = (".tif", ".tiff")
#: Relative tolerance when deciding that a chip's footprint is a whole number of pixels.
_WHOLE = 1e-6


@dataclass(frozen=True)
class AlignedLayout:
    """Settings of the ``aligned`` layout: the index's chip size (pixels of the item's finest grid),
    the ZSTD level (1-22) and whether to write overviews."""

    chip_size: int = 256
    level: int = ZSTD_LEVEL
    overviews: bool = False

    def __post_init__(self) -> None:
        if self.chip_size <= 0 or self.chip_size % BLOCK_MULTIPLE:
            raise ConfigError(
                f"--chip-size / STACCHIP_CHIP_SIZE {self.chip_size} must be a multiple of {BLOCK_MULTIPLE} px "
                f"with --layout aligned ({LAYOUT_VAR}=aligned): GeoTIFF tiles are; use --layout copy for other sizes"
            )
        if not 1 <= self.level <= 22:
            raise ConfigError(f"--zstd-level / {ZSTD_LEVEL_VAR} {self.level} must be within 1..22")


def layout_from(settings: Any) -> AlignedLayout | None:
    """The :class:`AlignedLayout` a processor's settings ask for (a
    :class:`~stacchip.processors.base.ProcessorSettings`, or a mapping of the same names),
    or None for ``copy``."""
    def get(name: str, default: Any) -> Any:
        if isinstance(settings, Mapping):
            return settings.get(name, default)
        return getattr(settings, name, default)

    if get("layout", DEFAULT_LAYOUT) != "aligned":
        return None
    return AlignedLayout(
        chip_size=int(get("chip_size", 256)),
        level=int(get("zstd_level", ZSTD_LEVEL)),
        overviews=bool(get("overviews", False)),
    )


def check_layout(name: str | None) -> str:
    """``name`` lower-cased when it is a known layout, else :class:`ConfigError`."""
    value = (name or DEFAULT_LAYOUT).strip().lower()
    if value not in LAYOUTS:
        raise ConfigError(f"--layout / {LAYOUT_VAR} {name!r} is not one of {', '.join(LAYOUTS)}")
    return value


def tile_size(chip_size: int, scale: float) -> int:
    """Tile side (pixels) for a band whose pixels are ``scale`` fine pixels wide.

    The chip's footprint in the band's pixels is ``chip_size / scale``; when that
    is a whole multiple of 16 it is the tile (each chip one tile), else the
    smallest multiple of 16 not below it (each chip within 2 x 2 tiles).
    """
    if scale <= 0 or not math.isfinite(scale):
        raise ConfigError(f"pixel scale {scale} must be a positive number")
    footprint = chip_size / scale
    whole = round(footprint)
    if whole >= BLOCK_MULTIPLE and abs(footprint - whole) <= _WHOLE * footprint and whole % BLOCK_MULTIPLE == 0:
        return whole
    return max(BLOCK_MULTIPLE, math.ceil(footprint / BLOCK_MULTIPLE - _WHOLE) * BLOCK_MULTIPLE)


def multihash_sha256(path: str | Path) -> str:
    """``file:checksum`` of a local file: the sha2-256 multihash in hex (``1220`` + digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return "1220" + digest.hexdigest()


class AlignedWriter:
    """Writes the assets of one item in the aligned layout.

    ``item`` is the STAC item as it will be published (its grid is the chip grid
    the index uses).
    """

    def __init__(self, layout: AlignedLayout, item: Any) -> None:
        self.layout = layout
        self.item = item
        self._fine: Any = None

    @staticmethod
    def retiles(filename: str) -> bool:
        """True for file names this layout re-tiles (GeoTIFFs)."""
        return filename.lower().endswith(TIFF_SUFFIXES)

    def fine_grid(self) -> Any:
        """The item's finest grid (computed once)."""
        if self._fine is None:
            from stacchip.projection import item_grid

            self._fine = item_grid(self.item)
        return self._fine

    def tiling(self, key: str, path: str) -> tuple[int, bool]:
        """``(tile side in px, whether the chip grid origin is a tile corner)`` for asset ``key`` in file ``path``.

        The band's pixel size relative to the finest grid comes from the transform
        the Chipper reads it with (:func:`stacchip.reader.asset_transform`). A file
        that contradicts the item gets chip-sized tiles and a warning: the layout
        is about speed, the reader judges the grid.
        """
        from stacchip.reader import asset_transform

        fine = self.fine_grid()
        chip = self.layout.chip_size
        with rasterio.open(path) as ds:
            try:
                t = asset_transform(ds, self.item, key, fine)
            except StacchipError as exc:
                logger.warning("item %r asset %r: %s; writing %d px tiles", self.item.id, key, exc, chip)
                return chip, False
        ft = fine.transform
        sx, sy = abs(t.a) / abs(ft.a), abs(t.e) / abs(ft.e)
        tile = max(tile_size(chip, sx), tile_size(chip, sy))
        # the fine grid's origin, in the band's pixels, must fall on a tile corner
        ox, oy = (ft.c - t.c) / t.a, (ft.f - t.f) / t.e
        aligned = all(abs(o / tile - round(o / tile)) * tile < 1e-6 for o in (ox, oy))
        return tile, aligned

    def write(
        self, key: str, filename: str, fill: Callable[[str], object], dst: str, what: str
    ) -> dict[str, Any]:
        """Fetch the asset into a temp file with ``fill(path)``, re-tile it, publish it whole at ``dst``.

        Returns the asset fields that describe the new file (``file:size``,
        ``file:checksum``).
        """
        tmpdir = tempfile.mkdtemp(prefix="stacchip-aligned-")
        try:
            source = str(Path(tmpdir) / f"source{Path(filename).suffix or '.tif'}")
            fill(source)
            if not _is_geotiff(source):
                logger.info("%s: not a GeoTIFF; copied as it is", what)
                out = source
            else:
                tile, aligned = self.tiling(key, source)
                if not aligned:
                    logger.info("%s: the chip grid origin is not a tile corner of this band; chips straddle its tiles",
                                what)
                out = str(Path(tmpdir) / (Path(filename).name or "asset.tif"))
                logger.info("%s: re-tile to %d px ZSTD tiles -> %s", what, tile, dst)
                retile_cog(source, out, tile, level=self.layout.level, overviews=self.layout.overviews)
                Path(source).unlink()
            fields = {"file:size": Path(out).stat().st_size, "file:checksum": multihash_sha256(out)}
            storage.put_file(out, dst)
            return fields
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _is_geotiff(path: str) -> bool:
    try:
        with rasterio.open(path) as ds:
            return ds.driver == "GTiff" and ds.count > 0
    except RasterioIOError:
        return False
