"""Chipper over the tile read path: the same chips as the GDAL path, the GDAL
fallback (and its forcing setting), block-order scans decoding each tile once,
layouts kept in a sidecar, and s3:// reads costing only the tiles they need."""

import logging
import os

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine

from stacchip.chipper import Chipper
from stacchip.errors import ConfigError, GridMismatchError
from stacchip.indexer import NoStatsChipIndexer
from stacchip.tiles import LayoutStore, item_layouts, sidecar_path
from stacchip.tiles.reader import shared_cache
from tests.builders import materialize, real_item
from tests.tiff_builders import pixels, write

ASSETS = ["red", "green", "swir16", "coastal", "scl"]


@pytest.fixture
def s2_item(tmp_path):
    """Real Sentinel-2 item scaled by 30 (10 m -> 366 px, 20 m -> 183 px, 60 m -> 61 px)."""
    def px(key, asset, shape):
        rng = np.random.default_rng(sum(key.encode()))
        dtype = "uint8" if key == "scl" else "uint16"
        return rng.integers(1, 250, size=(1, *shape)).astype(dtype)

    return materialize(real_item("sentinel-2"), tmp_path, factor=30, pixels=px)


def _pair(item_dict, chip_size=64, **kw):
    item = pystac.Item.from_dict(item_dict)
    tiles = Chipper(NoStatsChipIndexer(item, chip_size=chip_size), reader="tiles", **kw)
    gdal = Chipper(NoStatsChipIndexer(item, chip_size=chip_size), reader="gdal", **kw)
    return tiles, gdal


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("native", [False, True])
def test_tile_chips_equal_gdal_chips(s2_item, native):
    tiles, gdal = _pair(s2_item, assets=ASSETS, native=native)
    assert all(tiles.tile_file(k) is not None for k in ASSETS)
    ix = tiles.indexer
    positions = [(x, y) for y in range(ix.y_size) for x in range(ix.x_size)]
    got = {(x, y): c for x, y, c in tiles.chips(positions, order="block")}
    assert sorted(got) == sorted(positions)
    for x, y in positions:
        _same(got[(x, y)], gdal.chip(x, y))
    _same(tiles.chip(4, 4), gdal.chip(4, 4))
    assert tiles.get_pixels_for_asset("coastal", 2, 1).shape == gdal.get_pixels_for_asset("coastal", 2, 1).shape
    tiles.close()
    gdal.close()


def test_block_order_scan_decodes_each_tile_once(tmp_path):
    # 512 x 512 at 10 m in 128-px tiles and a 20 m band (256 x 256, 128-px tiles): 16 + 4 tiles.
    fine = write(tmp_path / "f.tif", pixels("uint16", 1, (512, 512)), blocksize=128, predictor=2)
    coarse = write(tmp_path / "c.tif", pixels("uint16", 1, (256, 256), seed=3), blocksize=128,
                   transform=Affine(20, 0, 500000, 0, -20, 4000000))
    item = pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "scan", "geometry": None, "links": [],
        "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": [512, 512],
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {"f": {"href": str(fine)},
                   "c": {"href": str(coarse), "proj:shape": [256, 256],
                         "proj:transform": [20, 0, 500000, 0, -20, 4000000]}},
    })
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=32), threads=2)
    cache = shared_cache()
    cache.clear()
    misses = cache.misses
    positions = [(x, y) for y in range(16) for x in range(16)]
    chips = {(x, y): c for x, y, c in chipper.chips(positions, order="block")}
    assert cache.misses - misses == 16 + 4  # every tile decoded once for 256 chips
    with rasterio.open(fine) as ds:
        whole = ds.read()
    np.testing.assert_array_equal(chips[(5, 9)]["f"], whole[:, 9 * 32:10 * 32, 5 * 32:6 * 32])
    chipper.close()


def test_reader_setting_forces_gdal(s2_item, monkeypatch):
    item = pystac.Item.from_dict(s2_item)
    monkeypatch.setenv("STACCHIP_READER", "gdal")
    forced = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"])
    assert forced.reader == "gdal" and forced.tile_file("red") is None
    want = forced.chip(1, 1)
    assert forced._tiles.open_count() == 0 and forced._datasets.open_count() == 1
    # The argument wins over the environment.
    tiles = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"], reader="tiles")
    _same(tiles.chip(1, 1), want)
    assert tiles._tiles.open_count() == 1 and tiles._datasets.open_count() == 0
    monkeypatch.setenv("STACCHIP_READER", "fast")
    with pytest.raises(ConfigError, match="STACCHIP_READER"):
        Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"])
    with pytest.raises(ConfigError, match="reader"):
        Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"], reader="rio")


