"""Ranged GETs for tile bytes: a small HTTP/1.1 client on the standard library's
sockets.

The tile read path fetches each tile (or coalesced run of tiles) of an ``s3://``
or ``http(s)://`` file with one ``GET`` carrying a ``Range`` header, straight into
a buffer of its own (no chunk lists joined, no copy before the decoder). It reads
nothing but what one ranged response needs: a status line, a few headers and a
body whose length is known, so next to obstore's async client it costs about half
the CPU per tile (and a quarter less than :mod:`http.client`, whose per-response
header parsing is general). It has no runtime threads of its own: the engine's
fetch threads make the requests and hand the bytes to its decode pool.

* S3 requests carry a URL presigned by obstore (:func:`obstore.sign`, so
  credentials come from obstore's chain exactly as for every other request);
  the URL of an object is kept until shortly before it expires and signed
  again after a ``403`` (temporary credentials renewed). Public buckets
  (``AWS_NO_SIGN_REQUEST``) get the plain path-style URL.
* :class:`ConnectionPool` keeps idle keep-alive connections per origin
  (HTTPS with the system's certificates; ``certifi``'s where the system has none).
* Failures are retried as obstore's client does (connection errors, ``5xx``,
  ``429``: up to :data:`RETRIES` times with exponential backoff, at most
  :data:`RETRY_TIMEOUT` seconds); a keep-alive connection the server closed is
  replaced at once. Redirects are followed (at most :data:`MAX_REDIRECTS`).
* Every response tells the object's total size (``Content-Range``) and
  ``ETag``: the caller compares them with the layout it trusted. A server that
  ignores ``Range`` may send a small object whole (:data:`WHOLE_MAX`); other
  unusable responses raise :class:`ProtocolError`.

Where this client does not apply (a proxy configured in the environment, or
``STACCHIP_REMOTE_CLIENT=obstore``) tiles go through obstore.
"""

from __future__ import annotations

import functools
import os
import random
import re
import select
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, urljoin, urlsplit

import numpy as np

#: Retries of a failed request (connection error, 5xx, 429), backoff and its cap, s.
RETRIES = 5
BACKOFF = 0.2
MAX_BACKOFF = 10.0
#: No retry starts later than this many seconds after the first attempt.
RETRY_TIMEOUT = 120.0
#: Time allowed for connecting (incl. the TLS handshake) and for each response, s.
CONNECT_TIMEOUT = 10.0
TIMEOUT = 60.0
#: Idle keep-alive connections older than this are closed, not reused (s).
MAX_IDLE_SECONDS = 30.0
MAX_REDIRECTS = 5
#: Idle connections kept per origin.
MAX_IDLE = 32
#: A server that ignores ``Range`` may send objects up to this size whole (bytes).
WHOLE_MAX = 64 * 2**20
#: Limits of a response's head (status line and headers, bytes), of its header
#: count, of a chunk-size line, and of an error body kept for its message (bytes).
HEAD_MAX = 64 * 1024
MAX_HEADERS = 100
LINE_MAX = 4096
ERROR_BODY_MAX = 64 * 1024
#: Bytes asked of the socket while reading a head or a chunk line (a body goes
#: straight into its buffer: the less of it read with the head, the fewer copies).
RECV_BYTES = 16 * 1024

CLIENT_ENV = "STACCHIP_REMOTE_CLIENT"
#: Characters kept as they are when the request path is percent-encoded (``%`` too:
#: an href already encoded stays as it is).
_PATH_SAFE = "/%:@!$&'()*+,;=~"


class HTTPStatusError(OSError):
    """A final (not retried) HTTP status other than 200/206."""

    def __init__(self, status: int, url: str, body: bytes = b"") -> None:
        text = body[:300].decode("utf-8", "replace").strip()
        super().__init__(f"HTTP {status}" + (f": {text}" if text else ""))
        self.status = status
        self.url = url


class ProtocolError(ValueError):
    """A response this client cannot use (not retried): wrong ``Content-Range`` or
    length, or a whole large object sent for a range; or a URL it cannot send."""


class MalformedResponse(ConnectionError):
    """Bytes that are not an HTTP/1.x response, or a connection closed before the
    end of one: retried (a connection broken on the way, or a server restarting)."""


@dataclass
class Ranged:
    """One ranged response: the bytes asked for, the object's total size and ETag."""

    data: np.ndarray
    size: int | None
    etag: str | None


