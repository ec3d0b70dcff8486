"""stacchip-sentinel-2 end to end: real STAC API (pgstac) and S3 server on loopback."""

from __future__ import annotations

import json
import uuid

import pyarrow.compute as pc
import pytest
from shapely.geometry import shape

from stacchip.index import read_index, read_metadata
from tests.processors_support import (
    bucket_objects,
    new_bucket,
    records,
    run_script,
    sentinel2_base,
    upload_assets,
    variant,
    write_samples,
)

pytestmark = pytest.mark.services

PLATFORM = "sentinel-2-l2a"
COPIED = {"blue", "green", "nir", "nir08", "red", "rededge1", "rededge2", "rededge3", "scl", "swir16", "swir22"}


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("s2-src")


@pytest.fixture
def s2_setup(stac_api, s3_env, s3_bucket, scene_dir, tmp_path):
    """Six Sentinel-2 items for one MGRS tile in 2020, assets in a source bucket."""
    base = sentinel2_base(scene_dir)
    source_bucket = new_bucket(s3_env)
    base = upload_assets(base, s3_env, source_bucket, "tiles/20/H/NJ")
    collection = f"s2-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    items = [
        variant(base, f"S2A_{tag}_Q1_CLOUD30", collection, "2020-02-10T14:00:00Z", **{"eo:cloud_cover": 30.0, "s2:nodata_pixel_percentage": 5.0}),
        # least cloudy of Q1, late on the last day of the quarter
        variant(base, f"S2A_{tag}_Q1_CLOUD10", collection, "2020-03-31T18:30:00.123456Z", **{"eo:cloud_cover": 10.0, "s2:nodata_pixel_percentage": 5.0}),
        # another tile: excluded by grid:code even though it is the least cloudy
        variant(base, f"S2A_{tag}_Q1_OTHER_TILE", collection, "2020-02-11T14:00:00Z", **{"eo:cloud_cover": 1.0, "s2:nodata_pixel_percentage": 0.0, "grid:code": "MGRS-20HNK"}),
        # too much nodata: excluded
        variant(base, f"S2A_{tag}_Q2_NODATA50", collection, "2020-05-01T14:00:00Z", **{"eo:cloud_cover": 5.0, "s2:nodata_pixel_percentage": 50.0}),
        variant(base, f"S2A_{tag}_Q2_CLOUD40", collection, "2020-06-01T14:00:00Z", **{"eo:cloud_cover": 40.0, "s2:nodata_pixel_percentage": 0.0}),
        # over the 75 % cloud limit (upstream's 0.75 would also have dropped the 10 % scene)
        variant(base, f"S2A_{tag}_Q4_CLOUD80", collection, "2020-11-01T14:00:00Z", **{"eo:cloud_cover": 80.0, "s2:nodata_pixel_percentage": 0.0}),
    ]
    stac_api.load_collection(stac_api.make_collection(collection, items))
    stac_api.load_items(items)
    footprint = shape(base["geometry"])
    samples = write_samples(tmp_path / "mgrs.geojson", [{"name": "20HNJ", "geometry": footprint}])
    env = {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0",
        "STACCHIP_MGRS_SOURCE": str(samples),
        "STACCHIP_BUCKET": s3_bucket,
        "STACCHIP_STAC_API": stac_api.url,
        "STACCHIP_COLLECTION": collection,
        "STACCHIP_YEARS": "2020",
        "STACCHIP_N_YEARS": "1",
    }
    return {"env": env, "items": items, "tag": tag, "bucket": s3_bucket, "endpoint": s3_env, "source": source_bucket}


