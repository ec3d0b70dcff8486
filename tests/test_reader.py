"""reader: GDAL configuration handling."""

import rasterio
from rasterio._env import del_gdal_config
from rasterio.env import get_gdal_config, set_gdal_config

from stacchip.reader import CLOUD_COG_OPTIONS, configure_gdal


def test_configure_gdal_keeps_the_users_gdal_settings(monkeypatch):
    key = "GDAL_HTTP_MAX_RETRY"
    assert CLOUD_COG_OPTIONS[key] != "9"
    monkeypatch.delenv(key, raising=False)
    set_gdal_config(key, "9", normalize=False)
    try:
        configure_gdal()
        assert get_gdal_config(key, normalize=False) == "9"
    finally:
        del_gdal_config(key)
    configure_gdal()  # nobody's setting now: stacchip's applies
    assert get_gdal_config(key, normalize=False) == CLOUD_COG_OPTIONS[key]

    other = "GDAL_DISABLE_READDIR_ON_OPEN"
    monkeypatch.delenv(other, raising=False)
    with rasterio.Env(**{other: "FALSE"}):
        configure_gdal()
        assert get_gdal_config(other, normalize=False) == "FALSE"


def test_configure_gdal_extra_always_applies(monkeypatch):
    monkeypatch.delenv("AWS_REQUEST_PAYER", raising=False)
    set_gdal_config("AWS_REQUEST_PAYER", "other", normalize=False)
    try:
        configure_gdal(AWS_REQUEST_PAYER="requester")
        assert get_gdal_config("AWS_REQUEST_PAYER", normalize=False) == "requester"
    finally:
        del_gdal_config("AWS_REQUEST_PAYER")
