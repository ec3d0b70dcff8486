"""stacchip.processors.publish: the output location is checked before a task writes anything."""

from __future__ import annotations

import uuid

import pytest


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
