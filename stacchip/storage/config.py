"""One configuration for every client that moves remote bytes.

Credentials, region, endpoint, CA bundle, proxies, requester-pays and the retry
policy are read here, once per environment, and handed to every client: obstore's
stores (:mod:`stacchip.storage.clients`), the synchronous client a forked child
uses, the STAC API session, and GDAL (:func:`gdal_options`). Nothing else in the
package reads these variables.

Where each value comes from (first that is set wins):

=================  ===========================================================================
credentials        boto3's session: environment keys, ``AWS_PROFILE`` (shared credentials and
                   config files, SSO, ``credential_process``, assume-role), web identity,
                   container and instance roles -- temporary ones refreshed by boto3. None
                   found: requests go unsigned (public buckets), and say so once in the log.
region             ``AWS_REGION``, then boto3's session (``AWS_DEFAULT_REGION``, the profile's
                   ``region`` in the config file), else ``us-east-1``
S3 endpoint        ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto, ...)
CA bundle          ``AWS_CA_BUNDLE``, the profile's ``ca_bundle``, ``REQUESTS_CA_BUNDLE``,
                   ``CURL_CA_BUNDLE``, ``SSL_CERT_FILE`` (added to the system's roots)
proxies            ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` (either case), ``NO_PROXY``
requester pays     ``AWS_REQUEST_PAYER=requester`` (or per call, for a source bucket)
unsigned           ``AWS_NO_SIGN_REQUEST=YES``
retries            ``STACCHIP_RETRIES`` attempts in all (else ``AWS_MAX_ATTEMPTS``, else 5),
                   within ``STACCHIP_RETRY_TIMEOUT`` seconds (default 120)
timeouts           ``STACCHIP_CONNECT_TIMEOUT`` (default 10 s), ``STACCHIP_READ_TIMEOUT``
                   (no byte for this long: default 60 s), ``STACCHIP_REQUEST_TIMEOUT``
                   (a whole request: default 600 s)
=================  ===========================================================================

The retry policy is the same everywhere: connection errors, timeouts, HTTP 5xx, 429
and 408 are retried with exponential backoff (jittered, from 0.2 s up to 15 s), at
most ``attempts`` times in all and never after ``timeout`` seconds; other 4xx,
certificate errors, refused credentials and clock skew are not retried. The
synchronous client and GDAL also wait for a server's ``Retry-After``; obstore's
client (object_store) does not read that header and backs off on its own schedule.

:func:`settings` is cheap: it compares the variables above with the last ones it
saw and builds new settings (and, through them, new clients) only when they changed.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

from stacchip.errors import ConfigError

logger = logging.getLogger(__name__)

#: Every environment variable a client's configuration depends on.
ENV_NAMES = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_EC2_METADATA_DISABLED",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "SSL_CERT_FILE", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "AWS_REQUEST_PAYER", "AWS_NO_SIGN_REQUEST", "AWS_MAX_ATTEMPTS",
    "STACCHIP_RETRIES", "STACCHIP_RETRY_TIMEOUT", "STACCHIP_CONNECT_TIMEOUT", "STACCHIP_READ_TIMEOUT",
    "STACCHIP_REQUEST_TIMEOUT",
)

#: What each variable of the I/O configuration does (the documentation's table is made
#: from this; the standard AWS and proxy variables mean what they mean to the AWS CLI and curl).
VARIABLES: dict[str, str] = {
    "AWS_PROFILE": "the AWS profile boto3's session reads (credentials, `region`, `ca_bundle`)",
    "AWS_REGION": "the region every client signs for (wins over `AWS_DEFAULT_REGION` and the profile's); "
    "default `us-east-1`",
    "AWS_ENDPOINT_URL_S3": "the S3 endpoint of every client and of GDAL (MinIO, Ceph, ...); wins over "
    "`AWS_ENDPOINT_URL`",
    "AWS_CA_BUNDLE": "CA bundle (PEM) added to the system's roots for every client and GDAL; then the profile's "
    "`ca_bundle`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, `SSL_CERT_FILE`",
    "HTTPS_PROXY": "proxy of https requests of every client and GDAL (`HTTP_PROXY` for http, `ALL_PROXY` for "
    "both); `NO_PROXY` lists hosts reached directly",
    "AWS_REQUEST_PAYER": "`requester`: every S3 request pays for itself (requester-pays buckets)",
    "AWS_NO_SIGN_REQUEST": "`YES`: S3 requests go unsigned (public buckets); also the case when no credentials "
    "are found",
    "STACCHIP_RETRIES": "attempts in all (the first included) of a request that fails for a reason worth "
    "retrying (connection, timeout, HTTP 5xx/429/408); default `AWS_MAX_ATTEMPTS`, else 5",
    "STACCHIP_RETRY_TIMEOUT": "seconds after the first attempt past which no retry starts; default 120",
    "STACCHIP_CONNECT_TIMEOUT": "seconds to connect (TLS handshake included); default 10",
    "STACCHIP_READ_TIMEOUT": "seconds without a byte before a request fails (and is retried); default 60",
    "STACCHIP_REQUEST_TIMEOUT": "seconds a whole request may take; default 600",
}

DEFAULT_ATTEMPTS = 5
DEFAULT_RETRY_TIMEOUT = 120.0
#: First backoff delay and its cap, s.
BASE_DELAY = 0.2
MAX_DELAY = 15.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_REQUEST_TIMEOUT = 600.0
#: Statuses worth retrying.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: How long obstore keeps temporary credentials from boto3 before asking it again, s.
CREDENTIALS_TTL = 600.0
DEFAULT_REGION = "us-east-1"
USER_AGENT = "stacchip"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("YES", "TRUE", "1", "ON")


def _number(name: str, default: float, *, integer: bool = False, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a {'whole ' if integer else ''}number") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy (see the module docstring), in each client's own terms."""

    attempts: int = DEFAULT_ATTEMPTS
    timeout: float = DEFAULT_RETRY_TIMEOUT
    base_delay: float = BASE_DELAY
    max_delay: float = MAX_DELAY

    def for_obstore(self) -> dict[str, Any]:
        return {
            "max_retries": max(0, self.attempts - 1),
            "retry_timeout": timedelta(seconds=self.timeout),
            "backoff": {"init_backoff": timedelta(seconds=self.base_delay),
                        "max_backoff": timedelta(seconds=self.max_delay), "base": 2.0},
        }

    def for_urllib3(self, methods: tuple[str, ...] = ("GET", "HEAD")) -> Any:
        """urllib3's ``Retry`` (also what ``requests`` sessions mount); ``methods`` are the
        idempotent ones retried (a STAC search POST is)."""
        from urllib3.util.retry import Retry

        retries = max(0, self.attempts - 1)
        return Retry(
            total=retries, connect=retries, read=retries, status=retries, other=0, redirect=5,
            allowed_methods=frozenset(methods), status_forcelist=RETRY_STATUSES,
            backoff_factor=self.base_delay, backoff_max=self.max_delay, backoff_jitter=self.base_delay,
            respect_retry_after_header=True, retry_after_max=int(self.timeout), raise_on_status=False,
        )

    def for_botocore(self) -> dict[str, Any]:
        return {"total_max_attempts": max(1, self.attempts), "mode": "standard"}

    def for_gdal(self) -> dict[str, str]:
        return {"GDAL_HTTP_MAX_RETRY": str(max(0, self.attempts - 1)),
                "GDAL_HTTP_RETRY_DELAY": f"{max(self.base_delay, 0.1):g}"}


