"""stacchip.processors.catalog: the STAC API client through outages and refusals (a loopback landing page)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from stacchip.errors import ConfigError
from stacchip.processors.catalog import Catalog

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
