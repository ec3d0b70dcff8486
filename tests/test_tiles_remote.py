"""The tile read path over s3:// (moto's S3 server on loopback, behind an endpoint that
answers as S3 does) and http:// (nginx): same pixels as GDAL, coalesced ranged GETs
carrying If-Match, no header read once a layout is known, a replaced object noticed by
the request that would have read it, the one I/O configuration (region from the AWS
config file, a private CA, a proxy), the retry policy, a server ignoring Range, and a
forked DataLoader worker on the fast path."""

import gc
import os
import shutil

import numpy as np
import pytest
import rasterio

from stacchip.errors import AssetReadError, StorageError, StorageRefusedError
from stacchip.reader import read_indexed
from stacchip.tiles.layouts import LayoutStore
from stacchip.tiles.reader import TileCache, TileEngine, TileFile
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


def _want(path, rows, cols, fill=0):
    with rasterio.open(path) as ds:
        return read_indexed(ds, rows, cols, fill)


def _settled(proxy):
    """The proxy's request log once it records no more (it records a request after answering)."""
    import time

    seen, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 0.2:
        n = len(proxy.log)
        if n != seen:
            seen, stable_since = n, time.monotonic()
        time.sleep(0.02)
    return list(proxy.log)


def _answered(proxy):
    """The proxy's answered requests ``(method, path, status, injected)``, once it records no more."""
    _settled(proxy)
    return list(proxy.requests)


def _gets(proxy, key):
    return [r for r in _settled(proxy) if r[1] == "GET" and key in r[2]]


@pytest.mark.services
def test_s3_pixels_equal_gdal(tmp_path, s3_bucket):
    eng = _engine()
    for name, path in _write_all(tmp_path).items():
        _assert_same(_upload(s3_bucket, f"scenes/{name}", path), path, eng)
    eng.shutdown()


@pytest.mark.services
def test_s3_requests_are_the_tiles_each_with_if_match_and_no_headers_once_known(tmp_path, s3_bucket, s3_faults):
    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE), driver="COG", predictor=2)
    url = _upload(s3_bucket, "r/a.tif", path)
    store = LayoutStore()
    eng = _engine()
    n0 = len(_gets(s3_faults, "r/a.tif"))
    f = TileFile(url, store=store)
    assert len(_gets(s3_faults, "r/a.tif")) - n0 == 1  # the header: one ranged GET
    rows, cols = np.arange(0, 256), np.arange(0, 700)  # one row of tiles: 3 tiles, adjacent in the file
    want = _want(path, rows, cols)
    n1 = len(_gets(s3_faults, "r/a.tif"))
    np.testing.assert_array_equal(f.read(rows, cols, 0, eng).result(), want)
    tile_gets = _gets(s3_faults, "r/a.tif")[n1:]
    assert len(tile_gets) == 1  # coalesced: one request for the 3 tiles
    etag = store.get(url).etag
    assert etag and tile_gets[0][3].get("if-match") == etag  # the layout's file, or 412
    np.testing.assert_array_equal(f.read(rows, cols, 0, eng).result(), want)
    assert len(_gets(s3_faults, "r/a.tif")) - n1 == 1  # cached tiles: no request
    # Another file handle with the layout already known: no header read, one request per tile group.
    n2 = len(_gets(s3_faults, "r/a.tif"))
    g = TileFile(url, store=store)
    assert len(_gets(s3_faults, "r/a.tif")) == n2
    g.read(np.arange(300, 400), np.arange(300, 400), 0, eng).result()
    assert len(_gets(s3_faults, "r/a.tif")) - n2 == 1
    assert not [r for r in _settled(s3_faults) if r[1] == "HEAD" and "r/a.tif" in r[2]]
    eng.shutdown()


