"""stacchip-linz end to end: a static catalog in S3, resampled to 0.3 m COGs, new items, nodata-mask index."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from affine import Affine

from stacchip.index import read_index
from stacchip.processors.linz_processor import LINZ_PREFIXES, sample_scenes
from tests.builders import write_cog
from tests.processors_support import local_files, new_bucket, records, run_script

SURVEY = "testregion/testregion_2023_0.1m/rgb/2193/"


def _scene(tmp_path, name, col0):
    data = np.full((4, 300, 240), 120, dtype="uint8")
    data[3] = 255  # alpha
    data[:3, :, :60] = 0  # nodata strip on the left (first band zero)
    transform = Affine(0.1, 0, 1750000 + col0, 0, -0.1, 5920000)
    path = write_cog(tmp_path / f"{name}.tiff", data, transform, "EPSG:2193", blocksize=64)
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": name, "links": [], "stac_extensions": [],
        "geometry": None, "bbox": None,
        "properties": {"datetime": None, "start_datetime": "2023-01-05T11:00:00Z", "end_datetime": "2023-02-05T11:00:00Z"},
        "assets": {"visual": {"href": f"./{name}.tiff", "type": "image/tiff; application=geotiff; profile=cloud-optimized"}},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(item))
    return path


@pytest.mark.services
def test_linz_from_static_catalog(s3_env, tmp_path):
    source = new_bucket(s3_env, "nz")
    client = boto3.client("s3", endpoint_url=s3_env)
    names = [f"BQ31_500_04{n}0" for n in range(3)]
    for n, name in enumerate(names):
        _scene(tmp_path, name, n * 24)
        for ext in (".tiff", ".json"):
            client.upload_file(str(tmp_path / f"{name}{ext}"), source, f"{SURVEY}{name}{ext}")
    prefixes = tmp_path / "prefixes.txt"
    prefixes.write_text("# surveys\ntestregion/testregion_2023_0.1m/\n")
    out = tmp_path / "corpus"
    env = {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0", "STACCHIP_BUCKET": str(out), "STACCHIP_LINZ_ROOT": f"s3://{source}",
        "STACCHIP_LINZ_PREFIXES": str(prefixes), "STACCHIP_CHIP_SIZE": "32",
    }
    proc = run_script("stacchip-linz", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc)
    assert sorted(r["item_id"] for r in recs) == names  # fewer than 10 scenes: all of them
    assert {r["status"] for r in recs} == {"done"}
    files = local_files(out)
    for name in names:
        item = json.loads((out / "linz" / name / "stac_item.json").read_text())
        assert item["id"] == name and item["properties"]["datetime"].startswith("2023-01-05T11:00:00")
        assert item["properties"]["proj:code"] == "EPSG:2193"
        assert item["properties"]["proj:shape"] == [100, 80]
        href = item["assets"]["asset"]["href"]
        assert href == str(out / "linz" / name / f"{name}.tiff")
        with rasterio.open(href) as ds:
            assert ds.count == 3 and abs(ds.res[0] - 0.3) < 1e-9
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        table = read_index(out / "index" / "linz" / name / f"index_{name}.parquet")
        nodata = dict(zip(table.column("chip_index_x").to_pylist(), table.column("nodata_percentage").to_pylist(), strict=True))
        assert 0 not in nodata  # 20 of its 32 columns are nodata: over the 0.5 limit
        assert nodata[1] == 0.0 and len(nodata) == 80 // 32 - 1
    assert f"linz/{names[0]}/{names[0]}.tiff" in files
    again = run_script("stacchip-linz", env)
    assert again.returncode == 0 and {r["status"] for r in records(again)} == {"skipped-done"}
    assert local_files(out) == files


def test_linz_sample_sizes():
    assert len(LINZ_PREFIXES) == 39
    assert len(sample_scenes([f"f{i}" for i in range(3)])) == 3
    assert len(sample_scenes([f"f{i}" for i in range(15)])) == 10
    assert len(sample_scenes([f"f{i}" for i in range(100)])) == 50
    assert len(sample_scenes([f"f{i}" for i in range(5000)])) == 2000
    files = [f"f{i}" for i in range(100)]
    assert sample_scenes(files) == sample_scenes(list(reversed(files)))  # listing order does not matter


@pytest.mark.services
def test_linz_unreadable_scene_fails_alone(s3_env, tmp_path, monkeypatch, capsys):
    """One corrupt scene fails that item; the survey's other scenes are still published (exit 1)."""
    import boto3

    from stacchip.processors import linz_processor

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