@dataclass(frozen=True)
class Proxies:
    """Proxies from the environment: ``http``/``https`` proxy URLs and ``NO_PROXY``."""

    http: str | None = None
    https: str | None = None
    no_proxy: str | None = None

    def for_url(self, url: str) -> str | None:
        """The proxy a request to ``url`` goes through, or None (direct, or excluded by ``NO_PROXY``)."""
        parts = urlsplit(url)
        proxy = self.https if parts.scheme == "https" else self.http
        if not proxy:
            return None
        host = parts.hostname or ""
        if self.no_proxy and host:
            import urllib.request  # ~25 ms of import: only when a proxy is set

            target = host if parts.port is None else f"{host}:{parts.port}"
            if urllib.request.proxy_bypass_environment(target, {"no": self.no_proxy}):  # type: ignore[attr-defined]
                return None
        return proxy


@dataclass(frozen=True)
class IOSettings:
    """Everything a client needs to reach remote storage (see the module docstring).

    Built by :func:`settings`; ``key`` is the environment it was built from.
    """

    region: str
    region_configured: bool
    endpoint: str | None
    ca_bundle: str | None
    ca_source: str | None
    proxies: Proxies
    requester_pays: bool
    unsigned: bool
    retry: RetryPolicy
    connect_timeout: float
    read_timeout: float
    request_timeout: float
    key: tuple[Any, ...] = field(repr=False, compare=False)
    session: Any = field(repr=False, compare=False, default=None)
    credentials: Any = field(repr=False, compare=False, default=None)

    # --- what each client gets -------------------------------------------------------------
    def ca_pem(self) -> bytes | None:
        """The CA bundle's PEM text (None without one); a bundle that cannot be read is a
        :class:`~stacchip.errors.ConfigError` naming its variable."""
        if not self.ca_bundle:
            return None
        return _read_pem(self.ca_bundle, self.ca_source or "CA bundle")

    def client_options(self, url: str) -> dict[str, Any]:
        """obstore ``client_options`` for requests to ``url`` (an endpoint or origin)."""
        options: dict[str, Any] = {
            "connect_timeout": timedelta(seconds=self.connect_timeout),
            "read_timeout": timedelta(seconds=self.read_timeout),
            "timeout": timedelta(seconds=self.request_timeout),
            "user_agent": USER_AGENT,
        }
        if url.startswith("http://"):
            options["allow_http"] = True
        pem = self.ca_pem()
        if pem is not None:
            options["root_certificate"] = pem
        proxy = self.proxies.for_url(url)
        if proxy:
            options["proxy_url"] = proxy
            if self.proxies.no_proxy:
                options["proxy_excludes"] = self.proxies.no_proxy
            if pem is not None:
                options["proxy_ca_certificate"] = pem.decode("ascii", "replace")
        return options

    def s3_base(self) -> str:
        """Where S3 requests go: the configured endpoint, else AWS's for the region."""
        return (self.endpoint or f"https://s3.{self.region}.amazonaws.com").rstrip("/")

    def signs(self) -> bool:
        """Whether S3 requests are signed (credentials found and not ``AWS_NO_SIGN_REQUEST``)."""
        return not self.unsigned and self.credentials is not None

    def credential_provider(self) -> Any:
        """obstore's ``credential_provider``: boto3's credentials, asked again every
        :data:`CREDENTIALS_TTL` s when they are temporary (boto3 refreshes them)."""
        creds = self.credentials
        if creds is None:
            return None
        refreshable = callable(getattr(creds, "refresh_needed", None))

        def provide() -> dict[str, Any]:
            frozen = creds.get_frozen_credentials()
            expires = datetime.now(timezone.utc) + timedelta(seconds=CREDENTIALS_TTL) if refreshable else None
            return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                    "token": frozen.token, "expires_at": expires}

        return provide

    def frozen_credentials(self) -> Any:
        """boto3's current credentials (refreshed when needed), or None."""
        return None if self.credentials is None else self.credentials.get_frozen_credentials()

    def botocore_config(self) -> Any:
        """A botocore ``Config`` with this region, retry policy, timeouts and proxies."""
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "region_name": self.region, "retries": self.retry.for_botocore(),
            "connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
            "user_agent_extra": USER_AGENT,
        }
        proxy = self.proxies.for_url(self.s3_base())
        if proxy:
            kwargs["proxies"] = {"http": proxy, "https": proxy}
        if self.endpoint:
            kwargs["s3"] = {"addressing_style": "path"}
        if not self.signs():
            from botocore import UNSIGNED

            kwargs["signature_version"] = UNSIGNED
        return Config(**kwargs)

    def boto3_client(self, service: str = "s3") -> Any:
        """A boto3 client from this configuration (the synchronous S3 client of forked
        children)."""
        import boto3

        session = self.session if self.session is not None else boto3.session.Session()
        return session.client(
            service, endpoint_url=self.endpoint if service == "s3" else None,
            config=self.botocore_config(), verify=self.ca_bundle or None,
        )

    def requests_session(self, session: Any, methods: tuple[str, ...] = ("GET", "HEAD", "POST")) -> Any:
        """Configure a ``requests`` session (the STAC API client's): the retry policy on
        its adapters, the CA bundle, the proxies. Returns it."""
        from requests.adapters import HTTPAdapter

        adapter = HTTPAdapter(max_retries=self.retry.for_urllib3(methods))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if self.ca_bundle:
            session.verify = self.ca_bundle
        for scheme, proxy in (("http", self.proxies.http), ("https", self.proxies.https)):
            if proxy:
                session.proxies[scheme] = proxy
        if self.proxies.no_proxy:
            session.proxies["no_proxy"] = self.proxies.no_proxy
        return session

    def gdal_options(self) -> dict[str, str]:
        """GDAL configuration derived from these settings (``/vsis3/``, ``/vsicurl/``)."""
        options = dict(self.retry.for_gdal())
        options["GDAL_HTTP_CONNECTTIMEOUT"] = f"{self.connect_timeout:g}"
        options["AWS_REGION"] = self.region
        if self.endpoint:
            parts = urlsplit(self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}")
            options["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
            options["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
            options["AWS_VIRTUAL_HOSTING"] = "FALSE"
        if self.requester_pays:
            options["AWS_REQUEST_PAYER"] = "requester"
        if not self.signs():
            options["AWS_NO_SIGN_REQUEST"] = "YES"
        else:
            frozen = self.frozen_credentials()
            options["AWS_NO_SIGN_REQUEST"] = "NO"
            options["AWS_ACCESS_KEY_ID"] = frozen.access_key
            options["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
            options["AWS_SESSION_TOKEN"] = frozen.token or ""
        if self.ca_bundle:  # GDAL >= 3.9 reads the first, older versions the second
            options["GDAL_CURL_CA_BUNDLE"] = self.ca_bundle
            options["CURL_CA_BUNDLE"] = self.ca_bundle
        if self.proxies.http:
            options["GDAL_HTTP_PROXY"] = self.proxies.http
        if self.proxies.https:
            options["GDAL_HTTPS_PROXY"] = self.proxies.https
        return options


def _read_pem(path: str, what: str) -> bytes:
    try:
        st = os.stat(path)
        return _pem(path, st.st_mtime_ns, st.st_size, what)
    except OSError as exc:
        raise ConfigError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from exc


@functools.lru_cache(maxsize=8)
def _pem(path: str, mtime_ns: int, size: int, what: str) -> bytes:
    """A CA bundle's content, read once per version of the file."""
    with open(path, "rb") as fh:
        data = fh.read()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{what} {path!r} holds no PEM certificate")
    return data


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _first_env(*names: str) -> tuple[str | None, str | None]:
    for name in names:
        value = _env(name)
        if value:
            return value, name
    return None, None


def _proxies() -> Proxies:
    everything = _env("ALL_PROXY") or _env("all_proxy")
    return Proxies(
        http=_env("HTTP_PROXY") or _env("http_proxy") or everything,
        https=_env("HTTPS_PROXY") or _env("https_proxy") or everything,
        no_proxy=_env("NO_PROXY") or _env("no_proxy"),
    )


def _retry_policy() -> RetryPolicy:
    if _env("STACCHIP_RETRIES"):
        attempts = int(_number("STACCHIP_RETRIES", DEFAULT_ATTEMPTS, integer=True, minimum=1))
    else:
        attempts = int(_number("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS, integer=True, minimum=1))
    return RetryPolicy(attempts=attempts, timeout=_number("STACCHIP_RETRY_TIMEOUT", DEFAULT_RETRY_TIMEOUT))


def _session() -> Any:
    import boto3
    import botocore.exceptions

    try:
        return boto3.session.Session()
    except botocore.exceptions.ProfileNotFound as exc:
        raise ConfigError(f"AWS profile: {exc}") from exc


def _credentials(session: Any) -> Any:
    import botocore.exceptions

    try:
        return session.get_credentials()
    except botocore.exceptions.BotoCoreError as exc:
        raise ConfigError(f"AWS credentials cannot be loaded: {exc}") from exc


def _build(key: tuple[Any, ...]) -> IOSettings:
    session = _session()
    region = _env("AWS_REGION") or session.region_name
    endpoint = _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    ca_bundle, ca_source = _first_env("AWS_CA_BUNDLE")
    if ca_bundle is None:
        configured = session._session.get_config_variable("ca_bundle")  # the profile's ca_bundle
        if configured:
            ca_bundle, ca_source = str(configured), "the AWS profile's ca_bundle"
    if ca_bundle is None:
        ca_bundle, ca_source = _first_env("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
    if ca_bundle is not None and ca_source and ca_source.isupper():
        ca_source = f"CA bundle {ca_source}"
    if ca_bundle is not None:
        _read_pem(ca_bundle, ca_source or "CA bundle")  # fail early, naming the variable
    unsigned = _truthy(_env("AWS_NO_SIGN_REQUEST"))
    credentials = None if unsigned else _credentials(session)
    if not unsigned and credentials is None:
        logger.info("no AWS credentials found: S3 requests go unsigned (public buckets only)")
    return IOSettings(
        region=region or DEFAULT_REGION, region_configured=bool(region), endpoint=endpoint,
        ca_bundle=ca_bundle, ca_source=ca_source, proxies=_proxies(),
        requester_pays=(_env("AWS_REQUEST_PAYER") or "").lower() == "requester",
        unsigned=unsigned, retry=_retry_policy(),
        connect_timeout=_number("STACCHIP_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
        read_timeout=_number("STACCHIP_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
        request_timeout=_number("STACCHIP_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT),
        key=key, session=session, credentials=credentials,
    )


_lock = threading.Lock()
_current: IOSettings | None = None


def environment_key() -> tuple[Any, ...]:
    """The values of :data:`ENV_NAMES` now (settings are rebuilt when it changes)."""
    env = os.environ
    return tuple(env.get(name) for name in ENV_NAMES)


def settings() -> IOSettings:
    """The I/O settings of the current environment (built once per environment)."""
    global _current
    key = environment_key()
    current = _current
    if current is not None and current.key == key:
        return current
    with _lock:
        if _current is None or _current.key != key:
            _current = _build(key)
        return _current


def reset() -> None:
    """Forget the settings (and so every client built from them): read again on next use."""
    global _current
    with _lock:
        _current = None


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
