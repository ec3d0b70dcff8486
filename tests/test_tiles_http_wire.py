"""The tile bytes client (stacchip.tiles.http) byte for byte on the wire: a loopback
server answers each request with scripted raw bytes, so responses no well-behaved
HTTP server library would send (HTTP/1.0, bodies ended by closing, interim 1xx,
broken heads and chunk framing, oversized heads) are covered."""

import socket
import threading

import numpy as np
import pytest

from stacchip.tiles import http as tile_http

DATA = np.random.default_rng(5).integers(0, 256, 200_000, dtype=np.uint8).tobytes()


class RawServer:
    """Answers request *i* with ``replies[i](start, end)`` (bytes, close after?)."""

    def __init__(self) -> None:
        self.replies: list = []
        self.requests: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def url(self, path: str = "/a.tif") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    got = conn.recv(65536)
                    if not got:
                        return
                    buf += got
                request, buf = buf.split(b"\r\n\r\n", 1)
                with self._lock:
                    self.requests.append(request)
                    reply = self.replies.pop(0) if self.replies else _ok
                start, end = _range(request)
                data, close = reply(start, end)
                for piece in data if isinstance(data, list) else [data]:  # a list: pieces sent 50 ms apart
                    conn.sendall(piece)
                    if isinstance(data, list) and self._stop.wait(0.05):
                        return
                if close:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self._sock.close()


def _range(request: bytes) -> tuple[int, int]:
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"range: bytes="):
            a, _, b = line.split(b"=", 1)[1].partition(b"-")
            return int(a), int(b)
    return 0, len(DATA) - 1


def _partial(start: int, end: int, extra: str = "", version: str = "1.1", length: bool = True) -> bytes:
    body = DATA[start:end + 1]
    head = f"HTTP/{version} 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{len(DATA)}\r\n"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


def _ok(start: int, end: int):
    return _partial(start, end), False


@pytest.fixture
def raw():
    srv = RawServer()
    yield srv
    srv.stop()


def _get(pool, url, start, end):
    got = pool.get_range(url, start, end)
    assert bytes(got.data) == DATA[start:end]
    return got


def test_keep_alive_rules_of_http_1_0_and_1_1(raw):
    pool = tile_http.ConnectionPool()
    raw.replies = [lambda s, e: (_partial(s, e, version="1.0"), True),  # 1.0: closed unless kept
                   lambda s, e: (_partial(s, e, "Connection: keep-alive\r\n", version="1.0"), False),
                   _ok, _ok]
    for start in (0, 1000, 2000, 3000):
        _get(pool, raw.url(), start, start + 500)
    assert raw.connections == 2  # the 1.0 keep-alive and 1.1 responses shared the second one
    pool.clear()


def test_a_body_ended_by_closing_the_connection(raw):
    pool = tile_http.ConnectionPool()
    raw.replies = [lambda s, e: (_partial(s, e, length=False), True)]
    _get(pool, raw.url(), 10, 50_000)
    _get(pool, raw.url(), 0, 10)
    assert raw.connections == 2  # such a connection is never reused
    pool.clear()


def test_interim_responses_and_folded_headers(raw):
    pool = tile_http.ConnectionPool()
    raw.replies = [lambda s, e: (b"HTTP/1.1 100 Continue\r\n\r\n" + _partial(s, e, "X-Long: a\r\n  b\r\n"), False)]
    got = _get(pool, raw.url(), 100, 200)
    assert got.size == len(DATA)
    _get(pool, raw.url(), 300, 400)
    assert raw.connections == 1
    pool.clear()


def test_request_line_and_headers_sent(raw):
    pool = tile_http.ConnectionPool()
    _get(pool, f"http://user:secret@127.0.0.1:{raw.port}/dir/a b.tif?X-Sig=a%2Fb&x=1", 0, 10)
    lines = raw.requests[0].split(b"\r\n")
    assert lines[0] == b"GET /dir/a%20b.tif?X-Sig=a%2Fb&x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{raw.port}".encode() in lines  # what a presigned URL signed; no credentials
    assert b"Range: bytes=0-9" in lines and b"Accept-Encoding: identity" in lines
    assert b"secret" not in raw.requests[0]
    # Controls and spaces an href carries are never sent as they are (no header injection).
    _get(pool, raw.url("/a\x00.tif?x=1\r\nEvil: 1"), 0, 10)
    assert raw.requests[1].split(b"\r\n")[0] == b"GET /a%00.tif?x=1Evil:%201 HTTP/1.1"
    assert b"\r\nEvil" not in raw.requests[1]
    for bad, what in (("http://a b/x.tif", "cannot send"), (f"http://127.0.0.1:{raw.port}x/a.tif", "bad port"),
                      ("ftp://127.0.0.1/a.tif", "not an http")):
        with pytest.raises(tile_http.ProtocolError, match=what):
            pool.get_range(bad, 0, 10)
    assert len(raw.requests) == 2  # nothing sent for them
    pool.clear()