def test_fallback_to_gdal_reads_the_same_pixels_and_logs_once(tmp_path, caplog):
    from stacchip import chipper as chipper_module

    data = pixels("uint8", 3, (300, 300))
    files = {
        "ycbcr": write(tmp_path / "y.tif", data, compress="jpeg", photometric="YCBCR"),
        "ycbcr2": write(tmp_path / "y2.tif", data, compress="jpeg", photometric="YCBCR", blocksize=128),
        "packbits": write(tmp_path / "p.tif", data, compress="packbits"),
        "plain": write(tmp_path / "d.tif", data),
    }
    item = pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "fallback", "geometry": None, "links": [],
        "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": [300, 300],
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {k: {"href": str(p)} for k, p in files.items()},
    })
    chipper_module._fallback_logged.clear()
    with caplog.at_level(logging.INFO, logger="stacchip.chipper"):
        chipper = Chipper(NoStatsChipIndexer(item, chip_size=100))
        gdal = Chipper(NoStatsChipIndexer(item, chip_size=100), reader="gdal")
        for x, y in [(0, 0), (2, 1), (1, 2)]:
            _same(chipper.chip(x, y), gdal.chip(x, y))
    assert chipper.tile_file("plain") is not None
    assert chipper.tile_file("ycbcr") is None and chipper.tile_file("packbits") is None
    messages = [r.getMessage() for r in caplog.records if "through GDAL" in r.getMessage()]
    assert len([m for m in messages if "JPEG-YCbCr" in m]) == 1  # two such files, one line
    assert len([m for m in messages if "PACKBITS" in m]) == 1
    assert chipper._datasets.open_count() == 3  # the fallback files, through GDAL
    chipper.close()