def lean_client_wanted() -> bool:
    """Whether tile bytes go through this client (``STACCHIP_REMOTE_CLIENT``: ``http``
    (default) or ``obstore``)."""
    value = os.environ.get(CLIENT_ENV, "http").strip().lower()
    if value in ("", "http", "auto"):
        return True
    if value == "obstore":
        return False
    from stacchip.errors import ConfigError

    raise ConfigError(f"{CLIENT_ENV}={value!r}: expected 'http' or 'obstore'")


def proxied(url: str) -> bool:
    """True when the environment routes ``url`` through a proxy (this client does not
    speak to proxies: such reads stay with obstore, which does)."""
    import urllib.request

    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    bypass: Any = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # not in typeshed
    return not bypass(parts.hostname or "", proxies)


def _tls_context() -> ssl.SSLContext:
    """The system's CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured); ``certifi``'s
    only where the system has none (e.g. python.org builds on macOS)."""
    ctx = ssl.create_default_context()
    if not ctx.cert_store_stats().get("x509_ca"):
        try:
            import certifi

            ctx.load_verify_locations(cafile=certifi.where())
        except (ImportError, OSError, ssl.SSLError):
            pass
    return ctx


class _Conn:
    """One connection: its socket, and bytes received past the last response read."""

    __slots__ = ("sock", "kernel", "pending", "reusable", "deadline")

    def __init__(self, sock: Any, kernel: bool) -> None:
        self.sock = sock
        #: A blocking plain socket under a kernel receive timeout: bodies are read with ``MSG_WAITALL``.
        self.kernel = kernel
        self.pending = b""
        #: Set once a response was read whole and the server keeps the connection open.
        self.reusable = False
        #: When the response being read must have arrived whole (``time.monotonic()``).
        self.deadline = 0.0

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # the kernel send timeout passed
            raise TimeoutError(f"timed out after {TIMEOUT:.0f} s sending a request") from None

    def more(self) -> None:
        """Receive what the server sent next (at least one byte) after ``pending``."""
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"timed out after {TIMEOUT:.0f} s waiting for a whole response")
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:  # the kernel receive timeout passed without a byte
            raise TimeoutError(f"timed out after {TIMEOUT:.0f} s waiting for the server") from None
        if not data:
            raise MalformedResponse("the server closed the connection before the end of its response")
        self.pending += data

    def close(self) -> None:
        self.reusable = False
        try:
            self.sock.close()
        except OSError:
            pass


