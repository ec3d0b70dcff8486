"""Processor edge cases found in review: STAC API outages are transient, not configuration errors."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from stacchip.errors import ConfigError
from stacchip.processors.catalog import Catalog
from tests.test_processors_sentinel2 import s2_setup, scene_dir  # noqa: F401 - fixtures

LANDING = {
    "type": "Catalog", "id": "t", "description": "d", "stac_version": "1.0.0", "links": [],
    "conformsTo": ["https://api.stacspec.org/v1.0.0/core"],
}


class _Api:
    """A loopback landing page answering ``status`` to the first ``failures`` requests."""

    def __init__(self, failures: int, status: int) -> None:
        self.requests = 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.requests += 1
                if api.requests <= failures:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(LANDING).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Api]:
    failures, status = request.param
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("STACCHIP_RETRIES", "4")
    api = _Api(failures, status)
    yield api
    api.close()


@pytest.mark.parametrize("flaky_api", [(2, 503)], indirect=True)
def test_catalog_open_retries_a_brief_outage(flaky_api: _Api) -> None:
    catalog = Catalog(flaky_api.url)
    assert flaky_api.requests == 3
    assert catalog.client.id == "t"


@pytest.mark.parametrize("flaky_api", [(100, 503)], indirect=True)
def test_catalog_down_is_not_a_configuration_error(flaky_api: _Api) -> None:
    # exit status 2 (ConfigError) tells the scheduler not to retry; an outage must stay retryable
    with pytest.raises(Exception) as info:
        Catalog(flaky_api.url)
    assert not isinstance(info.value, ConfigError)
    assert flaky_api.url in str(info.value)
    assert flaky_api.requests == 4


@pytest.mark.parametrize("flaky_api", [(100, 404)], indirect=True)
def test_catalog_refusal_is_a_configuration_error(flaky_api: _Api) -> None:
    with pytest.raises(ConfigError, match="cannot open STAC API"):
        Catalog(flaky_api.url)
    assert flaky_api.requests == 1


@pytest.mark.services
def test_upstream_entry_point_raises_when_an_item_fails(s2_setup, monkeypatch):
    """Upstream's ``process_mgrs_tile`` raised on a failed item; a caller must still learn of failures."""
    from stacchip.processors import jobs, sentinel_2_processor
    from tests.processors_support import bucket_objects, s3

    env = s2_setup["env"]
    for name in ("STACCHIP_STAC_API", "STACCHIP_COLLECTION", "STACCHIP_YEARS", "STACCHIP_N_YEARS"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("STACCHIP_RETRIES", "2")
    client = s3(s2_setup["endpoint"])
    for key in bucket_objects(s2_setup["endpoint"], s2_setup["source"]):
        client.delete_object(Bucket=s2_setup["source"], Key=key)  # every source asset is gone
    with pytest.raises(jobs.TaskFailed) as info:
        sentinel_2_processor.process_mgrs_tile(0, env["STACCHIP_MGRS_SOURCE"], s2_setup["bucket"])
    assert {r["status"] for r in info.value.result} == {"failed"}
    assert f"S2A_{s2_setup['tag']}_Q1_CLOUD10" in str(info.value)
    assert not bucket_objects(s2_setup["endpoint"], s2_setup["bucket"], "index/")