@pytest.mark.services
def test_s3_retries_and_missing_objects(tmp_path, s3_bucket, s3_faults):
    path = write(tmp_path / "a.tif", pixels("uint8", 1, SHAPE))
    url = _upload(s3_bucket, "x/a.tif", path)
    eng = _engine()
    f = TileFile(url, store=LayoutStore())
    s3_faults.fail_next(2, 503, method="GET", path_contains="x/a.tif")
    np.testing.assert_array_equal(f.read(np.arange(50), np.arange(50), 0, eng).result(),
                                  _want(path, np.arange(50), np.arange(50)))
    assert s3_faults.failures == 2
    with pytest.raises(AssetReadError, match="missing.tif"):
        TileFile(f"s3://{s3_bucket}/x/missing.tif", store=LayoutStore())
    eng.shutdown()


@pytest.mark.services
@pytest.mark.parametrize("same_size", [False, True])
def test_s3_replaced_object_is_noticed_by_if_match(tmp_path, s3_bucket, s3_faults, same_size):
    """An object replaced after its layout was read -- by one of another layout, or by one
    of exactly the same size and layout whose pixels differ -- answers the tile request's
    If-Match with 412; the header is read again and the new pixels come back."""
    old = write(tmp_path / "old.tif", pixels("uint16", 1, SHAPE, seed=1), blocksize=256, compress=None)
    if same_size:
        new = write(tmp_path / "new.tif", pixels("uint16", 1, SHAPE, seed=2), blocksize=256, compress=None)
        assert old.stat().st_size == new.stat().st_size
    else:
        new = write(tmp_path / "new.tif", pixels("uint16", 1, SHAPE, seed=2), blocksize=512, compress="zstd")
    url = _upload(s3_bucket, "c/a.tif", old)
    store = LayoutStore()
    eng = _engine()
    TileFile(url, store=store)
    stale = store.get(url)
    _upload(s3_bucket, "c/a.tif", new)  # replaced: a new ETag
    f = TileFile(url, store=store)  # the cached layout is used...
    rows, cols = np.arange(100, 300), np.arange(400, 650)
    n = len(_answered(s3_faults))
    got = f.read(rows, cols, 0, eng).result()  # ...and found stale by the first tile request
    np.testing.assert_array_equal(got, _want(new, rows, cols))
    assert store.get(url).etag != stale.etag
    statuses = [r for r in _answered(s3_faults)[n:] if "c/a.tif" in r[1]]
    assert statuses and statuses[0][2] == 412
    eng.shutdown()


@pytest.mark.services
def test_s3_unsigned_public_bucket(tmp_path, s3_bucket, s3_faults, monkeypatch):
    import boto3

    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE))
    url = _upload(s3_bucket, "p/a.tif", path)
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object_acl(
        Bucket=s3_bucket, Key="p/a.tif", ACL="public-read")
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    eng = _engine()
    n = len(_settled(s3_faults))
    g = TileFile(url, store=LayoutStore())
    np.testing.assert_array_equal(g.read(np.arange(40), np.arange(40), 0, eng).result(),
                                  _want(path, np.arange(40), np.arange(40)))
    assert all("authorization" not in r[3] for r in _settled(s3_faults)[n:])
    eng.shutdown()


def test_temporary_credentials_from_boto3_are_renewed(monkeypatch):
    """Credentials boto3 refreshes (SSO, assume-role, container roles) are asked of it again,
    so requests signed after they rotate carry the new keys; static keys never expire."""
    import datetime

    import boto3
    import botocore.credentials

    from stacchip import storage
    from stacchip.storage import config

    issued = []

    def refresh():
        issued.append(f"TEMPKEY{len(issued)}")
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        return {"access_key": issued[-1], "secret_key": "s", "token": "t", "expiry_time": expiry.isoformat()}

    creds = botocore.credentials.RefreshableCredentials.create_from_metadata(refresh(), refresh, "assume-role")
    monkeypatch.setattr(boto3.session.Session, "get_credentials", lambda self: creds)
    monkeypatch.setenv("AWS_PROFILE_MARKER_FOR_TEST", "1")
    storage.reset()
    provide = storage.settings().credential_provider()
    assert provide()["access_key_id"] == "TEMPKEY0" and provide()["expires_at"] is not None
    creds._expiry_time = datetime.datetime.now(datetime.timezone.utc)  # the role's keys ran out: boto3 refreshes
    assert provide()["access_key_id"] == "TEMPKEY1"
    assert storage.settings().gdal_options()["AWS_ACCESS_KEY_ID"] == "TEMPKEY1"  # GDAL gets the same keys
    static = botocore.credentials.Credentials("STATICKEY", "s")
    monkeypatch.setattr(boto3.session.Session, "get_credentials", lambda self: static)
    storage.reset()
    assert config.settings().credential_provider()()["expires_at"] is None
    storage.reset()


