"""The tile read path over s3:// (moto's S3 server on loopback) and http:// (a
loopback Range server): same pixels as GDAL, coalesced ranged GETs, no header
read once a layout is known, and a changed object is noticed and re-read."""

import functools
import http.server
import os
import threading

import numpy as np
import pytest
import rasterio

from stacchip.errors import AssetReadError
from stacchip.reader import read_indexed
from stacchip.tiles.layouts import LayoutStore
from stacchip.tiles.reader import TileCache, TileEngine, TileFile
from tests.test_chipper import _RangeHandler
from tests.test_tiles_equality import SHAPE, patterns
from tests.tiff_builders import pixels, write

FILES = {
    "u16-deflate-p2.tif": {"dtype": "uint16", "bands": 1, "compress": "deflate", "predictor": 2},
    "f32-band-zstd-p3.tif": {"dtype": "float32", "bands": 3, "compress": "zstd", "predictor": 3, "interleave": "band"},
    "u8-rgb-jpeg.tif": {"dtype": "uint8", "bands": 3, "compress": "jpeg", "photometric": "RGB"},
    "i16-lzw-bigtiff-be.tif": {"dtype": "int16", "bands": 4, "compress": "lzw", "bigtiff": "YES", "endianness": "BIG"},
}


def _write_all(directory):
    out = {}
    for name, spec in FILES.items():
        spec = dict(spec)
        data = pixels(spec.pop("dtype"), spec.pop("bands"), SHAPE, seed=len(name))
        out[name] = write(directory / name, data, **spec)
    return out


def _engine():
    return TileEngine(2, 4, TileCache(2**26))


def _assert_same(url, local, eng):
    f = TileFile(url, store=LayoutStore())
    with rasterio.open(local) as ds:
        for what, (rows, cols) in patterns(SHAPE).items():
            np.testing.assert_array_equal(f.read(rows, cols, 5, eng).result(), read_indexed(ds, rows, cols, 5),
                                          err_msg=f"{url}: {what}")
    return f


def _upload(bucket, key, path):
    from stacchip import storage

    storage.write_bytes(f"s3://{bucket}/{key}", path.read_bytes())
    return f"s3://{bucket}/{key}"


@pytest.mark.services
@pytest.mark.parametrize("client", ["http", "obstore"])
def test_s3_pixels_equal_gdal(tmp_path, s3_bucket, client, monkeypatch):
    monkeypatch.setenv("STACCHIP_REMOTE_CLIENT", client)
    eng = _engine()
    for name, path in _write_all(tmp_path).items():
        _assert_same(_upload(s3_bucket, f"scenes/{name}", path), path, eng)
    eng.shutdown()


def _gets(proxy, key):
    """GETs of ``key`` the proxy has recorded, once it records no more (it records a
    request after answering it, so the last one may land just after the read returns)."""
    import time

    seen, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 0.2:
        n = len(proxy.requests)
        if n != seen:
            seen, stable_since = n, time.monotonic()
        time.sleep(0.02)
    return [r for r in proxy.requests if r[0] == "GET" and key in r[1]]


@pytest.mark.services
def test_s3_requests_are_the_tiles_and_no_headers_once_known(tmp_path, s3_bucket, s3_faults):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE), driver="COG", predictor=2)
    url = _upload(s3_bucket, "r/a.tif", path)
    store = LayoutStore()
    eng = _engine()
    n0 = len(_gets(s3_faults, "r/a.tif"))
    f = TileFile(url, store=store)
    assert len(_gets(s3_faults, "r/a.tif")) - n0 == 1  # the header: one ranged GET
    with rasterio.open(path) as ds:
        rows, cols = np.arange(0, 256), np.arange(0, 700)  # one row of tiles: 3 tiles, adjacent in the file
        want = read_indexed(ds, rows, cols, 0)
    n1 = len(_gets(s3_faults, "r/a.tif"))
    np.testing.assert_array_equal(f.read(rows, cols, 0, eng).result(), want)
    assert len(_gets(s3_faults, "r/a.tif")) - n1 == 1  # coalesced: one request for the 3 tiles
    np.testing.assert_array_equal(f.read(rows, cols, 0, eng).result(), want)
    assert len(_gets(s3_faults, "r/a.tif")) - n1 == 1  # cached tiles: no request
    # Another file handle with the layout already known: no header read, one request per tile group.
    n2 = len(_gets(s3_faults, "r/a.tif"))
    g = TileFile(url, store=store)
    assert len(_gets(s3_faults, "r/a.tif")) == n2
    g.read(np.arange(300, 400), np.arange(300, 400), 0, eng).result()
    assert len(_gets(s3_faults, "r/a.tif")) - n2 == 1
    assert not [r for r in s3_faults.requests if r[0] == "HEAD" and "r/a.tif" in r[1]]
    eng.shutdown()


