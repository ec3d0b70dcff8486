"""The tile bytes client (stacchip.tiles.http) against a scripted loopback server:
keep-alive reuse, servers closing connections, chunked bodies, retries, redirects,
servers ignoring Range, bad Content-Range, the client setting and proxies."""

import http.server
import os
import socket
import threading

import numpy as np
import pytest

from stacchip.errors import AssetReadError, ConfigError
from stacchip.tiles import http as tile_http
from stacchip.tiles.sources import RemoteSource, StaleLayoutError

DATA = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


class _Script:
    """What the server does: per path a body, plus faults taken in order."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def take(self) -> str:
        with self.lock:
            return self.faults.pop(0) if self.faults else ""


def _handler(script):
    return type("Handler", (_Handler,), {"script": script})


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: _Script

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.script.lock:
            self.script.connections += 1

    def do_GET(self):  # noqa: C901 - one branch per scripted behaviour
        with self.script.lock:
            self.script.requests.append((self.path, self.headers.get("Range", "")))
        fault = self.script.take()
        if self.path.startswith("/missing"):
            return self._send(404, {}, b"no such object")
        if fault == "503":
            return self._send(503, {}, b"slow down")
        if fault == "redirect":
            return self._send(307, {"Location": "/moved" + self.path}, b"")
        if fault == "redirect-file":
            return self._send(302, {"Location": "file:///etc/passwd"}, b"")
        if fault == "drop":  # the connection dies before any response
            self.close_connection = True
            return
        rng = self.headers.get("Range", "")
        start_s, _, end_s = rng[len("bytes="):].partition("-")
        start, end = int(start_s), min(int(end_s), len(DATA) - 1)
        if start >= len(DATA):
            return self._send(416, {"Content-Range": f"bytes */{len(DATA)}"}, b"")
        body = DATA[start:end + 1]
        headers = {"ETag": '"v1"'}
        if fault == "ignore-range":
            return self._send(200, headers, DATA)
        if fault == "bad-range":
            headers["Content-Range"] = f"bytes {start + 1}-{end + 1}/{len(DATA)}"
            return self._send(206, headers, body)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(DATA)}"
        if fault == "chunked":
            self.send_response(206)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 7000):
                part = body[i:i + 7000]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return None
        if fault == "close":
            headers["Connection"] = "close"
            self.close_connection = True
        if fault == "close-quietly":  # closed after the response, without saying so
            self.close_connection = True
        if fault == "gzip":
            headers["Content-Encoding"] = "gzip"
        if fault == "no-range-header":
            del headers["Content-Range"]
        if fault == "stall":  # headers and part of the body, then nothing
            self.send_response(206)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:100])
            self.wfile.flush()
            self.script.release.wait(10)
            self.close_connection = True
            return None
        return self._send(206, headers, body)

    def _send(self, status, headers, body):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    script = _Script()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield script, f"http://127.0.0.1:{srv.server_address[1]}"
    script.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def _get(pool, url, start, end):
    got = pool.get_range(url, start, end)
    assert bytes(got.data) == DATA[start:end], (start, end)
    return got


def test_ranges_reuse_one_keep_alive_connection(server):
    script, base = server
    pool = tile_http.ConnectionPool()
    for start, end in [(0, 1000), (5000, 250_000), (299_000, 300_000)]:
        got = _get(pool, f"{base}/a.tif", start, end)
        assert got.size == len(DATA) and got.etag == '"v1"'
    got = pool.get_range(f"{base}/a.tif", 290_000, 400_000)  # past the end: the server clips the range
    assert bytes(got.data) == DATA[290_000:]
    assert script.connections == 1
    assert script.requests[1] == ("/a.tif", "bytes=5000-249999")
    pool.clear()


def test_server_closing_connections(server):
    script, base = server
    pool = tile_http.ConnectionPool()
    script.faults = ["close"]
    _get(pool, f"{base}/a.tif", 10, 200_000)  # "Connection: close": not kept
    _get(pool, f"{base}/a.tif", 10, 20)
    assert script.connections == 2
    # An idle connection the server dropped meanwhile is replaced, not an error.
    script.faults = ["drop"]
    _get(pool, f"{base}/a.tif", 100, 90_000)
    assert len(script.requests) == 4 and script.connections == 3
    pool.clear()


def test_chunked_body(server):
    script, base = server
    pool = tile_http.ConnectionPool()
    script.faults = ["chunked"]
    _get(pool, f"{base}/a.tif", 1234, 100_000)
    _get(pool, f"{base}/a.tif", 0, 10)  # the connection is still usable
    assert script.connections == 1
    pool.clear()


def test_retries_5xx_and_follows_redirects(server, monkeypatch):
    script, base = server
    monkeypatch.setattr(tile_http, "BACKOFF", 0.01)
    pool = tile_http.ConnectionPool()
    script.faults = ["503", "503", "redirect"]
    _get(pool, f"{base}/a.tif", 0, 5000)
    assert [p for p, _ in script.requests] == ["/a.tif"] * 3 + ["/moved/a.tif"]
    script.faults = ["503"] * (tile_http.RETRIES + 1)
    with pytest.raises(tile_http.HTTPStatusError, match="503"):
        pool.get_range(f"{base}/a.tif", 0, 10)
    script.faults = ["redirect"] * (tile_http.MAX_REDIRECTS + 1)
    with pytest.raises(tile_http.HTTPStatusError, match="too many redirects"):
        pool.get_range(f"{base}/a.tif", 0, 10)
    script.faults = ["redirect-file"]  # only http(s), never https -> http
    with pytest.raises(tile_http.HTTPStatusError, match="does not follow: file:///etc/passwd"):
        pool.get_range(f"{base}/a.tif", 0, 10)
    pool.clear()


def test_unusable_responses_are_clear_errors(server, monkeypatch):
    script, base = server
    pool = tile_http.ConnectionPool()
    n = len(script.requests)
    with pytest.raises(tile_http.HTTPStatusError, match="404"):
        pool.get_range(f"{base}/missing.tif", 0, 10)
    assert len(script.requests) == n + 1  # not retried
    script.faults = ["bad-range"]
    with pytest.raises(tile_http.ProtocolError, match="Content-Range"):
        pool.get_range(f"{base}/a.tif", 0, 10)
    script.faults = ["ignore-range"]  # a small object sent whole: the range is cut out of it
    _get(pool, f"{base}/a.tif", 70_000, 80_000)
    script.faults = ["ignore-range"]  # ... also when the range reaches past its end
    assert bytes(pool.get_range(f"{base}/a.tif", 299_000, 365_536).data) == DATA[299_000:]
    for fault, what in (("gzip", "Content-Encoding 'gzip'"), ("no-range-header", "without Content-Range")):
        script.faults = [fault]
        with pytest.raises(tile_http.ProtocolError, match=what):
            pool.get_range(f"{base}/a.tif", 0, 10)
    monkeypatch.setattr(tile_http, "WHOLE_MAX", 1000)
    script.faults = ["ignore-range"]
    with pytest.raises(tile_http.ProtocolError, match="ignored the Range header"):
        pool.get_range(f"{base}/a.tif", 0, 10)
    pool.clear()


def test_remote_source_errors_name_the_href(server, monkeypatch):
    script, base = server
    src = RemoteSource(f"{base}/a.tif", "item 'x' asset 'red' ")
    assert src.lean
    assert src.read(100, 50) == DATA[100:150]
    data, ident = src._get(0, 10)
    assert (ident.size, ident.etag) == (len(DATA), '"v1"')
    missing = RemoteSource(f"{base}/missing.tif", "item 'x' asset 'red' ")
    with pytest.raises(AssetReadError, match=r"asset 'red' href '.*missing.tif'.*not found"):
        missing.read(0, 10)
    from stacchip.tiles.sources import Identity

    with pytest.raises(StaleLayoutError, match="changed since its layout was read"):
        src.read_ranges([(0, 10)], expect=Identity(len(DATA), '"v0"', None))


def test_client_setting_and_proxies(server, monkeypatch):
    _script, base = server
    monkeypatch.setenv("STACCHIP_REMOTE_CLIENT", "obstore")
    assert not RemoteSource(f"{base}/a.tif").lean
    monkeypatch.setenv("STACCHIP_REMOTE_CLIENT", "curl")
    with pytest.raises(ConfigError, match="STACCHIP_REMOTE_CLIENT"):
        RemoteSource(f"{base}/a.tif")
    monkeypatch.delenv("STACCHIP_REMOTE_CLIENT")
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # reads behind a proxy stay with obstore
    assert not RemoteSource("http://example.invalid/a.tif").lean
    monkeypatch.setenv("NO_PROXY", "example.invalid")
    assert RemoteSource("http://example.invalid/a.tif").lean


def test_forked_pool_does_not_reuse_the_parents_sockets(server):
    script, base = server
    pool = tile_http.ConnectionPool()
    _get(pool, f"{base}/a.tif", 0, 10)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        ok = b"0"
        try:
            got = pool.get_range(f"{base}/a.tif", 20, 30)
            ok = b"1" if bytes(got.data) == DATA[20:30] else b"0"
        finally:
            os.write(w, ok)
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(r)
    assert script.connections == 2  # the child opened its own
    _get(pool, f"{base}/a.tif", 40, 50)  # the parent's connection still works
    assert script.connections == 2
    pool.clear()


def test_unreachable_server_fails_after_retries(monkeypatch):
    monkeypatch.setattr(tile_http, "BACKOFF", 0.01)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    pool = tile_http.ConnectionPool()
    with pytest.raises(ConnectionRefusedError):
        pool.get_range(f"http://127.0.0.1:{port}/a.tif", 0, 10)


def test_idle_connections_too_old_or_closed_are_not_reused(server, monkeypatch):
    script, base = server
    pool = tile_http.ConnectionPool()
    script.faults = ["close-quietly"]
    _get(pool, f"{base}/a.tif", 0, 10)
    import time

    deadline = time.monotonic() + 5
    while script.connections < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the server has closed its end by now
    _get(pool, f"{base}/a.tif", 10, 20)  # the closed idle socket is seen before a request is wasted on it
    assert len(script.requests) == 2 and script.connections == 2
    monkeypatch.setattr(tile_http, "MAX_IDLE_SECONDS", 0.0)
    _get(pool, f"{base}/a.tif", 20, 30)
    assert script.connections == 3  # too old: a new one
    pool.clear()


def test_connections_are_reused_whatever_the_descriptor_numbers(server):
    script, base = server
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip("needs 1200 descriptors")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # what a long process may hold
    try:
        pool = tile_http.ConnectionPool()
        for start in (0, 100, 200):
            _get(pool, f"{base}/a.tif", start, start + 50)
        assert script.connections == 1
        pool.clear()
    finally:
        for fd in held:
            os.close(fd)


def test_paths_are_percent_encoded(server):
    script, base = server
    pool = tile_http.ConnectionPool()
    _get(pool, f"{base}/scenes/a b\u00e9.tif", 0, 10)
    _get(pool, f"{base}/scenes/already%20encoded.tif", 0, 10)
    assert [p for p, _ in script.requests] == ["/scenes/a%20b%C3%A9.tif", "/scenes/already%20encoded.tif"]
    pool.clear()


def test_a_stalled_body_times_out(server, monkeypatch):
    script, base = server
    monkeypatch.setattr(tile_http, "TIMEOUT", 0.5)
    monkeypatch.setattr(tile_http, "RETRIES", 0)
    pool = tile_http.ConnectionPool()
    script.faults = ["stall"]
    with pytest.raises(TimeoutError, match="timed out"):
        pool.get_range(f"{base}/a.tif", 0, 200_000)
    script.release.set()
    pool.clear()


def test_range_past_the_end_is_a_stale_layout(server):
    _script, base = server
    src = RemoteSource(f"{base}/a.tif", "item 'x' asset 'red' ")
    with pytest.raises(StaleLayoutError, match="shorter than its layout"):
        src.read(len(DATA) + 10, 100)


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def test_https_ranges_verified_against_the_trusted_certificates(tmp_path, monkeypatch):
    import ssl

    cert_pem, key_pem = _self_signed(tmp_path)
    script = _Script()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_pem, key_pem)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    base = f"https://127.0.0.1:{srv.server_address[1]}"
    try:
        # Not trusted: a certificate error, at once (not retried).
        monkeypatch.setattr(tile_http, "BACKOFF", 5.0)
        with pytest.raises(ssl.SSLCertVerificationError):
            tile_http.ConnectionPool().get_range(f"{base}/a.tif", 0, 10)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_pem))  # trusted as the system's CAs would be
        pool = tile_http.ConnectionPool()
        for start, end in [(0, 1000), (5000, 250_000), (299_000, 300_000)]:
            _get(pool, f"{base}/a.tif", start, end)
        assert script.connections == 1  # one kept connection (the refused handshake never reached a handler)
        src = RemoteSource(f"{base}/a.tif", "item 'x' asset 'red' ")
        assert src.lean and src.read(10, 20) == DATA[10:30]
        pool.clear()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
