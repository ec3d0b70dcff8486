"""Which assets of a STAC item become a dataset's channels, and checking a choice.

By default :class:`~stacchip.ml.dataset.ChipDataset` reads an item's *data
bands*: its raster assets (as :func:`stacchip.chipper.is_raster_asset` decides:
no previews, thumbnails, metadata) minus

* QA and mask rasters, recognised by STAC role (:data:`QA_ROLES`: ``cloud``,
  ``cloud-shadow``, ``snow-ice``, ``water-mask``, ``land-water``,
  ``data-mask``, ``saturation``, and ``labels``) or by key
  (:data:`QA_ASSET_KEYS`, case-insensitive: Sentinel-2 ``scl``/``SCL`` and the
  ``cloud``/``snow`` probabilities, Landsat ``qa_pixel``/``qa_radsat``/
  ``qa_aerosol``, MODIS ``sur_refl_state_500m``/``sur_refl_qc_500m`` and its
  angle and day-of-year layers, ...);
* when the item marks its bands with the ``data`` role, assets that declare
  roles without ``data`` (e.g. Sentinel-2's 8-bit ``visual`` composite).

Pass ``assets=[...]`` to choose channels exactly (QA assets included). The
check of an explicit choice reads only the STAC item, never a raster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from stacchip.chipper import is_raster_asset
from stacchip.errors import ConfigError

#: STAC asset roles of QA, mask and label rasters (never default channels).
QA_ROLES = frozenset({
    "cloud", "cloud-shadow", "snow-ice", "water-mask", "land-water", "data-mask", "saturation",
    "labels", "label",
})

#: Asset keys (lower case) of QA/mask rasters and of per-pixel geometry/date layers.
QA_ASSET_KEYS = frozenset({
    # Sentinel-2 L2A: scene classification, cloud and snow probabilities (Earth Search, Planetary Computer)
    "scl", "cloud", "snow", "cld", "snw", "cloud_probability", "snow_probability", "cloud-probability",
    "snow-probability", "clouds", "cloud_mask", "cloud-mask", "fmask",
    # Landsat Collection 2: pixel QA, radiometric saturation, aerosol QA, surface temperature QA
    "qa_pixel", "qa_radsat", "qa_aerosol", "qa", "bqa", "qa_pixel_bitmask",
    # MODIS MOD09/MYD09: state and QC bitmasks, view/sun angles, day of year
    "sur_refl_state_500m", "sur_refl_qc_500m", "state_1km", "qc_500m", "sur_refl_szen", "sur_refl_vzen",
    "sur_refl_raz", "sur_refl_day_of_year",
    # generic masks
    "mask", "nodata_mask", "data_mask", "data-mask",
})


def is_qa_asset(key: str, asset: Any) -> bool:
    """True for QA/mask/label rasters: a role in :data:`QA_ROLES` or a key in :data:`QA_ASSET_KEYS`."""
    if key.lower() in QA_ASSET_KEYS:
        return True
    return bool(set(asset.roles or []) & QA_ROLES)


def data_asset_keys(item: Any, exclude: Iterable[str] = ()) -> list[str]:
    """The default channels of ``item``: its data bands in item order (see the module docs)."""
    skip = set(exclude)
    keys = [
        k for k, a in item.assets.items()
        if k not in skip and is_raster_asset(a) and not is_qa_asset(k, a)
    ]
    if any("data" in (item.assets[k].roles or []) for k in keys):
        keys = [k for k in keys if not item.assets[k].roles or "data" in item.assets[k].roles]
    return keys


def band_count(asset: Any) -> int | None:
    """Bands an asset declares (``eo:bands`` or ``raster:bands``), ``None`` when it declares none."""
    declared = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("raster:bands")
    return len(declared) if declared else None


def _listing(item: Any, exclude: Iterable[str] = ()) -> str:
    data = data_asset_keys(item, exclude)
    other = sorted(k for k in item.assets if k not in data)
    text = "data assets: " + (", ".join(data) or "none")
    if other:
        text += "; other assets: " + ", ".join(other)
    return text


def check_assets(
    item: Any,
    platform: str,
    assets: Sequence[str] | None,
    bands: Mapping[str, Sequence[int]],
    label_asset: str | None,
) -> None:
    """Raise :class:`ConfigError` unless ``item`` has every asset a dataset will read.

    Checks ``assets`` (or, when ``None``, that the default selection is not
    empty), the keys and band positions of ``bands``, and ``label_asset``; the
    message names the asset and the item and lists the item's assets.
    """
    where = f"item {item.id!r} (platform {platform!r})"
    exclude = [label_asset] if label_asset else []
    if assets is not None:
        for key in assets:
            if key not in item.assets:
                raise ConfigError(f"assets=: {where} has no asset {key!r}; {_listing(item, exclude)}")
        chosen = list(assets)
    else:
        chosen = data_asset_keys(item, exclude)
        if not chosen:
            raise ConfigError(
                f"{where} has no data bands to read by default; pass assets=[...]; {_listing(item, exclude)}"
            )
    for key, positions in bands.items():
        if key not in item.assets:
            raise ConfigError(f"bands=: {where} has no asset {key!r}; {_listing(item, exclude)}")
        if key not in chosen:
            raise ConfigError(
                f"bands= names asset {key!r}, which is not read: {where} reads {', '.join(chosen)} "
                "(add it to assets=)"
            )
        count = band_count(item.assets[key])
        bad = [p for p in positions if p < 0 or (count is not None and p >= count)]
        if bad:
            limit = f"0..{count - 1}" if count is not None else ">= 0"
            raise ConfigError(f"bands=: asset {key!r} of {where} has no band(s) {bad} (0-based, {limit})")
    if label_asset is not None and label_asset not in item.assets:
        raise ConfigError(f"label_asset=: {where} has no asset {label_asset!r}; {_listing(item)}")
