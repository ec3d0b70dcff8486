"""The aligned layout without services: tile sizes, the re-tiler on awkward rasters, and a local publish."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine

from stacchip.chipper import Chipper
from stacchip.errors import ConfigError
from stacchip.indexer import NoStatsChipIndexer, Sentinel2Indexer
from stacchip.processors.cog import copy_as_cog, retile_cog
from stacchip.processors.layout import (
    AlignedLayout,
    check_layout,
    multihash_sha256,
    tile_size,
)
from stacchip.processors.publish import Bucket, CopyAsset, Publisher, RenderedAsset
from stacchip.utils import load_item
from tests.builders import materialize, real_item
from tests.processors_support import scl_pixels

UTM = "EPSG:32620"
UTM_10M = Affine(10, 0, 500000, 0, -10, 6000000)


def _gtiff(path: Path, data: np.ndarray, nodata: float | None = None, blocksize: int = 512,
           transform: Affine = UTM_10M, **extra: object) -> Path:
    """A tiled DEFLATE GeoTIFF of (bands, rows, cols) ``data``."""
    bands, rows, cols = data.shape
    profile = dict(driver="GTiff", width=cols, height=rows, count=bands, dtype=data.dtype.name, crs=UTM,
                   transform=transform, tiled=True, blockxsize=blocksize, blockysize=blocksize,
                   compress="DEFLATE", nodata=nodata, **extra)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _same_header(a: Path, b: Path) -> None:
    with rasterio.open(a) as sa, rasterio.open(b) as sb:
        assert (sa.width, sa.height, sa.count, sa.dtypes) == (sb.width, sb.height, sb.count, sb.dtypes)
        assert sa.crs == sb.crs and sa.transform == sb.transform
        assert (sa.nodata == sb.nodata) or (np.isnan(sa.nodata) and np.isnan(sb.nodata))
        assert sa.colorinterp == sb.colorinterp
        assert sa.descriptions == sb.descriptions


# --- tile sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chip, scale, tile",
    [
        (256, 1, 256),      # the finest grid: one tile per chip
        (256, 2, 128),      # Sentinel-2 20 m: one tile per chip
        (256, 6, 48),       # Sentinel-2 60 m: 42.7 px per chip -> the next multiple of 16
        (64, 2, 32),
        (64, 6, 16),        # 10.7 px per chip, never below 16
        (240, 2, 128),      # 120 px per chip is not a multiple of 16 -> 128
        (256, 0.5, 512),    # a band finer than the item's grid (Landsat pan under a 30 m item grid)
        (256, 3, 96),       # 85.3 -> 96
    ],
)
def test_tile_size(chip, scale, tile):
    assert tile_size(chip, scale) == tile


def test_aligned_layout_refuses_what_it_cannot_write():
    with pytest.raises(ConfigError, match="multiple of 16"):
        AlignedLayout(chip_size=200)
    with pytest.raises(ConfigError, match="1..22"):
        AlignedLayout(chip_size=256, level=23)
    with pytest.raises(ConfigError, match="not one of"):
        check_layout("tiled")
    assert check_layout(" Aligned ") == "aligned" and check_layout(None) == "copy"


# --- the re-tiler -----------------------------------------------------------------------------


def test_retile_odd_size_uint16(tmp_path):
    """Edge tiles of a 1001 x 777 raster keep every pixel; the source's overviews are dropped."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 12000, size=(1, 777, 1001), dtype=np.uint16)
    data[0, 700:, :] = 0
    src = _gtiff(tmp_path / "src.tif", data, nodata=0, blocksize=512)
    with rasterio.open(src, "r+") as ds:
        ds.build_overviews([2, 4])
        ds.update_tags(1, STATISTICS_MEAN="1")
        ds.set_band_description(1, "B04")
    out = tmp_path / "out.tif"
    retile_cog(src, out, 256)
    with rasterio.open(out) as ds:
        assert ds.block_shapes == [(256, 256)]
        structure = ds.tags(ns="IMAGE_STRUCTURE")
        assert structure["COMPRESSION"] == "ZSTD" and structure["PREDICTOR"] == "2"
        assert structure.get("LAYOUT") == "COG"
        assert ds.overviews(1) == []
        assert ds.tags(1).get("STATISTICS_MEAN") == "1"
        np.testing.assert_array_equal(ds.read(), data)
    _same_header(src, out)