@pytest.mark.services
@pytest.mark.parametrize("client", ["http", "obstore"])
def test_s3_retries_and_missing_objects(tmp_path, s3_bucket, s3_faults, client, monkeypatch):
    monkeypatch.setenv("STACCHIP_REMOTE_CLIENT", client)
    path = write(tmp_path / "a.tif", pixels("uint8", 1, SHAPE))
    url = _upload(s3_bucket, "x/a.tif", path)
    eng = _engine()
    f = TileFile(url, store=LayoutStore())
    s3_faults.fail_next(2, 503, method="GET", path_contains="x/a.tif")
    with rasterio.open(path) as ds:
        want = read_indexed(ds, np.arange(50), np.arange(50), 0)
    np.testing.assert_array_equal(f.read(np.arange(50), np.arange(50), 0, eng).result(), want)
    assert s3_faults.failures == 2
    with pytest.raises(AssetReadError, match="missing.tif"):
        TileFile(f"s3://{s3_bucket}/x/missing.tif", store=LayoutStore())
    eng.shutdown()


@pytest.mark.services
@pytest.mark.parametrize("client", ["http", "obstore"])
def test_s3_changed_object_is_noticed(tmp_path, s3_bucket, client, monkeypatch):
    monkeypatch.setenv("STACCHIP_REMOTE_CLIENT", client)
    old = write(tmp_path / "old.tif", pixels("uint16", 1, SHAPE, seed=1), blocksize=256)
    new = write(tmp_path / "new.tif", pixels("uint16", 1, SHAPE, seed=2), blocksize=512, compress="zstd")
    url = _upload(s3_bucket, "c/a.tif", old)
    store = LayoutStore()
    eng = _engine()
    TileFile(url, store=store)
    stale = store.get(url)
    assert stale.tile_width == 256
    _upload(s3_bucket, "c/a.tif", new)  # replaced: another size and ETag
    f = TileFile(url, store=store)  # the cached layout is used...
    rows, cols = np.arange(100, 300), np.arange(400, 650)
    got = f.read(rows, cols, 0, eng).result()  # ...and found stale by the first response
    with rasterio.open(new) as ds:
        np.testing.assert_array_equal(got, read_indexed(ds, rows, cols, 0))
    assert store.get(url).tile_width == 512 and store.get(url).etag != stale.etag
    eng.shutdown()


@pytest.mark.services
def test_s3_presigned_urls_signed_again_after_403_and_unsigned_access(tmp_path, s3_bucket, s3_faults, monkeypatch):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE))
    url = _upload(s3_bucket, "p/a.tif", path)
    eng = _engine()
    f = TileFile(url, store=LayoutStore())
    assert f.source.lean
    first = f.source._url()
    assert "X-Amz-Signature=" in first
    with rasterio.open(path) as ds:
        want = read_indexed(ds, np.arange(40), np.arange(40), 0)
    s3_faults.fail_next(1, 403, method="GET", path_contains="p/a.tif")  # e.g. temporary credentials expired
    np.testing.assert_array_equal(f.read(np.arange(40), np.arange(40), 0, eng).result(), want)
    assert s3_faults.failures == 1
    s3_faults.fail_next(2, 403, method="GET", path_contains="p/a.tif")  # refused again: an error naming the href
    with pytest.raises(AssetReadError, match=r"p/a.tif.*HTTP 403"):
        f.read(np.arange(300, 340), np.arange(40), 0, eng).result()
    # A public object: plain (unsigned) path-style URLs.
    import boto3

    from stacchip.tiles.sources import reset_stores

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object_acl(
        Bucket=s3_bucket, Key="p/a.tif", ACL="public-read")

    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    reset_stores()
    g = TileFile(url, store=LayoutStore())
    assert "X-Amz-Signature" not in g.source._url() and g.source._url().endswith(f"/{s3_bucket}/p/a.tif")
    np.testing.assert_array_equal(g.read(np.arange(40), np.arange(40), 0, eng).result(), want)
    reset_stores()
    eng.shutdown()