# --- one configuration: region, CA bundle, proxy ---------------------------------------------------


@pytest.fixture
def west_bucket(s3_env, monkeypatch, tmp_path):
    """A bucket in us-west-2 behind an endpoint that refuses requests signed for another
    region (as S3 does), with the region only in an AWS config file (no region variable)."""
    from stacchip import storage
    from tests.services import FaultyS3Proxy

    import boto3

    name = f"west-{os.urandom(6).hex()}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-west-2").create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    proxy = FaultyS3Proxy(s3_env, region="us-west-2")
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-west-2\n")
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    storage.reset()
    try:
        yield name, proxy
    finally:
        proxy.close()
        storage.reset()


@pytest.mark.services
def test_region_from_the_aws_config_file_signs_tiles_storage_and_gdal(tmp_path, west_bucket, monkeypatch):
    from stacchip import storage
    from stacchip.reader import DatasetCache, gdal_env, resolve_href

    bucket, proxy = west_bucket
    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE), predictor=2)
    url = _upload(bucket, "w/a.tif", path)  # storage writes: signed for us-west-2
    assert storage.read_bytes(url) == path.read_bytes()
    eng = _engine()
    rows, cols = np.arange(10, 300), np.arange(5, 260)
    np.testing.assert_array_equal(TileFile(url, store=LayoutStore()).read(rows, cols, 0, eng).result(),
                                  _want(path, rows, cols))
    with gdal_env():  # GDAL's /vsis3/ gets the region from the same settings
        ds = DatasetCache().get(resolve_href(url), "test ")
        np.testing.assert_array_equal(read_indexed(ds, rows, cols, 0), _want(path, rows, cols))
    assert not [r for r in proxy.requests if r[2] == 400]
    # The check is real: a client signing for us-east-1 is refused as S3 refuses it.
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    storage.reset()
    with pytest.raises(StorageRefusedError, match="AuthorizationHeaderMalformed|HTTP 400"):
        storage.read_bytes(url)
    eng.shutdown()


@pytest.mark.services
@pytest.mark.parametrize("variable", ["AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"])
def test_https_endpoint_of_a_private_ca(tmp_path, s3_bucket, s3_https, private_ca, monkeypatch, variable):
    """Tiles, index files and GDAL reach an HTTPS endpoint signed by a private CA once a CA
    variable names it; without it, the certificate is refused at once (not retried)."""
    from stacchip import storage
    from stacchip.index import read_index, write_index
    from stacchip.reader import DatasetCache, gdal_env, resolve_href
    from tests.test_index_io import _item

    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE), predictor=2)
    url = f"s3://{s3_bucket}/ca/a.tif"
    before = s3_https.connections
    with pytest.raises(StorageRefusedError, match="TLS certificate is not trusted") as refused:
        storage.write_bytes(url, path.read_bytes())
    assert refused.value.exit_code == 2  # the scheduler does not retry it either
    # object_store counts a failed handshake as a connection error and retries it within
    # the policy (5 attempts in all); nothing beyond the policy.
    assert 1 <= s3_https.connections - before <= storage.settings().retry.attempts
    monkeypatch.setenv(variable, private_ca["ca"])
    storage.write_bytes(url, path.read_bytes())
    eng = _engine()
    rows, cols = np.arange(0, 200), np.arange(100, 400)
    np.testing.assert_array_equal(TileFile(url, store=LayoutStore()).read(rows, cols, 0, eng).result(),
                                  _want(path, rows, cols))
    from stacchip.indexer import Sentinel2Indexer

    table = Sentinel2Indexer(_item(tmp_path, "CA", "2024-01-01T00:00:00Z"), chip_size=20).create_full_index()
    index_url = f"s3://{s3_bucket}/ca/index.parquet"
    write_index(table, index_url)
    assert read_index(index_url).num_rows == table.num_rows
    with gdal_env():
        ds = DatasetCache().get(resolve_href(url), "test ")
        np.testing.assert_array_equal(read_indexed(ds, rows, cols, 0), _want(path, rows, cols))
    eng.shutdown()


