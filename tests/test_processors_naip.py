"""stacchip-naip end to end: newest scene plus one other, a location with a single scene,
fallback from the naip-analytic keys to the href, S3 sources into a local output directory."""

from __future__ import annotations

import json
import uuid

import pytest
from shapely import affinity
from shapely.geometry import mapping, shape

from stacchip.index import read_index
from stacchip.processors.naip_processor import naip_analytic_sources, pick_naip
from tests.builders import materialize, real_item
from tests.processors_support import local_files, new_bucket, records, run_script, upload_assets, variant, write_samples


def _moved(item, dx):
    geom = affinity.translate(shape(item["geometry"]), xoff=dx)
    item["geometry"] = mapping(geom)
    item["bbox"] = list(geom.bounds)
    return item


@pytest.mark.services
def test_naip_latest_plus_one_and_single_scene_location(stac_api, s3_env, tmp_path):
    base = materialize(real_item("naip"), tmp_path / "src", factor=20)
    base["assets"] = {"image": base["assets"].pop("asset")}  # Planetary Computer's key
    base = upload_assets(base, s3_env, new_bucket(s3_env), "naip/ma/2021")
    tag = uuid.uuid4().hex[:6]
    collection = f"naip-{tag}"
    props = {"naip:state": "ma", "gsd": 0.6}
    here = [
        variant(base, f"ma_m_4207009_ne_19_060_{year}1024_{tag}", collection, f"{year}-10-24T12:00:00Z",
                **{**props, "naip:year": str(year)})
        for year in (2016, 2018, 2021)
    ]
    lonely = _moved(variant(base, f"ma_m_4207009_nw_19_060_20140601_{tag}", collection, "2014-06-01T12:00:00Z",
                            **{**props, "naip:year": "2014"}), 3.0)
    items = here + [lonely]
    stac_api.load_collection(stac_api.make_collection(collection, items))
    stac_api.load_items(items)
    samples = write_samples(tmp_path / "naip.geojson", [
        {"geometry": shape(here[0]["geometry"]).centroid},
        {"geometry": shape(lonely["geometry"]).centroid},
    ])
    out = tmp_path / "bucket"
    env = {
        "STACCHIP_SAMPLE_SOURCE": str(samples), "STACCHIP_BUCKET": str(out),
        "STACCHIP_STAC_API": stac_api.url, "STACCHIP_COLLECTION": collection,
    }
    proc = run_script("stacchip-naip", env, "--range", "0:2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc)
    assert recs, proc.stderr[-3000:]
    task0 = [r["item_id"] for r in recs if r["task"] == 0]
    task1 = [r["item_id"] for r in recs if r["task"] == 1]
    assert task0[0] == here[2]["id"]  # the newest first
    assert len(task0) == 2 and task0[1] in {here[0]["id"], here[1]["id"]}
    assert task1 == [lonely["id"]]  # one scene: published, no crash
    assert {r["status"] for r in recs} == {"done"}

    files = local_files(out)
    for item_id in task0 + task1:
        item = json.loads((out / "naip" / item_id / "stac_item.json").read_text())
        assert list(item["assets"]) == ["image"]
        href = item["assets"]["image"]["href"]
        assert href == str(out / "naip" / item_id / "asset.tif")  # the source file's name
        assert f"naip/{item_id}/asset.tif" in files
        table = read_index(out / "index" / "naip" / item_id / f"index_{item_id}.parquet")
        assert table.num_rows > 0
        assert set(table.column("cloud_cover_percentage").to_pylist()) == {0.0}
    assert not any(name.endswith(".part") for name in files)


def test_naip_analytic_keys_follow_the_item():
    import pystac

    item = pystac.Item("ma_m_4207009_ne_19_060_20211024", None, None, "2021-10-24T00:00:00Z",
                       {"naip:state": "ma", "naip:year": "2021", "gsd": 0.6})
    item.add_asset("image", pystac.Asset("https://x.blob.core.windows.net/naip/v002/ma/2021/m_4207009_ne_19_060_20211024.tif"))
    assert naip_analytic_sources(item) == [
        "s3://naip-analytic/ma/2021/60cm/rgbir_cog/42070/09/m_4207009_ne_19_060_20211024.tif",
        "s3://naip-analytic/ma/2021/60cm/rgbir_cog/42070/m_4207009_ne_19_060_20211024.tif",
    ]
    del item.properties["naip:state"]
    assert naip_analytic_sources(item) == []


def test_pick_naip_handles_one_and_many():
    assert pick_naip([], 3) == []
    assert pick_naip(["only"], 3) == ["only"]
    many = ["newest", "a", "b", "c"]
    picked = pick_naip(many, 7)
    assert picked[0] == "newest" and picked[1] in many[1:] and len(picked) == 2
    assert pick_naip(many, 7) == picked  # reproducible per task index
    assert {pick_naip(many, seed)[1] for seed in range(40)} == set(many[1:])
