import numpy as np
import pytest

from stacchip import qa


def test_sentinel2_scl_all_classes():
    scl = np.arange(12, dtype=np.uint8).reshape(3, 4)
    cloud, nodata = qa.sentinel2_scl(scl)
    assert np.flatnonzero(cloud).tolist() == [1, 3, 8, 9, 10]
    assert np.flatnonzero(nodata).tolist() == [0]


def test_sentinel2_scl_non_uint8_input():
    scl = np.array([[0, 9], [4, 300]], dtype=np.uint16)
    cloud, nodata = qa.sentinel2_scl(scl)
    assert cloud.tolist() == [[False, True], [False, False]]
    assert nodata.tolist() == [[True, False], [False, False]]


def test_landsat_qa_pixel_bits():
    values = np.array(
        [
            0b0000_0000,  # clear
            0b0000_0001,  # fill -> nodata
            0b0000_0010,  # dilated cloud
            0b0000_0100,  # cirrus (bit 2) -> not counted
            0b0000_1000,  # cloud
            0b0001_0000,  # cloud shadow
            0b0010_0000,  # snow (bit 5) -> not counted
            0b0100_0000,  # clear flag (bit 6)
            0b1000_0000,  # water (bit 7)
            21824,        # typical clear land value
            22280,        # typical high-confidence cloud value (bit 3 set)
        ],
        dtype=np.uint16,
    )
    cloud, nodata = qa.landsat_qa_pixel(values)
    assert cloud.tolist() == [False, False, True, False, True, True, False, False, False, False, True]
    assert nodata.tolist() == [False, True] + [False] * 9


@pytest.mark.parametrize(
    "state,cloud,nodata",
    [
        (0b00, False, False),      # clear
        (0b01, True, False),       # cloudy
        (0b10, True, False),       # mixed
        (0b11, False, False),      # not set, assumed clear
        (0b100, False, False),     # cloud shadow bit only, cloud state clear
        (0b0000_0000_0100_0001, True, False),  # cloudy with other flags set
        (0b1000_0000_0000_0010, True, False),  # mixed with bit 15 set
        (65535, False, True),      # fill
    ],
)
def test_modis_state_cloud_bits_in_documented_order(state, cloud, nodata):
    c, n = qa.modis_state(np.array([state], dtype=np.uint16))
    assert c.tolist() == [cloud]
    assert n.tolist() == [nodata]


def test_nodata_value_float_and_nan():
    data = np.array([-32768.0, 0.5, np.nan, 1.0], dtype=np.float32)
    assert qa.nodata_value(data, -32768).tolist() == [True, False, True, False]
    assert qa.nodata_value(data, None).tolist() == [False, False, True, False]
    assert qa.nodata_value(np.array([0, 1], dtype=np.uint8), 0).tolist() == [True, False]