class ConnectionPool:
    """Idle keep-alive connections per origin ``(scheme, host, port)``; one process's.

    A connection idle for more than :data:`MAX_IDLE_SECONDS`, or whose socket
    has become readable while idle (the server closed it), is not used again."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], list[tuple[float, _Conn]]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._tls: ssl.SSLContext | None = None

    def _take(self, origin: tuple[str, str, int]) -> tuple[_Conn, bool]:
        now = time.monotonic()
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets and lock are not ours
                self._idle, self._pid = {}, os.getpid()
            idle = self._idle.get(origin) or []
            while idle:
                since, conn = idle.pop()
                if now - since <= MAX_IDLE_SECONDS and _alive(conn):
                    return conn, True
                conn.close()
        return self._connect(origin), False

    def _connect(self, origin: tuple[str, str, int]) -> _Conn:
        scheme, host, port = origin
        sock: Any = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write
            if scheme == "https":
                if self._tls is None:
                    self._tls = _tls_context()
                sock = self._tls.wrap_socket(sock, server_hostname=host)  # handshake within CONNECT_TIMEOUT
            if _KERNEL_WAIT and not isinstance(sock, ssl.SSLSocket):
                # Blocking, bounded by the kernel: a body is read by one recv(MSG_WAITALL).
                timeval = struct.pack("@ll", int(TIMEOUT), int(TIMEOUT % 1 * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
                sock.settimeout(None)
                return _Conn(sock, True)
            sock.settimeout(TIMEOUT)
            return _Conn(sock, False)
        except BaseException:
            sock.close()
            raise

    def _give(self, origin: tuple[str, str, int], conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if self._pid == os.getpid() and len(idle) < MAX_IDLE:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._idle, self._pid = {}, os.getpid()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                conn.close()

    def get_range(self, url: str, start: int, end: int, out: np.ndarray | None = None) -> Ranged:
        """Bytes ``start:end`` of ``url``, retried and redirected as the module says;
        received into ``out`` (a ``uint8`` array of at least ``end - start`` bytes) when given."""
        first = time.monotonic()
        attempt = 0
        redirects = 0
        while True:
            try:
                return self._once(url, start, end, out)
            except _Redirect as red:
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise HTTPStatusError(red.status, url, b"too many redirects") from None
                target = urljoin(url, red.location)
                to, was = urlsplit(target).scheme.lower(), urlsplit(url).scheme.lower()
                if to not in ("http", "https") or (was == "https" and to != "https"):  # no downgrade
                    raise HTTPStatusError(red.status, url, b"redirect to a URL this client does not follow: "
                                          + target.split("?")[0].encode()) from None
                url = target
            except OSError as exc:
                if isinstance(exc, HTTPStatusError) and not _retryable(exc.status):
                    raise
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise
                attempt += 1
                wait = min(MAX_BACKOFF, BACKOFF * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if attempt > RETRIES or time.monotonic() - first + wait > RETRY_TIMEOUT:
                    raise
                time.sleep(wait)

    def _once(self, url: str, start: int, end: int, out: np.ndarray | None = None) -> Ranged:
        origin, request = _request_head(url)
        request += f"Range: bytes={start}-{end - 1}\r\n\r\n".encode("ascii")
        while True:
            conn, reused = self._take(origin)
            try:
                conn.reusable = False
                conn.deadline = time.monotonic() + TIMEOUT
                conn.send(request)
                head = _read_head(conn)
            except OSError:
                conn.close()
                if reused:
                    continue  # a kept connection the server (or a middlebox) dropped: a fresh one, at once
                raise
            except BaseException:
                conn.close()
                raise
            break
        try:
            return _body(conn, head, url, start, end, out)
        finally:
            if conn.reusable and not conn.pending:
                self._give(origin, conn)
            else:
                conn.close()


_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


@functools.lru_cache(maxsize=4096)
def _request_head(url: str) -> tuple[tuple[str, str, int], bytes]:
    """The origin of ``url`` and the first lines of a GET of it (without ``Range``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ProtocolError(f"not an http(s) URL: {url.split('?')[0]!r}")
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ProtocolError(f"bad port in {url.split('?')[0]!r}") from None
    authority = parts.netloc.rpartition("@")[2]  # what a presigned URL signed as its host, credentials left out
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_PATH_SAFE + "?=&")
    if not host or _UNSAFE.search(authority) or _UNSAFE.search(target):
        raise ProtocolError(f"a URL this client cannot send: {url.split('?')[0]!r}")
    lines = (f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: stacchip\r\n"
             "Accept-Encoding: identity\r\n")
    try:
        return (scheme, host, port), lines.encode("ascii")
    except UnicodeEncodeError:
        raise ProtocolError(f"a host this client cannot send: {authority!r}") from None


def _alive(conn: _Conn) -> bool:
    """False when an idle connection's socket is readable: closed by the server (or
    holding bytes nobody asked for)."""
    sock = conn.sock
    if conn.pending or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        return False
    try:
        if hasattr(select, "poll"):  # any descriptor number (select() stops at FD_SETSIZE)
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class _Redirect(Exception):
    def __init__(self, status: int, location: str) -> None:
        self.status = status
        self.location = location


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