@pytest.mark.services
def test_requests_go_through_the_configured_proxy(tmp_path, s3_bucket, forward_proxy, monkeypatch, nginx):
    """HTTP_PROXY (and NO_PROXY) decide for every client: obstore's S3 and HTTP stores,
    the index writer, GDAL. A real forward proxy (proxy.py) logs what reached it."""
    from stacchip import storage

    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    storage.reset()
    path = write(tmp_path / "a.tif", pixels("uint16", 1, SHAPE), predictor=2)
    url = _upload(s3_bucket, "px/a.tif", path)
    shutil.copy(path, nginx.root / "a.tif")
    eng = _engine()
    rows, cols = np.arange(0, 120), np.arange(0, 300)

    def read(href):
        np.testing.assert_array_equal(TileFile(href, store=LayoutStore()).read(rows, cols, 0, eng).result(),
                                      _want(path, rows, cols))

    read(url)
    read(f"{nginx.url}/a.tif")
    storage.reset()  # proxy.py logs a connection when it closes: drop the clients' pools
    gc.collect()
    logged = "\n".join(forward_proxy.lines())
    assert "px/a.tif" in logged and f"{nginx.url.split('//')[1]}/a.tif" in logged
    # NO_PROXY keeps loopback direct: nothing more reaches the proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    storage.reset()
    n = len(forward_proxy.lines())
    read(url)
    storage.reset()
    gc.collect()
    assert len(forward_proxy.lines()) == n
    eng.shutdown()


# --- retries ----------------------------------------------------------------------------------------


@pytest.mark.services
def test_retry_policy_bounds_attempts_and_refusals_are_not_retried(tmp_path, s3_bucket, s3_faults, monkeypatch):
    from stacchip import storage

    url = f"s3://{s3_bucket}/rp/x.bin"
    storage.write_bytes(url, b"0123456789")
    monkeypatch.setenv("STACCHIP_RETRIES", "1")  # one attempt in all
    monkeypatch.setenv("STACCHIP_RETRY_TIMEOUT", "30")
    s3_faults.fail_next(5, 503, method="GET", path_contains="rp/x.bin")
    n = len(_answered(s3_faults))
    with pytest.raises(StorageError) as info:
        storage.read_bytes(url)
    assert not isinstance(info.value, StorageRefusedError) and info.value.exit_code == 1
    assert len([r for r in _answered(s3_faults)[n:] if "rp/x.bin" in r[1]]) == 1
    s3_faults.clear_faults()
    monkeypatch.setenv("STACCHIP_RETRIES", "4")
    s3_faults.fail_next(5, 403, method="GET", path_contains="rp/x.bin")  # refused: never retried
    n = len(_answered(s3_faults))
    with pytest.raises(StorageRefusedError) as refused:
        storage.read_bytes(url)
    assert refused.value.exit_code == 2
    assert len([r for r in _answered(s3_faults)[n:] if "rp/x.bin" in r[1]]) == 1
    s3_faults.clear_faults()
    s3_faults.fail_next(3, 503, method="GET", path_contains="rp/x.bin")  # within the budget: read
    assert storage.read_bytes(url) == b"0123456789"


