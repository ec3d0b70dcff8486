"""stacchip-modis end to end: tile rules, first composite per month, Web Mercator COGs, fractional-second end dates."""

from __future__ import annotations

import json
import uuid

import boto3
import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry import box, mapping
import shapely

from stacchip.index import read_index
from stacchip.processors.modis_processor import BANDS, SIN_GRID_TILES, fill_value, read_tiles
from stacchip.processors.sampling import parse_datetime
from tests.builders import write_cog
from tests.processors_support import bucket_objects, records, run_script

SINUSOIDAL = "+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs"
TILE_SIZE = 1111950.5197665233
PIXEL = TILE_SIZE / 2400
SIZE = 96


def _tile_item(tmp_path, collection, item_id, h, v, start, end, url_of):
    left = -20015109.354 + h * TILE_SIZE
    top = 10007554.677 - v * TILE_SIZE
    transform = Affine(PIXEL, 0, left, 0, -PIXEL, top)
    crs = CRS.from_proj4(SINUSOIDAL)
    folder = tmp_path / item_id
    assets = {}
    for n, key in enumerate(BANDS + ["sur_refl_vzen"]):
        if key == "sur_refl_state_500m":
            data = np.zeros((SIZE, SIZE), dtype="uint16")
            data[: SIZE // 3, : SIZE // 3] = 0b01  # cloudy block
            nodata = None
        elif key == "sur_refl_qc_500m":
            data = np.full((SIZE, SIZE), 1073741824, dtype="uint32")
            nodata = None
        else:
            data = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 4000 + n).astype("int16")
            nodata = -28672
        path = write_cog(folder / f"{item_id}_{key}.tif", data, transform, crs, nodata, blocksize=64)
        assets[key] = {"href": url_of(path), "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"]}
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform
    footprint = shapely.transform(
        box(left, top - SIZE * PIXEL, left + SIZE * PIXEL, top).segmentize(PIXEL * 8),
        lambda x, y: to_lonlat(x, y), interleaved=False,
    )
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection, "links": [],
        "stac_extensions": ["https://stac-extensions.github.io/projection/v1.1.0/schema.json"],
        "geometry": mapping(footprint), "bbox": list(footprint.bounds),
        "properties": {
            "datetime": None, "start_datetime": start, "end_datetime": end,
            "modis:horizontal-tile": h, "modis:vertical-tile": v,
            "proj:wkt2": crs.to_wkt(), "proj:shape": [SIZE, SIZE], "proj:transform": list(transform)[:6],
        },
        "assets": assets,
    }


@pytest.mark.services
def test_modis_first_composite_per_month_as_mercator_cogs(stac_api, s3_env, s3_bucket, tmp_path):
    tag = uuid.uuid4().hex[:6]
    collection = f"modis-{tag}"
    local = str
    items = [
        _tile_item(tmp_path, collection, f"MOD09A1.A2020121.h18v04.{tag}", 18, 4,
                   "2020-04-30T00:00:00Z", "2020-05-07T23:59:59.999999Z", local),
        _tile_item(tmp_path, collection, f"MOD09A1.A2020129.h18v04.{tag}", 18, 4,
                   "2020-05-08T00:00:00Z", "2020-05-15T23:59:59.999999Z", local),
        _tile_item(tmp_path, collection, f"MOD09A1.A2020121.h19v04.{tag}", 19, 4,
                   "2020-04-30T00:00:00Z", "2020-05-07T23:59:59.999999Z", local),
    ]
    stac_api.load_collection(stac_api.make_collection(collection, items))
    stac_api.load_items(items)
    tiles = tmp_path / "tiles.txt"
    tiles.write_text("# v,h\n4,18\n")
    env = {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0", "STACCHIP_BUCKET": s3_bucket, "STACCHIP_STAC_API": stac_api.url,
        "STACCHIP_COLLECTION": collection, "STACCHIP_YEARS": "2020", "STACCHIP_MONTHS_PER_YEAR": "12",
        "STACCHIP_MODIS_TILES": str(tiles), "STACCHIP_CHIP_SIZE": "32",
    }
    proc = run_script("stacchip-modis", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc)
    item_id = items[0]["id"]
    # the composite starting 30 April lies in April and in May: the first one of each month
    assert [r["item_id"] for r in recs] == [item_id, item_id]
    assert sorted(r["status"] for r in recs) == ["done", "skipped-done"]

    client = boto3.client("s3", endpoint_url=s3_env)
    item = json.loads(client.get_object(Bucket=s3_bucket, Key=f"modis/{item_id}/stac_item.json")["Body"].read())
    assert set(item["assets"]) == set(BANDS)
    assert item["properties"]["datetime"].startswith("2020-05-07T23:59:59.999999")
    assert item["properties"]["proj:code"] == "EPSG:3857"
    assert "proj:wkt2" not in item["properties"]
    shape_ = item["properties"]["proj:shape"]
    for key, asset in item["assets"].items():
        path = tmp_path / f"out_{key}.tif"
        path.write_bytes(client.get_object(Bucket=s3_bucket, Key=asset["href"].split("/", 3)[3])["Body"].read())
        with rasterio.open(path) as ds:
            assert ds.crs.to_epsg() == 3857
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert [ds.height, ds.width] == shape_
    table = read_index(f"s3://{s3_bucket}/index/modis/{item_id}/index_{item_id}.parquet")
    assert table.num_rows >= 1
    assert max(table.column("cloud_cover_percentage").to_pylist()) > 0.2  # the cloudy block
    assert min(table.column("cloud_cover_percentage").to_pylist()) == 0.0
    assert all(k.startswith(("modis/", "index/modis/", "_claims/")) for k in bucket_objects(s3_env, s3_bucket))


def test_modis_helpers():
    assert len(SIN_GRID_TILES) == len(set(SIN_GRID_TILES)) == 233
    assert fill_value("uint16", None) == 65535 and fill_value("int16", None) == -32768
    assert fill_value("int16", -28672) == -28672
    assert parse_datetime("2020-05-07T23:59:59.999999Z").microsecond == 999999
    assert parse_datetime("2020-05-07T23:59:59.5Z").microsecond == 500000
    assert parse_datetime("2020-05-07T23:59:59Z").second == 59


def test_modis_tile_file_errors(tmp_path):
    from stacchip.errors import ConfigError

    bad = tmp_path / "t.txt"
    bad.write_text("5;8\n")
    with pytest.raises(ConfigError, match="line 1"):
        read_tiles(str(bad))
    with pytest.raises(ConfigError, match="cannot be read"):
        read_tiles(str(tmp_path / "missing.txt"))
