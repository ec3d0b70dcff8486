"""The loopback services of tests/services.py work: boto3, GDAL and stacchip.storage
against the moto S3 server, and pystac-client against stac-fastapi-pgstac."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import rasterio
from affine import Affine

from stacchip import storage
from stacchip.errors import StorageNotFoundError
from stacchip.reader import gdal_env
from tests.services import http_get, service_unavailable

pytestmark = pytest.mark.services

SHARED_ITEMS = Path(__file__).resolve().parent / "data"
S2_ITEM = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"


def _write_cog(path: Path, data: np.ndarray) -> None:
    """A small single-band UTM COG with internal tiles and overviews."""
    profile = {
        "driver": "COG",
        "width": data.shape[1],
        "height": data.shape[0],
        "count": 1,
        "dtype": data.dtype.name,
        "crs": "EPSG:32720",
        "transform": Affine(10.0, 0.0, 499980.0, 0.0, -10.0, 6300040.0),
        "compress": "DEFLATE",
        "blocksize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def test_missing_service_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no such server"):
        service_unavailable("no such server")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no such server"):
        service_unavailable("no such server")


# ------------------------------------------------------------------------- S3


def test_boto3_put_get_list(s3_bucket: str, s3_env: str) -> None:
    client = boto3.client("s3")  # endpoint from AWS_ENDPOINT_URL_S3, as any job would get it
    assert client.meta.endpoint_url == s3_env
    payloads = {f"a/{i}.bin": np.random.default_rng(i).bytes(1000 + i) for i in range(3)}
    for key, body in payloads.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    client.put_object(Bucket=s3_bucket, Key="b/other.txt", Body=b"x")

    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="a/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(payloads)
    assert {o["Key"]: o["Size"] for o in listed["Contents"]} == {k: len(v) for k, v in payloads.items()}
    for key, body in payloads.items():
        assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == body
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=s3_bucket, Key="a/missing.bin")


def test_storage_client_uses_endpoint(s3_server: Any, s3_bucket: str) -> None:
    """stacchip's cached boto3 client was rebuilt for the loopback endpoint."""
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    client = storage.s3_client()
    assert client.meta.endpoint_url == s3_server.endpoint
    assert s3_bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_gdal_reads_cog_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    data = rng.integers(0, 10000, size=(600, 520), dtype=np.uint16)
    local = tmp_path / "band.tif"
    _write_cog(local, data)
    boto3.client("s3").upload_file(str(local), s3_bucket, "scene/band.tif")

    with gdal_env():
        with rasterio.open(f"s3://{s3_bucket}/scene/band.tif") as src:
            assert (src.width, src.height) == (520, 600)
            assert src.crs.to_epsg() == 32720
            full = src.read(1)
            window = src.read(1, window=rasterio.windows.Window(300, 256, 200, 100))
            overview_levels = src.overviews(1)
    np.testing.assert_array_equal(full, data)
    np.testing.assert_array_equal(window, data[256:356, 300:500])
    assert overview_levels  # a real COG with overviews came through /vsis3/


def test_gdal_missing_object_is_an_error(s3_bucket: str) -> None:
    with gdal_env():
        with pytest.raises(rasterio.errors.RasterioIOError):
            rasterio.open(f"s3://{s3_bucket}/does/not/exist.tif")