def test_s3_temporary_credentials_from_boto3_are_renewed(tmp_path, s3_bucket, monkeypatch):
    """Credentials boto3 refreshes (SSO, assume-role, container roles) are asked of it
    again, so URLs signed after they rotate carry the new keys (obstore would keep
    credentials without an expiry for good)."""
    import datetime

    import boto3
    import botocore.credentials

    from stacchip.tiles import sources

    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE))
    url = _upload(s3_bucket, "t/a.tif", path)
    issued = []

    def refresh():
        issued.append(f"TEMPKEY{len(issued)}")
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        return {"access_key": issued[-1], "secret_key": "s", "token": "t", "expiry_time": expiry.isoformat()}

    creds = botocore.credentials.RefreshableCredentials.create_from_metadata(refresh(), refresh, "assume-role")
    monkeypatch.setattr(boto3.session.Session, "get_credentials", lambda self: creds)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setattr(sources, "CREDENTIALS_TTL", 0)  # asked again at every signing
    sources.reset_stores()
    src = sources.RemoteSource(url)
    assert "TEMPKEY0" in src._url()
    creds._expiry_time = datetime.datetime.now(datetime.timezone.utc)  # the role's keys ran out: boto3 refreshes
    assert "TEMPKEY1" in src._url(fresh=True)
    static = botocore.credentials.Credentials("STATICKEY", "s")
    monkeypatch.setattr(boto3.session.Session, "get_credentials", lambda self: static)
    assert sources._boto3_credentials()()["expires_at"] is None  # static keys never expire
    sources.reset_stores()


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_http_pixels_equal_gdal(tmp_path, http_root):
    root, base = http_root
    eng = _engine()
    for name, path in _write_all(tmp_path).items():
        os.link(path, root / name)
        _assert_same(f"{base}/{name}", path, eng)
    with pytest.raises(AssetReadError, match="nothere.tif"):
        TileFile(f"{base}/nothere.tif", store=LayoutStore())
    eng.shutdown()


def test_receive_buffers_reused_without_changing_pixels(tmp_path, http_root, monkeypatch):
    """Remote ranges land in buffers reused once their tiles are decoded: many reads in
    parallel through a small pool give GDAL's pixels, and the pool stays in its budget."""
    from stacchip.tiles import reader as tile_reader

    monkeypatch.setattr(tile_reader, "_buffers", tile_reader._Buffers(4 * tile_reader.BUFFER_STEP))
    root, base = http_root
    eng = _engine()
    for name, path in _write_all(tmp_path).items():
        os.link(path, root / name)
        tile_reader.shared_cache().clear()
        _assert_same(f"{base}/{name}", path, eng)
    pool = tile_reader._buffers
    assert pool.reused > 0 and pool.made > 0  # ranges went into memory used before
    assert pool.nbytes <= pool.budget
    eng.shutdown()


def _child_remote_read(chipper, queue):
    try:
        chip = chipper.chip(1, 1)
        queue.put((chipper.tile_file("a") is not None, {k: v.tolist() for k, v in chip.items()}))
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put((None, repr(exc)))


@pytest.mark.parametrize("client", ["http", "obstore"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_remote_reads_in_forked_and_spawned_children(tmp_path, http_root, method, client, monkeypatch):
    """A child forked after the parent made remote requests with obstore cannot use
    its runtime (its threads are the parent's): it reads through GDAL, same pixels,
    instead of hanging. Plain http(s) reads of the default client need no runtime,
    so a forked child reads them through tiles, as a spawned child always does."""
    import multiprocessing as mp

    monkeypatch.setenv("STACCHIP_REMOTE_CLIENT", client)

    import pystac

    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer

    root, base = http_root
    write(root / "a.tif", pixels("uint16", 2, SHAPE), predictor=2)
    item = pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "r", "geometry": None, "links": [],
        "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": list(SHAPE),
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {"a": {"href": f"{base}/a.tif"}},
    })
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=128), threads=2)
    want = chipper.chip(1, 1)  # the parent's runtime is up
    assert chipper.tile_file("a") is not None
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_remote_read, args=(chipper, queue))
    proc.start()
    tiles, got = queue.get(timeout=60)
    proc.join(timeout=30)
    assert tiles is not None, got
    assert tiles == (method == "spawn" or client == "http")
    np.testing.assert_array_equal(np.array(got["a"], dtype=want["a"].dtype), want["a"])
    chipper.close()