def test_sentinel2_fills_bucket_and_rerun_skips(s2_setup):
    env, tag, bucket, endpoint = s2_setup["env"], s2_setup["tag"], s2_setup["bucket"], s2_setup["endpoint"]
    proc = run_script("stacchip-sentinel-2", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    picked = {r["item_id"]: r for r in records(proc)}
    expected = {f"S2A_{tag}_Q1_CLOUD10", f"S2A_{tag}_Q2_CLOUD40"}
    assert set(picked) == expected
    assert all(r["status"] == "done" for r in picked.values())

    objects = bucket_objects(endpoint, bucket)
    for item_id in expected:
        item_key = f"{PLATFORM}/{item_id}/stac_item.json"
        index_key = f"index/{PLATFORM}/{item_id}/index_{item_id}.parquet"
        assert item_key in objects and index_key in objects
        assets = {k for k in objects if k.startswith(f"{PLATFORM}/{item_id}/") and k.endswith(".tif")}
        assert len(assets) == len(COPIED)
        # the index is written last
        assert objects[index_key]["modified"] >= max(objects[k]["modified"] for k in assets | {item_key})

        import boto3

        body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key=item_key)["Body"].read()
        item = json.loads(body)
        assert item["id"] == item_id
        assert set(item["assets"]) == COPIED
        for asset in item["assets"].values():
            assert asset["href"].startswith(f"s3://{bucket}/{PLATFORM}/{item_id}/"), asset["href"]
            assert asset["href"].removeprefix(f"s3://{bucket}/") in objects
            assert "alternate" not in asset

        meta = read_metadata(f"s3://{bucket}/{index_key}")
        assert meta["item_id"] == item_id and meta["platform"] == PLATFORM
        assert meta["writer"] == "sentinel-2/0"

    # nothing for other quarters, no stray objects (claims aside)
    data_keys = {k for k in objects if not k.startswith("_claims/")}
    assert all(any(item_id in k for item_id in expected) for k in data_keys)

    table = read_index(f"s3://{bucket}/index/{PLATFORM}/")
    assert set(table.column("item_id").to_pylist()) == expected
    assert set(table.column("platform").to_pylist()) == {PLATFORM}
    # SCL has a cloud block top-left and a nodata strip at the bottom
    clouds = pc.max(table.column("cloud_cover_percentage")).as_py()
    assert clouds > 0
    first = table.filter(pc.and_(pc.equal(table.column("chip_index_x"), 0), pc.equal(table.column("chip_index_y"), 0)))
    assert first.num_rows == 2 and min(first.column("cloud_cover_percentage").to_pylist()) > 0.2

    # a re-run finds both items done and writes nothing
    again = run_script("stacchip-sentinel-2", env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r["status"] for r in records(again)} == {"skipped-done"}
    after = bucket_objects(endpoint, bucket)
    assert {k: v["etag"] for k, v in after.items()} == {k: v["etag"] for k, v in objects.items()}
    assert {k: v["modified"] for k, v in after.items()} == {k: v["modified"] for k, v in objects.items()}


