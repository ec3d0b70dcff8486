"""The tile read path returns exactly the pixels of the GDAL path
(stacchip.reader.read_indexed on a rasterio dataset), over a matrix of files
rasterio writes: dtypes, band counts, interleaves, codecs and predictors, tile
sizes, BigTIFF, byte orders, sparse tiles, masks, nodata, partial edge tiles and
several resolution ratios."""

import itertools

import numpy as np
import pytest
import rasterio

from stacchip.reader import read_indexed
from stacchip.tiles.layouts import LayoutStore
from stacchip.tiles.reader import TileCache, TileEngine, TileFile
from tests.tiff_builders import TRANSFORM, pixels, write

SHAPE = (600, 700)  # rows, cols: partial edge tiles for every tile size below 600


def _nn(start, count, ratio, offset=0.0):
    """Asset indices of fine pixel centres ``start..start+count`` at ``ratio`` asset px per fine px."""
    return np.floor((np.arange(start, start + count) + 0.5) * ratio + offset + 1e-9).astype(np.int64)


def patterns(shape):
    rows, cols = shape
    return {
        "window across tiles": (np.arange(100, 356), np.arange(200, 456)),
        "20 m onto 10 m": (_nn(300, 256, 0.5), _nn(512, 256, 0.5)),
        "20 m onto 10 m, odd start": (_nn(301, 256, 0.5), _nn(513, 255, 0.5)),
        "30 m onto 10 m": (_nn(3, 252, 1 / 3), _nn(900, 255, 1 / 3)),
        "60 m onto 10 m": (_nn(0, 256, 1 / 6) + 10, _nn(1000, 256, 1 / 6)),
        "ratio 1.7 (coarser fine grid)": (_nn(0, 128, 1.7), _nn(50, 128, 1.7)),
        "past the bottom-right edge": (np.arange(rows - 100, rows + 60), np.arange(cols - 30, cols + 90)),
        "before the top-left edge": (np.arange(-40, 60), np.arange(-7, 250)),
        "wholly outside": (np.arange(rows + 5, rows + 20), np.arange(0, 10)),
        "native (unique) indices": (np.unique(_nn(64, 200, 0.5)), np.unique(_nn(100, 200, 0.5))),
    }


def assert_same_as_gdal(path, fill=0, shape=SHAPE, engine=None):
    f = TileFile(str(path), store=LayoutStore())
    assert f.layout.unsupported is None, f.layout.unsupported
    with rasterio.open(path) as ds:
        for name, (rows, cols) in patterns(shape).items():
            want = read_indexed(ds, rows, cols, fill=fill)
            got = f.read(rows, cols, fill, engine).result()
            assert got.dtype == want.dtype, name
            assert got.shape == want.shape == (ds.count, len(rows), len(cols)), name
            np.testing.assert_array_equal(got, want, err_msg=name)
    f.close()
    return f.layout


CODECS = [("deflate", 1), ("deflate", "pred"), ("zstd", "pred"), ("lzw", 1), ("lzw", "pred"),
          ("lerc", 1), (None, 1)]
MATRIX = list(itertools.product(["uint8", "uint16", "int16", "float32"], [1, 3, 4], ["pixel", "band"], CODECS))


@pytest.mark.parametrize("dtype,bands,interleave,codec", MATRIX,
                         ids=[f"{d}-{b}b-{i}-{c[0]}-{c[1]}" for d, b, i, c in MATRIX])
def test_matrix_equals_gdal(tmp_path, dtype, bands, interleave, codec):
    compress, predictor = codec
    if predictor == "pred":
        predictor = 3 if dtype == "float32" else 2
    data = pixels(dtype, bands, SHAPE, seed=bands)
    path = write(tmp_path / "a.tif", data, compress=compress, predictor=predictor, interleave=interleave)
    layout = assert_same_as_gdal(path, fill=3)
    assert layout.planar == (2 if interleave == "band" else 1)
    assert layout.predictor == predictor


@pytest.mark.parametrize("blocksize", [256, 512, 1024])
def test_tile_sizes(tmp_path, blocksize):
    shape = (1100, 1300) if blocksize == 1024 else SHAPE
    path = write(tmp_path / "a.tif", pixels("uint16", 1, shape), driver="COG", blocksize=blocksize,
                 predictor=2, nodata=0)
    layout = assert_same_as_gdal(path, shape=shape)
    assert layout.tile_width == blocksize


@pytest.mark.parametrize("options", [
    {"bigtiff": "YES"},
    {"endianness": "BIG"},
    {"bigtiff": "YES", "endianness": "BIG"},
], ids=["bigtiff", "big-endian", "bigtiff-big-endian"])
@pytest.mark.parametrize("dtype,predictor", [("uint16", 2), ("float32", 3), ("int16", 1)])
def test_bigtiff_and_byte_order(tmp_path, options, dtype, predictor):
    path = write(tmp_path / "a.tif", pixels(dtype, 3, SHAPE), predictor=predictor, interleave="band", **options)
    layout = assert_same_as_gdal(path)
    assert layout.bigtiff == ("bigtiff" in options)
    assert layout.little_endian == ("endianness" not in options)


@pytest.mark.parametrize("case", [
    {"bands": 1, "compress": "jpeg", "options": {}},
    {"bands": 3, "compress": "jpeg", "options": {"photometric": "RGB"}},
    {"bands": 3, "compress": "jpeg", "options": {"photometric": "RGB", "interleave": "band"}},
    {"bands": 3, "compress": "webp", "options": {}},
    {"bands": 4, "compress": "webp", "options": {}},
    {"bands": 3, "compress": "webp", "options": {"webp_lossless": True}},
    {"bands": 1, "compress": "lerc_deflate", "options": {"max_z_error": 0.5}},
    {"bands": 3, "compress": "lerc_zstd", "options": {}},
], ids=["jpeg-1b", "jpeg-rgb", "jpeg-rgb-band", "webp-3b", "webp-4b", "webp-lossless", "lerc-deflate-lossy",
        "lerc-zstd"])
