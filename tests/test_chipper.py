import functools
import http.server
import multiprocessing as mp
import os
import pickle
import threading

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stacchip.chipper import Chipper
from stacchip.errors import AssetNotFoundError, AssetReadError, ChipOutOfRangeError
from stacchip.indexer import ChipIndexer, NoStatsChipIndexer, Sentinel2Indexer
from tests.builders import materialize, real_item, write_cog

FINE = 10  # metres
X0, Y0 = 500000, 4000000


def _item(assets, rows, cols, item_id="synthetic"):
    return pystac.Item.from_dict(
        {
            "type": "Feature", "stac_version": "1.0.0", "id": item_id, "geometry": None, "links": [],
            "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633,
                           "proj:shape": [rows, cols], "proj:transform": [FINE, 0, X0, 0, -FINE, Y0]},
            "assets": assets,
        }
    )


def _reference_chip(data, res, origin, x, y, chip, fill):
    """Nearest-neighbour resample of ``data`` onto the fine grid, pixel by pixel,
    with exact integer arithmetic (coordinates doubled to keep centres integral)."""
    out = np.full((data.shape[0], chip, chip), fill, dtype=data.dtype)
    for i in range(chip):
        r = y * chip + i
        cy2 = 2 * Y0 - (2 * r + 1) * FINE  # doubled centre y
        ar = (2 * origin[1] - cy2) // (2 * res)
        for j in range(chip):
            c = x * chip + j
            cx2 = 2 * X0 + (2 * c + 1) * FINE
            ac = (cx2 - 2 * origin[0]) // (2 * res)
            if 0 <= ar < data.shape[1] and 0 <= ac < data.shape[2]:
                out[:, i, j] = data[:, ar, ac]
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(4, 90),
    cols=st.integers(4, 90),
    chip=st.integers(2, 32),
    res=st.sampled_from([10, 20, 30, 60, 25, 15, 70]),
    dx=st.integers(-30, 30),
    dy=st.integers(-30, 30),
    grow=st.integers(-2, 2),
    seed=st.integers(0, 100),
)
def test_chip_equals_nearest_neighbour_reference(tmp_path_factory, rows, cols, chip, res, dx, dy, grow, seed):
    chip = min(chip, rows, cols)
    tmp = tmp_path_factory.mktemp("nn")
    origin = (X0 + dx, Y0 + dy)
    shape = (max(1, rows * FINE // res + grow), max(1, cols * FINE // res + grow))
    data = np.random.default_rng(seed).integers(1, 60000, size=(2, *shape), dtype=np.uint16)
    path = write_cog(tmp / "a.tif", data, Affine(res, 0, origin[0], 0, -res, origin[1]), "EPSG:32633", nodata=0,
                     blocksize=16)
    fine = np.random.default_rng(seed + 1).integers(1, 60000, size=(1, rows, cols), dtype=np.uint16)
    fine_path = write_cog(tmp / "f.tif", fine, Affine(FINE, 0, X0, 0, -FINE, Y0), "EPSG:32633", blocksize=16)
    # asset "a" states its own grid (as Earth Search items do per band): a file on
    # another grid than the item's must say so, or it is refused (GridMismatchError)
    a_fields = {"proj:shape": list(shape), "proj:transform": [res, 0, origin[0], 0, -res, origin[1]]}
    item = _item({"a": {"href": str(path), **a_fields}, "f": {"href": str(fine_path)}}, rows, cols)
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=chip))
    ix = chipper.indexer
    for x, y in {(0, 0), (ix.x_size - 1, ix.y_size - 1), (ix.x_size // 2, ix.y_size // 2)}:
        got = chipper.chip(x, y)
        assert got["a"].shape == (2, chip, chip)
        np.testing.assert_array_equal(got["a"], _reference_chip(data, res, origin, x, y, chip, 0))
        np.testing.assert_array_equal(got["f"], fine[:, y * chip:(y + 1) * chip, x * chip:(x + 1) * chip])
    chipper.close()


@pytest.fixture
def s2_item(tmp_path):
    """Real Sentinel-2 item scaled by 30: 10 m -> 366 px, 20 m -> 183 px, 60 m -> 61 px."""
    def pixels(key, asset, shape):
        rng = np.random.default_rng(sum(key.encode()))
        if key == "scl":
            scl = np.full(shape, 4, dtype=np.uint8)
            scl[:40, :40] = 0  # nodata in the top-left chip area
            return scl[None]
        bands = len(asset.get("eo:bands") or [None])
        dtype = (asset.get("raster:bands") or [{}])[0].get("data_type", "uint8")
        return rng.integers(1, 250, size=(bands, *shape)).astype(dtype)

    return materialize(real_item("sentinel-2"), tmp_path, factor=30, pixels=pixels)


def test_sentinel2_60m_bands_align(s2_item):
    item = pystac.Item.from_dict(s2_item)
    indexer = NoStatsChipIndexer(item, chip_size=64)
    chipper = Chipper(indexer, assets=["coastal", "swir16", "red"])
    with rasterio.open(s2_item["assets"]["coastal"]["href"]) as src:
        coastal = src.read()
        t = src.transform
    for x, y in [(0, 0), (1, 2), (4, 4)]:
        chip = chipper.chip(x, y)
        # 64 px at 300 m over 1800 m pixels: 10.67 coarse pixels per chip, not an integer.
        # Same origin, so coarse index = floor((fine index + 0.5) * 300 / 1800).
        r = (np.arange(y * 64, y * 64 + 64) * 2 + 1) * 300 // 3600
        c = (np.arange(x * 64, x * 64 + 64) * 2 + 1) * 300 // 3600
        assert t.a == 1800
        ref = coastal[:, r][:, :, c]
        np.testing.assert_array_equal(chip["coastal"], ref)
        assert chip["red"].shape == chip["swir16"].shape == chip["coastal"].shape == (1, 64, 64)


def test_default_assets_are_data_rasters(s2_item):
    item = pystac.Item.from_dict(real_item("sentinel-2"))
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=256))
    keys = chipper.asset_keys
    assert "red" in keys and "scl" in keys and "coastal" in keys
    for skipped in ("thumbnail", "preview", "granule_metadata", "tileinfo_metadata", "product_metadata"):
        assert skipped not in keys
    chipper = Chipper(NoStatsChipIndexer(item), asset_blacklist=["scl", "visual"])
    assert "scl" not in chipper.asset_keys and "visual" not in chipper.asset_keys


