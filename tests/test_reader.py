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


def test_forked_child_threads_share_one_fresh_cache(tmp_path):
    """Right after a fork several lane threads open files at once: every handle
    they open must land in the child's one cache (no thread resets it under another)."""
    import os
    import sys
    import threading

    import numpy as np
    from rasterio.transform import from_origin

    from stacchip.reader import DatasetCache

    paths = []
    for i in range(8):
        path = str(tmp_path / f"f{i}.tif")
        with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                           transform=from_origin(0, 8, 1, 1), crs="EPSG:32633") as ds:
            ds.write(np.zeros((1, 8, 8), np.uint8))
        paths.append(path)
    cache = DatasetCache()
    cache.get(paths[0])  # the parent holds a handle
    failures = 0
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                sys.setswitchinterval(1e-6)  # interleave the threads as much as possible
                barrier = threading.Barrier(len(paths))

                def work(path, barrier=barrier):
                    barrier.wait()
                    cache.get(path)

                threads = [threading.Thread(target=work, args=(p,)) for p in paths]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                code = 0 if cache.open_count() == len(paths) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        failures += os.waitstatus_to_exitcode(status) != 0
    assert failures == 0
    assert cache.open_count() == 1  # the parent's cache is untouched