def test_sentinel2_dry_run_writes_nothing(s2_setup):
    env, tag = s2_setup["env"], s2_setup["tag"]
    proc = run_script("stacchip-sentinel-2", {**env, "STACCHIP_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc)
    assert {r["item_id"] for r in recs} == {f"S2A_{tag}_Q1_CLOUD10", f"S2A_{tag}_Q2_CLOUD40"}
    assert {r["status"] for r in recs} == {"planned"}
    # the plan names the server-side copy sources
    assert all(src.startswith(f"s3://{s2_setup['source']}/") for r in recs for src in r["assets"].values())
    assert bucket_objects(s2_setup["endpoint"], s2_setup["bucket"]) == {}


def test_sentinel2_empty_quarters_succeed(s2_setup):
    env = {**s2_setup["env"], "STACCHIP_YEARS": "2019"}
    proc = run_script("stacchip-sentinel-2", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(proc) == []
    assert bucket_objects(s2_setup["endpoint"], s2_setup["bucket"]) == {}


def test_upstream_entry_point_still_works(s2_setup, monkeypatch):
    """``process_mgrs_tile(index, mgrs_source, bucket)`` as upstream called it, with a bucket name."""
    from stacchip.processors import sentinel_2_processor

    env = s2_setup["env"]
    for name in ("STACCHIP_STAC_API", "STACCHIP_COLLECTION", "STACCHIP_YEARS", "STACCHIP_N_YEARS"):
        monkeypatch.setenv(name, env[name])
    sentinel_2_processor.process_mgrs_tile(0, env["STACCHIP_MGRS_SOURCE"], s2_setup["bucket"])
    objects = bucket_objects(s2_setup["endpoint"], s2_setup["bucket"], "index/")
    ids = [f"S2A_{s2_setup['tag']}_{name}" for name in ("Q1_CLOUD10", "Q2_CLOUD40")]
    # each index with its checksum record beside it
    assert sorted(objects) == sorted(
        key for i in ids for key in (f"index/{PLATFORM}/{i}/index_{i}.parquet",
                                     f"index/{PLATFORM}/{i}/.index_{i}.parquet.sha256.json")
    )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_sentinel2_aligned_layout_against_copy(s2_setup, tmp_path):
    """The same task in both layouts: copy keeps the source bytes, aligned re-tiles them to the
    chip grid (64 px tiles at 10 m, 32 px at 20 m, ZSTD) with identical pixels, index and chips."""
    import boto3
    import numpy as np
    import rasterio

    from stacchip.chipper import Chipper
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.processors.layout import multihash_sha256
    from stacchip.utils import load_indexer_s3

    env, endpoint, tag = s2_setup["env"], s2_setup["endpoint"], s2_setup["tag"]
    client = boto3.client("s3", endpoint_url=endpoint)
    copy_bucket = s2_setup["bucket"]
    aligned_bucket = new_bucket(endpoint, "aligned")
    chip = 64
    copy_run = run_script("stacchip-sentinel-2", {**env, "STACCHIP_CHIP_SIZE": str(chip)})
    assert copy_run.returncode == 0, copy_run.stderr[-3000:]
    aligned_run = run_script(
        "stacchip-sentinel-2",
        {**env, "STACCHIP_BUCKET": aligned_bucket, "STACCHIP_CHIP_SIZE": str(chip), "STACCHIP_LAYOUT": "aligned"},
    )
    assert aligned_run.returncode == 0, aligned_run.stderr[-3000:]
    done = {f"S2A_{tag}_Q1_CLOUD10", f"S2A_{tag}_Q2_CLOUD40"}
    for run in (copy_run, aligned_run):
        assert {r["item_id"]: r["status"] for r in records(run)} == {i: "done" for i in done}

    def strip(objects, bucket):
        return {k for k in objects if not k.startswith("_claims/")}

    copy_objects = bucket_objects(endpoint, copy_bucket)
    aligned_objects = bucket_objects(endpoint, aligned_bucket)
    assert strip(copy_objects, copy_bucket) == strip(aligned_objects, aligned_bucket)

    def body(bucket, key):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    source = {a["href"].rsplit("/", 1)[1]: a for a in s2_setup["items"][0]["assets"].values()}
    for item_id in done:
        prefix = f"{PLATFORM}/{item_id}/"
        copy_item = json.loads(body(copy_bucket, prefix + "stac_item.json"))
        aligned_item = json.loads(body(aligned_bucket, prefix + "stac_item.json"))
        assert set(aligned_item["assets"]) == COPIED
        for key, asset in aligned_item["assets"].items():
            name = asset["href"].rsplit("/", 1)[1]
            assert asset["href"] == f"s3://{aligned_bucket}/{prefix}{name}"
            src_asset = source[name]
            src_bytes = body(s2_setup["source"], src_asset["href"].removeprefix(f"s3://{s2_setup['source']}/"))
            # the default layout copies byte for byte
            assert _sha256(body(copy_bucket, prefix + name)) == _sha256(src_bytes)
            assert copy_item["assets"][key]["href"] == f"s3://{copy_bucket}/{prefix}{name}"
            # the grid is unchanged
            assert asset["proj:shape"] == src_asset["proj:shape"]
            assert asset["proj:transform"] == src_asset["proj:transform"]
            local = tmp_path / f"{item_id}-{name}"
            local.write_bytes(body(aligned_bucket, prefix + name))
            assert asset["file:size"] == local.stat().st_size
            assert asset["file:checksum"] == multihash_sha256(local)
            src_local = tmp_path / f"src-{name}"
            src_local.write_bytes(src_bytes)
            with rasterio.open(local) as ds, rasterio.open(src_local) as sds:
                fine = src_asset["proj:transform"][0] == 200.0  # 10 m bands, scaled by 20
                assert ds.block_shapes[0] == ((chip, chip) if fine else (chip // 2, chip // 2)), key
                assert sds.block_shapes[0] != ds.block_shapes[0]
                assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "ZSTD"
                assert (ds.crs, ds.transform, ds.nodata) == (sds.crs, sds.transform, sds.nodata)
                np.testing.assert_array_equal(ds.read(), sds.read())

    copy_index = read_index(f"s3://{copy_bucket}/index/{PLATFORM}/").sort_by("chipid")
    aligned_index = read_index(f"s3://{aligned_bucket}/index/{PLATFORM}/").sort_by("chipid")
    assert aligned_index.num_rows == copy_index.num_rows > 0
    assert aligned_index.equals(copy_index)

    item_id = f"S2A_{tag}_Q1_CLOUD10"
    a = Chipper(load_indexer_s3(copy_bucket, PLATFORM, item_id, indexer=Sentinel2Indexer, chip_size=chip))
    b = Chipper(load_indexer_s3(aligned_bucket, PLATFORM, item_id, indexer=Sentinel2Indexer, chip_size=chip))
    with a, b:
        assert a.path("red").startswith("/vsis3/" + copy_bucket) and b.path("red").startswith("/vsis3/" + aligned_bucket)
        assert len(a) == len(b) > 20
        for (xa, ya, ca), (xb, yb, cb) in zip(a, b):
            assert (xa, ya) == (xb, yb) and set(ca) == set(cb) == COPIED
            for key in ca:
                np.testing.assert_array_equal(ca[key], cb[key])


def test_sentinel2_aligned_layout_refuses_chip_sizes_it_cannot_tile(s2_setup):
    env = {**s2_setup["env"], "STACCHIP_LAYOUT": "aligned", "STACCHIP_CHIP_SIZE": "100"}
    proc = run_script("stacchip-sentinel-2", env)
    assert proc.returncode == 2
    assert "STACCHIP_CHIP_SIZE" in proc.stderr and "multiple of 16" in proc.stderr
    assert bucket_objects(s2_setup["endpoint"], s2_setup["bucket"]) == {}


@pytest.mark.services
def test_upstream_entry_point_raises_when_an_item_fails(s2_setup, monkeypatch):
    """Upstream's ``process_mgrs_tile`` raised on a failed item; a caller must still learn of failures."""
    from stacchip.processors import jobs, sentinel_2_processor
    from tests.processors_support import bucket_objects, s3

    env = s2_setup["env"]
    for name in ("STACCHIP_STAC_API", "STACCHIP_COLLECTION", "STACCHIP_YEARS", "STACCHIP_N_YEARS"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("STACCHIP_RETRIES", "2")
    client = s3(s2_setup["endpoint"])
    for key in bucket_objects(s2_setup["endpoint"], s2_setup["source"]):
        client.delete_object(Bucket=s2_setup["source"], Key=key)  # every source asset is gone
    with pytest.raises(jobs.TaskFailed) as info:
        sentinel_2_processor.process_mgrs_tile(0, env["STACCHIP_MGRS_SOURCE"], s2_setup["bucket"])
    assert {r["status"] for r in info.value.result} == {"failed"}
    assert f"S2A_{s2_setup['tag']}_Q1_CLOUD10" in str(info.value)
    assert not bucket_objects(s2_setup["endpoint"], s2_setup["bucket"], "index/")
