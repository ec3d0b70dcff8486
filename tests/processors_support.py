"""Helpers for the processor tests: running console scripts as a batch scheduler would,
building source scenes from the shared real items, and looking into buckets."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tests.builders import band_count, materialize, real_item
from tests.services import read_request_body

#: Seconds a console-script run may take in a test before it is killed.
SCRIPT_TIMEOUT = 300


def script_command(script: str) -> list[str]:
    """The console script on PATH, else the same code through ``python -m stacchip.processors``."""
    path = shutil.which(script)
    if path:
        return [path]
    return [sys.executable, "-m", "stacchip.processors", script.removeprefix("stacchip-")]


def run_script(script: str, env: dict[str, str], *args: str, timeout: float = SCRIPT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a console script with ``env`` added to the current environment (as AWS Batch would)."""
    full = dict(os.environ)
    for name in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        full.pop(name, None)
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    no_proxy = ",".join(p for p in (full.get("NO_PROXY"), "127.0.0.1", "localhost") if p)
    full["NO_PROXY"] = full["no_proxy"] = no_proxy
    return subprocess.run(
        [*script_command(script), *args], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


def records(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The JSON lines a processor printed (one per item)."""
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def s3(endpoint: str) -> Any:
    """A plain boto3 client for the test S3 server."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def new_bucket(endpoint: str, prefix: str = "src") -> str:
    """Create a fresh bucket; its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    s3(endpoint).create_bucket(Bucket=name)
    return name


def bucket_objects(endpoint: str, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every object under ``prefix``: key -> {size, etag, modified}."""
    client = s3(endpoint)
    out: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = {"size": obj["Size"], "etag": obj["ETag"], "modified": obj["LastModified"]}
    return out


def local_files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size), hidden temp files included."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def upload_assets(item: dict[str, Any], endpoint: str, bucket: str, prefix: str) -> dict[str, Any]:
    """Upload the item's local asset files to ``s3://bucket/prefix/`` and point the hrefs there."""
    item = copy.deepcopy(item)
    client = s3(endpoint)
    for asset in item["assets"].values():
        path = Path(asset["href"])
        key = f"{prefix}/{path.name}"
        client.upload_file(str(path), bucket, key)
        asset["href"] = f"s3://{bucket}/{key}"
    return item


def write_samples(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """A GeoJSON sample file from rows with a shapely ``geometry`` and other columns."""
    import geopandas as gpd

    frame = gpd.GeoDataFrame(list(rows), geometry="geometry", crs="EPSG:4326")
    frame.to_file(path, driver="GeoJSON")
    return path


def scl_pixels(key: str, asset: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """Sentinel-2 pixels: SCL is vegetation (4) with a cloud (9) top-left block and a
    nodata (0) bottom strip; other bands are position-coded values."""
    rows, cols = shape
    if key == "scl":
        scl = np.full((1, rows, cols), 4, dtype="uint8")
        scl[0, : rows // 4, : cols // 4] = 9
        scl[0, rows - rows // 8:, :] = 0
        return scl
    bands = band_count(asset)
    value = (np.arange(rows * cols, dtype=np.int64).reshape(rows, cols) % 5000 + 1).astype("uint16")
    return np.broadcast_to(value, (bands, rows, cols)).copy()


def sentinel2_base(directory: Path, factor: int = 20) -> dict[str, Any]:
    """The real Sentinel-2 item with small COGs (10 m bands 549 px) written under ``directory``."""
    return materialize(real_item("sentinel-2"), directory, factor=factor, pixels=scl_pixels)


def variant(base: dict[str, Any], item_id: str, collection: str, when: str, **props: Any) -> dict[str, Any]:
    """A copy of ``base`` with a new id, collection, datetime and properties."""
    item = copy.deepcopy(base)
    item["id"] = item_id
    item["collection"] = collection
    item["links"] = []
    item["properties"]["datetime"] = when
    for key in ("start_datetime", "end_datetime"):  # pgstac searches these when present
        if key in item["properties"]:
            item["properties"][key] = when
    item["properties"].update(props)
    return item


# --- loopback HTTP helpers ------------------------------------------------------------------

import contextlib
import functools
import http.client
import http.server
import threading
import time
from typing import Iterator
from urllib.parse import urlparse


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    delay = 0.0
    stagger = False
    served = 0
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        with self.lock:
            type(self).served += 1
            n = type(self).served
        time.sleep(self.delay * (n if self.stagger else 1))
        super().do_GET()


@contextlib.contextmanager
def file_server(directory: Path, delay: float = 0.0, stagger: bool = False) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (each GET delayed by ``delay`` s, or with
    ``stagger`` the n-th GET by ``n * delay`` s: copies in parallel still land one by one);
    yields the base URL."""
    handler = type("Handler", (_QuietHandler,), {"delay": delay, "stagger": stagger, "served": 0,
                                                 "lock": threading.Lock()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """A reverse proxy in front of an S3 server that answers 503 SlowDown to the first
    ``fail_first`` requests and then to every ``fail_every``-th one (0: never)."""

    def __init__(self, upstream: str, fail_first: int, fail_every: int = 0) -> None:
        self.upstream = urlparse(upstream)
        self.fail_first = fail_first
        self.fail_every = fail_every
        self.count = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                return read_request_body(self)

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                    fail = n <= proxy.fail_first or (proxy.fail_every and n % proxy.fail_every == 0)
                    if fail:
                        proxy.failed += 1
                if fail:
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>injected</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else response.getheader("Content-Length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
