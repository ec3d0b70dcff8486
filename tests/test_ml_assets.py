"""stacchip.ml.assets: which assets of an item are its data bands (the default channels)."""

from __future__ import annotations

import warnings

import pystac

from stacchip.ml.assets import data_asset_keys, is_qa_asset
from tests.builders import real_item


def test_default_assets_of_the_real_items_are_their_data_bands():
    def item(name: str) -> pystac.Item:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pystac storage-extension migration notes
            return pystac.Item.from_dict(real_item(name))

    def keys(name: str) -> list[str]:
        return data_asset_keys(item(name))

    s2 = keys("sentinel-2")
    assert set(s2) == {
        "coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "nir09",
        "swir16", "swir22", "aot", "wvp",
    }
    assert keys("landsat") == ["coastal", "blue", "green", "red", "nir08", "swir16", "swir22"]
    assert keys("sentinel-1") == ["vh", "vv"]
    assert keys("naip") == ["asset"]  # no roles at all: kept
    modis = pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "MOD09A1.A2024001.h12v12.061", "geometry": None,
        "properties": {"datetime": "2024-01-01T00:00:00Z"}, "links": [],
        "assets": {
            k: {"href": f"{k}.tif", "type": "image/tiff; application=geotiff", "roles": ["data"]}
            for k in ("sur_refl_b01", "sur_refl_b02", "sur_refl_state_500m", "sur_refl_qc_500m",
                      "sur_refl_szen", "sur_refl_day_of_year")
        },
    })
    assert data_asset_keys(modis) == ["sur_refl_b01", "sur_refl_b02"]
    s2_item = item("sentinel-2")
    assert is_qa_asset("SCL", s2_item.assets["scl"]) and is_qa_asset("cloud", s2_item.assets["cloud"])
    assert not is_qa_asset("red", s2_item.assets["red"])
