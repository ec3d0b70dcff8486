"""Pytest plugin: real services on loopback for the test suite.

Fixtures
--------
``s3_server`` (session)
    moto's standalone S3-protocol HTTP server on ``127.0.0.1`` and a free
    port, in a subprocess. Yields :class:`S3Server` (``.endpoint``).
``s3_env`` (function)
    Points boto3 and GDAL at ``s3_server`` through the standard environment
    variables (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, dummy
    credentials, ``us-east-1``) and rebuilds stacchip's cached boto3 client.
    Yields the endpoint URL.
``s3_bucket`` (function)
    A new, uniquely named bucket on ``s3_server``; yields its name.
``s3_faults`` (function)
    Like ``s3_env`` but through :class:`FaultyS3Proxy`, a loopback proxy whose
    ``.fail_next(n, status=503)`` makes the next requests fail (retry tests).
``stac_api`` (session)
    PostgreSQL + PostGIS in a temporary data directory, the pgstac schema
    (``pypgstac migrate``) and stac-fastapi-pgstac served by uvicorn on
    ``127.0.0.1``. Yields :class:`StacApi` (``.url``, ``.dsn``, ``.conforms_to``,
    ``.load_collection(dict)``, ``.load_items(list[dict])`` (pypgstac load, upsert),
    ``.load_queryables(props, collection_ids)``, ``.delete_collection(id)``,
    ``StacApi.make_collection(id, items)``). :data:`DEFAULT_QUERYABLES` are loaded
    at start so ``sortby`` on ``eo:cloud_cover`` is numeric, as on public APIs.

A service that cannot be started (program not installed, start failed) fails
the test when ``CI=true`` is set and skips it with the reason otherwise; see
:func:`service_unavailable`.

Enable with ``pytest_plugins = ["tests.services"]`` in ``tests/conftest.py``
and mark tests that use these fixtures with ``@pytest.mark.services``.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import pytest

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Seconds to wait for a server to answer after it was started.
START_TIMEOUT = 60.0
#: Seconds to wait for a server process to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: PostgreSQL major version whose programs live in /usr/lib/postgresql/<N>/bin (Debian layout).
PG_MAJOR = "15"
DUMMY_ACCESS_KEY = "testing-access-key"
DUMMY_SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"
#: Queryables loaded into every test STAC API, as public deployments (Planetary Computer,
#: Earth Search) define them. Without a numeric queryable pgstac sorts a property as text
#: ("18.4" before "3.2"); comparisons in query/filter are numeric either way.
DEFAULT_QUERYABLES: dict[str, Any] = {
    "eo:cloud_cover": {"type": "number", "minimum": 0, "maximum": 100, "description": "percent"},
    "s2:nodata_pixel_percentage": {"type": "number", "minimum": 0, "maximum": 100},
    "landsat:cloud_cover_land": {"type": "number", "minimum": -1, "maximum": 100},
}

# urllib opener that never goes through an HTTP proxy: everything here is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def in_ci() -> bool:
    """True when the environment says this is a CI run (``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def service_unavailable(reason: str) -> NoReturn:
    """A required service is missing: fail under ``CI=true``, skip elsewhere."""
    if in_ci():
        pytest.fail(f"service unavailable (CI=true makes this a failure): {reason}", pytrace=False)
    pytest.skip(f"service unavailable: {reason}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """``(status, body)`` of a GET on a loopback URL (no proxy); HTTP errors return their status."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _tail(path: Path, n_chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-n_chars:]


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    """Terminate ``proc``; kill it when it has not exited after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    """A running moto S3 server."""

    endpoint: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)
    logfile: Path = field(repr=False)


def _start_moto(logdir: Path) -> S3Server:
    try:
        import moto.server  # noqa: F401  (the server needs flask/werkzeug from moto[server])
        import flask  # noqa: F401
    except ImportError as exc:
        service_unavailable(f"moto[server] is not installed ({exc}); pip install 'moto[server]'")
    last = ""
    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        logfile = logdir / f"moto-{port}.log"
        with open(logfile, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        endpoint = f"http://{LOOPBACK}:{port}"
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT and proc.poll() is None:
            try:
                status, _ = http_get(f"{endpoint}/moto-api/", timeout=2.0)
                if status < 500:
                    log.info("moto server on %s after %.2f s", endpoint, time.monotonic() - start)
                    return S3Server(endpoint=endpoint, port=port, process=proc, logfile=logfile)
            except OSError:
                pass
            time.sleep(0.1)
        stop_process(proc)
        last = _tail(logfile)
    service_unavailable(f"moto S3 server did not start on {LOOPBACK}:\n{last}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3 server on 127.0.0.1 for the whole session."""
    server = _start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        stop_process(server.process)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Environment pointing boto3 and GDAL at ``s3_server``; yields the endpoint URL."""
    from stacchip import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REQUEST_PAYER"):
        monkeypatch.delenv(name, raising=False)
    no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY"), LOOPBACK, "localhost") if p)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    storage.reset()
    try:
        yield s3_server.endpoint
    finally:
        storage.reset()


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new bucket with a unique name on the loopback S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


class FaultyS3Proxy:
    """A loopback HTTP(S) endpoint in front of the S3 server that can answer as S3 does
    when something is wrong.

    Every request is forwarded to ``upstream`` unchanged, except:

    * the next ``n`` matching ones after :meth:`fail_next`, which get ``status`` and an
      S3 XML error (``SlowDown`` for 503), with ``Retry-After`` when asked, without
      reaching the server;
    * with ``region`` set, a request signed for another region gets S3's answer,
      ``400 AuthorizationHeaderMalformed`` (the bucket lives in ``region``).

    ``tls=(certfile, keyfile)`` serves HTTPS (a private CA's certificate). Every
    request's method, path, status, headers and arrival time are recorded. GDAL and
    boto3 in this process or in subprocesses reach it the same way.
    """

    def __init__(self, upstream: str, region: str | None = None, tls: tuple[str, str] | None = None) -> None:
        import http.server
        import threading

        self.upstream = upstream
        self.region = region
        self._lock = threading.Lock()
        self._rules: list[dict[str, Any]] = []
        #: ``(method, path, status, injected)`` of every request, in arrival order.
        self.requests: list[tuple[str, str, int, bool]] = []
        #: ``(arrival time.monotonic(), method, path, headers (lower-case names))`` of every request.
        self.log: list[tuple[float, str, str, dict[str, str]]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("s3 proxy: " + format, *args)

            def _body(self) -> bytes:
                return read_request_body(self)

            def _handle(self) -> None:
                import time

                body = self._body()
                with proxy._lock:
                    proxy.log.append((time.monotonic(), self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                fault = proxy._take_fault(self.command, self.path)
                if fault is not None:
                    status, retry_after = fault
                    extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                    self._send(status, {"Content-Type": "application/xml", **extra}, _s3_error_xml(status, self.path))
                    proxy._record(self.command, self.path, status, True)
                    return
                wrong = proxy._wrong_region(self.path, self.headers.get("Authorization", ""))
                if wrong is not None:
                    self._send(400, {"Content-Type": "application/xml"}, _region_error_xml(wrong, proxy.region or ""))
                    proxy._record(self.command, self.path, 400, True)
                    return
                import http.client

                conn = http.client.HTTPConnection(proxy._host, proxy._port, timeout=60)
                try:
                    headers = {
                        k: v for k, v in self.headers.items()
                        if k.lower() not in ("transfer-encoding", "connection", "content-length")
                    }
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = {k: v for k, v in resp.getheaders()
                           if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date")}
                    self._send(resp.status, out, data, head_length=resp.getheader("Content-Length"))
                    proxy._record(self.command, self.path, resp.status, False)
                finally:
                    conn.close()

            def _send(self, status: int, headers: dict[str, str], data: bytes, head_length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", head_length or str(len(data)))
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        from urllib.parse import urlparse

        parsed = urlparse(upstream)
        self._host, self._port = parsed.hostname or LOOPBACK, parsed.port or 80
        class Server(http.server.ThreadingHTTPServer):
            def get_request(self) -> Any:
                with proxy._lock:
                    proxy.connections += 1  # counted before a TLS handshake, which may fail
                return super().get_request()

        #: Connections accepted (TLS ones counted before their handshake).
        self.connections = 0
        self._server = Server((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.endpoint = f"{scheme}://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="faulty-s3-proxy", daemon=True
        )
        self._thread.start()

    def fail_next(
        self, n: int, status: int = 503, method: str | None = None, path_contains: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``n`` requests (of ``method``, whose path contains ``path_contains``) with
        ``status`` (and a ``Retry-After`` of ``retry_after`` seconds when given)."""
        with self._lock:
            self._rules.append({"n": n, "status": status, "method": method, "path": path_contains,
                                "retry_after": retry_after})

    def clear_faults(self) -> None:
        """Forget every pending :meth:`fail_next`."""
        with self._lock:
            self._rules.clear()

    @property
    def failures(self) -> int:
        """How many requests were answered with an injected error."""
        with self._lock:
            return sum(1 for r in self.requests if r[3])

    def _take_fault(self, method: str, path: str) -> tuple[int, int | None] | None:
        with self._lock:
            for rule in self._rules:
                if rule["n"] <= 0:
                    continue
                if rule["method"] and rule["method"] != method:
                    continue
                if rule["path"] and rule["path"] not in path:
                    continue
                rule["n"] -= 1
                return int(rule["status"]), rule["retry_after"]
        return None

    def _wrong_region(self, path: str, authorization: str) -> str | None:
        """The region a request was signed for when it is not :attr:`region` (header or
        presigned query), else None."""
        import re
        from urllib.parse import unquote

        if self.region is None:
            return None
        found = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/s3/", authorization) or \
            re.search(r"X-Amz-Credential=[^&]+?%2F\d{8}%2F([^&%]+)%2Fs3%2F", path)
        if found is None:
            return None  # unsigned
        signed = unquote(found.group(1))
        return None if signed == self.region else signed

    def _record(self, method: str, path: str, status: int, injected: bool) -> None:
        with self._lock:
            self.requests.append((method, path, status, injected))

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=STOP_TIMEOUT)


def _region_error_xml(signed: str, region: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AuthorizationHeaderMalformed</Code>'
        f"<Message>The authorization header is malformed; the region '{signed}' is wrong; "
        f"expecting '{region}'</Message><Region>{region}</Region><RequestId>test</RequestId></Error>"
    ).encode()


def _s3_error_xml(status: int, path: str) -> bytes:
    code = {503: "SlowDown", 500: "InternalError", 429: "SlowDown"}.get(status, "ServiceUnavailable")
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected by the test proxy</Message><Resource>{path}</Resource>"
        "<RequestId>test</RequestId></Error>"
    ).encode()


@pytest.fixture
def s3_faults(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3Proxy]:
    """Like ``s3_env``, but boto3 and GDAL go through a :class:`FaultyS3Proxy`.

    Buckets made by ``s3_bucket`` are on the same server. Yields the proxy;
    call ``.fail_next(n)`` to make the next ``n`` requests fail with 503.
    """
    from stacchip import storage

    proxy = FaultyS3Proxy(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    storage.reset()
    try:
        yield proxy
    finally:
        proxy.close()
        storage.reset()


@pytest.fixture(scope="session")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private certificate authority (trustme) and a server certificate it signed for
    127.0.0.1 and localhost: ``{"ca": pem path, "cert": ..., "key": ...}``."""
    try:
        import trustme
    except ImportError as exc:  # pragma: no cover - installed by the test extra
        service_unavailable(f"trustme is not installed ({exc}); pip install trustme")
    folder = tmp_path_factory.mktemp("ca")
    ca = trustme.CA()
    server = ca.issue_cert(LOOPBACK, "localhost")
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def s3_https(s3_env: str, private_ca: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3Proxy]:
    """Like ``s3_env``, but the S3 endpoint is HTTPS with a certificate of a private CA
    (as MinIO, Ceph or a company gateway); no CA variable is set (tests set one)."""
    from stacchip import storage

    proxy = FaultyS3Proxy(s3_env, tls=(private_ca["cert"], private_ca["key"]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    storage.reset()
    try:
        yield proxy
    finally:
        proxy.close()
        storage.reset()


@dataclass
class ForwardProxy:
    """proxy.py, a forward HTTP proxy, on loopback; :meth:`lines` reads its access log."""

    url: str
    process: subprocess.Popen[bytes]
    logfile: Path

    def lines(self) -> list[str]:
        """Access-log lines, once the log stops growing (proxy.py writes a line after answering)."""
        seen, stable_since, text = -1, time.monotonic(), ""
        while time.monotonic() - stable_since < 0.3:
            text = self.logfile.read_text(errors="replace")
            if len(text) != seen:
                seen, stable_since = len(text), time.monotonic()
            time.sleep(0.05)
        return [line for line in text.splitlines() if "access_log" in line]


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    """A real forward proxy (proxy.py) on 127.0.0.1, stopped after the test."""
    if not _has_module("proxy"):
        service_unavailable("proxy.py is not installed; pip install proxy.py")
    for _attempt in range(3):
        port = free_port()
        logfile = tmp_path / f"proxy-{port}.log"
        with open(logfile, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--hostname", LOOPBACK, "--port", str(port),
                 "--num-workers", "1", "--num-acceptors", "1", "--log-level", "INFO"],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT and proc.poll() is None:
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None:
            try:
                yield ForwardProxy(f"http://{LOOPBACK}:{port}", proc, logfile)
            finally:
                stop_process(proc)
            return
        stop_process(proc)
    service_unavailable(f"proxy.py did not start on {LOOPBACK}:\n{_tail(logfile)}")


@dataclass
class Nginx:
    """nginx serving ``root`` on loopback (ETags, ``If-Match``, ranges as real servers do);
    :meth:`requests` reads its access log: ``(method, path, status, Range, If-Match)``."""

    url: str
    root: Path
    process: subprocess.Popen[bytes]
    access_log: Path

    def requests(self) -> list[tuple[str, str, int, str, str]]:
        out = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            method, path, status, rng, if_match = line.split("\t")
            out.append((method, path, int(status), rng, if_match))
        return out


def _start_nginx(workdir: Path, root: Path, ranges: bool = True) -> Nginx:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        service_unavailable("nginx is not installed (Debian package nginx-light)")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    last = ""
    for _attempt in range(3):
        port = free_port()
        access = workdir / f"access-{port}.log"
        access.touch()
        conf = workdir / f"nginx-{port}.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {workdir}/nginx-{port}.pid;\n"
            f"error_log {workdir}/error-{port}.log warn;\nevents {{ worker_connections 64; }}\n"
            "http {\n"
            "  log_format t '$request_method\\t$uri\\t$status\\t$http_range\\t$http_if_match';\n"
            f"  access_log {access} t;\n"
            f"  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;\n"
            f"  fastcgi_temp_path {workdir}/fastcgi; uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;\n"
            "  default_type application/octet-stream;\n"
            f"  server {{ listen {LOOPBACK}:{port}; root {root}; {'' if ranges else 'max_ranges 0;'} }}\n"
            "}\n"
        )
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT and proc.poll() is None:
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1):
                    return Nginx(f"http://{LOOPBACK}:{port}", root, proc, access)
            except OSError:
                time.sleep(0.05)
        stop_process(proc)
        last = _tail(workdir / f"error-{port}.log")
    service_unavailable(f"nginx did not start on {LOOPBACK}:\n{last}")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """nginx serving ``tmp_path/www`` on 127.0.0.1 (stopped after the test)."""
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    server = _start_nginx(tmp_path / "nginx", root)
    try:
        yield server
    finally:
        stop_process(server.process)


@pytest.fixture
def nginx_no_ranges(tmp_path: Path) -> Iterator[Nginx]:
    """nginx configured to ignore ``Range`` (``max_ranges 0``: whole files, status 200)."""
    root = tmp_path / "www-whole"
    root.mkdir(exist_ok=True)
    server = _start_nginx(tmp_path / "nginx-whole", root, ranges=False)
    try:
        yield server
    finally:
        stop_process(server.process)


# --------------------------------------------------------------------- STAC API


@dataclass
class StacApi:
    """A running stac-fastapi-pgstac on PostgreSQL + PostGIS + pgstac.

    The server is shared by the whole session: give each test's collections
    ids of their own (see :meth:`make_collection`).
    """

    url: str
    dsn: str
    conforms_to: list[str] = field(default_factory=list)
    workdir: Path | None = field(default=None, repr=False)

    def load_collection(self, collection: dict[str, Any]) -> None:
        """Insert or update one STAC collection (``pypgstac load``, method upsert)."""
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            Loader(db=db).load_collections(iter([collection]), insert_mode=Methods.upsert)

    def load_items(self, items: Sequence[dict[str, Any]]) -> None:
        """Insert or update STAC items (``pypgstac load``, method upsert).

        Their collection must have been loaded first.
        """
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            Loader(db=db).load_items(iter(list(items)), insert_mode=Methods.upsert)

    def load_queryables(
        self, properties: dict[str, dict[str, Any]], collection_ids: Sequence[str] | None = None
    ) -> None:
        """Add queryables (JSON-schema per property name), globally or for some collections.

        The same as ``pypgstac load_queryables``. A ``{"type": "number"}``
        queryable makes pgstac sort that property numerically.
        """
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET search_path TO pgstac, public")
            conn.execute(
                "SELECT upsert_queryables(%s::jsonb, %s::text[], %s::text[], %s)",
                [json.dumps({"properties": properties}), list(collection_ids) if collection_ids else None, None, False],
            )

    def delete_collection(self, collection_id: str) -> bool:
        """Remove a collection and all its items; False when there was none.

        The server is shared by the session: a test that must use a fixed
        collection id (``sentinel-2-l2a``) deletes it first.
        """
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET search_path TO pgstac, public")
            cur = conn.execute("DELETE FROM collections WHERE id = %s", [collection_id])
            return cur.rowcount > 0

    @staticmethod
    def make_collection(
        collection_id: str, items: Sequence[dict[str, Any]] = (), **extra: Any
    ) -> dict[str, Any]:
        """A minimal valid STAC collection dict whose extent covers ``items``.

        The spatial extent is the union of the items' bboxes (degrees), the
        temporal extent spans their datetimes; without items the whole globe
        and an open interval.
        """
        bboxes = [it["bbox"] for it in items if it.get("bbox")]
        if bboxes:
            bbox = [
                min(b[0] for b in bboxes),
                min(b[1] for b in bboxes),
                max(b[2] for b in bboxes),
                max(b[3] for b in bboxes),
            ]
        else:
            bbox = [-180.0, -90.0, 180.0, 90.0]
        times = sorted(
            t
            for it in items
            for t in (
                it["properties"].get("datetime"),
                it["properties"].get("start_datetime"),
                it["properties"].get("end_datetime"),
            )
            if t
        )
        interval = [times[0], times[-1]] if times else [None, None]
        collection: dict[str, Any] = {
            "type": "Collection",
            "stac_version": "1.0.0",
            "id": collection_id,
            "description": f"test collection {collection_id}",
            "license": "proprietary",
            "links": [],
            "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}},
        }
        collection.update(extra)
        return collection


def _has_module(name: str) -> bool:
    """True when ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _pg_bindir() -> Path | None:
    """Directory with initdb and pg_ctl: ``$STACCHIP_PG_BINDIR`` when set, else Debian's or PATH's."""
    override = os.environ.get("STACCHIP_PG_BINDIR")
    if override:
        candidates = [Path(override)]
    else:
        candidates = [Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")]
        found = shutil.which("initdb")
        if found:
            candidates.append(Path(found).resolve().parent)
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    return None


class _Postgres:
    """A throw-away PostgreSQL cluster in ``workdir`` on 127.0.0.1:``port``."""

    def __init__(self, workdir: Path, bindir: Path) -> None:
        self.workdir = workdir
        self.bindir = bindir
        self.datadir = workdir / "data"
        self.logfile = workdir / "postgres.log"
        self.port = 0
        self.started = False
        # As root, PostgreSQL refuses to run: its programs run as the `postgres` OS user.
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                service_unavailable("running as root but `runuser` is missing to start PostgreSQL as `postgres`")
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                service_unavailable("running as root but there is no `postgres` OS user (install postgresql-15)")
            os.chown(workdir, pw.pw_uid, pw.pw_gid)
            self.prefix = [runuser, "-u", "postgres", "--"]

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
        )

    def initdb(self) -> None:
        res = self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", "postgres",
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            timeout=120,
        )
        if res.returncode != 0:
            service_unavailable(f"initdb failed ({res.returncode}): {res.stderr[-2000:]}")

    def start(self) -> None:
        last = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            opts = (
                f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.workdir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=50 -c shared_buffers=64MB"
            )
            res = self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                 "-w", "-t", str(int(START_TIMEOUT)), "-o", opts, "start"],
                timeout=START_TIMEOUT + 30,
            )
            if res.returncode == 0:
                self.started = True
                return
            last = f"{res.stdout[-1000:]}{res.stderr[-1000:]}\n{_tail(self.logfile)}"
        service_unavailable(f"pg_ctl start failed:\n{last}")

    def stop(self) -> None:
        if not self.started:
            return
        try:
            res = self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30", "stop"],
                timeout=60,
            )
            ok = res.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if not ok:
            self._kill_postmaster()
        self.started = False

    def _kill_postmaster(self) -> None:
        pidfile = self.datadir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 9)
            log.warning("PostgreSQL in %s did not stop; killed postmaster %d", self.datadir, pid)

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{database}"