_WAITALL = getattr(socket, "MSG_WAITALL", 0)
#: Blocking ``MSG_WAITALL`` reads under a kernel receive timeout (``SO_RCVTIMEO``, set at connect).
_KERNEL_WAIT = sys.platform.startswith("linux") and bool(_WAITALL)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class _Head:
    """A response's status line and headers (names in lower case)."""

    status: int
    keep: bool
    headers: dict[str, str]

    def get(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


def _read_head(conn: _Conn) -> _Head:
    """The next final response's head (``1xx`` interim responses skipped)."""
    while True:
        found = _HEAD_END.search(conn.pending)
        while found is None:
            seen = len(conn.pending)
            if seen > HEAD_MAX:
                raise ProtocolError(f"a response head longer than {HEAD_MAX} bytes")
            conn.more()
            found = _HEAD_END.search(conn.pending, max(0, seen - 3))
        if found.start() > HEAD_MAX:
            raise ProtocolError(f"a response head longer than {HEAD_MAX} bytes")
        raw, conn.pending = conn.pending[:found.start()], conn.pending[found.end():]
        head = _parse_head(raw)
        if not 100 <= head.status < 200:
            return head


def _parse_head(raw: bytes) -> _Head:
    lines = raw.decode("latin-1").split("\n")
    status_line = lines[0].rstrip("\r")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit() or rest[3:4] not in ("", " "):
        raise MalformedResponse(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise ProtocolError(f"a response with more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    name = ""
    for line in lines[1:]:
        line = line.rstrip("\r")
        if line[:1] in (" ", "\t") and name:  # an obsolete folded continuation
            headers[name] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        name = key.strip().lower()
        if not sep or not name or key != key.rstrip() or _UNSAFE.search(name):
            raise MalformedResponse(f"not an HTTP header line: {line[:80]!r}")
        value = value.strip()
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise ProtocolError(f"conflicting Content-Length headers ({headers[name]!r}, {value!r})")
            if name != "content-length":
                headers[name] += ", " + value
        else:
            headers[name] = value
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return _Head(int(code), keep, headers)


def _framing(head: _Head) -> tuple[str, int]:
    """How the body of ``head`` ends: ``("none"|"length"|"chunked"|"close", length)``."""
    if head.status in (204, 304):
        return "none", 0
    coding = head.get("transfer-encoding")
    if coding:
        if [c.strip().lower() for c in coding.split(",")] != ["chunked"]:
            raise ProtocolError(f"Transfer-Encoding {coding!r} for a byte range")
        if "content-length" in head.headers:  # both: read as chunked, the connection not trusted further
            head.keep = False
        return "chunked", -1
    length = head.get("content-length")
    if length:
        if not length.isdigit():
            raise ProtocolError(f"Content-Length {length!r}")
        return "length", int(length)
    head.keep = False
    return "close", -1


def _read_into(conn: _Conn, view: memoryview) -> None:
    """Fill ``view`` with the next body bytes: those already received, then straight
    from the socket. On Linux a plain socket is read blocking with ``MSG_WAITALL``
    (the kernel fills the buffer as segments arrive, without a return to Python
    per segment), under its receive timeout; the whole response must arrive within
    :data:`TIMEOUT` s of its request."""
    total = len(view)
    got = 0
    if conn.pending:
        got = min(total, len(conn.pending))
        view[:got] = memoryview(conn.pending)[:got]
        conn.pending = conn.pending[got:]
    if got >= total:
        return
    sock = conn.sock
    flags = _WAITALL if conn.kernel else 0
    while got < total:
        if time.monotonic() > conn.deadline:
            raise TimeoutError(f"timed out after {TIMEOUT:.0f} s reading a {total}-byte body")
        try:
            n = sock.recv_into(view[got:], total - got, flags)
        except BlockingIOError:  # the kernel receive timeout passed without a byte
            raise TimeoutError(f"timed out after {TIMEOUT:.0f} s reading a {total}-byte body") from None
        if not n:
            raise MalformedResponse(f"the server closed the connection {total - got} bytes before the end "
                                    f"of a {total}-byte body")
        got += n


def _read_line(conn: _Conn) -> bytes:
    while True:
        i = conn.pending.find(b"\n")
        if i >= 0:
            line, conn.pending = conn.pending[:i], conn.pending[i + 1:]
            return line.rstrip(b"\r")
        if len(conn.pending) > LINE_MAX:
            raise ProtocolError(f"a chunked-body line longer than {LINE_MAX} bytes")
        conn.more()


_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")


def _chunks(conn: _Conn, view: memoryview) -> int:
    """Read a chunked body into ``view``; how many bytes it held (a longer body
    than ``view``: :class:`ProtocolError`)."""
    got = 0
    while True:
        size_s = _read_line(conn).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_s):
            raise ProtocolError(f"a bad chunk size {size_s[:20]!r}")
        size = int(size_s, 16)
        if size == 0:
            break
        if size > len(view) - got:
            raise ProtocolError(f"a chunked body longer than the {len(view)} bytes asked for")
        _read_into(conn, view[got:got + size])
        got += size
        if _read_line(conn):
            raise ProtocolError("a chunk not ended by CRLF")
    for _ in range(MAX_HEADERS + 1):  # trailers, up to the empty line
        if not _read_line(conn):
            return got
    raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")


def _read_body(conn: _Conn, head: _Head, limit: int) -> bytes:
    """A whole body of at most ``limit`` bytes; a longer one: its first ``limit``
    bytes, and the connection is not reused."""
    kind, length = _framing(head)
    if kind == "none":
        conn.reusable = head.keep
        return b""
    if kind == "length" and length <= limit:
        buf = bytearray(length)
        _read_into(conn, memoryview(buf))
        conn.reusable = head.keep
        return bytes(buf)
    if kind == "chunked":
        buf = bytearray(limit)
        try:
            n = _chunks(conn, memoryview(buf))
        except ProtocolError:
            return bytes(buf[:300])  # longer than is kept, or broken: the connection goes
        conn.reusable = head.keep
        return bytes(buf[:n])
    if kind == "length":
        buf = bytearray(limit)
        _read_into(conn, memoryview(buf))
        return bytes(buf)  # the rest is not read: the connection is closed
    try:  # a body ended by closing the connection
        while len(conn.pending) < limit:
            conn.more()
    except MalformedResponse:
        pass
    return conn.pending[:limit]


def _body(conn: _Conn, head: _Head, url: str, start: int, end: int, out: np.ndarray | None = None) -> Ranged:
    status = head.status
    etag = head.headers.get("etag")
    if status in (200, 206):
        encoding = (head.get("content-encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise ProtocolError(f"Content-Encoding {encoding!r} for a byte range")
    if status == 206:
        if "multipart/" in head.get("content-type").lower():
            raise ProtocolError("a multipart response to a single range")
        last, size = _content_range(head.headers.get("content-range"), start, end)
        kind, length = _framing(head)
        if kind == "length" and length != last + 1 - start:
            raise ProtocolError(f"Content-Length {length} for bytes {start}-{last}")
        n = last + 1 - start
        buf = out[:n] if out is not None and len(out) >= n else np.empty(n, np.uint8)
        view = memoryview(cast(Any, buf))
        if kind == "chunked":
            if _chunks(conn, view) != len(view):
                raise ProtocolError(f"a chunked body shorter than the {len(view)} bytes of its Content-Range")
        elif len(view):
            _read_into(conn, view)
        conn.reusable = head.keep and kind != "close"
        return Ranged(buf, size, etag)
    if status == 200:  # the server ignored the range: the whole object comes
        kind, length = _framing(head)
        if kind != "length" or length > WHOLE_MAX:
            raise ProtocolError(f"the server ignored the Range header and sent the whole object "
                                f"({length if length >= 0 else 'unknown'} bytes) for bytes {start}-{end - 1}")
        data = _read_body(conn, head, WHOLE_MAX)
        if start >= len(data):
            raise ProtocolError(f"bytes {start}-{end - 1} asked of a {len(data)}-byte object")
        stop = min(end, len(data))  # a range reaching past the end is cut there, as a 206 would be
        return Ranged(np.frombuffer(data, np.uint8, stop - start, start), len(data), etag)
    body = _read_body(conn, head, ERROR_BODY_MAX)
    if status in (301, 302, 303, 307, 308) and head.get("location"):
        raise _Redirect(status, head.get("location"))
    raise HTTPStatusError(status, url, body)


def _content_range(value: str | None, start: int, end: int) -> tuple[int, int | None]:
    """``(last byte, total size)`` from ``Content-Range: bytes a-b/total``: ``a`` must
    be ``start``, ``b`` the last byte asked for, or the object's last byte when the
    range reaches past its end."""
    if not value:
        raise ProtocolError(f"a 206 response without Content-Range for bytes {start}-{end - 1}")
    try:
        unit, _, rest = value.strip().partition(" ")
        span, _, total_s = rest.partition("/")
        a, _, b = span.partition("-")
        first, last = int(a), int(b)
        total = None if total_s.strip() == "*" else int(total_s)
        clipped = total is not None and last == total - 1 and last < end - 1
        if unit.lower() != "bytes" or first != start or last < first or (total is not None and last >= total) \
                or not (last == end - 1 or clipped):
            raise ValueError
    except ValueError:
        raise ProtocolError(f"unexpected Content-Range {value!r} for bytes {start}-{end - 1}") from None
    return last, total


_pool: ConnectionPool | None = None
_pool_lock = threading.Lock()


def _forked_child() -> None:
    global _pool, _pool_lock
    _pool_lock = threading.Lock()
    if _pool is not None:
        _pool._after_fork()


os.register_at_fork(after_in_child=_forked_child)


def pool() -> ConnectionPool:
    """The process-wide connection pool."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ConnectionPool()
    return _pool
