"""TIFF header parsing (stacchip.tiles.tiff) and the layout cache (stacchip.tiles.layouts),
checked against what GDAL itself reads from files rasterio writes."""

import json
import os

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stacchip.errors import LayoutError, LayoutVersionError
from stacchip.tiles.layouts import LayoutStore, open_layout, sidecar_path
from stacchip.tiles.sources import LocalSource
from stacchip.tiles import tiff as tiff_module
from stacchip.tiles.tiff import (
    GEO_KEY_DIRECTORY,
    HEADER_BYTES,
    LAYOUT_VERSION,
    TILE_BYTE_COUNTS,
    TILE_LENGTH,
    TILE_OFFSETS,
    TILE_WIDTH,
    Layout,
    TiffError,
    parse_layout,
)
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


# --- what the header costs -----------------------------------------------------------------


class _Counting:
    """``fetch`` over a local file that counts requests and bytes, and fails any
    read past the file's end (a header read must never ask for one)."""

    def __init__(self, path):
        self.data = path.read_bytes()
        self.calls = []

    def __call__(self, offset, length):
        assert offset >= 0 and length > 0 and offset + length <= len(self.data), (offset, length)
        self.calls.append((offset, length))
        return self.data[offset:offset + length]


def test_a_cog_header_costs_one_request(tmp_path):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, (1100, 1300)), driver="COG", blocksize=256,
                 predictor=2, nodata=0, overviews="AUTO")
    fetch = _Counting(path)
    layout = parse_layout(fetch, size=len(fetch.data))
    assert layout.unsupported is None and len(layout.offsets) == 5 * 6
    assert fetch.calls == [(0, HEADER_BYTES)]
    # given the first bytes (as a source's head() reads them), no request at all
    fetch.calls.clear()
    again = parse_layout(fetch, fetch.data[:HEADER_BYTES], size=len(fetch.data))
    assert fetch.calls == [] and again.offsets.tolist() == layout.offsets.tolist()


def test_a_header_beyond_the_first_chunk_is_fetched_in_few_requests(tmp_path):
    """65536 tiles of 16 px: 512 KB of tile offsets and counts after the first 64 KB."""
    path = write(tmp_path / "big.tif", pixels("uint8", 1, (4096, 4096)), compress=None, blocksize=16)
    fetch = _Counting(path)
    layout = parse_layout(fetch, size=len(fetch.data))
    assert layout.unsupported is None and len(layout.offsets) == 256 * 256
    with rasterio.open(path) as ds:  # (GDAL's word for the last tile)
        assert ds.get_tag_item("BLOCK_OFFSET_255_255", "TIFF", bidx=1) == str(int(layout.offsets[-1]))
    needed = 2 * 4 * 256 * 256  # two LONG arrays
    assert 2 <= len(fetch.calls) <= 4, fetch.calls
    assert sum(n for _, n in fetch.calls) <= HEADER_BYTES + needed + 2 * tiff_module.FETCH_BLOCK


# --- headers that are not what they say ----------------------------------------------------


