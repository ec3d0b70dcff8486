"""stacchip-landsat end to end: L1 and L2 in different years, each level's own assets,
server-side copies from the requester-pays alternate hrefs."""

from __future__ import annotations

import copy
import json
import uuid

import boto3
import numpy as np
import pytest
from shapely.geometry import shape

from stacchip.index import read_index
from stacchip.processors.landsat_processor import LS_ASSETS_L1, LS_ASSETS_L2
from tests.builders import materialize, real_item
from tests.processors_support import bucket_objects, new_bucket, records, run_script, variant, write_samples

pytestmark = pytest.mark.services

CLEAR = 21824  # QA_PIXEL: clear, low confidence everything


def _pixels(key, asset, shape_):
    rows, cols = shape_
    if key == "qa_pixel":
        return np.full((1, rows, cols), CLEAR, dtype="uint16")
    return (np.arange(rows * cols).reshape(1, rows, cols) % 20000 + 1).astype("uint16")


@pytest.fixture
def landsat_setup(stac_api, s3_env, s3_bucket, tmp_path):
    base = materialize(real_item("landsat"), tmp_path / "src", factor=30, pixels=_pixels)
    for key in ("lwir", "lwir_high", "pan"):  # Level-1 only bands
        base["assets"][key] = copy.deepcopy(base["assets"]["blue"])
    source = new_bucket(s3_env, "usgs")
    client = boto3.client("s3", endpoint_url=s3_env)
    for key, asset in base["assets"].items():
        path = asset["href"]
        name = f"LC09_{key}.TIF"
        client.upload_file(path, source, f"collection02/{name}")
        asset["alternate"] = {"s3": {"href": f"s3://{source}/collection02/{name}", "storage:requester_pays": True}}
        asset["href"] = f"http://127.0.0.1:9/unreachable/{name}"  # only the alternate can be copied
    tag = uuid.uuid4().hex[:6]
    c1, c2 = f"l1-{tag}", f"l2-{tag}"
    items = []
    for collection, level in ((c1, "L1"), (c2, "L2")):
        for year in (2019, 2020):
            items.append(variant(base, f"LC09_{level}_{year}_Q2_{tag}", collection, f"{year}-05-10T10:00:00Z",
                                 **{"eo:cloud_cover": 20.0, "platform": "LANDSAT_9"}))
            # least cloudy, but Landsat 7: not accepted
            items.append(variant(base, f"LE07_{level}_{year}_Q2_{tag}", collection, f"{year}-05-11T10:00:00Z",
                                 **{"eo:cloud_cover": 1.0, "platform": "LANDSAT_7"}))
    for collection in (c1, c2):
        mine = [i for i in items if i["collection"] == collection]
        stac_api.load_collection(stac_api.make_collection(collection, mine))
        stac_api.load_items(mine)
    samples = write_samples(tmp_path / "samples.geojson", [{"geometry": shape(base["geometry"])}])
    env = {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0",
        "STACCHIP_SAMPLE_SOURCE": str(samples),
        "STACCHIP_BUCKET": f"s3://{s3_bucket}/corpus",
        "STACCHIP_STAC_API": stac_api.url,
        "STACCHIP_COLLECTION_L1": c1,
        "STACCHIP_COLLECTION_L2": c2,
        "STACCHIP_YEARS": "2019,2020",
        "STACCHIP_SEASONS": "q2",
    }
    return env, tag


def test_landsat_levels_get_different_years_and_their_own_assets(landsat_setup, s3_env, s3_bucket):
    env, tag = landsat_setup
    proc = run_script("stacchip-landsat", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc)
    assert [r["status"] for r in recs] == ["done", "done"]
    by_platform = {r["platform"]: r["item_id"] for r in recs}
    assert set(by_platform) == {"landsat-c2l1", "landsat-c2l2-sr"}
    l1, l2 = by_platform["landsat-c2l1"], by_platform["landsat-c2l2-sr"]
    assert l1.startswith("LC09_L1_") and l2.startswith("LC09_L2_")
    assert l1.split("_")[2] != l2.split("_")[2]  # different years

    objects = bucket_objects(s3_env, s3_bucket, "corpus/")
    client = boto3.client("s3", endpoint_url=s3_env)
    for platform, item_id, wanted in (("landsat-c2l1", l1, LS_ASSETS_L1), ("landsat-c2l2-sr", l2, LS_ASSETS_L2)):
        item = json.loads(client.get_object(Bucket=s3_bucket, Key=f"corpus/{platform}/{item_id}/stac_item.json")["Body"].read())
        assert set(item["assets"]) == set(wanted)
        for asset in item["assets"].values():
            assert asset["href"].startswith(f"s3://{s3_bucket}/corpus/{platform}/{item_id}/")
            assert asset["href"].removeprefix(f"s3://{s3_bucket}/") in objects
        table = read_index(f"s3://{s3_bucket}/corpus/index/{platform}/{item_id}/index_{item_id}.parquet")
        assert table.num_rows >= 1
        assert set(table.column("platform").to_pylist()) == {platform}
        assert max(table.column("cloud_cover_percentage").to_pylist()) == 0.0
