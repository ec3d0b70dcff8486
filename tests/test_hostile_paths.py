"""Hostile inputs end to end: names from a STAC API or an index never lead a read or write
outside the root the user gave; damaged outputs are repaired on re-run; files get the umask's
permissions."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pystac
import pytest
from shapely.geometry import shape

from stacchip import storage
from stacchip.chipper import Chipper
from stacchip.errors import UnsafePathError
from stacchip.index import read_index
from stacchip.indexer import NoStatsChipIndexer
from stacchip.processors import prechip, stats
from stacchip.utils import load_indexer_local
from tests.builders import materialize, real_item
from tests.processors_support import (
    new_bucket,
    records,
    s3,
    script_command,
    sentinel2_base,
    upload_assets,
    variant,
    write_samples,
)
from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes as build_scenes
from tests.builders import load_cube

pytestmark = pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")

HOSTILE_ID = "../../x/.ssh"


def tree(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size), leaving out ``skip``."""
    out = {}
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() or path.is_symlink():
            out[str(path.relative_to(root))] = path.lstat().st_size
    return out


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def run_umask(script: str, env: dict[str, str], umask: int) -> subprocess.CompletedProcess[str]:
    """A console script as a batch scheduler runs it, under ``umask``."""
    full = dict(os.environ)
    for name in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        full.pop(name, None)
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    full["NO_PROXY"] = full["no_proxy"] = "127.0.0.1,localhost"
    return subprocess.run(
        script_command(script), env=full, capture_output=True, text=True, timeout=300, check=False, umask=umask
    )


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


# --- processors ------------------------------------------------------------------------------------------


