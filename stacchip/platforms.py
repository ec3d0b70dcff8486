"""What each source is: canonical platform names and catalog aliases, band order,
nodata.

Catalogs name the same source differently (Earth Search ``sentinel-2-c1-l2a``,
Planetary Computer ``sentinel-2-l2a``; USGS ``landsat-c2l2-sr``, Planetary
Computer and Earth Search ``landsat-c2-l2``; ...). :data:`ALIASES` maps every
known collection id to the canonical platform a source's bands and QA belong
to, :func:`canonical_platform` resolves a name (case-insensitive; unknown names
are kept as they are) and :func:`platform_aliases` lists every name of one
platform. Indexes store the canonical name (and the collection id in its own
column); every filter accepts any alias.

Per-platform band order: which assets (and which bands of them) make a cube's channels.

The band orders are upstream's (``S2_BANDS``, ``LS_BANDS``, ``NAIP_BANDS``,
``LINZ_BANDS``, ``S1_BANDS``; MODIS as Clay's ``metadata.yaml``), so cubes made
here feed a model trained on upstream cubes unchanged. Each :class:`PlatformBands`
also carries what Clay's ``metadata.yaml`` lists beside the statistics
(``gsd`` in metres, ``rgb_indices``, wavelengths in micrometres) and the
nodata value used when neither the STAC item (``raster:bands[].nodata``) nor
the file declares one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stacchip.errors import AssetNotFoundError, ConfigError
from stacchip.qa import nodata_value

#: Upstream's band lists (names kept for code that imported them from ``prechip``).
S2_BANDS = ["blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16", "swir22"]
LS_BANDS = ["red", "green", "blue", "nir08", "swir16", "swir22"]
NAIP_BANDS = ["red", "green", "blue", "nir"]
LINZ_BANDS = ["red", "green", "blue"]
S1_BANDS = ["vv", "vh"]
MODIS_BANDS = [f"sur_refl_b0{i}" for i in range(1, 8)]


@dataclass(frozen=True)
class PlatformBands:
    """How one platform's chips become ``(C, H, W)`` channel stacks.

    ``sources`` maps each channel, in order, to ``(asset key candidates, band
    number)``: the first candidate key present in the item is read and band
    ``band`` (0-based) of it becomes the channel. ``default_nodata`` applies
    when neither the item nor the file declares nodata (``None``: no nodata).
    ``value_range`` is the default histogram range for percentiles.
    """

    platform: str
    band_order: tuple[str, ...]
    sources: tuple[tuple[tuple[str, ...], int], ...]
    gsd: float
    rgb_indices: tuple[int, ...] | None
    wavelength: dict[str, float] = field(default_factory=dict)
    default_nodata: float | None = 0
    value_range: tuple[float, float] = (0.0, 65536.0)

    @property
    def count(self) -> int:
        """Number of channels."""
        return len(self.band_order)

    def asset_keys(self, item: Any) -> list[str]:
        """The asset key used for each channel of ``item`` (raises if one is missing)."""
        keys = []
        for band, (candidates, _) in zip(self.band_order, self.sources, strict=False):
            key = next((k for k in candidates if k in item.assets), None)
            if key is None:
                raise AssetNotFoundError(
                    f"item {item.id!r} (platform {self.platform!r}): no asset for band {band!r}; "
                    f"expected one of {list(candidates)}, item has {sorted(item.assets)}"
                )
            keys.append(key)
        return keys

    def stack(self, item_id: str, chip: dict[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
        """Channel stack ``(C, H, W)`` of one chip from ``Chipper.chip`` output."""
        planes = []
        for band, key, (_, index) in zip(self.band_order, keys, self.sources, strict=False):
            data = chip[key]
            if index >= data.shape[0]:
                raise AssetNotFoundError(
                    f"item {item_id!r} asset {key!r}: band {band!r} is band {index + 1} but the "
                    f"asset has {data.shape[0]} band(s)"
                )
            planes.append(data[index])
        return np.stack(planes)


def _single(names: Sequence[str]) -> tuple[tuple[tuple[str, ...], int], ...]:
    return tuple(((name,), 0) for name in names)


def _multi(keys: Sequence[str], count: int) -> tuple[tuple[tuple[str, ...], int], ...]:
    return tuple((tuple(keys), i) for i in range(count))


PLATFORMS: dict[str, PlatformBands] = {
    "sentinel-2-l2a": PlatformBands(
        "sentinel-2-l2a", tuple(S2_BANDS), _single(S2_BANDS), 10.0, (2, 1, 0),
        dict(zip(S2_BANDS, (0.493, 0.56, 0.665, 0.704, 0.74, 0.783, 0.842, 0.865, 1.61, 2.19), strict=False)),
    ),
    "landsat-c2l2-sr": PlatformBands(
        "landsat-c2l2-sr", tuple(LS_BANDS), _single(LS_BANDS), 30.0, (0, 1, 2),
        dict(zip(LS_BANDS, (0.65, 0.56, 0.48, 0.86, 1.6, 2.2), strict=False)),
    ),
    "landsat-c2l1": PlatformBands(
        "landsat-c2l1", tuple(LS_BANDS), _single(LS_BANDS), 30.0, (0, 1, 2),
        dict(zip(LS_BANDS, (0.65, 0.56, 0.48, 0.86, 1.6, 2.2), strict=False)),
    ),
    # NAIP: one 4-band asset, "image" in the bucket the processors fill.
    "naip": PlatformBands(
        "naip", tuple(NAIP_BANDS), _multi(("image", "asset"), 4), 1.0, (0, 1, 2),
        dict(zip(NAIP_BANDS, (0.65, 0.56, 0.48, 0.842), strict=False)), value_range=(0.0, 256.0),
    ),
    # LINZ: one RGB asset called "asset".
    "linz": PlatformBands(
        "linz", tuple(LINZ_BANDS), _multi(("asset", "image"), 3), 0.5, (0, 1, 2),
        dict(zip(LINZ_BANDS, (0.635, 0.555, 0.465), strict=False)), value_range=(0.0, 256.0),
    ),
    "sentinel-1-rtc": PlatformBands(
        "sentinel-1-rtc", tuple(S1_BANDS), _single(S1_BANDS), 10.0, None,
        {"vv": 3.5, "vh": 4.0}, default_nodata=-32768, value_range=(0.0, 2.0),
    ),
    # MODIS surface reflectance, fill value -28672 (MOD09A1 user guide).
    "modis": PlatformBands(
        "modis", tuple(MODIS_BANDS), _single(MODIS_BANDS), 500.0, (0, 3, 2),
        dict(zip(MODIS_BANDS, (0.645, 0.8585, 0.469, 0.555, 1.24, 1.64, 2.13), strict=False)),
        default_nodata=-28672, value_range=(-100.0, 16000.0),
    ),
}


#: Catalog collection ids (and upstream names) -> canonical platform. Keys are lower case.
ALIASES: dict[str, str] = {
    # Sentinel-2 L2A: Planetary Computer and upstream; Earth Search v1 (collection 1) and v0
    "sentinel-2-l2a": "sentinel-2-l2a",
    "sentinel-2-c1-l2a": "sentinel-2-l2a",
    "sentinel-s2-l2a-cogs": "sentinel-2-l2a",
    # Landsat Collection 2 Level-2: USGS; Planetary Computer and Earth Search
    "landsat-c2l2-sr": "landsat-c2l2-sr",
    "landsat-c2-l2": "landsat-c2l2-sr",
    # Landsat Collection 2 Level-1: USGS; Planetary Computer and Earth Search
    "landsat-c2l1": "landsat-c2l1",
    "landsat-c2-l1": "landsat-c2l1",
    "naip": "naip",
    "linz": "linz",
    "sentinel-1-rtc": "sentinel-1-rtc",
    # MODIS surface reflectance 8-day 500 m (Terra and Aqua), Planetary Computer ids
    "modis": "modis",
    "modis-09a1-061": "modis",
    "mod09a1": "modis",
    "myd09a1": "modis",
}


def canonical_platform(name: str | None) -> str:
    """The canonical platform of a collection id or platform name (any known
    alias, case-insensitive); unknown names are returned unchanged."""
    if name is None:
        return ""
    return ALIASES.get(str(name).strip().lower(), str(name))


def platform_aliases(name: str) -> list[str]:
    """Every name of ``name``'s platform: the canonical one, its aliases and
    ``name`` itself (for matching indexes written with any of them)."""
    canonical = canonical_platform(name)
    names = {name, canonical} | {alias for alias, target in ALIASES.items() if target == canonical}
    return sorted(names)


def platform_bands(platform: str) -> PlatformBands:
    """The :class:`PlatformBands` of ``platform`` or any alias of it (raises
    :class:`ConfigError` if unknown)."""
    try:
        return PLATFORMS[canonical_platform(platform)]
    except KeyError:
        raise ConfigError(
            f"unknown platform {platform!r}; choose one of {', '.join(sorted(PLATFORMS))} "
            f"or a catalog collection id ({', '.join(sorted(a for a in ALIASES if a not in PLATFORMS))})"
        ) from None


def asset_nodata(asset: Any, band: int = 0) -> float | None:
    """The nodata value a STAC asset declares for band ``band`` (0-based) in
    ``raster:bands[].nodata``, else None. The one place this field is read."""
    bands = asset.extra_fields.get("raster:bands") or []
    if 0 <= band < len(bands) and isinstance(bands[band], Mapping) and bands[band].get("nodata") is not None:
        return float(bands[band]["nodata"])
    return None


#: Media types that are never rasters worth chipping (previews, metadata, and
#: multi-dataset containers such as HDF4/HDF5/NetCDF that GDAL cannot read as one raster).
NON_RASTER_TYPES = ("json", "xml", "html", "text/", "jpeg", "png", "hdf", "netcdf")
#: Asset roles that mark previews and metadata, not data.
NON_DATA_ROLES = {"thumbnail", "overview", "metadata", "tiles", "visual-preview"}


def is_raster_asset(asset: Any) -> bool:
    """True for assets that look like data rasters (COGs), not previews or metadata
    (by media type and roles; ``stacchip.chipper.is_raster_asset`` is this function)."""
    media = (asset.media_type or "").lower()
    if any(token in media for token in NON_RASTER_TYPES):
        return False
    roles = set(asset.roles or [])
    if roles & NON_DATA_ROLES and "data" not in roles:
        return False
    return True


def is_nodata(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """Boolean mask of ``data`` equal to ``nodata`` (and NaN for float data);
    :func:`stacchip.qa.nodata_value`."""
    return nodata_value(data, nodata)


__all__ = [
    "ALIASES",
    "LINZ_BANDS",
    "LS_BANDS",
    "MODIS_BANDS",
    "NAIP_BANDS",
    "NON_DATA_ROLES",
    "NON_RASTER_TYPES",
    "PLATFORMS",
    "S1_BANDS",
    "S2_BANDS",
    "PlatformBands",
    "asset_nodata",
    "canonical_platform",
    "is_nodata",
    "is_raster_asset",
    "platform_aliases",
    "platform_bands",
]