def test_default_assets_skip_hdf_containers():
    """Planetary Computer MODIS items carry the source HDF4 file as a data asset."""
    item = pystac.Item.from_dict(real_item("sentinel-2"))
    item.add_asset("hdf", pystac.Asset("https://example.invalid/MOD09A1.hdf", media_type="application/x-hdf",
                                       roles=["data"]))
    item.add_asset("nc", pystac.Asset("https://example.invalid/x.nc", media_type="application/netcdf",
                                      roles=["data"]))
    keys = Chipper(NoStatsChipIndexer(item)).asset_keys
    assert "hdf" not in keys and "nc" not in keys and "red" in keys


def test_native_resolution_option(s2_item):
    item = pystac.Item.from_dict(s2_item)
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16", "coastal"], native=True)
    chip = chipper.chip(1, 1)
    assert chip["red"].shape == (1, 64, 64)
    assert chip["swir16"].shape == (1, 32, 32)
    assert chip["coastal"].shape[1] in (11, 12)  # 64 * 300 / 1800 = 10.67 -> 11 or 12 pixels
    full = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["swir16"]).chip(1, 1)["swir16"]
    np.testing.assert_array_equal(full[:, ::2, ::2], chip["swir16"])


def test_len_iter_getitem_cover_kept_chips(s2_item):
    item = pystac.Item.from_dict(s2_item)
    indexer = Sentinel2Indexer(item, chip_size=64, chip_max_nodata=0.0)
    table = indexer.create_full_index()
    chipper = Chipper(indexer, assets=["red"])
    assert len(chipper) == table.num_rows == indexer.size - 4  # SCL nodata covers 4 chips' corners
    kept = list(zip(table.column("chip_index_x").to_pylist(), table.column("chip_index_y").to_pylist()))
    seen = [(x, y) for x, y, _ in chipper]
    assert seen == kept
    x, y, chip = chipper[-1]
    assert (x, y) == kept[-1]
    np.testing.assert_array_equal(chip["red"], chipper.chip(x, y)["red"])
    with pytest.raises(IndexError):
        chipper[len(chipper)]
    # Without statistics every chip is served (upstream's load_indexer_* returns a ChipIndexer).
    assert len(Chipper(ChipIndexer(item, chip_size=64))) == indexer.size


