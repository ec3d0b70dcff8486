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
``stac_api`` (session)
    PostgreSQL + PostGIS in a temporary data directory, the pgstac schema
    (``pypgstac migrate``) and stac-fastapi-pgstac served by uvicorn on
    ``127.0.0.1``. Yields :class:`StacApi` (``.url``, ``.dsn``,
    ``.load_collection(dict)``, ``.load_items(list[dict])``).

A service that cannot be started (program not installed, start failed) fails
the test when ``CI=true`` is set and skips it with the reason otherwise; see
:func:`service_unavailable`.

Enable with ``pytest_plugins = ["tests.services"]`` in ``tests/conftest.py``
and mark tests that use these fixtures with ``@pytest.mark.services``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
from typing import Any, Iterator, NoReturn

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


def wait_for_http(
    url: str,
    proc: subprocess.Popen[bytes] | None,
    logfile: Path | None,
    timeout: float = START_TIMEOUT,
    ok_status: tuple[int, ...] = (200,),
) -> float:
    """Poll ``url`` until it answers with ``ok_status``; returns the seconds waited.

    Calls :func:`service_unavailable` when ``proc`` exits or ``timeout``
    seconds pass first.
    """
    start = time.monotonic()
    last_error = "no answer"
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            tail = _tail(logfile) if logfile else ""
            service_unavailable(f"server for {url} exited with code {proc.returncode}:\n{tail}")
        try:
            status, _ = http_get(url, timeout=2.0)
            if status in ok_status:
                return time.monotonic() - start
            last_error = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as exc:
            last_error = str(exc)
        time.sleep(0.1)
    tail = _tail(logfile) if logfile else ""
    stop_process(proc)
    service_unavailable(f"{url} did not answer within {timeout:.0f} s ({last_error}):\n{tail}")


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
    storage._client.cache_clear()
    try:
        yield s3_server.endpoint
    finally:
        storage._client.cache_clear()


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new bucket with a unique name on the loopback S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name
