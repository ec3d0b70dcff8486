"""reader: GDAL configuration handling."""

import rasterio
from rasterio._env import del_gdal_config
from rasterio.env import get_gdal_config, set_gdal_config

from stacchip.reader import CLOUD_COG_OPTIONS, configure_gdal


def test_configure_gdal_keeps_the_users_gdal_settings(monkeypatch):
    key = "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"
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


def test_gdal_retries_follow_the_one_retry_policy(monkeypatch):
    from stacchip import storage
    from stacchip.reader import gdal_options

    monkeypatch.delenv("GDAL_HTTP_MAX_RETRY", raising=False)
    monkeypatch.setenv("STACCHIP_RETRIES", "3")
    storage.reset()
    assert gdal_options()["GDAL_HTTP_MAX_RETRY"] == "2"
    configure_gdal()
    assert get_gdal_config("GDAL_HTTP_MAX_RETRY", normalize=False) == "2"


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
                start = threading.Barrier(len(paths))
                opened = threading.Barrier(len(paths) + 1)
                release = threading.Event()

                def work(path, start=start, opened=opened, release=release):
                    start.wait()
                    cache.get(path)
                    opened.wait()
                    release.wait()  # stay alive while the count is taken

                threads = [threading.Thread(target=work, args=(p,)) for p in paths]
                for t in threads:
                    t.start()
                opened.wait()
                count = cache.open_count()
                release.set()
                for t in threads:
                    t.join()
                code = 0 if count == len(paths) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        failures += os.waitstatus_to_exitcode(status) != 0
    assert failures == 0
    assert cache.open_count() == 1  # the parent's cache is untouched


def test_handles_of_ended_threads_are_closed(tmp_path):
    import threading

    import numpy as np
    from rasterio.transform import from_origin

    from stacchip.reader import DatasetCache

    path = str(tmp_path / "a.tif")
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       transform=from_origin(0, 8, 1, 1), crs="EPSG:32633") as ds:
        ds.write(np.zeros((1, 8, 8), np.uint8))
    cache = DatasetCache()
    opened = []
    for _ in range(5):  # e.g. a fresh thread pool per epoch
        t = threading.Thread(target=lambda: opened.append(cache.get(path)))
        t.start()
        t.join()
    assert len(opened) == 5 and len({id(ds) for ds in opened}) == 5  # one handle per thread
    assert cache.open_count() == 0  # ended threads keep nothing open
    assert all(ds.closed for ds in opened)
    mine = cache.get(path)
    assert cache.open_count() == 1 and not mine.closed
    cache.close()
    assert mine.closed