def test_datasets_opened_once(s2_item, monkeypatch):
    item = pystac.Item.from_dict(s2_item)
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "green", "coastal"], reader="gdal")
    opened = []
    real_open = rasterio.open
    monkeypatch.setattr(rasterio, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    for x in range(5):
        chipper.chip(x, 0)
    assert len(opened) == 3


def test_tile_reader_opens_each_file_once_without_gdal(s2_item, monkeypatch):
    from stacchip.tiles import LayoutStore
    from stacchip.tiles import layouts as layouts_module

    item = pystac.Item.from_dict(s2_item)
    store = LayoutStore()
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "green", "coastal"], layouts=store)
    opened, parsed = [], []
    real_open, real_read = rasterio.open, layouts_module.read_layout
    monkeypatch.setattr(rasterio, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    monkeypatch.setattr(layouts_module, "read_layout", lambda href, *a: parsed.append(href) or real_read(href, *a))
    for x in range(5):
        chipper.chip(x, 0)
    assert opened == []  # georeferencing checked from the cached header, not by opening with GDAL
    assert len(parsed) == 3 and chipper._tiles.open_count() == 3 and len(store) == 3


def _child_read(chipper, x, y, queue):
    try:
        before = chipper._datasets.open_count()
        chip = chipper.chip(x, y)
        queue.put((before, {k: v.tolist() for k, v in chip.items()}))
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put(("error", repr(exc)))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_fork_and_spawn_workers_open_their_own(s2_item, method):
    item = pystac.Item.from_dict(s2_item)
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16"], reader="gdal")
    expected = chipper.chip(2, 3)  # parent opens handles first
    assert chipper._datasets.open_count() == 2
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_read, args=(chipper, 2, 3, queue))
    proc.start()
    before, chip = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert before == 0  # the child never sees the parent's handles
    for key in expected:
        np.testing.assert_array_equal(np.array(chip[key]), expected[key])
    # Pickling drops handles too.
    clone = pickle.loads(pickle.dumps(chipper))
    assert clone._datasets.open_count() == 0


def _child_tile_read(chipper, x, y, queue):
    try:
        before = chipper._tiles.open_count()
        chip = chipper.chip(x, y)
        queue.put((before, chipper._tiles.open_count(), {k: v.tolist() for k, v in chip.items()}))
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put(("error", repr(exc), None))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_tile_reader_in_fork_and_spawn_workers(s2_item, method):
    item = pystac.Item.from_dict(s2_item)
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16"], threads=2)
    expected = chipper.chip(2, 3)
    list(chipper.chips([(0, 0), (1, 0), (2, 0)]))  # tiles in flight / cached in the parent
    assert chipper._tiles.open_count() == 2
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_tile_read, args=(chipper, 2, 3, queue))
    proc.start()
    before, after, chip = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert (before, after) == (0, 2)  # the child opens its own files
    for key in expected:
        np.testing.assert_array_equal(np.array(chip[key]), expected[key])
    chipper.close()


def test_mountpath_and_file_urls(s2_item, tmp_path):
    item = pystac.Item.from_dict(s2_item)
    red = item.assets["red"].href
    want = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"]).chip(1, 1)["red"]
    item.assets["red"].href = "file://" + red
    np.testing.assert_array_equal(Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"]).chip(1, 1)["red"], want)
    # Upstream mountpath: the URL path is re-rooted under the mount.
    item.assets["red"].href = "s3://some-bucket/" + os.path.basename(red)
    mounted = Chipper(NoStatsChipIndexer(item, chip_size=64), mountpath=os.path.dirname(red), assets=["red"])
    np.testing.assert_array_equal(mounted.chip(1, 1)["red"], want)


def test_errors_are_named(s2_item):
    item = pystac.Item.from_dict(s2_item)
    with pytest.raises(AssetNotFoundError, match="S2A_T20HNJ.*'nope'"):
        Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["nope"])
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"])
    with pytest.raises(ChipOutOfRangeError, match="\\(5, 0\\)"):
        chipper.chip(5, 0)
    with pytest.raises(ChipOutOfRangeError):
        chipper.chip(0, -1)
    item.assets["red"].href = "/does/not/exist.tif"
    with pytest.raises(AssetReadError, match="'red'.*/does/not/exist.tif"):
        Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"]).chip(0, 0)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (what GDAL's /vsicurl/ needs)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        rng = self.headers.get("Range")
        f = open(path, "rb")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s)
            end = min(int(end_s) if end_s else size - 1, size - 1)
            f.seek(start)
            self._remaining = end - start + 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self._remaining = size
            self.send_response(200)
        self.send_header("Content-Length", str(self._remaining))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return f

    def copyfile(self, source, outputfile):
        outputfile.write(source.read(self._remaining))


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_https_style_hrefs_over_loopback(s2_item, http_root):
    root, url = http_root
    item = pystac.Item.from_dict(s2_item)
    want = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "coastal"]).chip(2, 1)
    local = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"], threads=1)
    plain_red = {(x, y): local.chip(x, y)["red"] for y in range(2) for x in range(5)}
    for key in ("red", "coastal"):
        src = item.assets[key].href
        os.link(src, root / os.path.basename(src))
        item.assets[key].href = f"{url}/{os.path.basename(src)}"
    got = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "coastal"]).chip(2, 1)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    # A single remote asset gets several GDAL lanes: read-ahead overlaps its requests, same pixels.
    single = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"], reader="gdal")
    assert single._lanes is not None and single._lanes.spread > 1
    positions = [(x, y) for y in range(2) for x in range(5)]
    for x, y, chip in single.chips(positions):
        np.testing.assert_array_equal(chip["red"], plain_red[(x, y)])
    assert len(single._lanes._lanes_of[single.path("red")]) == single._lanes.spread
    single.close()
    tiles = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"])  # the tile path: same pixels
    for x, y, chip in tiles.chips(positions):
        np.testing.assert_array_equal(chip["red"], plain_red[(x, y)])
    assert tiles.tile_file("red") is not None and tiles.tile_file("red").source.remote
    tiles.close()
    item.assets["red"].href = f"{url}/missing.tif"
    with pytest.raises(AssetReadError, match="missing.tif"):
        Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red"]).chip(0, 0)