def _start_stac_app(workdir: Path, pg: _Postgres, database: str) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ)
    for name in ("ENABLED_EXTENSIONS", "PREFIX_PATH", "ROOT_PATH", "DATABASE_URL"):
        env.pop(name, None)
    env.update(
        PGHOST=LOOPBACK,
        PGPORT=str(pg.port),
        PGUSER="postgres",
        PGPASSWORD="unused-trust-auth",  # required by the settings model; loopback uses trust auth
        PGDATABASE=database,
        DB_MIN_CONN_SIZE="1",
        DB_MAX_CONN_SIZE="5",
        STAC_FASTAPI_TITLE="stacchip test STAC API",
        STAC_FASTAPI_DESCRIPTION="stac-fastapi-pgstac on loopback for the stacchip tests",
        STAC_FASTAPI_LANDING_ID="stacchip-test",
        STAC_FASTAPI_VERSION="test",
    )
    last = ""
    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        logfile = workdir / f"uvicorn-{port}.log"
        with open(logfile, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory",
                 "--host", LOOPBACK, "--port", str(port), "--log-level", "warning"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,  # no stray .env file is read
                env=env,
            )
        url = f"http://{LOOPBACK}:{port}"
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT and proc.poll() is None:
            try:
                status, _ = http_get(f"{url}/", timeout=5.0)
                if status == 200:
                    return proc, url
            except OSError:
                pass
            time.sleep(0.1)
        stop_process(proc)
        last = _tail(logfile)
    service_unavailable(f"stac-fastapi-pgstac did not answer on {LOOPBACK}:\n{last}")


