"""TIFF header parsing (stacchip.tiles.tiff) and the layout cache (stacchip.tiles.layouts),
checked against what GDAL itself reads from files rasterio writes."""

import json
import os

import numpy as np
import pytest
import rasterio

from stacchip.errors import LayoutError, LayoutVersionError
from stacchip.tiles.layouts import LayoutStore, open_layout, sidecar_path
from stacchip.tiles.sources import LocalSource
from stacchip.tiles.tiff import LAYOUT_VERSION, Layout, TiffError, parse_layout
from tests.tiff_builders import TRANSFORM, pixels, write


def _layout(path):
    with open(path, "rb") as fh:
        def fetch(offset, length):
            fh.seek(offset)
            return fh.read(length)
        return parse_layout(fetch)


def _gdal_tile_bytes(ds, layout):
    """Tile offsets and byte counts as GDAL reports them (TIFF metadata domain)."""
    offsets, counts = [], []
    for plane in range(layout.planes):
        for tr in range(layout.tiles_down):
            for tc in range(layout.tiles_across):
                bidx = plane + 1 if layout.planar == 2 else 1
                off = ds.get_tag_item(f"BLOCK_OFFSET_{tc}_{tr}", "TIFF", bidx=bidx)
                size = ds.get_tag_item(f"BLOCK_SIZE_{tc}_{tr}", "TIFF", bidx=bidx)
                offsets.append(int(off or 0))
                counts.append(int(size or 0))
    return offsets, counts


CASES = [
    # (dtype, bands, driver, interleave, compress, predictor, options)
    ("uint16", 1, "COG", "pixel", "deflate", 2, {}),
    ("uint8", 3, "GTiff", "pixel", "zstd", 1, {}),
    ("int16", 3, "GTiff", "band", "lzw", 2, {}),
    ("float32", 4, "GTiff", "band", "deflate", 3, {"bigtiff": "YES"}),
    ("uint16", 3, "GTiff", "pixel", "deflate", 2, {"endianness": "BIG"}),
    ("float32", 1, "GTiff", "pixel", "lerc_zstd", 1, {"bigtiff": "YES", "endianness": "BIG"}),
]