def test_small_error_bodies_keep_the_connection_large_ones_close_it(raw):
    pool = tile_http.ConnectionPool()
    small = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno object"
    big = b"HTTP/1.1 404 Not Found\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200_000
    chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ngone\r\n0\r\n\r\n"
    closing = b"HTTP/1.1 403 Forbidden\r\n\r\naccess denied"
    raw.replies = [lambda s, e: (small, False), lambda s, e: (chunked, False), _ok,
                   lambda s, e: (big, False), _ok, lambda s, e: (closing, True)]
    with pytest.raises(tile_http.HTTPStatusError, match="404: no object"):
        pool.get_range(raw.url(), 0, 10)
    with pytest.raises(tile_http.HTTPStatusError, match="404: gone"):
        pool.get_range(raw.url(), 0, 10)
    _get(pool, raw.url(), 0, 10)
    assert raw.connections == 1
    with pytest.raises(tile_http.HTTPStatusError, match="404"):
        pool.get_range(raw.url(), 0, 10)
    _get(pool, raw.url(), 0, 10)
    assert raw.connections == 2  # the unread rest of the big body went with its connection
    with pytest.raises(tile_http.HTTPStatusError, match="403: access denied"):  # a body ended by closing
        pool.get_range(raw.url(), 0, 10)
    _get(pool, raw.url(), 0, 10)
    assert raw.connections == 3
    pool.clear()


def test_chunk_framing(raw):
    pool = tile_http.ConnectionPool()

    def chunked(body: bytes, sizes: str | None = None, tail: bytes = b"0\r\nX-Trailer: 1\r\n\r\n"):
        def reply(s, e):
            head = (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{e}/{len(DATA)}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n").encode()
            size = sizes if sizes is not None else f"{len(body(s, e)):x};ext=1"
            return head + size.encode() + b"\r\n" + body(s, e) + b"\r\n" + tail, False
        return reply

    raw.replies = [chunked(lambda s, e: DATA[s:e + 1])]  # one chunk, an extension and a trailer
    _get(pool, raw.url(), 5, 40_000)
    cases = [
        (chunked(lambda s, e: DATA[s:e + 2]), "longer than"),
        (chunked(lambda s, e: DATA[s:e]), "shorter than"),
        (chunked(lambda s, e: DATA[s:e + 1], sizes="0x10"), "bad chunk size"),
        (chunked(lambda s, e: DATA[s:e + 1], sizes="1_0"), "bad chunk size"),
        (chunked(lambda s, e: DATA[s:e + 1], tail=b"X0\r\n\r\n"), "not ended by CRLF|bad chunk size"),
    ]
    for reply, what in cases:
        raw.replies = [reply]
        with pytest.raises(tile_http.ProtocolError, match=what):
            pool.get_range(raw.url(), 0, 1000)
    gzip = _partial(0, 9, "Transfer-Encoding: gzip, chunked\r\n", length=False)
    raw.replies = [lambda s, e: (gzip, False)]
    with pytest.raises(tile_http.ProtocolError, match="Transfer-Encoding 'gzip, chunked'"):
        pool.get_range(raw.url(), 0, 10)
    pool.clear()


def test_broken_heads(raw, monkeypatch):
    monkeypatch.setattr(tile_http, "BACKOFF", 0.01)
    pool = tile_http.ConnectionPool()
    garbage = b"SSH-2.0-OpenSSH_9.0\r\n\r\n"
    raw.replies = [lambda s, e: (garbage, True)] * (tile_http.RETRIES + 1)
    with pytest.raises(tile_http.MalformedResponse, match="not an HTTP/1.x status line"):
        pool.get_range(raw.url(), 0, 10)  # retried, as a connection broken on the way would be
    assert len(raw.requests) == tile_http.RETRIES + 1
    raw.replies = [lambda s, e: (garbage, True), _ok]
    _get(pool, raw.url(), 0, 10)  # one garbled answer, then a good one
    big = b"HTTP/1.1 206 Partial Content\r\n" + b"X-Pad: " + b"p" * (tile_http.HEAD_MAX + 10) + b"\r\n\r\n"
    many = b"HTTP/1.1 206 Partial Content\r\n" + b"X-A: 1\r\n" * (tile_http.MAX_HEADERS + 1) + b"\r\n"
    twice = _partial(0, 9, "Content-Length: 11\r\n")
    for reply, what in ((big, "head longer than"), (many, "more than 100 headers"),
                        (twice, "conflicting Content-Length"),
                        (_partial(0, 9, length=False).replace(b"\r\n\r\n", b"\r\nContent-Length: -10\r\n\r\n", 1),
                         "Content-Length '-10'")):
        raw.replies = [lambda s, e, reply=reply: (reply, True)]
        with pytest.raises(tile_http.ProtocolError, match=what):
            pool.get_range(raw.url(), 0, 10)
    pool.clear()


def test_a_connection_closed_mid_body_is_retried(raw, monkeypatch):
    monkeypatch.setattr(tile_http, "BACKOFF", 0.01)
    pool = tile_http.ConnectionPool()
    raw.replies = [lambda s, e: (_partial(s, e)[:-5000], True)]
    _get(pool, raw.url(), 0, 100_000)
    assert raw.connections == 2 and len(raw.requests) == 2
    pool.clear()


def test_a_trickled_response_times_out(raw, monkeypatch):
    monkeypatch.setattr(tile_http, "TIMEOUT", 0.5)
    monkeypatch.setattr(tile_http, "RETRIES", 0)
    pool = tile_http.ConnectionPool()
    head = _partial(0, 9)
    raw.replies = [lambda s, e: ([head[i:i + 1] for i in range(len(head))], True)]  # a byte per 50 ms
    with pytest.raises(TimeoutError, match="timed out after"):
        pool.get_range(raw.url(), 0, 10)
    pool.clear()