@pytest.mark.services
def test_s3_hrefs(s2_item, s3_bucket):
    from stacchip import storage

    item = pystac.Item.from_dict(s2_item)
    want = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16", "coastal"]).chip(3, 2)
    for key in ("red", "swir16", "coastal"):
        src = item.assets[key].href
        url = f"s3://{s3_bucket}/sentinel-2-l2a/{item.id}/{os.path.basename(src)}"
        storage.write_bytes(url, open(src, "rb").read())
        item.assets[key].href = url
    remote = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16", "coastal"])
    assert remote.threads > 1  # remote hrefs get parallel lanes by default
    got = remote.chip(3, 2)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    plain = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=["red", "swir16", "coastal"], threads=1)
    for x, y, chip in remote.chips([(0, 0), (3, 2), (4, 1)]):
        for key, value in plain.chip(x, y).items():
            np.testing.assert_array_equal(chip[key], value)
    remote.close()


def test_fast_paths_return_the_plain_pixels(s2_item):
    """Batch reads, lane threads and the plain single-thread path agree exactly."""
    item = pystac.Item.from_dict(s2_item)
    assets = ["red", "swir16", "coastal", "scl"]
    plain = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=assets, threads=1)
    threaded = Chipper(NoStatsChipIndexer(item, chip_size=64), assets=assets, threads=4)
    positions = [(4, 4), (0, 0), (2, 3), (2, 3), (1, 0), (3, 1)]
    batch = list(threaded.chips(positions, prefetch=3))
    assert [(x, y) for x, y, _ in batch] == positions
    for (x, y), (_, _, chip) in zip(positions, batch):
        want = plain.chip(x, y)
        got = threaded.chip(x, y)
        for key in assets:
            np.testing.assert_array_equal(chip[key], want[key])
            np.testing.assert_array_equal(got[key], want[key])
    threaded.close()
    plain.close()


def test_block_order_groups_chips_by_block(tmp_path):
    data = np.arange(256 * 256, dtype=np.uint16).reshape(1, 256, 256)
    path = write_cog(tmp_path / "a.tif", data, Affine(FINE, 0, X0, 0, -FINE, Y0), "EPSG:32633", blocksize=64)
    chipper = Chipper(NoStatsChipIndexer(_item({"a": {"href": str(path)}}, 256, 256), chip_size=32), threads=2)
    positions = [(x, y) for y in range(8) for x in range(8)]
    ordered = chipper.block_order(positions)
    assert sorted(ordered) == sorted(positions)
    # 64-px blocks hold 2 x 2 chips of 32 px: each group of four shares a block.
    for i in range(0, 64, 4):
        assert len({(x // 2, y // 2) for x, y in ordered[i:i + 4]}) == 1
    got = {(x, y): chip["a"] for x, y, chip in chipper.chips(positions, order="block")}
    for x, y in positions:
        np.testing.assert_array_equal(got[(x, y)], data[:, y * 32:(y + 1) * 32, x * 32:(x + 1) * 32])
    with pytest.raises(ValueError, match="order"):
        list(chipper.chips(positions, order="random"))
    chipper.close()


def test_a_chipper_reads_from_a_chip_grid_as_from_an_indexer(s2_item):
    from stacchip.grid import ChipGrid

    item = pystac.Item.from_dict(s2_item)
    indexer = Sentinel2Indexer(item, chip_size=64, chip_max_nodata=0.0)
    grid = ChipGrid.of(item, 64)
    assets = ["red", "swir16", "coastal"]  # 10, 20 and 60 m
    by_grid = Chipper(grid, assets=assets)
    by_indexer = Chipper(indexer, assets=assets)
    assert by_indexer.indexer is indexer and by_indexer.chip_grid.grid == indexer.grid
    assert by_grid.chip_grid is grid and by_grid.indexer is grid
    for x, y in [(0, 0), (2, 3), (grid.x_size - 1, grid.y_size - 1)]:
        a, b = by_grid.chip(x, y), by_indexer.chip(x, y)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert len(by_grid) == grid.size == indexer.size  # a grid keeps every chip
    assert len(by_indexer) == indexer.size - 4  # the indexer's nodata filter keeps fewer
    with pytest.raises(ChipOutOfRangeError):
        by_grid.chip(grid.x_size, 0)
    by_grid.close()
    by_indexer.close()
