"""stacchip-sentinel-1 end to end: spatial filter, best-covering scene, COG outputs, nodata index."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from shapely import affinity
from shapely.geometry import box, mapping, shape

from stacchip.index import read_index
from stacchip.processors.sentinel_1_processor import coverage
from tests.builders import materialize, real_item
from tests.processors_support import bucket_objects, file_server, records, run_script, variant, write_samples

NODATA = -32768.0


def _pixels(key, asset, shape_):
    rows, cols = shape_
    data = np.full((1, rows, cols), 0.05, dtype="float32")
    data[0, :, : cols // 10] = NODATA  # a nodata band on the left
    return data


def _moved(item, dx, dy=0.0):
    geom = affinity.translate(shape(item["geometry"]), xoff=dx, yoff=dy)
    item["geometry"] = mapping(geom)
    item["bbox"] = list(geom.bounds)
    return item


@pytest.mark.services
def test_sentinel1_picks_the_covering_scene_and_writes_cogs(stac_api, s3_env, s3_bucket, tmp_path):
    base = materialize(real_item("sentinel-1"), tmp_path / "src", factor=40, pixels=_pixels)
    with file_server(tmp_path / "src") as url:
        for asset in base["assets"].values():
            asset["href"] = f"{url}/{Path(asset['href']).name}"
        tag = uuid.uuid4().hex[:6]
        collection = f"s1-{tag}"
        footprint = shape(base["geometry"])
        tile = box(*footprint.centroid.buffer(0.1).bounds)
        full = variant(base, f"S1A_FULL_{tag}", collection, "2019-05-10T05:00:00Z")
        partial = _moved(variant(base, f"S1A_PART_{tag}", collection, "2019-05-01T05:00:00Z"),
                         dx=(footprint.bounds[2] - footprint.bounds[0]) / 2 - 0.05)
        elsewhere = _moved(variant(base, f"S1A_AWAY_{tag}", collection, "2019-04-02T05:00:00Z"), dx=20.0)
        items = [full, partial, elsewhere]
        assert coverage_of(partial, tile) < 1.0 and coverage_of(full, tile) == pytest.approx(1.0)
        stac_api.load_collection(stac_api.make_collection(collection, items))
        stac_api.load_items(items)
        samples = write_samples(tmp_path / "mgrs.geojson", [{"name": "33RVN", "geometry": tile}])
        env = {
            "AWS_BATCH_JOB_ARRAY_INDEX": "0", "STACCHIP_MGRS_SOURCE": str(samples), "STACCHIP_BUCKET": s3_bucket,
            "STACCHIP_STAC_API": stac_api.url, "STACCHIP_COLLECTION": collection,
            "STACCHIP_YEARS": "2019", "STACCHIP_SEASONS": "q2",
        }
        proc = run_script("stacchip-sentinel-1", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc)
    assert recs, proc.stderr[-3000:]
    assert [(r["item_id"], r["status"]) for r in recs] == [(full["id"], "done")]

    item_id = full["id"]
    objects = bucket_objects(s3_env, s3_bucket)
    client = boto3.client("s3", endpoint_url=s3_env)
    item = json.loads(client.get_object(Bucket=s3_bucket, Key=f"sentinel-1-rtc/{item_id}/stac_item.json")["Body"].read())
    assert set(item["assets"]) == {"vv", "vh"}
    for key, asset in item["assets"].items():
        assert asset["href"] == f"s3://{s3_bucket}/sentinel-1-rtc/{item_id}/{key}.tif"
        assert "cloud-optimized" in asset["type"]
        local = tmp_path / f"{key}-copy.tif"
        local.write_bytes(client.get_object(Bucket=s3_bucket, Key=asset["href"].split("/", 3)[3])["Body"].read())
        with rasterio.open(local) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert ds.nodata == NODATA
            assert ds.read(1)[0, 0] == NODATA and ds.read(1)[0, -1] == pytest.approx(0.05)
    table = read_index(f"s3://{s3_bucket}/index/sentinel-1-rtc/{item_id}/index_{item_id}.parquet")
    assert table.num_rows >= 1
    nodata = dict(zip(table.column("chip_index_x").to_pylist(), table.column("nodata_percentage").to_pylist(), strict=True))
    assert nodata[0] > 0.0  # the left chip holds the nodata band
    assert f"index/sentinel-1-rtc/{item_id}/index_{item_id}.parquet" in objects


def coverage_of(item_dict, area):
    import pystac

    return coverage(pystac.Item.from_dict(copy.deepcopy(item_dict)), area)