@pytest.mark.services
def test_retry_after_is_waited_for_by_the_synchronous_client(tmp_path, s3_bucket, s3_faults):
    """The client of forked children (urllib3) waits for a 503's Retry-After before it
    asks again. (obstore's client backs off on its own schedule: object_store does not
    read Retry-After; it retries within the same bounded policy.)"""
    from stacchip import storage
    from stacchip.storage import clients

    url = f"s3://{s3_bucket}/ra/x.bin"
    storage.write_bytes(url, b"abcdefghij")
    sync = clients.SyncClient(clients.locate(url), storage.settings(), False)
    s3_faults.fail_next(1, 503, method="GET", path_contains="ra/x.bin", retry_after=2)
    n = len(s3_faults.log)
    data, meta = sync.get("ra/x.bin", 2, 6)
    assert bytes(data) == b"cdef" and meta.size == 10
    times = [r[0] for r in _settled(s3_faults)[n:] if "ra/x.bin" in r[2]]
    assert len(times) == 2 and times[1] - times[0] >= 2.0
    s3_faults.fail_next(1, 503, method="GET", path_contains="ra/x.bin", retry_after=1)
    assert storage.read_bytes(url) == b"abcdefghij"  # obstore: retried, read


# --- http: nginx ------------------------------------------------------------------------------------


def test_http_pixels_equal_gdal(tmp_path, nginx):
    eng = _engine()
    for name, path in _write_all(tmp_path).items():
        shutil.copy(path, nginx.root / name)
        _assert_same(f"{nginx.url}/{name}", path, eng)
    with pytest.raises(AssetReadError, match="nothere.tif"):
        TileFile(f"{nginx.url}/nothere.tif", store=LayoutStore())
    eng.shutdown()