@pytest.mark.services
def test_processor_refuses_hostile_item_ids_and_file_names(stac_api, s3_env, tmp_path):
    """An item id ``../../x/.ssh`` with an asset file ``authorized_keys``, and an item whose asset
    file name decodes to ``..``, are refused (failed, nothing written anywhere); the task's good
    item is still published, with the umask's permissions; the task exits 1 as for any failed item.
    A re-run rewrites the good item's truncated index and removes a killed run's stale temp file."""
    base = sentinel2_base(tmp_path / "src")
    source = new_bucket(s3_env)
    base = upload_assets(base, s3_env, source, "tiles")
    s3(s3_env).put_object(Bucket=source, Key="keys/authorized_keys", Body=b"ssh-ed25519 AAAA attacker\n")
    collection = f"hostile-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    props = {"eo:cloud_cover": 5.0, "s2:nodata_pixel_percentage": 0.0}
    hostile = variant(base, HOSTILE_ID, collection, "2021-02-15T10:00:00Z", **props)
    hostile["assets"]["red"]["href"] = f"s3://{source}/keys/authorized_keys"
    badname = variant(base, f"S2B_{tag}_BADNAME", collection, "2021-05-15T10:00:00Z", **props)
    badname["assets"]["red"]["href"] = f"s3://{source}/keys/%2e%2e"
    fine = variant(base, f"S2B_{tag}_FINE", collection, "2021-08-15T10:00:00Z", **props)
    stac_api.load_collection(stac_api.make_collection(collection, [hostile, badname, fine]))
    stac_api.load_items([hostile, badname, fine])

    work = tmp_path / "work"
    work.mkdir()
    samples = write_samples(work / "mgrs.geojson", [{"name": "20HNJ", "geometry": shape(base["geometry"])}])
    bucket = work / "out" / "b"
    env = {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0",
        "STACCHIP_MGRS_SOURCE": str(samples),
        "STACCHIP_BUCKET": str(bucket),
        "STACCHIP_STAC_API": stac_api.url,
        "STACCHIP_COLLECTION": collection,
        "STACCHIP_YEARS": "2021",
        "STACCHIP_N_YEARS": "1",
        "STACCHIP_RETRIES": "1",
    }
    outside_before = tree(tmp_path, skip=bucket)
    proc = run_umask("stacchip-sentinel-2", env, 0o002)
    assert proc.returncode == 1, proc.stderr[-3000:]
    status = {r["item_id"]: r for r in records(proc)}
    assert {k: r["status"] for k, r in status.items()} == {
        HOSTILE_ID: "failed", badname["id"]: "failed", fine["id"]: "done",
    }
    assert "UnsafePathError" in status[HOSTILE_ID]["note"] and "item id '../../x/.ssh'" in status[HOSTILE_ID]["note"]
    assert "UnsafePathError" in status[badname["id"]]["note"] and "'%2e%2e'" in status[badname["id"]]["note"]
    assert HOSTILE_ID in proc.stderr

    # nothing outside the bucket, nothing of the refused items inside it
    assert not (work / "out" / "x").exists()
    assert tree(tmp_path, skip=bucket) == outside_before
    inside = tree(bucket)
    assert not [f for f in inside if "ssh" in f or "authorized_keys" in f or "BADNAME" in f], inside
    index = bucket / "index" / "sentinel-2-l2a" / fine["id"] / f"index_{fine['id']}.parquet"
    assert index.exists() and read_index(str(index)).num_rows > 0
    assert storage.verify(str(index)).ok
    # every file, hidden checksum records and claims included, has the umask's mode
    assert set(modes(bucket).values()) == {0o664}, modes(bucket)

    # damage: the index truncated, a stale temp file of a killed run, and one still being written
    asset_dir = bucket / "sentinel-2-l2a" / fine["id"]
    assets_before = {p.name: p.stat().st_mtime_ns for p in asset_dir.glob("*.tif")}
    whole = index.read_bytes()
    index.write_bytes(whole[: len(whole) // 2])
    stale = asset_dir / ".red.tif.k1ll3d00.part"
    stale.write_bytes(b"partial")
    _age(stale, 3600)
    busy = asset_dir / ".blue.tif.b0sy0000.part"
    busy.write_bytes(b"being written")
    os.utime(busy, (time.time() + 3600, time.time() + 3600))
    again = run_umask("stacchip-sentinel-2", env, 0o022)
    assert again.returncode == 1, again.stderr[-3000:]
    assert {r["item_id"]: r["status"] for r in records(again)}[fine["id"]] == "done"
    assert index.read_bytes() != whole[: len(whole) // 2]
    assert storage.verify(str(index)).ok and read_index(str(index)).num_rows > 0
    assert stat.S_IMODE(index.stat().st_mode) == 0o644
    assert not stale.exists() and busy.exists()
    assert {p.name: p.stat().st_mtime_ns for p in asset_dir.glob("*.tif")} == assets_before  # whole: kept
    assert not (work / "out" / "x").exists()

    # whole now: a third run skips it without writing anything
    busy.unlink()
    before = {str(p): p.stat().st_mtime_ns for p in bucket.rglob("*") if p.is_file()}
    third = run_umask("stacchip-sentinel-2", env, 0o022)
    assert {r["item_id"]: r["status"] for r in records(third)}[fine["id"]] == "skipped-done"
    assert {str(p): p.stat().st_mtime_ns for p in bucket.rglob("*") if p.is_file()} == before


# --- reads under a mountpath or data root ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_item(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return materialize(real_item("sentinel-2"), tmp_path_factory.mktemp("hostile-item"), factor=30)


@pytest.mark.parametrize("href", ["s3://bucket/../elsewhere/red.tif", "s3://bucket/a/%2e%2e/%2e%2e/elsewhere/red.tif"])
def test_chipper_with_mountpath_refuses_an_escaping_href(small_item, tmp_path, href):
    """The file the href escapes to is a readable COG: without the check the chip would read it."""
    mount = tmp_path / "mount"
    mount.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    red = Path(small_item["assets"]["red"]["href"])
    shutil.copy(red, elsewhere / "red.tif")
    item = pystac.Item.from_dict(copy.deepcopy(small_item))
    item.assets["red"].href = href
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=64), mountpath=str(mount), assets=["red"])
    with pytest.raises(UnsafePathError, match="leads outside"):
        chipper.chip(0, 0)
    assert chipper._datasets.open_count() == 0
    # the same file reached through the mount is read
    shutil.copy(red, mount / "red.tif")
    item.assets["red"].href = "s3://bucket/red.tif"
    ok = Chipper(NoStatsChipIndexer(item, chip_size=64), mountpath=str(mount), assets=["red"])
    assert ok.chip(0, 0)["red"].shape == (1, 64, 64)


def test_load_indexer_local_refuses_escaping_ids_and_hrefs(small_item, tmp_path):
    root = tmp_path / "data"
    evil = tmp_path / "elsewhere" / "evil"
    evil.mkdir(parents=True)
    (evil / "stac_item.json").write_text(json.dumps(small_item))
    with pytest.raises(UnsafePathError, match="item id"):
        load_indexer_local(root, PLATFORM, "../../elsewhere/evil")
    # an item inside the root whose relative href climbs out of it
    item = copy.deepcopy(small_item)
    item["assets"]["red"]["href"] = "../../../elsewhere/red.tif"
    folder = root / PLATFORM / item["id"]
    folder.mkdir(parents=True)
    (folder / "stac_item.json").write_text(json.dumps(item))
    with pytest.raises(UnsafePathError, match="'red' href"):
        load_indexer_local(root, PLATFORM, item["id"])
    item["assets"]["red"]["href"] = "../" + item["id"] + "/red.tif"  # relative, but inside
    (folder / "stac_item.json").write_text(json.dumps(item))
    assert load_indexer_local(root, PLATFORM, item["id"]).item.assets["red"].href == str(folder / "red.tif")


@pytest.fixture
def audited_opens():
    """Paths this process opens (Python's ``open`` audit event) while the list is live."""
    opened: list[str] = []
    live = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if live[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        yield opened
    finally:
        live[0] = False


def test_prechip_refuses_an_index_with_an_escaping_item_id(tmp_path, capsys, audited_opens):
    """The escaping item id points at a valid item outside --data: it is never opened, nothing is written."""
    scenes = build_scenes(tmp_path / "scenes", n_items=1)
    item = scenes["items"][0]
    evil_id = "../../elsewhere/evil"
    # {data}/{platform}/../../elsewhere/evil/stac_item.json == {data}/../elsewhere/evil/stac_item.json
    target = Path(scenes["data"]).parent / "elsewhere" / "evil"
    target.mkdir(parents=True)
    (target / "stac_item.json").write_text(json.dumps(item))
    table = read_index(scenes["index"])
    ids = pc.replace_substring(table.column("chipid"), item["id"], evil_id)
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array([evil_id] * table.num_rows))
    table = table.set_column(table.schema.get_field_index("chipid"), "chipid", ids)
    hostile_index = tmp_path / "hostile_index.parquet"
    pq.write_table(table, hostile_index)
    out = tmp_path / "cubes"
    audited_opens.clear()
    status = prechip.main([
        "--data", scenes["data"], "--indexpath", str(hostile_index), "--chips", str(out),
        "--platform", PLATFORM, "--cube-size", "4", "--max-nodata", "none", "--index", "0",
    ])
    err = capsys.readouterr().err
    assert status == 2, err
    assert evil_id in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in audited_opens if "elsewhere" in p], audited_opens
    # stats over the same index (--source index) refuses it too
    status = stats.main(["--platform", PLATFORM, "--source", "index", "--data", scenes["data"],
                         "--indexpath", str(hostile_index), "--output", str(tmp_path / "stats"), "--index", "0"])
    assert status == 2 and evil_id in capsys.readouterr().err
    assert not [p for p in audited_opens if "elsewhere" in p]