def test_storage_over_s3(s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/prefix"
    url = storage.join(base, "x", "one.json")
    assert url == f"s3://{s3_bucket}/prefix/x/one.json"
    assert not storage.exists(url)
    body = json.dumps({"id": "one"}).encode()
    storage.write_bytes(url, body)
    storage.write_bytes(storage.join(base, "x", "two.parquet"), b"PAR1")
    storage.write_bytes(storage.join(base, "y", "three.json"), b"{}")
    assert storage.exists(url)
    assert storage.read_bytes(url) == body
    assert sorted(storage.list_files(base, suffix=".json")) == [
        f"s3://{s3_bucket}/prefix/x/one.json",
        f"s3://{s3_bucket}/prefix/y/three.json",
    ]
    assert list(storage.list_files(storage.join(base, "x"), suffix=".parquet")) == [
        f"s3://{s3_bucket}/prefix/x/two.parquet"
    ]
    with pytest.raises(StorageNotFoundError):
        storage.read_bytes(storage.join(base, "nope.json"))
    with pytest.raises(StorageNotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}-absent/key")


# ------------------------------------------------------------------- STAC API
#
# Conformance of stac-fastapi-pgstac 7.2 on pgstac 0.10 (its default extensions), checked by
# test_stac_api_conformance and exercised below:
#   sortby  - yes, advertised as https://api.stacspec.org/v1.1.0/item-search#sort (GET and POST)
#   query   - yes, https://api.stacspec.org/v1.0.0/item-search#query ({"prop": {"lt": v}})
#   filter  - yes, https://api.stacspec.org/v1.0.0-rc.2/item-search#filter with cql2-text,
#             cql2-json and basic-cql2 (t_intersects works too)
#   fields, token pagination ("next" links) and collection search also conform.
# pgstac sorts a property numerically only when a numeric queryable defines it (the fixture
# loads DEFAULT_QUERYABLES: eo:cloud_cover, ...); otherwise sortby compares the JSON values as
# text ("18.4" < "3.2"). query/filter comparisons with a number literal are numeric either way.
# So a client should re-sort what it got when the property's queryable is not numeric.
# pystac-client 0.9 matches conformance URIs against "v1.0.*" only, so its
# Client.conforms_to(SORT) is False for this server (and search(sortby=...) warns
# DoesNotConformTo while still sending sortby). Check conformsTo version-agnostically
# (`_conforms` below) and tell pystac-client with Client.add_conforms_to("SORT").


def _conforms(uris: list[str], klass: str) -> bool:
    """``klass`` (e.g. ``"item-search#sort"``) is advertised under any STAC API 1.x version."""
    pattern = re.compile(r"https://api\.stacspec\.org/v1\.\d+\.\d+(-[\w.]+)?/" + re.escape(klass) + "$")
    return any(pattern.match(u) for u in uris)


def _client(url: str) -> Any:
    """pystac-client for ``url`` that knows every extension the server advertises."""
    from pystac_client import Client

    client = Client.open(url)
    uris = client.get_conforms_to()
    for name, klass in (("SORT", "item-search#sort"), ("QUERY", "item-search#query"), ("FILTER", "item-search#filter")):
        if _conforms(uris, klass):
            client.add_conforms_to(name)
    return client


def _s2_variants(collection_id: str) -> list[dict[str, Any]]:
    """Four copies of the real Sentinel-2 item with their own ids, dates, cloud covers;
    the last one moved 20 degrees east so that a bbox search leaves it out."""
    base = json.loads((SHARED_ITEMS / S2_ITEM).read_text())
    specs = [
        ("2024-01-05T14:06:36Z", 50.0, 0.0),
        ("2024-03-11T14:06:36.123Z", base["properties"]["eo:cloud_cover"], 0.0),
        ("2024-06-20T14:06:36Z", 3.25, 0.0),
        ("2023-12-01T14:06:36Z", 1.0, 0.0),
        ("2024-04-02T14:06:36Z", 0.5, 20.0),
    ]
    items = []
    for n, (dt, cloud, shift) in enumerate(specs):
        item = copy.deepcopy(base)
        item["id"] = f"{base['id']}-v{n}"
        item["collection"] = collection_id
        item["properties"]["datetime"] = dt
        item["properties"]["eo:cloud_cover"] = cloud
        if shift:
            item["bbox"] = [item["bbox"][0] + shift, item["bbox"][1], item["bbox"][2] + shift, item["bbox"][3]]
            for ring in item["geometry"]["coordinates"]:
                for pt in ring:
                    pt[0] += shift
        item["links"] = [ln for ln in item["links"] if ln.get("rel") not in ("self", "parent", "root", "collection")]
        items.append(item)
    return items


@pytest.fixture
def s2_collection(stac_api: Any, request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """A fresh collection (unique id) with the Sentinel-2 variants loaded."""
    cid = f"s2-{request.node.name.replace('_', '-')[:40]}-{np.random.default_rng().integers(1 << 30)}"
    items = _s2_variants(cid)
    stac_api.load_collection(stac_api.make_collection(cid, items))
    stac_api.load_items(items)
    return cid, items


def _in_range(item: dict[str, Any], start: str, end: str) -> bool:
    return start <= item["properties"]["datetime"][:10] <= end


def _overlaps(item: dict[str, Any], bbox: list[float]) -> bool:
    b = item["bbox"]
    return b[0] <= bbox[2] and bbox[0] <= b[2] and b[1] <= bbox[3] and bbox[1] <= b[3]


def test_stac_api_conformance(stac_api: Any) -> None:
    from pystac_client.conformance import ConformanceClasses

    uris = stac_api.conforms_to
    for klass in ("core", "item-search", "item-search#sort", "item-search#query", "item-search#filter",
                  "item-search#fields", "collections", "ogcapi-features"):
        assert _conforms(uris, klass), klass
    assert "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json" in uris
    assert "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text" in uris
    assert not _conforms(uris, "item-search#no-such-thing")
    client = _client(stac_api.url)
    for name in ("ITEM_SEARCH", "SORT", "QUERY", "FILTER"):
        assert client.conforms_to(ConformanceClasses.get_by_name(name)), name


def test_stac_api_search_bbox_datetime_sortby(stac_api: Any, s2_collection: Any) -> None:
    cid, items = s2_collection
    bbox = [-62.5, -33.2, -62.0, -32.8]
    expected = sorted(
        (it for it in items if _in_range(it, "2024-01-01", "2024-12-31") and _overlaps(it, bbox)),
        key=lambda it: it["properties"]["eo:cloud_cover"],
    )
    assert len(expected) == 3  # the 2023 item and the moved item are out

    client = _client(stac_api.url)
    search = client.search(
        collections=[cid], bbox=bbox, datetime="2024-01-01/2024-12-31", sortby="properties.eo:cloud_cover"
    )
    found = list(search.items_as_dicts())
    assert [it["id"] for it in found] == [it["id"] for it in expected]

    search = client.search(
        collections=[cid], bbox=bbox, datetime="2024-01-01/2024-12-31", sortby="-properties.eo:cloud_cover"
    )
    assert [it["id"] for it in search.items_as_dicts()] == [it["id"] for it in reversed(expected)]

    # The item comes back whole: properties, assets and geometry as loaded.
    src = expected[0]
    got = found[0]
    assert got["properties"]["eo:cloud_cover"] == src["properties"]["eo:cloud_cover"]
    assert got["properties"]["proj:epsg"] == src["properties"]["proj:epsg"]
    assert got["assets"]["red"]["href"] == src["assets"]["red"]["href"]
    assert set(got["assets"]) == set(src["assets"])
    assert got["collection"] == cid


def test_stac_api_query_and_filter(stac_api: Any, s2_collection: Any) -> None:
    cid, items = s2_collection
    limit = 20.0
    expected = sorted(it["id"] for it in items if it["properties"]["eo:cloud_cover"] < limit)
    assert 0 < len(expected) < len(items)
    client = _client(stac_api.url)

    by_query = client.search(collections=[cid], query={"eo:cloud_cover": {"lt": limit}})
    assert sorted(it["id"] for it in by_query.items_as_dicts()) == expected

    by_cql2_json = client.search(
        collections=[cid],
        filter={"op": "<", "args": [{"property": "eo:cloud_cover"}, limit]},
        filter_lang="cql2-json",
    )
    assert sorted(it["id"] for it in by_cql2_json.items_as_dicts()) == expected

    by_cql2_text = client.search(
        collections=[cid], filter=f"eo:cloud_cover < {limit}", filter_lang="cql2-text", method="GET"
    )
    assert sorted(it["id"] for it in by_cql2_text.items_as_dicts()) == expected

    # A filter on the id and the datetime together (what "skip finished items" needs).
    first = items[1]
    both = client.search(
        collections=[cid],
        filter={
            "op": "and",
            "args": [
                {"op": "=", "args": [{"property": "id"}, first["id"]]},
                {"op": "t_intersects", "args": [{"property": "datetime"},
                                                {"interval": ["2024-03-01T00:00:00Z", "2024-03-31T23:59:59Z"]}]},
            ],
        },
    )
    assert [it["id"] for it in both.items_as_dicts()] == [first["id"]]


def test_stac_api_paging_and_empty_search(stac_api: Any, s2_collection: Any) -> None:
    cid, items = s2_collection
    client = _client(stac_api.url)
    search = client.search(collections=[cid], limit=2, sortby="-properties.datetime")
    pages = list(search.pages_as_dicts())
    assert len(pages) == (len(items) + 1) // 2  # token pagination through "next" links
    ids = [f["id"] for page in pages for f in page["features"]]
    assert ids == [it["id"] for it in sorted(items, key=lambda it: it["properties"]["datetime"], reverse=True)]

    empty = client.search(collections=[cid], datetime="1990-01-01/1990-12-31")
    assert list(empty.items_as_dicts()) == []


def test_stac_api_upsert_replaces_item(stac_api: Any, s2_collection: Any) -> None:
    cid, items = s2_collection
    changed = copy.deepcopy(items[0])
    changed["properties"]["eo:cloud_cover"] = 0.01
    stac_api.load_items([changed])
    client = _client(stac_api.url)
    found = list(client.search(collections=[cid], sortby="properties.eo:cloud_cover", max_items=1).items_as_dicts())
    assert [it["id"] for it in found] == [changed["id"]]
    assert found[0]["properties"]["eo:cloud_cover"] == 0.01
    all_ids = [it["id"] for it in client.search(collections=[cid]).items_as_dicts()]
    assert sorted(all_ids) == sorted(it["id"] for it in items)  # replaced, not duplicated


def test_stac_api_queryables_make_sort_numeric(stac_api: Any, s2_collection: Any) -> None:
    cid, items = s2_collection
    # A numeric property without a queryable yet, with values whose text order differs.
    scores = [9.0, 10.0, 100.0, 2.5, 0.75]
    for item, score in zip(items, scores, strict=True):
        item["properties"]["test:score"] = score
    stac_api.load_items(items)
    stac_api.load_queryables({"test:score": {"type": "number"}}, collection_ids=[cid])

    status, body = http_get(f"{stac_api.url}/collections/{cid}/queryables")
    assert status == 200
    queryables = json.loads(body)
    assert queryables["properties"]["test:score"]["type"] == "number"
    client = _client(stac_api.url)
    found = client.search(collections=[cid], sortby="properties.test:score").items_as_dicts()
    got = [it["properties"]["test:score"] for it in found]
    assert got == sorted(scores)



# ------------------------------------------------------------- S3 with faults


def test_s3_faults_are_retried_by_boto3_and_storage(s3_bucket: str, s3_faults: Any) -> None:
    url = f"s3://{s3_bucket}/retry/object.bin"
    payload = np.random.default_rng(3).bytes(5000)
    s3_faults.fail_next(2, status=503, method="PUT")
    storage.write_bytes(url, payload)
    assert s3_faults.failures == 2
    s3_faults.fail_next(2, status=500, method="GET")
    assert storage.read_bytes(url) == payload
    assert s3_faults.failures == 4
    injected = [r for r in s3_faults.requests if r[3]]
    assert [r[0] for r in injected] == ["PUT", "PUT", "GET", "GET"]
    # The object reached the server once, whole: read it around the proxy.
    direct = boto3.client("s3", endpoint_url=s3_faults.upstream)
    assert direct.get_object(Bucket=s3_bucket, Key="retry/object.bin")["Body"].read() == payload


def test_gdal_retries_through_s3_faults(s3_bucket: str, s3_faults: Any, tmp_path: Path) -> None:
    data = np.arange(300 * 280, dtype=np.uint16).reshape(300, 280)
    local = tmp_path / "b.tif"
    _write_cog(local, data)
    boto3.client("s3").upload_file(str(local), s3_bucket, "g/b.tif")
    s3_faults.fail_next(2, status=503, method="GET", path_contains="/g/b.tif")
    with gdal_env(GDAL_HTTP_RETRY_DELAY="0.05"):
        with rasterio.open(f"s3://{s3_bucket}/g/b.tif") as src:
            got = src.read(1)
    np.testing.assert_array_equal(got, data)
    assert s3_faults.failures == 2


def test_stac_api_delete_collection(stac_api: Any, s2_collection: Any) -> None:
    cid, items = s2_collection
    client = _client(stac_api.url)
    assert len(list(client.search(collections=[cid]).items_as_dicts())) == len(items)
    assert stac_api.delete_collection(cid)
    assert not stac_api.delete_collection(cid)
    assert http_get(f"{stac_api.url}/collections/{cid}")[0] == 404
    # The same id can be loaded again from scratch.
    stac_api.load_collection(stac_api.make_collection(cid, items[:1]))
    stac_api.load_items(items[:1])
    assert [it["id"] for it in client.search(collections=[cid]).items_as_dicts()] == [items[0]["id"]]
