"""The loopback services of tests/services.py work: boto3, GDAL and stacchip.storage
against the moto S3 server, and pystac-client against stac-fastapi-pgstac."""

from __future__ import annotations

import copy
import json
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

pytestmark = pytest.mark.services

SHARED_ITEMS = Path(__file__).resolve().parents[2] / "shared" / "stac-items"
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