# --- damaged cubes, stale temp files, permissions ----------------------------------------------------------


def test_truncated_cube_is_rewritten_and_stats_names_a_damaged_cube(tmp_path, capsys):
    scenes = build_scenes(tmp_path / "scenes", n_items=1)
    out = tmp_path / "cubes"
    cfg = prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(out), platform=PLATFORM,
                                cube_size=4, cubes_per_job=3, max_nodata=None)
    old = os.umask(0o022)
    try:
        first = prechip.run_job(0, cfg)
    finally:
        os.umask(old)
    assert len(first) == 3
    folder = out / prechip.VERSION / PLATFORM
    assert set(modes(folder).values()) == {0o644}, modes(folder)
    cube = Path(first[1])
    whole = cube.read_bytes()
    original = load_cube(str(cube))
    cube.write_bytes(whole[: len(whole) // 3])  # a truncated cube, as a full disk or a bad copy leaves

    # stats on the damaged cube: an error naming it (exit 2), not a BadZipFile traceback
    status = stats.main(["--platform", PLATFORM, "--chips", str(out), "--output", str(tmp_path / "st"), "--index", "0"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert str(cube) in err and "Traceback" not in err

    # stale temp files of a killed job: those of this job's cubes go, others stay
    stale = folder / ".cube_0.npz.k1ll3d00.part"
    stale.write_bytes(b"half a cube")
    _age(stale, 3600)
    foreign = folder / ".cube_99.npz.k1ll3d00.part"
    foreign.write_bytes(b"another job's")
    _age(foreign, 3600)
    untouched = Path(first[0]).stat().st_mtime_ns
    old = os.umask(0o002)
    try:
        again = prechip.run_job(0, cfg)
    finally:
        os.umask(old)
    assert again == [str(cube)]
    rewritten = load_cube(str(cube))  # the same chips again
    assert sorted(rewritten) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(rewritten[key], original[key])
    assert storage.verify(str(cube)).ok
    assert stat.S_IMODE(cube.stat().st_mode) == 0o664
    assert Path(first[0]).stat().st_mtime_ns == untouched
    assert not stale.exists() and foreign.exists()
    assert prechip.run_job(0, cfg) == []

    foreign.unlink()
    assert stats.main(["--platform", PLATFORM, "--chips", str(out), "--output", str(tmp_path / "st"), "--index", "0"]) == 0
    capsys.readouterr()
    partial = tmp_path / "st" / "stats" / PLATFORM / "partial_00000.json"
    assert json.loads(partial.read_text())["count"][0] > 0
    assert stat.S_IMODE(partial.stat().st_mode) == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cube_without_a_record_is_checked_by_its_zip_crcs(tmp_path):
    """Cubes written before records existed (or by upstream) are kept when whole, rewritten when not."""
    scenes = build_scenes(tmp_path / "scenes", n_items=1)
    cfg = prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(tmp_path / "c"),
                                platform=PLATFORM, cube_size=4, cubes_per_job=2, max_nodata=None)
    first = prechip.run_job(0, cfg)
    for url in first:
        Path(storage.record_url(url)).unlink()
    stamps = [Path(u).stat().st_mtime_ns for u in first]
    assert prechip.run_job(0, cfg) == []
    assert [Path(u).stat().st_mtime_ns for u in first] == stamps
    data = bytearray(Path(first[0]).read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF  # one flipped bit inside a compressed member: its CRC fails
    Path(first[0]).write_bytes(bytes(data))
    assert prechip.cube_damage(bytes(data)) is not None
    assert prechip.run_job(0, cfg) == [first[0]]
    assert storage.verify(first[0]).ok
    assert load_cube(first[0])["pixels"].shape[0] == 4
