"""Processors under failure: killed tasks re-run, S3 errors retried, bad input refused, shared items claimed."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import rasterio
from shapely.geometry import shape

from stacchip.index import read_index, read_metadata
from tests.processors_support import (
    FaultProxy,
    bucket_objects,
    file_server,
    local_files,
    new_bucket,
    records,
    run_script,
    script_command,
    sentinel2_base,
    upload_assets,
    variant,
    write_samples,
)

PLATFORM = "sentinel-2-l2a"
N_ASSETS = 11


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("s2-res")


def _load(stac_api, base, n_items=1, year=2021):
    collection = f"s2r-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    items = [
        variant(base, f"S2B_{tag}_{q}", collection, f"{year}-{3 * q - 1:02d}-15T10:00:00Z",
                **{"eo:cloud_cover": 10.0 + q, "s2:nodata_pixel_percentage": 1.0})
        for q in range(1, n_items + 1)
    ]
    stac_api.load_collection(stac_api.make_collection(collection, items))
    stac_api.load_items(items)
    return collection, items


def _env(stac_api, collection, samples, bucket, year=2021):
    return {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0",
        "STACCHIP_MGRS_SOURCE": str(samples),
        "STACCHIP_BUCKET": bucket,
        "STACCHIP_STAC_API": stac_api.url,
        "STACCHIP_COLLECTION": collection,
        "STACCHIP_YEARS": str(year),
        "STACCHIP_N_YEARS": "1",
    }


def _samples(tmp_path, base, rows=1):
    return write_samples(tmp_path / "mgrs.geojson", [{"name": "20HNJ", "geometry": shape(base["geometry"])}] * rows)


def _run_and_kill(cmd, env, ready, timeout=120.0):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; returns whether it was killed mid-way."""
    full = {**os.environ, **env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        full.pop(name, None)
    proc = subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    killed = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return killed


@pytest.mark.services
@pytest.mark.parametrize("dest", ["local", "s3"])
def test_killed_task_rerun_finishes_every_object_once(dest, stac_api, s3_env, scene_dir, tmp_path):
    """Assets are streamed from a slow HTTP server; the task is SIGKILLed after its first
    asset landed, then run again: every object is there once and whole, none partial."""
    base = sentinel2_base(scene_dir)
    src_dir = Path(next(iter(base["assets"].values()))["href"]).parent
    with file_server(src_dir, delay=0.4, stagger=True) as url:
        http_base = copy.deepcopy(base)
        for asset in http_base["assets"].values():
            asset["href"] = f"{url}/{Path(asset['href']).name}"
        collection, items = _load(stac_api, http_base)
        item_id = items[0]["id"]
        if dest == "s3":
            bucket = new_bucket(s3_env, "out")
            out = bucket
            prefix = f"{PLATFORM}/{item_id}/"

            def assets_now():
                return [k for k in bucket_objects(s3_env, bucket, prefix) if k.endswith(".tif")]
        else:
            root = tmp_path / "out"
            out = str(root)

            def assets_now():
                folder = root / PLATFORM / item_id
                return [p for p in folder.glob("*.tif")] if folder.is_dir() else []

        env = _env(stac_api, collection, _samples(tmp_path, base), out)
        killed = _run_and_kill(script_command("stacchip-sentinel-2"), env, lambda: len(assets_now()) >= 1)
        assert killed, "the task finished before it could be killed"
        first = len(assets_now())
        assert 1 <= first < N_ASSETS
        index_url = f"index/{PLATFORM}/{item_id}/index_{item_id}.parquet"
        if dest == "s3":
            assert index_url not in bucket_objects(s3_env, bucket)
        else:
            assert not (root / index_url).exists()

        proc = run_script("stacchip-sentinel-2", env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [r["status"] for r in records(proc)] == ["done"]

    sources = {Path(a["href"]).name: Path(a["href"]).stat().st_size for a in base["assets"].values()}
    if dest == "s3":
        objects = bucket_objects(s3_env, bucket)
        tifs = {k.rsplit("/", 1)[1]: v["size"] for k, v in objects.items() if k.endswith(".tif")}
        assert index_url in objects and f"{PLATFORM}/{item_id}/stac_item.json" in objects
        index_src = f"s3://{bucket}/{index_url}"
    else:
        files = local_files(root)
        assert not [f for f in files if f.endswith(".part")], files
        tifs = {Path(f).name: size for f, size in files.items() if f.endswith(".tif")}
        assert index_url in files
        index_src = str(root / index_url)
        item = json.loads((root / PLATFORM / item_id / "stac_item.json").read_text())
        for asset in item["assets"].values():
            with rasterio.open(asset["href"]) as ds:  # whole, readable rasters
                assert ds.read(1).shape == (ds.height, ds.width)
    assert len(tifs) == N_ASSETS
    assert all(tifs[name] == sources[name] for name in tifs)
    assert read_index(index_src).num_rows > 0


@pytest.mark.services
def test_s3_errors_are_retried_through(stac_api, s3_env, scene_dir, tmp_path):
    """A proxy in front of the S3 server answers 503 to the first requests and then every
    eleventh: boto3 copies, the item JSON, the index and GDAL's reads all get through."""
    base = sentinel2_base(scene_dir)
    source = new_bucket(s3_env)
    base = upload_assets(base, s3_env, source, "src")
    bucket = new_bucket(s3_env, "out")
    collection, items = _load(stac_api, base)
    env = _env(stac_api, collection, _samples(tmp_path, base), bucket)
    with FaultProxy(s3_env, fail_first=4, fail_every=11) as proxy:
        env.update({"AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_S3": proxy.url, "STACCHIP_RETRIES": "10"})
        proc = run_script("stacchip-sentinel-2", env)
        failed = proxy.failed
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert failed >= 4
    item_id = items[0]["id"]
    objects = bucket_objects(s3_env, bucket)
    assert len([k for k in objects if k.endswith(".tif")]) == N_ASSETS
    assert read_index(f"s3://{bucket}/index/{PLATFORM}/{item_id}/index_{item_id}.parquet").num_rows > 0


@pytest.mark.services
def test_two_tasks_never_write_the_same_item(stac_api, s3_env, scene_dir, tmp_path):
    """Two sample rows for the same tile pick the same scene; run as a local range over a
    pool of two processes, exactly one task writes it, the other leaves it alone."""
    base = sentinel2_base(scene_dir)
    source = new_bucket(s3_env)
    base = upload_assets(base, s3_env, source, "src")
    bucket = new_bucket(s3_env, "out")
    collection, items = _load(stac_api, base, n_items=2)
    env = _env(stac_api, collection, _samples(tmp_path, base, rows=2), bucket)
    del env["AWS_BATCH_JOB_ARRAY_INDEX"]
    proc = run_script("stacchip-sentinel-2", env, "--range", "0:2", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc)
    for item in items:
        mine = [r for r in recs if r["item_id"] == item["id"]]
        assert len(mine) == 2
        done = [r for r in mine if r["status"] == "done"]
        assert len(done) == 1
        assert {r["status"] for r in mine} - {"done"} <= {"skipped-claimed", "skipped-done"}
        index_url = f"s3://{bucket}/index/{PLATFORM}/{item['id']}/index_{item['id']}.parquet"
        assert read_metadata(index_url)["writer"] == f"sentinel-2/{done[0]['task']}"


# --- refused configuration: clear error, exit status 2, nothing written -------------------------


def _refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last
    for word in words:
        assert word in last, last


def test_missing_sample_file_is_refused(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope.fgb"
    proc = run_script("stacchip-sentinel-2", {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0", "STACCHIP_MGRS_SOURCE": str(missing), "STACCHIP_BUCKET": str(out),
        "STACCHIP_STAC_API": "http://127.0.0.1:9/unused",
    })
    _refused(proc, str(missing))
    assert not out.exists()


def test_unreadable_sample_file_is_refused(tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "samples.geojson"
    bad.write_text("this is not a vector file")
    proc = run_script("stacchip-landsat", {
        "JOB_COMPLETION_INDEX": "0", "STACCHIP_SAMPLE_SOURCE": str(bad), "STACCHIP_BUCKET": str(out),
    })
    _refused(proc, "samples.geojson", "not a readable vector file")
    assert not out.exists()


def test_sample_file_without_tile_names_is_refused(tmp_path):
    from shapely.geometry import box

    out = tmp_path / "out"
    samples = write_samples(tmp_path / "s.geojson", [{"label": "x", "geometry": box(0, 0, 1, 1)}])
    proc = run_script("stacchip-sentinel-2", {
        "SLURM_ARRAY_TASK_ID": "0", "STACCHIP_MGRS_SOURCE": str(samples), "STACCHIP_BUCKET": str(out),
    })
    _refused(proc, "name")
    assert not out.exists()


def test_task_index_beyond_sample_file_is_refused(tmp_path):
    from shapely.geometry import box

    out = tmp_path / "out"
    samples = write_samples(tmp_path / "s.geojson", [{"name": "20HNJ", "geometry": box(0, 0, 1, 1)}])
    proc = run_script("stacchip-naip", {
        "AWS_BATCH_JOB_ARRAY_INDEX": "5", "STACCHIP_SAMPLE_SOURCE": str(samples), "STACCHIP_BUCKET": str(out),
    })
    _refused(proc, "task index 5", "1 rows")
    assert not out.exists()


def test_unknown_source_is_refused(tmp_path):
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "STACCHIP_BUCKET": str(out), "AWS_BATCH_JOB_ARRAY_INDEX": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "stacchip.processors", "sentinel-3"], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )
    _refused(proc, "unknown source", "sentinel-3", "sentinel-2")
    assert not out.exists()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"STACCHIP_MGRS_SOURCE": "x.fgb", "AWS_BATCH_JOB_ARRAY_INDEX": "0"}, ["STACCHIP_BUCKET"]),
        ({"STACCHIP_BUCKET": "./out", "AWS_BATCH_JOB_ARRAY_INDEX": "0"}, ["STACCHIP_MGRS_SOURCE"]),
        ({"STACCHIP_BUCKET": "./out", "STACCHIP_MGRS_SOURCE": "x.fgb"}, ["AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX"]),
        ({"STACCHIP_BUCKET": "./out", "STACCHIP_MGRS_SOURCE": "x.fgb", "AWS_BATCH_JOB_ARRAY_INDEX": "one"}, ["AWS_BATCH_JOB_ARRAY_INDEX", "integer"]),
        ({"STACCHIP_BUCKET": "./out", "STACCHIP_MGRS_SOURCE": "x.fgb", "AWS_BATCH_JOB_ARRAY_INDEX": "0", "STACCHIP_MAX_CLOUD_COVER": "150"}, ["STACCHIP_MAX_CLOUD_COVER"]),
        ({"STACCHIP_BUCKET": "./out", "STACCHIP_MGRS_SOURCE": "x.fgb", "AWS_BATCH_JOB_ARRAY_INDEX": "0", "STACCHIP_SEASONS": "winter"}, ["winter"]),
        ({"STACCHIP_BUCKET": "Bad_Bucket!", "STACCHIP_MGRS_SOURCE": "x.fgb", "AWS_BATCH_JOB_ARRAY_INDEX": "0"}, ["Bad_Bucket!"]),
    ],
)
def test_bad_settings_are_refused(env, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("STACCHIP_BUCKET", "STACCHIP_MGRS_SOURCE", "STACCHIP_MAX_CLOUD_COVER", "STACCHIP_SEASONS"):
        monkeypatch.delenv(name, raising=False)
    proc = run_script("stacchip-sentinel-2", env)
    _refused(proc, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.services
def test_a_failing_item_fails_the_task_but_not_its_other_items(stac_api, s3_env, scene_dir, tmp_path):
    """One picked scene has an asset missing at its source: the other scene is still
    published, the task exits 1 (so the scheduler retries it), and once the source is
    fixed a re-run finishes the failed item and skips the done one."""
    import boto3

    base = sentinel2_base(scene_dir)
    source = new_bucket(s3_env)
    base = upload_assets(base, s3_env, source, "src")
    collection, items = _load(stac_api, base, n_items=2)
    broken, fine = items
    broken["assets"]["scl"]["href"] = f"s3://{source}/missing/scl.tif"
    stac_api.load_items([broken])
    bucket = new_bucket(s3_env, "out")
    env = _env(stac_api, collection, _samples(tmp_path, base), bucket)
    proc = run_script("stacchip-sentinel-2", env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    status = {r["item_id"]: r["status"] for r in records(proc)}
    assert status == {broken["id"]: "failed", fine["id"]: "done"}
    assert broken["id"] in proc.stderr.strip().splitlines()[-1]
    objects = bucket_objects(s3_env, bucket)
    assert f"index/{PLATFORM}/{broken['id']}/index_{broken['id']}.parquet" not in objects
    assert f"index/{PLATFORM}/{fine['id']}/index_{fine['id']}.parquet" in objects

    boto3.client("s3", endpoint_url=s3_env).copy({"Bucket": source, "Key": "src/scl.tif"}, source, "missing/scl.tif")
    again = run_script("stacchip-sentinel-2", env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r["item_id"]: r["status"] for r in records(again)} == {broken["id"]: "done", fine["id"]: "skipped-done"}
