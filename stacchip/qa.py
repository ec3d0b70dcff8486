"""QA band decoders: each turns a QA array into ``(cloud, nodata)`` boolean masks.

All decoders are pure numpy functions over arrays of any shape.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

# Sentinel-2 L2A Scene Classification (SCL) classes.
SCL_NO_DATA = 0
SCL_SATURATED_OR_DEFECTIVE = 1
SCL_CLOUD_SHADOWS = 3
SCL_CLOUD_MEDIUM_PROBABILITY = 8
SCL_CLOUD_HIGH_PROBABILITY = 9
SCL_THIN_CIRRUS = 10
SCL_CLOUD_CLASSES = (
    SCL_SATURATED_OR_DEFECTIVE,
    SCL_CLOUD_SHADOWS,
    SCL_CLOUD_MEDIUM_PROBABILITY,
    SCL_CLOUD_HIGH_PROBABILITY,
    SCL_THIN_CIRRUS,
)

# Landsat Collection 2 QA_PIXEL bits.
LANDSAT_FILL_BIT = 0
LANDSAT_DILATED_CLOUD_BIT = 1
LANDSAT_CLOUD_BIT = 3
LANDSAT_CLOUD_SHADOW_BIT = 4
LANDSAT_CLOUD_BITS = (LANDSAT_DILATED_CLOUD_BIT, LANDSAT_CLOUD_BIT, LANDSAT_CLOUD_SHADOW_BIT)

# MODIS MOD09/MYD09 500 m "state" QA (sur_refl_state_500m), 16-bit.
# Bits 0-1 are the cloud state, bit 0 the least significant:
#   0b00 clear, 0b01 cloudy, 0b10 mixed, 0b11 not set (assumed clear).
MODIS_CLOUD_STATE_MASK = 0b11
MODIS_CLOUD_STATE_CLEAR = 0b00
MODIS_CLOUD_STATE_CLOUDY = 0b01
MODIS_CLOUD_STATE_MIXED = 0b10
MODIS_CLOUD_STATE_NOT_SET = 0b11
MODIS_STATE_FILL = 65535


def _bits(qa: np.ndarray, bits: Iterable[int]) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def sentinel2_scl(
    scl: np.ndarray,
    cloud_classes: Iterable[int] = SCL_CLOUD_CLASSES,
    nodata_value: int = SCL_NO_DATA,
) -> tuple[np.ndarray, np.ndarray]:
    """Cloud = SCL classes 1, 3, 8, 9, 10 (defective, shadow, cloud medium/high, cirrus);
    nodata = class 0."""
    scl = np.asarray(scl)
    lookup = np.zeros(256, dtype=bool)
    lookup[list(cloud_classes)] = True
    if scl.dtype == np.uint8:
        cloud = lookup[scl]
    else:
        cloud = np.isin(scl, list(cloud_classes))
    return cloud, scl == nodata_value


def landsat_qa_pixel(qa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Landsat Collection 2 QA_PIXEL: nodata = bit 0 (fill); cloud = bit 1 (dilated
    cloud), bit 3 (cloud) or bit 4 (cloud shadow)."""
    qa = np.asarray(qa)
    cloud = (qa & _bits(qa, LANDSAT_CLOUD_BITS)) != 0
    nodata = (qa & (1 << LANDSAT_FILL_BIT)) != 0
    return cloud, nodata


def modis_state(
    state: np.ndarray, fill_value: int | None = MODIS_STATE_FILL
) -> tuple[np.ndarray, np.ndarray]:
    """MODIS ``sur_refl_state_500m`` (MOD09A1/MYD09A1 state QA).

    Cloud = cloud state (bits 0-1, bit 0 least significant) equal to 0b01
    (cloudy) or 0b10 (mixed); 0b00 (clear) and 0b11 (not set, assumed clear)
    are clear. Nodata = the fill value (65535 in the product).
    """
    state = np.asarray(state)
    cloud_state = state & MODIS_CLOUD_STATE_MASK
    cloud = (cloud_state == MODIS_CLOUD_STATE_CLOUDY) | (
        cloud_state == MODIS_CLOUD_STATE_MIXED
    )
    if fill_value is None:
        nodata = np.zeros(state.shape, dtype=bool)
    else:
        nodata = state == fill_value
        cloud &= ~nodata
    return cloud, nodata


def nodata_value(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """Pixels equal to ``nodata`` (and NaN for float data)."""
    data = np.asarray(data)
    mask = np.zeros(data.shape, dtype=bool)
    if nodata is not None:
        if isinstance(nodata, float) and np.isnan(nodata):
            pass
        else:
            mask |= data == nodata
    if np.issubdtype(data.dtype, np.floating):
        mask |= np.isnan(data)
    return mask