def _tag(path, code):
    """(entry offset, value offset, type, count, byte order, bigtiff) of tag ``code`` in the first IFD."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tag = tif.pages.first.tags[code]
        return tag.offset, tag.valueoffset, int(tag.dtype), tag.count, tif.tiff.byteorder, tif.tiff.is_bigtiff


def _patch(path, at, fmt, value):
    import struct

    raw = bytearray(path.read_bytes())
    packed = struct.pack(fmt, value)
    raw[at:at + len(packed)] = packed
    path.write_bytes(bytes(raw))


def _patch_inline(path, code, value):
    entry, _, typ, _, bo, big = _tag(path, code)
    _patch(path, entry + (12 if big else 8), bo + {3: "H", 4: "I", 16: "Q"}[typ], value)


def _patch_count(path, code, count):
    entry, _, _, _, bo, big = _tag(path, code)
    _patch(path, entry + 4, bo + ("Q" if big else "I"), count)


def _read_layout_of(path):
    fetch = _Counting(path)
    return parse_layout(fetch, size=len(fetch.data))


@pytest.mark.parametrize("code", [TILE_WIDTH, TILE_LENGTH])
def test_tile_size_zero_is_left_to_gdal(tmp_path, code):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, (300, 300)))
    _patch_inline(path, code, 0)
    layout = _read_layout_of(path)
    assert layout.unsupported is not None and "tiles of" in layout.unsupported


def test_short_geokey_directory_is_left_to_gdal(tmp_path):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, (300, 300)))
    assert _read_layout_of(path).geo_exact
    _, values, _, count, bo, _ = _tag(path, GEO_KEY_DIRECTORY)
    _patch(path, values + 6, bo + "H", 200)  # NumberOfKeys: 200 keys in a directory of a few
    layout = _read_layout_of(path)
    assert layout.georeferenced and not layout.geo_exact and layout.unsupported is None
    path = write(tmp_path / "b.tif", pixels("uint16", 1, (300, 300)))
    _patch_count(path, GEO_KEY_DIRECTORY, 6)  # the tag itself shorter than its header says
    layout = _read_layout_of(path)
    assert layout.georeferenced and not layout.geo_exact


def test_corrupt_bigtiff_counts_never_ask_for_a_huge_read(tmp_path, monkeypatch):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, (600, 700)), bigtiff="YES")
    _patch_count(path, TILE_OFFSETS, 2**40)  # 8 TB of offsets in a small file
    layout = _read_layout_of(path)
    assert layout.unsupported is not None and "offsets" in layout.unsupported
    # a count the file could hold, but more than a header may take
    path = write(tmp_path / "b.tif", pixels("uint16", 1, (1024, 1024)), compress=None, bigtiff="YES")
    size = path.stat().st_size
    _patch_count(path, TILE_BYTE_COUNTS, size // 8 - 64)
    monkeypatch.setattr(tiff_module, "MAX_HEADER_BYTES", 256 * 1024)
    fetch = _Counting(path)
    with pytest.raises(TiffError, match="needs more than"):
        parse_layout(fetch, size=size)
    assert sum(n for _, n in fetch.calls) <= HEADER_BYTES + 256 * 1024


@pytest.mark.parametrize("data", [
    b"II*\x00", b"II*\x00\x08\x00\x00\x00", b"II*\x00\xff\xff\xff\xff" + b"\x00" * 100,
    b"MM\x00*\x00\x00\x00\x08\x00\x00", b"II+\x00\x08\x00\x00\x00" + b"\x00" * 8,
    b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff",
    b"II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 64,
], ids=["magic only", "no IFD", "IFD past the end", "big-endian empty IFD", "BigTIFF short",
        "BigTIFF huge entry count", "65535 entries"])
def test_garbage_headers_are_tiff_errors(tmp_path, data):
    path = tmp_path / "g.tif"
    path.write_bytes(data)
    try:
        layout = _read_layout_of(path)
    except TiffError:
        return
    assert layout.unsupported is not None  # whatever was read, the tile reader does not use it


def test_truncated_cog_is_a_tiff_error_or_left_to_gdal(tmp_path):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, (600, 700)), driver="COG", blocksize=256)
    whole = path.read_bytes()
    for cut in (16, 200, 2000, len(whole) // 2):
        path.write_bytes(whole[:cut])
        try:
            layout = _read_layout_of(path)
        except TiffError:
            continue
        assert layout.unsupported is not None, cut  # tiles beyond the end of the file


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=12),
       big=st.booleans())
def test_fuzzed_headers_give_a_layout_or_a_tiff_error(tmp_path_factory, edits, big):
    """Random bytes in the first KB (header, IFD, tag arrays) of a real GeoTIFF: a layout
    (usable only when its checks hold) or TiffError, reading nothing past the file's end."""
    base = _FUZZ_BASE.get(big)
    if base is None:
        path = write(tmp_path_factory.mktemp("fuzz") / "a.tif", pixels("uint16", 2, (300, 200)), predictor=2,
                     interleave="band", **({"bigtiff": "YES"} if big else {}))
        base = _FUZZ_BASE[big] = path.read_bytes()
    raw = bytearray(base)
    for at, byte in edits:
        raw[at] = byte
    data = bytes(raw)

    def fetch(offset, length):
        assert 0 <= offset and offset + length <= len(data)
        return data[offset:offset + length]

    try:
        layout = parse_layout(fetch, size=len(data))
    except TiffError:
        return
    if layout.unsupported is None:
        assert layout.problems() == []
        assert int((layout.offsets + layout.counts).max()) <= len(data)
        assert layout.tile_nbytes <= tiff_module.MAX_TILE_BYTES


_FUZZ_BASE: dict = {}


def test_chipper_over_hostile_headers_gives_gdals_answer(tmp_path):
    """Through a Chipper: a header the tile reader does not take is GDAL's to read --
    its pixels, or its named error -- never an internal error."""
    import pystac

    from stacchip.chipper import Chipper
    from stacchip.errors import AssetNotRasterError
    from stacchip.indexer import NoStatsChipIndexer

    def chipper(path, reader=None):
        item = pystac.Item.from_dict({
            "type": "Feature", "stac_version": "1.0.0", "id": "h", "geometry": None, "links": [],
            "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": [300, 300],
                           "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
            "assets": {"a": {"href": str(path)}},
        })
        return Chipper(NoStatsChipIndexer(item, chip_size=100), reader=reader)

    zero = write(tmp_path / "zero.tif", pixels("uint16", 1, (300, 300)))
    _patch_inline(zero, TILE_WIDTH, 0)
    with pytest.raises(AssetNotRasterError, match="zero.tif"):
        chipper(zero).chip(1, 1)
    counts = write(tmp_path / "counts.tif", pixels("uint16", 1, (300, 300)), bigtiff="YES")
    _patch_count(counts, TILE_OFFSETS, 2**40)
    keys = write(tmp_path / "keys.tif", pixels("uint16", 1, (300, 300)))
    _patch_count(keys, GEO_KEY_DIRECTORY, 6)
    for path, tiles in ((counts, False), (keys, True)):
        c = chipper(path)
        assert (c.tile_file("a") is not None) == tiles, path
        np.testing.assert_array_equal(c.chip(1, 1)["a"], chipper(path, "gdal").chip(1, 1)["a"])