@pytest.fixture(scope="session")
def stac_api() -> Iterator[StacApi]:
    """stac-fastapi-pgstac on PostgreSQL + PostGIS on loopback, for the whole session."""
    missing = [
        name
        for name in ("psycopg", "pypgstac", "stac_fastapi.pgstac", "uvicorn")
        if not _has_module(name)
    ]
    if missing:
        service_unavailable(
            f"STAC API packages missing ({', '.join(missing)}); "
            "pip install 'pypgstac[psycopg]' stac-fastapi-pgstac uvicorn"
        )
    import psycopg
    bindir = _pg_bindir()
    if bindir is None:
        where = os.environ.get("STACCHIP_PG_BINDIR") or f"/usr/lib/postgresql/{PG_MAJOR}/bin or on PATH"
        service_unavailable(
            f"PostgreSQL programs (initdb, pg_ctl) not found in {where}; "
            "apt-get install postgresql-15-postgis-3 (or run .ci/setup)"
        )
    t0 = time.monotonic()
    # Under /tmp, not pytest's tmp dir: the unix socket path must stay short and the
    # `postgres` user must be able to reach it.
    workdir = Path(tempfile.mkdtemp(prefix="stacchip-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    pg = _Postgres(workdir, bindir)
    app: subprocess.Popen[bytes] | None = None
    try:
        pg.initdb()
        pg.start()
        database = "pgstac"
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
            row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'").fetchone()
            if row is None:
                service_unavailable("PostGIS is not installed for PostgreSQL; apt-get install postgresql-15-postgis-3")
            conn.execute(f"CREATE DATABASE {database}")
        dsn = pg.dsn(database)
        from pypgstac.db import PgstacDB
        from pypgstac.migrate import Migrate

        try:
            with PgstacDB(dsn=dsn) as db:
                version = Migrate(db).run_migration()
        except Exception as exc:  # any failure of the migration means no STAC API
            service_unavailable(f"pypgstac migrate failed: {exc}")
        api_probe = StacApi(url="", dsn=dsn)
        api_probe.load_queryables(DEFAULT_QUERYABLES)
        t_db = time.monotonic() - t0
        app, url = _start_stac_app(workdir, pg, database)
        status, body = http_get(f"{url}/")
        conforms_to = sorted(json.loads(body).get("conformsTo", [])) if status == 200 else []
        log.info(
            "STAC API %s up in %.1f s (postgres + pgstac %s in %.1f s)",
            url, time.monotonic() - t0, version, t_db,
        )
        yield StacApi(url=url, dsn=dsn, conforms_to=conforms_to, workdir=workdir)
    finally:
        stop_process(app)
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def read_request_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """The request body a proxy handler received (Content-Length or chunked)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        return b"".join(chunks)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""
