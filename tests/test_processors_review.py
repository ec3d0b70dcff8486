"""Processor edge cases found in review: STAC API outages, upstream entry points, one bad scene in a task."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
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
def test_upstream_entry_point_raises_when_an_item_fails(s2_setup, monkeypatch):  # noqa: F811
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


@pytest.mark.services
def test_linz_unreadable_scene_fails_alone(s3_env, tmp_path, monkeypatch, capsys):
    """One corrupt scene fails that item; the survey's other scenes are still published (exit 1)."""
    import boto3

    from stacchip.processors import linz_processor
    from tests.test_processors_linz import SURVEY, _scene

    source = f"nz-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket=source)
    names = [f"BQ31_500_05{n}0" for n in range(3)]
    hrefs = [f"s3://{source}/{SURVEY}{name}.tiff" for name in names]
    bad = Path(linz_processor.sample_scenes(hrefs)[0]).stem  # processed first
    for n, name in enumerate(names):
        _scene(tmp_path, name, n * 24)
        if name == bad:
            (tmp_path / f"{name}.tiff").write_bytes(b"not a tiff")
        for ext in (".tiff", ".json"):
            client.upload_file(str(tmp_path / f"{name}{ext}"), source, f"{SURVEY}{name}{ext}")
    prefixes = tmp_path / "prefixes.txt"
    prefixes.write_text("testregion/testregion_2023_0.1m/\n")
    out = tmp_path / "corpus"
    monkeypatch.setenv("STACCHIP_RETRIES", "1")
    status = linz_processor.process([
        "--index", "0", "--bucket", str(out), "--root", f"s3://{source}", "--prefixes", str(prefixes),
        "--chip-size", "32",
    ])
    recs = {r["item_id"]: r["status"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert status == 1
    assert recs == {name: ("failed" if name == bad else "done") for name in names}
    for name in names:
        assert (out / "index" / "linz" / name / f"index_{name}.parquet").exists() == (name != bad)


@pytest.mark.services
@pytest.mark.parametrize("form", ["name", "url"])
def test_missing_output_bucket_is_a_configuration_error(form, s3_env, tmp_path, monkeypatch, capsys):
    """A mistyped STACCHIP_BUCKET stops the job at once (exit 2) instead of failing every item."""
    from shapely.geometry import box

    from stacchip import storage
    from stacchip.processors import sentinel_2_processor
    from tests.processors_support import write_samples

    missing = f"no-such-{uuid.uuid4().hex[:12]}"
    samples = write_samples(tmp_path / "mgrs.geojson", [{"name": "20HNJ", "geometry": box(0, 0, 1, 1)}])
    monkeypatch.setenv("STACCHIP_BUCKET", missing if form == "name" else f"s3://{missing}/corpus")
    monkeypatch.setenv("STACCHIP_MGRS_SOURCE", str(samples))
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "0")
    monkeypatch.setenv("STACCHIP_STAC_API", "http://127.0.0.1:9/")  # never reached
    monkeypatch.setenv("STACCHIP_RETRIES", "1")
    assert sentinel_2_processor.process([]) == 2
    assert missing in capsys.readouterr().err
    assert storage.bucket_exists(f"s3://{missing}") is False


@pytest.mark.services
def test_existing_output_bucket_passes_the_check(s3_bucket):
    from stacchip import storage
    from stacchip.processors.publish import Bucket

    assert storage.bucket_exists(f"s3://{s3_bucket}/any/prefix") is True
    Bucket(f"s3://{s3_bucket}/corpus").check()
    Bucket("relative/local/dir").check()  # local roots are created on write