def test_tile_path_checks_the_grid_like_gdal(tmp_path, monkeypatch):
    data = pixels("uint16", 1, (300, 300))
    on_grid = tmp_path / "a.tif"  # pixel-is-point georeferencing: GDAL checks it
    with rasterio.open(on_grid, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint16",
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4000000), tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        dst.update_tags(AREA_OR_POINT="Point")
        dst.write(data)
    off_grid = write(tmp_path / "b.tif", data, transform=Affine(10, 0, 500100, 0, -10, 4000000))

    def item(href):
        return pystac.Item.from_dict({
            "type": "Feature", "stac_version": "1.0.0", "id": "g", "geometry": None, "links": [],
            "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": [300, 300],
                           "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
            "assets": {"a": {"href": str(href)}},
        })

    opened = []
    real_open = rasterio.open
    monkeypatch.setattr(rasterio, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    chipper = Chipper(NoStatsChipIndexer(item(on_grid), chip_size=100))
    assert chipper.tile_file("a") is not None and not chipper.tile_file("a").layout.geo_exact
    np.testing.assert_array_equal(chipper.chip(1, 1)["a"], data[:, 100:200, 100:200])
    chipper.chip(2, 2)
    assert len(opened) == 1  # the georeferencing, read once through GDAL
    with pytest.raises(GridMismatchError, match="off the item's grid"):
        Chipper(NoStatsChipIndexer(item(off_grid), chip_size=100)).chip(0, 0)


def test_layout_sidecar_is_used(s2_item, tmp_path, monkeypatch):
    from stacchip.tiles import layouts as layouts_module

    item = pystac.Item.from_dict(s2_item)
    side = sidecar_path(tmp_path / "index_x.parquet")
    item_layouts(item, ["red", "swir16"]).save(side)
    parsed = []
    real_read = layouts_module.read_layout
    monkeypatch.setattr(layouts_module, "read_layout", lambda href, *a: parsed.append(href) or real_read(href, *a))
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16"], layouts=side)
    want = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16"], reader="gdal").chip(2, 2)
    _same(chipper.chip(2, 2), want)
    assert parsed == []  # no header read: the sidecar's layouts match the files
    # A file rewritten since: its layout is read again, never trusted.
    src = item.assets["red"].href
    with rasterio.open(src) as ds:
        data = ds.read()
        profile = ds.profile
    profile.update(blockxsize=128, blockysize=128)
    os.unlink(src)
    with rasterio.open(src, "w", **profile) as dst:
        dst.write(data)
    fresh = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16"], layouts=side)
    _same(fresh.chip(2, 2), want)
    assert parsed == [src] and fresh.tile_file("red").layout.tile_width == 128


def _gets(proxy):
    """Requests the proxy recorded, once it records no more (it records after answering)."""
    import time

    seen, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 0.2:
        n = len(proxy.requests)
        if n != seen:
            seen, stable_since = n, time.monotonic()
        time.sleep(0.02)
    return [r for r in proxy.requests if r[0] in ("GET", "HEAD")]


@pytest.mark.services
def test_s3_chips_cost_only_their_tiles(s2_item, s3_bucket, s3_faults):
    from stacchip import storage

    item = pystac.Item.from_dict(s2_item)
    keys = ["red", "green", "swir16", "coastal"]
    local = Chipper(NoStatsChipIndexer(pystac.Item.from_dict(s2_item), chip_size=64), assets=keys, reader="gdal")
    for key in keys:
        src = item.assets[key].href
        url = f"s3://{s3_bucket}/s2/{os.path.basename(src)}"
        with open(src, "rb") as fh:
            storage.write_bytes(url, fh.read())
        item.assets[key].href = url
    store = LayoutStore()
    remote = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=keys, layouts=store)
    n0 = len(_gets(s3_faults))
    _same(remote.chip(0, 0), local.chip(0, 0))
    assert len(_gets(s3_faults)) - n0 == 4 + 4  # first open: one header read per file, then one tile each
    # Files of 366 / 183 / 61 px in one 256-px tile row/column or so: count the tiles each chip needs.
    for x, y in [(3, 2), (4, 4), (1, 3)]:
        shared_cache().clear()
        need = 0
        for key in keys:
            f = remote.tile_file(key)
            from stacchip.grid import chip_asset_indices
            rows, cols = chip_asset_indices(remote.indexer.affine, remote._tile_transform(key, f), x, y, 64)
            rows = rows[(rows >= 0) & (rows < f.layout.height)]
            cols = cols[(cols >= 0) & (cols < f.layout.width)]
            need += len(np.unique(rows // f.layout.tile_height)) * len(np.unique(cols // f.layout.tile_width))
        before = len(_gets(s3_faults))
        _same(remote.chip(x, y), local.chip(x, y))
        assert len(_gets(s3_faults)) - before <= need
    # A new chipper (another worker) with the layouts known reads no header.
    again = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=keys, layouts=store)
    shared_cache().clear()
    before = len(_gets(s3_faults))
    _same(again.chip(4, 1), local.chip(4, 1))
    assert len(_gets(s3_faults)) - before <= 4 * 2
    assert not [r for r in s3_faults.requests if r[0] == "HEAD"]
    remote.close()
    again.close()


def test_stacchip_index_keeps_the_layouts(s2_item, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from stacchip.index import read_metadata
    from stacchip.tiles import layouts as layouts_module

    item_path = tmp_path / "stac_item.json"
    item_path.write_text(json.dumps(s2_item))
    out = tmp_path / "index_x.parquet"
    proc = subprocess.run([sys.executable, "-m", "stacchip.cli", "index", str(item_path), "--out", str(out),
                           "--chip-size", "64"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = read_metadata(out)["layouts"]
    assert doc["format"] == "stacchip-layouts"
    hrefs = {a["href"] for a in s2_item["assets"].values()}
    assert set(doc["layouts"]) == hrefs
    parsed = []
    real_read = layouts_module.read_layout
    monkeypatch.setattr(layouts_module, "read_layout", lambda href, *a: parsed.append(href) or real_read(href, *a))
    item = pystac.Item.from_dict(s2_item)
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=ASSETS, layouts=str(out))
    gdal = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=ASSETS, reader="gdal")
    _same(chipper.chip(3, 1), gdal.chip(3, 1))
    assert parsed == []  # every header came from the index file


@pytest.mark.parametrize("prefetch", [None, 1000])
def test_read_ahead_bounded_by_tile_bytes(s2_item, monkeypatch, prefetch):
    """With a tiny tile cache budget chips() keeps only two chips in flight and
    still yields every chip, in order, with GDAL's pixels: also when asked to
    read far ahead (memory stays within the budget whatever the depth)."""
    tiles, gdal = _pair(s2_item, assets=["red", "swir16"], threads=2)
    cache = shared_cache()
    monkeypatch.setattr(cache, "budget", 1)
    in_flight = []
    real_submit = tiles._submit

    def submit(x, y):
        in_flight.append((x, y))
        return real_submit(x, y)

    monkeypatch.setattr(tiles, "_submit", submit)
    positions = [(x, y) for y in range(5) for x in range(5)][::-1]
    seen = []
    for x, y, chip in tiles.chips(positions, prefetch=prefetch):
        assert len(in_flight) - len(seen) <= 3  # the chip being yielded, and two read ahead at most
        seen.append((x, y))
        _same(chip, gdal.chip(x, y))
    assert seen == positions
    tiles.close()


def test_chippers_dropped_unclosed_hold_no_descriptors(s2_item):
    """Upstream code makes a Chipper per item and never closes it: once dropped, its
    open files (tile path and GDAL path alike) are closed."""
    import gc

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    item = pystac.Item.from_dict(s2_item)
    for reader in ("tiles", "gdal"):
        warm = Chipper(NoStatsChipIndexer(item, chip_size=64), reader=reader)
        warm.chip(0, 0)
        del warm
        gc.collect()
        before = open_fds()
        for _ in range(30):
            chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), reader=reader)
            chipper.chip(1, 1)
            held = chipper._tiles if reader == "tiles" else chipper._datasets
            assert held.open_count() >= 4  # files were opened (and are not closed yet)
        del chipper, held
        gc.collect()
        assert open_fds() <= before + 2, reader  # 30 chippers x 5 files each would be 150


def test_decode_threads_variable_bounds_a_chippers_pool(monkeypatch):
    from stacchip.errors import ConfigError
    from stacchip.tiles.reader import decode_threads_setting

    monkeypatch.setenv("STACCHIP_DECODE_THREADS", "1")
    assert decode_threads_setting() == 1
    monkeypatch.setenv("STACCHIP_DECODE_THREADS", "lots")
    with pytest.raises(ConfigError, match="STACCHIP_DECODE_THREADS"):
        decode_threads_setting()
    monkeypatch.delenv("STACCHIP_DECODE_THREADS")
    assert decode_threads_setting() == (os.cpu_count() or 1)
