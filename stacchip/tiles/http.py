"""Ranged GETs for tile bytes with the standard library's :mod:`http.client`.

The tile read path fetches each tile (or coalesced run of tiles) of an ``s3://``
or ``http(s)://`` file with one ``GET`` carrying a ``Range`` header, straight into
a buffer of its own (no chunk lists joined, no copy before the decoder). Next to
obstore's async client this costs about a third less CPU per tile, and it has no
runtime threads of its own: the engine's fetch threads make the requests and hand
the bytes to its decode pool.

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

import http.client
import os
import random
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
    length, or a whole large object sent for a range."""


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


class ConnectionPool:
    """Idle keep-alive connections per origin ``(scheme, host, port)``; one process's.

    A connection idle for more than :data:`MAX_IDLE_SECONDS`, or whose socket
    has become readable while idle (the server closed it), is not used again."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._tls: ssl.SSLContext | None = None

    def _take(self, origin: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
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

    def _connect(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection:
        scheme, host, port = origin
        conn: http.client.HTTPConnection
        if scheme == "https":
            if self._tls is None:
                self._tls = _tls_context()  # outside the lock: loading CA files takes a while
            conn = http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT)
        conn.connect()  # connect (and TLS handshake) within CONNECT_TIMEOUT, then reads within TIMEOUT
        sock = conn.sock
        if sock is not None:
            sock.settimeout(TIMEOUT)
            if _kernel_wait(sock):  # the bound of the blocking body reads (see _read_exact)
                timeval = struct.pack("@ll", int(TIMEOUT), int(TIMEOUT % 1 * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        return conn

    def _give(self, origin: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
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

    def get_range(self, url: str, start: int, end: int) -> Ranged:
        """Bytes ``start:end`` of ``url``, retried and redirected as the module says."""
        first = time.monotonic()
        attempt = 0
        redirects = 0
        while True:
            try:
                return self._once(url, start, end)
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
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, HTTPStatusError) and not _retryable(exc.status):
                    raise
                if isinstance(exc, (ssl.SSLCertVerificationError, http.client.InvalidURL)):
                    raise
                attempt += 1
                wait = min(MAX_BACKOFF, BACKOFF * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if attempt > RETRIES or time.monotonic() - first + wait > RETRY_TIMEOUT:
                    raise
                time.sleep(wait)

    def _once(self, url: str, start: int, end: int) -> Ranged:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, parts.hostname or "", port)
        target = quote(parts.path or "/", safe=_PATH_SAFE) + (f"?{parts.query}" if parts.query else "")
        headers = {"Range": f"bytes={start}-{end - 1}"}
        while True:
            conn, reused = self._take(origin)
            try:
                conn.request("GET", target, headers=headers)
                sock = conn.sock  # http.client lets go of it when the server closes after this response
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()
                if reused:
                    continue  # a kept connection the server (or a middlebox) dropped: a fresh one, at once
                raise
            except BaseException:
                conn.close()
                raise
            break
        try:
            out = _body(resp, sock, url, start, end)
        except BaseException:
            conn.close()
            raise
        if resp.will_close or not resp.isclosed():
            conn.close()
        else:
            self._give(origin, conn)
        return out


def _alive(conn: http.client.HTTPConnection) -> bool:
    """False when an idle connection's socket is readable: closed by the server (or
    holding bytes nobody asked for)."""
    sock = conn.sock
    if sock is None:
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


def _kernel_wait(sock: Any) -> bool:
    return _KERNEL_WAIT and isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)


def _read_exact(resp: http.client.HTTPResponse, sock: Any, buf: np.ndarray) -> None:
    """Fill ``buf`` with the body: what the response's reader holds, then straight
    from the socket. On Linux a plain socket is read blocking with ``MSG_WAITALL``
    (the kernel fills the buffer as segments arrive, without a return to Python and
    a ``poll`` per segment), under a receive timeout; the whole body must arrive
    within :data:`TIMEOUT` s."""
    view = memoryview(cast(Any, buf))
    total = len(view)
    got = resp.fp.readinto1(view) if total else 0  # bytes read with the headers, at most one more recv
    if got >= total:
        return _done(resp)
    kernel = _kernel_wait(sock)
    timeout = sock.gettimeout()
    deadline = time.monotonic() + TIMEOUT
    if kernel:
        sock.settimeout(None)
    try:
        while got < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {TIMEOUT:.0f} s reading a {total}-byte body")
            try:
                n = sock.recv_into(view[got:], total - got, _WAITALL if kernel else 0)
            except BlockingIOError:  # the kernel receive timeout passed without a byte
                raise TimeoutError(f"timed out after {TIMEOUT:.0f} s reading a {total}-byte body") from None
            if not n:
                raise http.client.IncompleteRead(b"", total - got)
            got += n
    finally:
        if kernel:
            sock.settimeout(timeout)
    return _done(resp)


def _done(resp: http.client.HTTPResponse) -> None:
    resp.length = 0
    resp.close()  # the body is read: the connection is ready for the next request


def _read_chunked(resp: http.client.HTTPResponse, buf: np.ndarray) -> None:
    view = memoryview(cast(Any, buf))
    got = 0
    while got < len(view):
        n = resp.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(b"", len(view) - got)
        got += n
    if resp.read(1):  # the last chunk (and trailers) only: a longer body is not what was asked
        raise ProtocolError(f"a chunked body longer than the {len(view)} bytes of its Content-Range")


def _body(resp: http.client.HTTPResponse, sock: Any, url: str, start: int, end: int) -> Ranged:
    status = resp.status
    etag = resp.getheader("ETag")
    if status in (200, 206):
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise ProtocolError(f"Content-Encoding {encoding!r} for a byte range")
    if status == 206:
        if "multipart/" in (resp.getheader("Content-Type") or "").lower():
            raise ProtocolError("a multipart response to a single range")
        last, size = _content_range(resp.getheader("Content-Range"), start, end)
        length = resp.length
        if length is not None and length != last + 1 - start:
            raise ProtocolError(f"Content-Length {length} for bytes {start}-{last}")
        buf = np.empty(last + 1 - start, np.uint8)
        if resp.chunked:
            _read_chunked(resp, buf)
        else:
            _read_exact(resp, sock, buf)
        return Ranged(buf, size, etag)
    if status == 200:  # the server ignored the range: the whole object comes
        if resp.length is None or resp.length > WHOLE_MAX:
            raise ProtocolError(f"the server ignored the Range header and sent the whole object "
                                f"({resp.length or 'unknown'} bytes) for bytes {start}-{end - 1}")
        data = resp.read()
        if start >= len(data):
            raise ProtocolError(f"bytes {start}-{end - 1} asked of a {len(data)}-byte object")
        stop = min(end, len(data))  # a range reaching past the end is cut there, as a 206 would be
        return Ranged(np.frombuffer(data, np.uint8, stop - start, start), len(data), etag)
    body = resp.read(4096)
    if status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
        raise _Redirect(status, resp.getheader("Location") or "")
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
