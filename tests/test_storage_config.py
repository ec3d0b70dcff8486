"""The one I/O configuration (stacchip.storage.config): where each value comes from, what
every client gets from it, and the one error classification (stacchip.storage.clients)."""

import pytest

from stacchip import storage
from stacchip.errors import (
    ConfigError,
    StorageError,
    StorageNotFoundError,
    StoragePreconditionError,
    StorageRangeError,
    StorageRefusedError,
)
from stacchip.storage import clients, config

AWS_VARS = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "SSL_CERT_FILE", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "AWS_REQUEST_PAYER", "AWS_NO_SIGN_REQUEST", "AWS_MAX_ATTEMPTS", "STACCHIP_RETRIES",
    "STACCHIP_RETRY_TIMEOUT", "STACCHIP_CONNECT_TIMEOUT", "STACCHIP_READ_TIMEOUT", "STACCHIP_REQUEST_TIMEOUT",
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No AWS or proxy variable, empty AWS config files, no instance metadata."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.reset()
    yield monkeypatch
    storage.reset()


def _pem(tmp_path, name):
    trustme = pytest.importorskip("trustme")
    path = tmp_path / name
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_region_from_the_profile_in_the_config_file(clean_env, tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("[default]\nregion = eu-central-1\n[profile west]\nregion = us-west-2\n")
    clean_env.setenv("AWS_CONFIG_FILE", str(cfg))
    assert storage.settings().region == "eu-central-1" and storage.settings().region_configured
    clean_env.setenv("AWS_PROFILE", "west")
    conf = storage.settings()
    assert conf.region == "us-west-2"
    assert conf.gdal_options()["AWS_REGION"] == "us-west-2"  # GDAL signs for the same region
    assert conf.botocore_config().region_name == "us-west-2"
    clean_env.setenv("AWS_REGION", "ap-southeast-2")  # the variable wins over the profile
    assert storage.settings().region == "ap-southeast-2"


def test_no_region_anywhere_is_us_east_1(clean_env):
    conf = storage.settings()
    assert conf.region == "us-east-1" and not conf.region_configured


def test_missing_profile_is_a_config_error(clean_env):
    clean_env.setenv("AWS_PROFILE", "nosuchprofile")
    with pytest.raises(ConfigError, match="nosuchprofile"):
        storage.settings()


def test_credentials_from_the_chain_or_unsigned(clean_env, tmp_path):
    conf = storage.settings()
    assert conf.credentials is None and not conf.signs()  # none found: public buckets only
    assert conf.gdal_options()["AWS_NO_SIGN_REQUEST"] == "YES"
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = FROMFILE\naws_secret_access_key = s\n")
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    conf = storage.settings()
    assert conf.signs() and conf.credential_provider()()["access_key_id"] == "FROMFILE"
    assert conf.gdal_options()["AWS_ACCESS_KEY_ID"] == "FROMFILE"
    clean_env.setenv("AWS_NO_SIGN_REQUEST", "YES")
    assert not storage.settings().signs()


def test_ca_bundle_precedence_and_errors(clean_env, tmp_path):
    a, b, c = _pem(tmp_path, "a.pem"), _pem(tmp_path, "b.pem"), _pem(tmp_path, "c.pem")
    clean_env.setenv("SSL_CERT_FILE", c)
    assert storage.settings().ca_bundle == c
    clean_env.setenv("REQUESTS_CA_BUNDLE", b)
    assert storage.settings().ca_bundle == b
    clean_env.setenv("AWS_CA_BUNDLE", a)
    conf = storage.settings()
    assert conf.ca_bundle == a
    options = conf.client_options("https://s3.example.com")
    assert options["root_certificate"] == open(a, "rb").read()
    assert conf.gdal_options()["GDAL_CURL_CA_BUNDLE"] == a
    clean_env.setenv("AWS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="AWS_CA_BUNDLE.*missing.pem"):
        storage.settings()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    clean_env.setenv("AWS_CA_BUNDLE", str(bad))
    with pytest.raises(ConfigError, match="no PEM certificate"):
        storage.settings()


def test_ca_bundle_from_the_profile(clean_env, tmp_path):
    pem = _pem(tmp_path, "profile.pem")
    cfg = tmp_path / "config"
    cfg.write_text(f"[default]\nca_bundle = {pem}\n")
    clean_env.setenv("AWS_CONFIG_FILE", str(cfg))
    assert storage.settings().ca_bundle == pem


def test_proxies_and_no_proxy(clean_env):
    clean_env.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    clean_env.setenv("http_proxy", "http://plain.corp:8080")
    clean_env.setenv("NO_PROXY", "localhost,.internal.corp,10.1.2.3")
    conf = storage.settings()
    assert conf.proxies.for_url("https://s3.us-west-2.amazonaws.com/b/k") == "http://proxy.corp:3128"
    assert conf.proxies.for_url("http://example.org/x.tif") == "http://plain.corp:8080"
    assert conf.proxies.for_url("https://minio.internal.corp:9000/b") is None
    assert conf.proxies.for_url("http://10.1.2.3/x") is None
    options = conf.client_options("https://s3.us-west-2.amazonaws.com")
    assert options["proxy_url"] == "http://proxy.corp:3128" and options["proxy_excludes"] == conf.proxies.no_proxy
    assert "proxy_url" not in conf.client_options("https://minio.internal.corp:9000")
    gdal = conf.gdal_options()
    assert gdal["GDAL_HTTPS_PROXY"] == "http://proxy.corp:3128" and gdal["GDAL_HTTP_PROXY"] == "http://plain.corp:8080"
    clean_env.setenv("ALL_PROXY", "http://all.corp:1")
    clean_env.delenv("http_proxy")
    assert storage.settings().proxies.http == "http://all.corp:1"


def test_one_retry_policy_for_every_client(clean_env):
    policy = storage.settings().retry
    assert policy.attempts == config.DEFAULT_ATTEMPTS and policy.timeout == config.DEFAULT_RETRY_TIMEOUT
    clean_env.setenv("AWS_MAX_ATTEMPTS", "3")
    assert storage.settings().retry.attempts == 3
    clean_env.setenv("STACCHIP_RETRIES", "2")  # ours wins
    clean_env.setenv("STACCHIP_RETRY_TIMEOUT", "9")
    policy = storage.settings().retry
    assert policy.attempts == 2 and policy.timeout == 9
    assert policy.for_obstore()["max_retries"] == 1
    assert policy.for_obstore()["retry_timeout"].total_seconds() == 9
    retry = policy.for_urllib3()
    assert retry.total == 1 and retry.respect_retry_after_header and 503 in retry.status_forcelist
    assert 403 not in retry.status_forcelist
    assert policy.for_botocore() == {"total_max_attempts": 2, "mode": "standard"}
    assert storage.settings().gdal_options()["GDAL_HTTP_MAX_RETRY"] == "1"
    for bad in ("0", "many", "-1"):
        clean_env.setenv("STACCHIP_RETRIES", bad)
        with pytest.raises(ConfigError, match="STACCHIP_RETRIES"):
            storage.settings()


def test_settings_are_built_once_per_environment(clean_env):
    first = storage.settings()
    assert storage.settings() is first
    clean_env.setenv("AWS_REGION", "us-west-2")
    second = storage.settings()
    assert second is not first and second.region == "us-west-2"


def test_endpoint_for_every_client(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    conf = storage.settings()
    assert storage.s3_endpoint() == "http://127.0.0.1:9000" and conf.s3_base() == "http://127.0.0.1:9000"
    gdal = conf.gdal_options()
    assert gdal["AWS_S3_ENDPOINT"] == "127.0.0.1:9000" and gdal["AWS_HTTPS"] == "NO"
    assert conf.client_options(conf.s3_base())["allow_http"] is True
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "minio.corp:9443")  # the S3 one wins; https by default
    assert storage.settings().endpoint == "https://minio.corp:9443"


def test_requests_sessions_get_the_same_configuration(clean_env, tmp_path):
    import requests

    pem = _pem(tmp_path, "r.pem")
    clean_env.setenv("AWS_CA_BUNDLE", pem)
    clean_env.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    clean_env.setenv("STACCHIP_RETRIES", "4")
    session = storage.settings().requests_session(requests.Session())
    assert session.verify == pem and session.proxies["https"] == "http://proxy.corp:3128"
    retry = session.get_adapter("https://stac.example.com").max_retries
    assert retry.total == 3 and "POST" in retry.allowed_methods


@pytest.mark.parametrize("url, root, path", [
    ("s3://bucket/a/b.tif", "s3://bucket", "a/b.tif"),
    ("https://host:8443/dir/a%20b.tif", "https://host:8443", "dir/a b.tif"),
    ("https://acct.blob.core.windows.net/c/x.tif?st=1&sig=a%2Fb",
     "https://acct.blob.core.windows.net/c/x.tif?st=1&sig=a%2Fb", ""),
    ("gs://bucket/k.tif", "gs://bucket", "k.tif"),
])
def test_locations(url, root, path):
    location = clients.locate(url)
    assert (location.root, location.path) == (root, path)


def test_locate_refuses_what_it_cannot_read():
    for url in ("ftp://host/x", "/local/path", "s3:///nobucket"):
        with pytest.raises(StorageError):
            clients.locate(url)


class _Status(Exception):
    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


class NotFoundError(Exception):
    pass


class PreconditionError(Exception):
    pass


class PermissionDeniedError(Exception):
    pass


@pytest.mark.parametrize("exc, kind, code", [
    (NotFoundError("gone"), StorageNotFoundError, 2),
    (PreconditionError("etag"), StoragePreconditionError, 1),
    (PermissionDeniedError("403"), StorageRefusedError, 2),
    (_Status(412, "precondition"), StoragePreconditionError, 1),
    (_Status(416, "range"), StorageRangeError, 1),
    (_Status(400, "AuthorizationHeaderMalformed: the region 'us-east-1' is wrong"), StorageRefusedError, 2),
    (_Status(403, "RequestTimeTooSkewed"), StorageRefusedError, 2),
    (_Status(429, "slow down"), StorageError, 1),
    (_Status(503, "unavailable"), StorageError, 1),
    (Exception("error: InvalidCertificate(UnknownIssuer)"), StorageRefusedError, 2),
    (Exception("Server returned non-2xx status code: 404 Not Found:"), StorageNotFoundError, 2),
    (ConnectionResetError("reset"), StorageError, 1),
])
def test_one_error_classification(exc, kind, code):
    err = clients.translate(exc, "s3://b/k", "read")
    assert type(err) is kind and err.exit_code == code and "s3://b/k" in str(err)


@pytest.mark.parametrize("href, expected", [
    ("s3://bucket/a/b.tif", "s3://bucket/a/b.tif"),
    ("https://host/a.tif?st=1&sig=x", "https://host/a.tif?st=1&sig=x"),  # signed: obstore keeps the query
    ("gs://bucket/k.tif", "gs://bucket/k.tif"),
    ("https://user:secret@host/a.tif", None),  # credentials in the href: GDAL's
    ("https://host/a.tif#frag", None),
    ("s3://bucket/k.tif?versionId=3", None),
    ("/vsicurl/https://host/a.tif", None),
    ("file:///data/a.tif", "/data/a.tif"),
    ("ftp://host/a.tif", None),
])
def test_what_the_tile_path_opens(href, expected):
    from stacchip.tiles.sources import tile_href

    assert tile_href(href) == expected