def test_http_same_size_new_etag_is_reread(tmp_path, nginx):
    """nginx's ETag changes with the file: a same-size replacement answers If-Match with
    412 and the new pixels are read."""
    old = write(tmp_path / "old.tif", pixels("uint16", 1, SHAPE, seed=1), blocksize=256, compress=None)
    new = write(tmp_path / "new.tif", pixels("uint16", 1, SHAPE, seed=2), blocksize=256, compress=None)
    assert old.stat().st_size == new.stat().st_size
    target = nginx.root / "a.tif"
    shutil.copy(old, target)
    os.utime(target, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    url = f"{nginx.url}/a.tif"
    store = LayoutStore()
    eng = _engine()
    TileFile(url, store=store)
    shutil.copy(new, target)  # same size, another mtime: another ETag
    rows, cols = np.arange(0, 300), np.arange(200, 500)
    n = len(nginx.requests())
    np.testing.assert_array_equal(TileFile(url, store=store).read(rows, cols, 0, eng).result(),
                                  _want(new, rows, cols))
    after = nginx.requests()[n:]
    assert after[0][2] == 412 and after[0][4]  # the tile request carried If-Match, and lost
    eng.shutdown()


def test_http_without_etag_reads_the_header_again_once(tmp_path):
    """A server that sends no ETag cannot be asked If-Match: a stored layout of such a file
    is read again once per process (then kept), so a same-size replacement made before
    the process started is never read through the old layout."""
    import functools
    import http.server
    import threading

    from tests.test_chipper import _RangeHandler  # static files with ranges, no ETag

    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        old = write(tmp_path / "old.tif", pixels("uint16", 1, SHAPE, seed=1), blocksize=256, compress=None)
        new = write(tmp_path / "new.tif", pixels("uint16", 1, SHAPE, seed=3), blocksize=256, compress=None)
        shutil.copy(old, root / "a.tif")
        url = f"http://127.0.0.1:{server.server_address[1]}/a.tif"
        first = LayoutStore()
        TileFile(url, store=first)
        assert first.get(url).etag is None
        stored = LayoutStore()
        stored.update_from_json(first.to_json())  # as an index written earlier would hand it over
        from stacchip.tiles import layouts

        layouts._confirmed.pop(url, None)  # a new process
        shutil.copy(new, root / "a.tif")
        eng = _engine()
        rows, cols = np.arange(0, 100), np.arange(0, 100)
        np.testing.assert_array_equal(TileFile(url, store=stored).read(rows, cols, 0, eng).result(),
                                      _want(new, rows, cols))
        eng.shutdown()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_server_ignoring_range(tmp_path, nginx_no_ranges, monkeypatch):
    """A server that answers ranged GETs with the whole file (status 200): small files are
    fetched whole once and their tiles served from memory; larger ones go to GDAL."""
    import pystac

    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer
    from stacchip.tiles import sources

    path = write(tmp_path / "a.tif", pixels("uint16", 2, SHAPE), predictor=2)
    shutil.copy(path, nginx_no_ranges.root / "a.tif")
    url = f"{nginx_no_ranges.url}/a.tif"
    eng = _engine()
    f = _assert_same(url, path, eng)
    gets = [r for r in nginx_no_ranges.requests() if r[0] == "GET" and r[1] == "/a.tif"]
    assert len(gets) == 2 and {r[2] for r in gets} == {200}  # the refused range, then the whole file once
    assert f.source.requests >= 1
    monkeypatch.setattr(sources, "WHOLE_MAX", 1000)  # too large to fetch whole: left to GDAL, which
    item = pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "r", "geometry": None, "links": [],
        "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": list(SHAPE),
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {"a": {"href": url}},
    })
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=128))  # refuses such servers: a named error
    with pytest.raises(AssetReadError, match="a.tif.*Range downloading not supported"):
        chipper.chip(1, 1)
    assert chipper.tile_file("a") is None
    chipper.close()
    eng.shutdown()


# --- forked children ---------------------------------------------------------------------------------


class _Chips:
    """A map-style dataset reading chips through one Chipper (as ChipDataset does)."""

    def __init__(self, chipper, positions):
        self.chipper, self.positions = chipper, positions

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        x, y = self.positions[i]
        chip = self.chipper.chip(x, y)["a"]
        f = self.chipper.tile_file("a")
        return {"pixels": chip, "tiles": f is not None, "blocking": bool(f is not None and f.source.blocking),
                "pid": os.getpid()}


@pytest.mark.services
def test_forked_dataloader_workers_read_s3_tiles_through_the_fast_path(tmp_path, s3_bucket):
    """DataLoader workers forked after the parent read s3:// through obstore (whose runtime
    does not survive a fork) read tiles through the synchronous client: tile path, same
    pixels, no GDAL."""
    torch = pytest.importorskip("torch")
    import pystac

    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer

    path = write(tmp_path / "a.tif", pixels("uint16", 2, SHAPE), predictor=2, compress="deflate")
    url = _upload(s3_bucket, "dl/a.tif", path)
    item = pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "dl", "geometry": None, "links": [],
        "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": list(SHAPE),
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {"a": {"href": url}},
    })
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=128), threads=2)
    positions = [(0, 0), (1, 1), (2, 0), (0, 2), (3, 3), (2, 2)]
    want = {p: chipper.chip(*p)["a"] for p in positions}  # the parent's obstore runtime is up
    assert not chipper.tile_file("a").source.blocking
    loader = torch.utils.data.DataLoader(_Chips(chipper, positions), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    seen = list(loader)
    assert len(seen) == len(positions)
    assert {s["pid"] for s in seen} != {os.getpid()}
    for p, s in zip(positions, seen, strict=True):
        assert s["tiles"] and s["blocking"], s
        np.testing.assert_array_equal(s["pixels"].numpy(), want[p])
    chipper.close()