def test_lossy_and_image_codecs(tmp_path, case):
    options = dict(case["options"])
    interleave = options.pop("interleave", "pixel")
    data = pixels("uint8", case["bands"], SHAPE)
    path = write(tmp_path / "a.tif", data, compress=case["compress"], interleave=interleave, **options)
    assert_same_as_gdal(path)


@pytest.mark.parametrize("nodata", [None, 7])
@pytest.mark.parametrize("interleave", ["pixel", "band"])
def test_sparse_tiles(tmp_path, nodata, interleave):
    """Tiles never written have no bytes (offset and count 0): nodata, else 0, as GDAL gives."""
    path = tmp_path / "s.tif"
    data = pixels("uint16", 2, SHAPE)
    profile = {"driver": "GTiff", "width": SHAPE[1], "height": SHAPE[0], "count": 2, "dtype": "uint16",
               "crs": "EPSG:32633", "transform": TRANSFORM, "tiled": True, "blockxsize": 256, "blockysize": 256,
               "compress": "deflate", "interleave": interleave, "sparse_ok": True}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        window = rasterio.windows.Window(256, 256, 256, 256)  # one tile only
        dst.write(data[:, 256:512, 256:512], window=window)
    layout = assert_same_as_gdal(path, fill=9)
    assert int((layout.counts == 0).sum()) == len(layout.counts) - layout.planes  # all but one tile sparse
    f = TileFile(str(path), store=LayoutStore())
    got = f.read(np.arange(0, 10), np.arange(0, 10), 9).result()
    assert (got == (nodata or 0)).all()


def test_internal_mask_and_nodata(tmp_path):
    path = tmp_path / "m.tif"
    data = pixels("uint8", 3, SHAPE)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
        path, "w", driver="GTiff", width=SHAPE[1], height=SHAPE[0], count=3, dtype="uint8", crs="EPSG:32633",
        transform=TRANSFORM, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
    ) as dst:
        dst.write(data)
        mask = np.full(SHAPE, 255, np.uint8)
        mask[:, :300] = 0
        dst.write_mask(mask)
    assert_same_as_gdal(path, fill=0)  # (the mask is GDAL's business: the image's pixels are the same)
    nd = write(tmp_path / "n.tif", pixels("int16", 1, SHAPE), nodata=-120, predictor=2)
    assert assert_same_as_gdal(nd, fill=-120).nodata == -120


def test_each_tile_decoded_once_and_cache_bounded(tmp_path):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE), predictor=2)
    tile_bytes = 256 * 256 * 2
    cache = TileCache(budget=4 * tile_bytes)
    eng = TileEngine(2, 1, cache)
    f = TileFile(str(path), store=LayoutStore())
    rows, cols = np.arange(0, 256), np.arange(0, 512)  # tiles (0,0) and (0,1)
    first = f.read(rows, cols, 0, eng).result()
    assert (cache.misses, cache.hits) == (2, 0)
    again = f.read(rows, cols, 0, eng).result()
    assert (cache.misses, cache.hits) == (2, 2)
    np.testing.assert_array_equal(first, again)
    # reading every tile (3 x 3) keeps at most the budget
    f.read(np.arange(600), np.arange(700), 0, eng).result()
    assert cache.nbytes <= cache.budget and len(cache) <= 4
    assert cache.misses == 2 + 7  # the two cached ones were hits
    eng.shutdown()


def test_inline_and_pooled_decoding_agree(tmp_path):
    path = write(tmp_path / "a.tif", pixels("float32", 4, SHAPE), predictor=3, interleave="band")
    inline = TileEngine(1, 1, TileCache(0))
    pooled = TileEngine(2, 1, TileCache(2**26))
    f = TileFile(str(path), store=LayoutStore())
    for rows, cols in patterns(SHAPE).values():
        np.testing.assert_array_equal(f.read(rows, cols, 0, inline).result(), f.read(rows, cols, 0, pooled).result())
    pooled.shutdown()


@pytest.mark.parametrize(("dtype", "bands", "interleave", "nodata"), [
    ("float32", 1, "pixel", float("nan")),
    ("float32", 3, "pixel", float("nan")),  # per-band masks: the blob holds bands one after another
    ("float32", 3, "band", float("nan")),
    ("float32", 1, "pixel", -9999.0),
    ("uint16", 3, "pixel", 7),
])
@pytest.mark.parametrize("compress", ["lerc", "lerc_zstd"])
def test_lerc_with_nodata_regions(tmp_path, dtype, bands, interleave, nodata, compress):
    """LERC blobs carry a validity mask for nodata pixels: masked float pixels are NaN, as libtiff gives them."""
    data = pixels(dtype, bands, SHAPE)
    data[:, 100:300, 50:400] = nodata
    data[0, 400:450, 0:100] = nodata  # band 1 only: the bands' masks differ
    path = write(tmp_path / "l.tif", data, compress=compress, nodata=nodata, interleave=interleave)
    assert_same_as_gdal(path, fill=0)
    if np.isnan(nodata):
        f = TileFile(str(path), store=LayoutStore())
        assert np.isnan(f.read(np.arange(150, 160), np.arange(60, 70), 0).result()).all()