@pytest.mark.parametrize("dtype,bands,driver,interleave,compress,predictor,options", CASES)
def test_layout_matches_gdal(tmp_path, dtype, bands, driver, interleave, compress, predictor, options):
    data = pixels(dtype, bands, (600, 700))
    path = write(tmp_path / "a.tif", data, driver=driver, interleave=interleave, compress=compress,
                 predictor=predictor, nodata=0 if dtype != "float32" else -9999.5, **options)
    layout = _layout(path)
    with rasterio.open(path) as ds:
        assert (layout.height, layout.width) == (ds.height, ds.width)
        assert (layout.tile_height, layout.tile_width) == ds.block_shapes[0]
        assert layout.bands == ds.count and layout.dtype == ds.dtypes[0]
        assert layout.planar == (2 if ds.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") == "BAND" and bands > 1 else 1)
        assert layout.nodata == ds.nodata
        assert layout.predictor == predictor
        assert layout.bigtiff == (options.get("bigtiff") == "YES")
        assert layout.little_endian == (options.get("endianness") != "BIG")
        assert layout.epsg == ds.crs.to_epsg() == 32633
        assert layout.geotransform == tuple(ds.transform)[:6]
        assert layout.geo_exact and layout.georeferenced
        offsets, counts = _gdal_tile_bytes(ds, layout)
    assert layout.unsupported is None
    assert layout.offsets.tolist() == offsets and layout.counts.tolist() == counts
    assert len(offsets) == layout.tiles_across * layout.tiles_down * layout.planes == \
        3 * 3 * (bands if layout.planar == 2 else 1)


def test_compression_codes_and_lerc_parameters(tmp_path):
    data = pixels("uint16", 1, (300, 300))
    expect = {"deflate": 8, "zstd": 50000, "lzw": 5, "lerc": 34887, "lerc_deflate": 34887, None: 1}
    for compress, code in expect.items():
        layout = _layout(write(tmp_path / f"{compress}.tif", data, compress=compress))
        assert layout.compression == code, compress
    assert _layout(tmp_path / "lerc_deflate.tif").lerc_params[1] == 1
    assert _layout(tmp_path / "lerc.tif").lerc_params[1] == 0
    jpeg = _layout(write(tmp_path / "j.tif", pixels("uint8", 1, (300, 300)), compress="jpeg"))
    assert jpeg.compression == 7 and jpeg.jpeg_tables and jpeg.jpeg_tables[:2] == b"\xff\xd8"


def test_only_the_first_ifd_is_read(tmp_path):
    """The header is the first IFD and the arrays it points at: an internal mask and
    overviews behind it are never read (here: overwritten with garbage)."""
    data = pixels("uint8", 1, (600, 600))
    path = tmp_path / "m.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
        path, "w", driver="GTiff", width=600, height=600, count=1, dtype="uint8", crs="EPSG:32633",
        transform=TRANSFORM, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
    ) as dst:
        dst.write(data)
        mask = np.full((600, 600), 255, np.uint8)
        mask[:50] = 0
        dst.write_mask(mask)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2])
    whole = _layout(path)
    with rasterio.open(path) as ds:
        offsets, _ = _gdal_tile_bytes(ds, whole)
    assert whole.offsets.tolist() == offsets
    # the IFDs after the first: find them by walking the chain with tifffile, then spoil them
    import tifffile

    with tifffile.TiffFile(path) as tif:
        later = [p.offset for p in tif.pages][1:]
    assert len(later) >= 2  # mask and overview
    raw = bytearray(path.read_bytes())
    for offset in later:
        raw[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    again = _layout(path)
    assert again.offsets.tolist() == whole.offsets.tolist() and again.unsupported is None


def test_what_the_tile_reader_lacks_is_named(tmp_path):
    data = pixels("uint8", 3, (300, 300))
    assert "PACKBITS" in _layout(write(tmp_path / "p.tif", data, compress="packbits")).unsupported
    assert "YCbCr" in _layout(write(tmp_path / "y.tif", data, compress="jpeg", photometric="YCBCR")).unsupported
    striped = tmp_path / "s.tif"
    with rasterio.open(striped, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(data[:1])
    assert "striped" in _layout(striped).unsupported
    one_bit = tmp_path / "b.tif"
    with rasterio.open(one_bit, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8", nbits=1,
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write((data[:1] > 100).astype("uint8"))
    assert "1-bit" in _layout(one_bit).unsupported


def test_not_a_tiff(tmp_path):
    p = tmp_path / "x.tif"
    p.write_bytes(b"PK\x03\x04 not a tiff at all")
    with pytest.raises(TiffError, match="not a TIFF"):
        _layout(p)


def test_georeferencing_other_than_a_plain_epsg_code_is_not_exact(tmp_path):
    data = pixels("uint8", 1, (300, 300))
    custom = "+proj=tmerc +lat_0=0 +lon_0=15.5 +k=0.9996 +x_0=500000 +y_0=0 +ellps=WGS84 +units=m"
    layout = _layout(write(tmp_path / "c.tif", data, crs=custom))
    assert layout.georeferenced and not layout.geo_exact
    bare = tmp_path / "bare.tif"
    with rasterio.open(bare, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8",
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(data)
    layout = _layout(bare)
    assert not layout.georeferenced and not layout.geo_exact and layout.epsg is None


def test_layout_json_round_trip_and_version(tmp_path):
    path = write(tmp_path / "a.tif", pixels("float32", 3, (600, 700)), compress="lerc_deflate",
                 interleave="band", nodata=float("nan"))
    layout = _layout(path).with_identity(os.path.getsize(path), '"etag"', 456, inode=7, ctime=9)
    doc = json.loads(json.dumps(layout.to_json("a.tif")))
    assert doc["version"] == LAYOUT_VERSION and doc["digest"].startswith("sha256:")
    back = Layout.from_json(doc, "a.tif")
    for name in ("width", "height", "tile_width", "bands", "dtype", "planar", "compression",
                 "lerc_params", "geotransform", "epsg", "size", "etag", "mtime", "inode", "ctime"):
        assert getattr(back, name) == getattr(layout, name), name
    assert np.isnan(back.nodata)
    assert back.offsets.tolist() == layout.offsets.tolist() and back.counts.dtype == np.uint64
    # the digest binds the layout to its href
    with pytest.raises(LayoutError, match="digest"):
        Layout.from_json(doc, "b.tif")
    old = dict(doc, version=LAYOUT_VERSION - 1)
    with pytest.raises(LayoutVersionError, match="version"):
        Layout.from_json(old, "a.tif")
    store = LayoutStore()
    assert store.update_from_json({"format": "stacchip-layouts", "version": LAYOUT_VERSION,
                                   "layouts": {"x.tif": old, "a.tif": doc}}) == 1
    assert "x.tif" not in store and "a.tif" in store


def test_cached_layout_is_checked_against_the_file(tmp_path):
    path = tmp_path / "a.tif"
    write(path, pixels("uint16", 1, (600, 700)), blocksize=256)
    store = LayoutStore()
    src = LocalSource(str(path))
    first = open_layout(str(path), src, store)
    assert store.get(str(path)) is first
    assert open_layout(str(path), LocalSource(str(path)), store) is first  # unchanged file: cached
    # Rewritten with another tiling (and size): the cached layout is not trusted.
    write(path, pixels("uint16", 1, (600, 700)), blocksize=512)
    again = open_layout(str(path), LocalSource(str(path)), store)
    assert again is not first and again.tile_width == 512 and store.get(str(path)) is again
    # Same bytes, touched later: modification time differs, read again.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = open_layout(str(path), LocalSource(str(path)), store)
    assert third is not again and third.mtime == st.st_mtime_ns + 10**9


def test_sidecar_save_and_load(tmp_path):
    paths = [write(tmp_path / f"{i}.tif", pixels("uint8", 1, (300, 300), seed=i)) for i in range(3)]
    store = LayoutStore()
    for p in paths:
        open_layout(str(p), LocalSource(str(p)), store)
    index = tmp_path / "index_X.parquet"
    side = sidecar_path(index)
    assert side.endswith("index_X.layouts.json")
    store.save(side)
    loaded = LayoutStore(path=side)
    assert loaded.hrefs() == store.hrefs() == sorted(str(p) for p in paths)
    got = loaded.get(str(paths[1]))
    assert got.offsets.tolist() == store.get(str(paths[1])).offsets.tolist()
    # the loaded layout is used as is for the unchanged file
    assert open_layout(str(paths[1]), LocalSource(str(paths[1])), loaded) is got
    assert LayoutStore(path=tmp_path / "missing.json").hrefs() == []