def test_retile_float32_with_nodata(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(0.1, 0.05, size=(1, 300, 517)).astype(np.float32)
    data[0, :40, :] = np.nan
    data[0, 100:110, 200:260] = -0.0
    src = _gtiff(tmp_path / "nan.tif", data, nodata=float("nan"))
    out = tmp_path / "nan_out.tif"
    retile_cog(src, out, 128, level=3)
    with rasterio.open(out) as ds:
        assert ds.block_shapes == [(128, 128)]
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        got = ds.read()
        assert np.isnan(ds.nodata)
    # bit for bit, NaNs and negative zeros included
    assert got.tobytes() == data.tobytes()
    _same_header(src, out)

    data2 = data.copy()
    data2[np.isnan(data2)] = -9999.0
    src2 = _gtiff(tmp_path / "m.tif", data2, nodata=-9999.0)
    out2 = tmp_path / "m_out.tif"
    retile_cog(src2, out2, 256)
    with rasterio.open(out2) as ds:
        assert ds.nodata == -9999.0
        assert ds.read().tobytes() == data2.tobytes()


def test_retile_naip_four_bands(tmp_path):
    """A 4-band uint8 pixel-interleaved NAIP-like image; overviews only when asked."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(4, 650, 431), dtype=np.uint8)
    src = _gtiff(tmp_path / "naip.tif", data, blocksize=512, interleave="pixel",
                 transform=Affine(0.6, 0, 300000, 0, -0.6, 4700000), photometric="RGB")
    out = tmp_path / "naip_out.tif"
    retile_cog(src, out, 256, overviews=True)
    with rasterio.open(out) as ds:
        assert ds.count == 4
        assert ds.block_shapes == [(256, 256)] * 4
        assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "ZSTD"
        assert ds.overviews(1), "overviews were asked for"
        np.testing.assert_array_equal(ds.read(), data)
    _same_header(src, out)


def test_retile_refuses_block_sizes_gdal_cannot_write(tmp_path):
    src = _gtiff(tmp_path / "s.tif", np.ones((1, 64, 64), dtype=np.uint16))
    with pytest.raises(ConfigError, match="multiple of 16"):
        retile_cog(src, tmp_path / "o.tif", 100)
    assert not (tmp_path / "o.tif").exists()


# --- a local publish of a Sentinel-2 item in both layouts -----------------------------------------


def _sentinel2(directory: Path) -> dict:
    """The real Sentinel-2 item, 10 m bands 549 px (200 m), with its 60 m bands and a metadata file."""
    item = materialize(real_item("sentinel-2"), directory, factor=20, pixels=scl_pixels,
                       keep=lambda k: k == "granule_metadata")
    meta = directory / "metadata.xml"
    meta.write_text("<granule/>")
    item["assets"]["granule_metadata"]["href"] = str(meta)
    return item


def _publish(item_dict: dict, root: Path, layout: AlignedLayout | None) -> pystac.Item:
    item = pystac.Item.from_dict(json.loads(json.dumps(item_dict)), migrate=False)
    plan = {key: CopyAsset([a.href], Path(a.href).name) for key, a in item.assets.items()}
    outcome = Publisher(Bucket(str(root)), "test/0", layout=layout).publish(
        item, "sentinel-2-l2a", plan, lambda it: Sentinel2Indexer(it, chip_size=64)
    )
    assert outcome.status == "done", outcome.note
    return load_item(root / "sentinel-2-l2a" / item.id / "stac_item.json")


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_local_publish_aligned_against_copy(tmp_path):
    src = _sentinel2(tmp_path / "src")
    copied = _publish(src, tmp_path / "copy", None)
    aligned = _publish(src, tmp_path / "aligned", AlignedLayout(chip_size=64))

    expected_tiles = {10: 64, 20: 32, 60: 16}
    for key, asset in aligned.assets.items():
        source = src["assets"][key]
        assert asset.href.startswith(str(tmp_path / "aligned")), asset.href
        # the grid is unchanged
        assert asset.extra_fields.get("proj:shape") == source.get("proj:shape")
        assert asset.extra_fields.get("proj:transform") == source.get("proj:transform")
        # byte for byte in the copy layout, for every asset
        assert _sha(copied.assets[key].href) == _sha(source["href"])
        assert copied.assets[key].extra_fields.get("file:checksum") == source.get("file:checksum")
        if key == "granule_metadata":  # not a GeoTIFF: copied as it is in both layouts
            assert _sha(asset.href) == _sha(source["href"])
            continue
        metres = round(source["proj:transform"][0] / 20)
        with rasterio.open(asset.href) as ds, rasterio.open(source["href"]) as sds:
            assert ds.block_shapes[0] == (expected_tiles[metres],) * 2, key
            assert ds.compression.value == "ZSTD"
            np.testing.assert_array_equal(ds.read(), sds.read())
        assert asset.extra_fields["file:size"] == Path(asset.href).stat().st_size
        assert asset.extra_fields["file:checksum"] == multihash_sha256(asset.href)
        assert asset.extra_fields["file:checksum"] != source.get("file:checksum")

    index_copy = Sentinel2Indexer(copied, chip_size=64).create_full_index()
    index_aligned = Sentinel2Indexer(aligned, chip_size=64).create_full_index()
    assert index_aligned.equals(index_copy)

    keys = [k for k in aligned.assets if k != "granule_metadata"]
    with Chipper(NoStatsChipIndexer(copied, chip_size=64), assets=keys) as a, \
            Chipper(NoStatsChipIndexer(aligned, chip_size=64), assets=keys) as b:
        assert len(a) == len(b) > 30
        for (xa, ya, ca), (xb, yb, cb) in zip(a, b):
            assert (xa, ya) == (xb, yb)
            for key in keys:
                np.testing.assert_array_equal(ca[key], cb[key])


def test_local_publish_aligned_rerun_keeps_files(tmp_path):
    """A re-run of a finished item writes nothing; one whose index is missing keeps the whole files."""
    src = _sentinel2(tmp_path / "src")
    first = _publish(src, tmp_path / "out", AlignedLayout(chip_size=64))
    blue = Path(first.assets["blue"].href)
    before = blue.stat().st_mtime_ns
    (tmp_path / "out" / "index" / "sentinel-2-l2a" / first.id / f"index_{first.id}.parquet").unlink()
    second = _publish(src, tmp_path / "out", AlignedLayout(chip_size=64))
    assert blue.stat().st_mtime_ns == before
    with rasterio.open(blue) as ds:
        assert ds.block_shapes[0] == (64, 64)
    assert second.assets["blue"].href == str(blue)


def test_local_publish_aligned_rendered_naip(tmp_path):
    """A rendered asset (as LINZ, Sentinel-1 and MODIS write them: 512 px DEFLATE COGs with
    overviews) is re-tiled too; a 4-band NAIP image keeps its bands and pixels."""
    src = materialize(real_item("naip"), tmp_path / "src", factor=20)
    item = pystac.Item.from_dict(src, migrate=False)
    (key,) = item.assets
    href = item.assets[key].href
    plan = {key: RenderedAsset(lambda path: copy_as_cog(href, path), "image.tif", href)}
    outcome = Publisher(Bucket(str(tmp_path / "out")), "naip/0", layout=AlignedLayout(chip_size=64)).publish(
        item, "naip", plan, lambda it: NoStatsChipIndexer(it, chip_size=64)
    )
    assert outcome.status == "done", outcome.note
    out = load_item(tmp_path / "out" / "naip" / item.id / "stac_item.json")
    with rasterio.open(out.assets[key].href) as ds, rasterio.open(href) as sds:
        assert ds.count == sds.count == 4
        assert ds.block_shapes == [(64, 64)] * 4
        assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "ZSTD"
        assert ds.overviews(1) == []
        np.testing.assert_array_equal(ds.read(), sds.read())
