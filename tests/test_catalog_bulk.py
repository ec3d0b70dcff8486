"""Bulk indexing (``stacchip index`` over many items, ``stacchip.catalog.bulk``) end to end:
stac-geoparquet on the loopback S3 server indexed by two array tasks, killed and partial runs
finished by a re-run, ndjson / ItemCollection / single-item inputs, a STAC API search on
stac-fastapi-pgstac, bad items among good ones, and bad flags."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from stacchip import cli
from stacchip.catalog import bulk
from stacchip.errors import ConfigError
from stacchip.index import read_index, read_metadata
from stacchip.indexer import Sentinel2Indexer
from tests.processors_support import bucket_objects, new_bucket, s3, sentinel2_base, upload_assets, variant

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "sentinel-2-l2a"
ARRAY_VARS = ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "STACCHIP_INDEX_OFFSET")
#: Fixed ids: their split over two tasks is known (both tasks get items, see test_task_split).
IDS = [f"S2B_BULK_{i}" for i in range(6)]


# --- scenes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real Sentinel-2 item with COGs scaled down 10x (10 m bands 1098 px, 16 chips)."""
    return sentinel2_base(tmp_path_factory.mktemp("bulk-base"), factor=10)


def write_scl(base: dict[str, Any], path: Path, n: int) -> Path:
    """An SCL COG on the base item's SCL grid, its cloud block and nodata strip sized by ``n``."""
    with rasterio.open(base["assets"]["scl"]["href"]) as src:
        profile = src.profile
        rows, cols = src.height, src.width
    scl = np.full((rows, cols), 4, dtype="uint8")
    scl[: rows * (n + 1) // 8, : cols * (n + 1) // 8] = 9
    scl[rows - rows * (n % 3 + 1) // 10:, :] = 0
    profile.update(driver="COG", blocksize=256, compress="DEFLATE")
    for key in ("blockxsize", "blockysize", "tiled", "interleave"):
        profile.pop(key, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(scl, 1)
    return path


def make_items(base: dict[str, Any], directory: Path, collection: str = PLATFORM,
               ids: list[str] = IDS) -> list[dict[str, Any]]:
    """One item per id, each with an SCL file of its own (different cloud and nodata)."""
    items = []
    for n, item_id in enumerate(ids):
        item = variant(base, item_id, collection, f"2020-{n + 1:02d}-10T14:00:00Z",
                       **{"eo:cloud_cover": float(10 * n)})
        item["assets"]["scl"]["href"] = str(write_scl(base, directory / item_id / "scl.tif", n))
        items.append(item)
    return items


def expected_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    return Sentinel2Indexer(copy.deepcopy(item)).create_full_index().to_pylist()


def write_geoparquet(items: list[dict[str, Any]], path: Path) -> Path:
    import stac_geoparquet.arrow as sga

    sga.to_parquet(sga.parse_stac_items_to_arrow(items), path)
    return path


def write_ndjson(items: list[Any], path: Path) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in items))
    return path


def index_path(out: Path, item_id: str) -> Path:
    return out / "index" / PLATFORM / item_id / f"index_{item_id}.parquet"


def local_indexes(out: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sorted(out.rglob("*.parquet"))}


def summary_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stacchip index:")]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def count(line: str, what: str) -> int:
    """The number before ``what`` in a summary line (``4 indexed``, ``2 already indexed``)."""
    head = line.split(f" {what}")[0]
    return int(head.rsplit(" ", 1)[-1].lstrip("("))


# --- running the command as a scheduler does --------------------------------------------------------


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name in (*ARRAY_VARS, "STACCHIP_TASKS", "STACCHIP_POOL_SIZE"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stacchip.cli", "index", *args]


def run_index(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), env=environment(env), capture_output=True, text=True,
                          timeout=timeout, check=False)


# --- unit: tasks, sources ---------------------------------------------------------------------------


def test_task_split() -> None:
    shares = [bulk.task_of(i, 2) for i in IDS]
    assert 0 < sum(shares) < len(IDS)  # both tasks get items of IDS (the tests below rely on it)
    many = [f"item-{n}" for n in range(4000)]
    tasks = [bulk.task_of(i, 7) for i in many]
    assert set(tasks) == set(range(7))
    sizes = np.bincount(tasks, minlength=7)
    assert sizes.min() > 0.85 * len(many) / 7 and sizes.max() < 1.15 * len(many) / 7
    assert [bulk.task_of(i, 7) for i in reversed(many)] == tasks[::-1]  # an id's task is its own
    assert all(bulk.task_of(i, 1) == 0 for i in many[:50])


def test_geoparquet_reads_back_as_the_items(base: dict[str, Any], tmp_path: Path) -> None:
    items = make_items(base, tmp_path / "scenes", ids=IDS[:3])
    del items[1]["assets"]["blue"]  # a null in the union schema: must not come back as an asset
    items[2]["properties"]["only_here"] = "x"
    path = write_geoparquet(items, tmp_path / "items.parquet")
    records = list(bulk.read_source(path))
    assert [r.key for r in records] == [i["id"] for i in items]
    for record, item in zip(records, items, strict=True):
        got = record.item
        assert got["assets"] == item["assets"]
        assert got["geometry"] == json.loads(json.dumps(item["geometry"]))
        assert got["bbox"] == item["bbox"]
        assert got["collection"] == item["collection"]
        props = {k: v for k, v in item["properties"].items() if k not in ("created", "updated", "datetime")}
        assert {k: got["properties"][k] for k in props} == props
        assert set(got["properties"]) == set(item["properties"])
        assert got["properties"]["datetime"].startswith(item["properties"]["datetime"][:19])
    assert "blue" not in records[1].item["assets"]
    assert "only_here" not in records[0].item["properties"]
    # only the rows a task wants are decoded; the tally counts them all
    tally = bulk.Tally()
    some = list(bulk.read_source(path, lambda key: key == IDS[1], tally))
    assert [r.key for r in some] == [IDS[1]] and tally.entries == 3


def test_select_takes_a_task_share_in_id_order_once() -> None:
    def rec(item_id: str, source: str, cloud: float = 1.0, collection: str = PLATFORM) -> bulk.Record:
        item = {"type": "Feature", "id": item_id, "collection": collection, "properties": {"eo:cloud_cover": cloud}}
        return bulk.Record(item_id, item, source)

    records = [rec(i, "b.ndjson") for i in reversed(IDS)]
    records += [rec(IDS[0], "a.ndjson"), rec(IDS[1], "a.ndjson", cloud=99.0)]  # again; the second differs
    records += [rec(IDS[2], "c.ndjson", collection="sentinel-2-c1-l2a")]  # an alias: the same platform
    records += [bulk.Record("x.ndjson line 3", None, "x.ndjson", error="line 3 is not JSON")]
    every = bulk.select(records, None, 2)
    assert [r.key for r in every if r.item] == sorted(IDS)
    assert {r.key: r.source for r in every if r.item}[IDS[1]] == "a.ndjson"  # first in source order
    assert [r.key for r in every if not r.item] == ["x.ndjson line 3"]
    shares = [bulk.select(records, task, 2) for task in (0, 1)]
    assert sorted(r.key for share in shares for r in share) == sorted(r.key for r in every)
    assert all(bulk.task_of(r.key, 2) == task for task, share in enumerate(shares) for r in share)
    # another platform is another output path: both are indexed
    both = bulk.select([rec("same", "a"), rec("same", "b", collection="landsat-c2-l2")], None, 1)
    assert sorted(bulk.record_platform(r) for r in both) == ["landsat-c2l2-sr", PLATFORM]


def test_parquet_without_ids_is_bad_input(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "not-stac.parquet"
    pq.write_table(pa.table({"name": ["a"]}), path)
    with pytest.raises(ConfigError, match="no 'id' column"):
        list(bulk.read_source(path))


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.services
def test_geoparquet_on_s3_two_array_tasks(base: dict[str, Any], s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    """A stac-geoparquet catalog on S3, assets on S3, two AWS Batch array tasks at once."""
    remote = upload_assets(base, s3_env, new_bucket(s3_env), "base")
    items = []
    for item in make_items(base, tmp_path / "scenes"):
        key = f"scenes/{item['id']}/scl.tif"
        s3(s3_env).upload_file(item["assets"]["scl"]["href"], s3_bucket, key)
        item["assets"] = {**copy.deepcopy(remote["assets"]), "scl": {**item["assets"]["scl"], "href": f"s3://{s3_bucket}/{key}"}}
        items.append(item)
    catalog = write_geoparquet(items, tmp_path / "part-0.parquet")
    s3(s3_env).upload_file(str(catalog), s3_bucket, "catalog/part-0.parquet")
    out = f"s3://{s3_bucket}/bulk"
    env: dict[str, str] = {}  # s3_env put the endpoint and credentials in os.environ
    procs = [
        subprocess.Popen(command(f"s3://{s3_bucket}/catalog/", "--out", out, "--tasks", "2"),
                         env=environment({**env, "AWS_BATCH_JOB_ARRAY_INDEX": str(task)}),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for task in (0, 1)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for task, res in enumerate(results):
        assert res.returncode == 0, res.stderr[-3000:]
        line = summary_line(res)
        share = [i for i in IDS if bulk.task_of(i, 2) == task]
        assert f"task {task} of 2" in line and count(line, "indexed") == len(share), line

    objects = bucket_objects(s3_env, s3_bucket, "bulk/")
    # each index, and the item beside it in the bucket layout (a stac-geoparquet row has no href of its own)
    assert sorted(objects) == sorted([f"bulk/index/{PLATFORM}/{i}/index_{i}.parquet" for i in IDS]
                                     + [f"bulk/{PLATFORM}/{i}/stac_item.json" for i in IDS])
    for item in items:
        path = f"{out}/index/{PLATFORM}/{item['id']}/index_{item['id']}.parquet"
        assert read_index(path).to_pylist() == expected_rows(item)
        meta = read_metadata(path)
        assert meta["item"]["id"] == item["id"]
        assert meta["item"]["assets"]["scl"]["href"] == item["assets"]["scl"]["href"]
        assert meta["source"] == f"s3://{s3_bucket}/catalog/part-0.parquet"
        assert meta["item_href"] == f"{out}/{PLATFORM}/{item['id']}/stac_item.json"
    # the items really differ: each index read its own SCL
    clouds = {i["id"]: sum(r["cloud_cover_percentage"] for r in expected_rows(i)) for i in items}
    assert len(set(clouds.values())) == len(items)

    # a re-run of task 1 skips its share, verified, and writes nothing
    before = bucket_objects(s3_env, s3_bucket, "bulk/")
    again = run_index(f"s3://{s3_bucket}/catalog/part-0.parquet", "--out", out, "--tasks", "2",
                      env={**env, "AWS_BATCH_JOB_ARRAY_INDEX": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert count(summary_line(again), "already indexed") == len([i for i in IDS if bulk.task_of(i, 2) == 1])
    assert bucket_objects(s3_env, s3_bucket, "bulk/") == before


def test_killed_run_rerun_indexes_every_item_once(base: dict[str, Any], tmp_path: Path) -> None:
    items = make_items(base, tmp_path / "scenes")
    source = write_ndjson(items, tmp_path / "items.ndjson")
    out = tmp_path / "out"
    proc = subprocess.Popen(command(str(source), "--out", str(out)), env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not local_indexes(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = local_indexes(out)
    assert 1 <= len(done) < len(items), f"kill came too late: {sorted(done)}"
    first = {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in done.items()}

    res = run_index(str(source), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    line = summary_line(res)
    assert count(line, "already indexed") == len(done) and count(line, "indexed") == len(items) - len(done), line
    final = local_indexes(out)
    assert sorted(final) == sorted(IDS)
    for item in items:
        assert read_index(final[item["id"]]).to_pylist() == expected_rows(item)
    for key, (mtime, data) in first.items():  # skipped, not rewritten
        assert final[key].stat().st_mtime_ns == mtime and final[key].read_bytes() == data
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp left by the kill


def test_partial_state_finished_by_all_workers(base: dict[str, Any], tmp_path: Path) -> None:
    """Task 0 ran; then one of its indexes got truncated and a write left a temp file:
    ``--all --workers 2`` re-indexes the broken one, skips the others, indexes task 1's share."""
    items = make_items(base, tmp_path / "scenes")
    source = write_geoparquet(items, tmp_path / "items.parquet")
    out = tmp_path / "out"
    res = run_index(str(source), "--out", str(out), "--index", "0", "--tasks", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    task0 = sorted(i for i in IDS if bulk.task_of(i, 2) == 0)
    assert sorted(local_indexes(out)) == task0
    broken, kept = task0[0], task0[1:]
    data = index_path(out, broken).read_bytes()
    index_path(out, broken).write_bytes(data[: len(data) // 2])
    other = sorted(i for i in IDS if bulk.task_of(i, 2) == 1)[0]
    stale = index_path(out, other).parent / f".index_{other}.parquet.k1ll3d.part"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a file")
    untouched = {k: index_path(out, k).stat().st_mtime_ns for k in kept}

    res = run_index(str(source), "--out", str(out), "--all", "--workers", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    line = summary_line(res)
    assert "all tasks" in line
    assert count(line, "already indexed") == len(kept) and count(line, "indexed") == len(IDS) - len(kept), line
    assert "rewriting" in res.stderr and broken in res.stderr  # the truncated file was noticed
    final = local_indexes(out)
    assert sorted(final) == sorted(IDS)
    for item in items:
        assert read_index(final[item["id"]]).to_pylist() == expected_rows(item)
    assert {k: index_path(out, k).stat().st_mtime_ns for k in kept} == untouched
    assert not stale.exists()

    # other settings are other indexes: a re-run with another chip size rewrites every file
    res = run_index(str(source), "--out", str(out), "--chip-size", "128", "--sign", "planetary-computer")
    assert res.returncode == 0 and count(summary_line(res), "indexed") == len(IDS), res.stderr[-2000:]
    assert read_metadata(final[IDS[0]])["chip_size"] == 128


def test_ndjson_itemcollection_and_single_item(base: dict[str, Any], tmp_path: Path) -> None:
    scenes = tmp_path / "scenes"
    items = make_items(base, scenes)
    ndjson = write_ndjson(items[:3], tmp_path / "first.ndjson")
    # an ItemCollection beside its scenes, with asset hrefs relative to it
    relative = copy.deepcopy(items[3:5])
    for item in relative:
        item["assets"]["scl"]["href"] = os.path.relpath(item["assets"]["scl"]["href"], scenes)
    collection = scenes / "collection.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": relative}))
    single = tmp_path / "one.json"
    single.write_text(json.dumps(items[5]))
    out = tmp_path / "out"
    res = run_index(str(ndjson), str(collection), str(single), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert count(summary_line(res), "indexed") == 6
    final = local_indexes(out)
    assert sorted(final) == sorted(IDS)
    for item in items:
        assert read_index(final[item["id"]]).to_pylist() == expected_rows(item)
    assert read_metadata(final[IDS[3]])["item"]["assets"]["scl"]["href"] == items[3]["assets"]["scl"]["href"]
    assert read_metadata(final[IDS[5]])["item_href"] == str(single)
    # an ndjson line has no href of its own: the item is kept beside its index, in the bucket layout
    assert read_metadata(final[IDS[0]])["item_href"] == str(out / PLATFORM / IDS[0] / "stac_item.json")

    # `stacchip chip` finds the item in the index it records (no item file exists for ndjson items)
    npz = tmp_path / "chip.npz"
    assert cli.main(["chip", str(final[IDS[0]]), "--chipid", f"{IDS[0]}-0-0", "--out", str(npz),
                     "--assets", "red"]) == 0
    assert np.load(npz)["red"].shape == (1, 256, 256)

    # today's one-item form is unchanged
    legacy = tmp_path / "legacy.parquet"
    res = run_index(str(single), "--out", str(legacy))
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_index(legacy).to_pylist() == expected_rows(items[5])
    assert read_metadata(legacy)["item_href"] == str(single)


@pytest.mark.services
def test_stac_api_search_as_two_tasks(base: dict[str, Any], stac_api: Any, tmp_path: Path) -> None:
    import uuid

    collection = f"bulk-{uuid.uuid4().hex[:8]}"
    items = make_items(base, tmp_path / "scenes", collection=collection)
    items[2]["properties"]["eo:cloud_cover"] = 60.0  # excluded by the query
    stac_api.load_collection(stac_api.make_collection(collection, items))
    stac_api.load_items(items)
    west, south, east, north = items[0]["bbox"]
    search = ["--stac-api", stac_api.url, "--collection", collection, "--datetime", "2020-01-01/2020-04-30",
              "--query", '{"eo:cloud_cover": {"lt": 50}}', f"--bbox={west},{south},{east},{north}"]
    wanted = [IDS[0], IDS[1], IDS[3]]  # January to April, less than 50 % cloud
    out = tmp_path / "out"
    for task, var in enumerate(("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")):
        res = run_index(*search, "--out", str(out), "--tasks", "2", env={var: str(task)})
        assert res.returncode == 0, res.stderr[-3000:]
        share = [i for i in wanted if bulk.task_of(i, 2) == task]
        assert count(summary_line(res), "indexed") == len(share), res.stdout
    final = local_indexes(out)
    assert sorted(final) == wanted
    for item in items:
        if item["id"] in wanted:
            path = final[item["id"]]
            assert read_index(path).to_pylist() == expected_rows(item)
            meta = read_metadata(path)
            assert meta["item_href"].startswith(stac_api.url) and meta["item_href"].endswith(item["id"])
            assert meta["item"]["assets"]["scl"]["href"] == item["assets"]["scl"]["href"]

    limited = tmp_path / "limited"
    res = run_index(*search, "--limit", "2", "--out", str(limited))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(local_indexes(limited)) == 2 and set(local_indexes(limited)) <= set(wanted)

    res = run_index("--stac-api", stac_api.url, "--collection", f"{collection}-none", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "found no items" in res.stderr


def bad_items(items: list[dict[str, Any]], tmp_path: Path) -> dict[str, dict[str, Any]]:
    no_proj = copy.deepcopy(items[0])
    no_proj["id"] = "BAD_NO_CRS"
    no_proj["properties"].pop("proj:epsg", None)
    no_proj["properties"].pop("proj:code", None)
    missing = copy.deepcopy(items[1])
    missing["id"] = "BAD_MISSING_SCL"
    missing["assets"]["scl"]["href"] = str(tmp_path / "gone" / "scl.tif")
    unsafe = copy.deepcopy(items[2])
    unsafe["id"] = "../../escaped"
    down = copy.deepcopy(items[3])
    down["id"] = "RETRY_SERVER_DOWN"
    from tests.services import free_port

    down["assets"]["scl"]["href"] = f"http://127.0.0.1:{free_port()}/scl.tif"  # nothing listens there
    return {"no_proj": no_proj, "missing": missing, "unsafe": unsafe, "down": down}


def test_bad_items_among_good_ones(base: dict[str, Any], tmp_path: Path) -> None:
    items = make_items(base, tmp_path / "scenes")
    bad = bad_items(items, tmp_path)
    source = write_ndjson(
        [items[0], bad["no_proj"], items[1], bad["missing"], "{not json", items[2], bad["unsafe"], items[3]],
        tmp_path / "mixed.ndjson",
    )
    out = tmp_path / "out"
    res = run_index(str(source), "--out", str(out))
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])  # every failure is bad input
    errors = res.stderr.splitlines()
    for name in ("BAD_NO_CRS", "BAD_MISSING_SCL", "../../escaped", "line 5"):
        assert any(name in line for line in errors), (name, res.stderr)
    assert any("BAD_MISSING_SCL" in line and "gone" in line for line in errors)
    line = summary_line(res)
    assert count(line, "indexed") == 4 and count(line, "failed") == 4, line
    final = local_indexes(out)
    assert sorted(final) == sorted(IDS[:4])
    for item in items[:4]:
        assert read_index(final[item["id"]]).to_pylist() == expected_rows(item)
    assert not list(tmp_path.rglob("*escaped*"))  # the unsafe id wrote nothing, anywhere

    # a failure worth retrying (a server down) makes the status 1, also beside bad input
    source = write_ndjson([items[4], bad["down"], bad["no_proj"]], tmp_path / "retry.ndjson")
    res = run_index(str(source), "--out", str(out))
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert any("RETRY_SERVER_DOWN" in line for line in res.stderr.splitlines())
    assert index_path(out, IDS[4]).exists()


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--tasks", "2"], {}, "--tasks 2"),
        ([], {"AWS_BATCH_JOB_ARRAY_INDEX": "0"}, "--tasks"),
        (["--index", "2", "--tasks", "2"], {}, "--tasks 2"),
        (["--index", "-1", "--tasks", "2"], {}, "--index"),
        (["--collection", "x"], {}, "--stac-api"),
        (["--stac-api", "ftp://x", "--collection", "x"], {}, "--stac-api"),
        (["--bbox", "1,2,3"], {}, "--bbox"),
        (["--stac-api", "http://127.0.0.1:9", "--collection", "c", "--bbox", "1,2,3"], {}, "--bbox"),
        (["--stac-api", "http://127.0.0.1:9", "--collection", "c", "--query", "{"], {}, "--query"),
        (["--stac-api", "http://127.0.0.1:9"], {}, "--collection"),
        (["--chip-size", "0"], {}, "--chip-size"),
    ],
)
def test_bad_flags_exit_2_naming_them(
    args: list[str], env: dict[str, str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for var in (*ARRAY_VARS, "STACCHIP_TASKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    source = write_ndjson([{"type": "Feature", "id": "x"}], tmp_path / "one.ndjson")
    assert cli.main(["index", str(source), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "out").exists()


def test_bad_sources_exit_2_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ndjson = write_ndjson([{"type": "Feature", "id": "x"}, {"type": "Feature", "id": "y"}], tmp_path / "two.ndjson")
    cases = [
        ([str(ndjson), "--out", str(tmp_path / "x.parquet")], "--out"),
        ([str(tmp_path / "missing.ndjson"), "--out", str(tmp_path / "out")], "missing.ndjson"),
        ([str(write_ndjson([], tmp_path / "empty.ndjson")), "--out", str(tmp_path / "out")], "no STAC items"),
        ([str(tmp_path), "--out", str(tmp_path / "out")], "without stac-geoparquet files"),
        (["--out", str(tmp_path / "out")], "nothing to index"),
    ]
    for args, named in cases:
        assert cli.main(["index", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], (args, err)


# --- end to end: catalog -> bulk index (2 array tasks) -> compaction -> ChipDataset ------------------


def test_geoparquet_catalog_to_compacted_index_to_chip_dataset(base: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from stacchip.catalog import compact
    from stacchip.chipper import Chipper
    from stacchip.grid import ChipGrid
    from stacchip.index import query
    from stacchip.ml import ChipDataset
    from stacchip.utils import load_item

    items = make_items(base, tmp_path / "scenes")
    catalog = write_geoparquet(items, tmp_path / "catalog.parquet")
    out = tmp_path / "bucket"
    for task in ("0", "1"):  # as two array tasks of one job
        res = run_index(str(catalog), "--out", str(out), "--tasks", "2",
                        env={"AWS_BATCH_JOB_ARRAY_INDEX": task})
        assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(local_indexes(out)) == sorted(IDS)

    dest = tmp_path / "compacted"
    compact([str(out / "index")], str(dest))
    per_item = query(out / "index").sort_by("chipid")
    compacted = query(dest).sort_by("chipid")
    assert compacted.column("chipid").to_pylist() == per_item.column("chipid").to_pylist()
    assert compacted.num_rows == sum(len(expected_rows(item)) for item in items)

    from stacchip.errors import UnsafePathError

    with pytest.raises(UnsafePathError, match="outside the index root"):  # hrefs of a manifest: confined
        ChipDataset(dest, assets=["red", "nir"], max_cloud=0.5)
    ds = ChipDataset(dest, assets=["red", "nir"], max_cloud=0.5, item_roots=[str(out)])
    assert 0 < len(ds) < compacted.num_rows  # the cloud filter removed some chips
    sample = ds[len(ds) // 2]
    item_id, x, y = str(ds.chipid[len(ds) // 2]).rsplit("-", 2)
    item = load_item(ds.items.location(PLATFORM, item_id))
    want = Chipper(ChipGrid.of(item, 256), assets=["red", "nir"]).chip(int(x), int(y))
    pixels = np.asarray(sample["pixels"])
    np.testing.assert_array_equal(pixels[0], want["red"][0].astype(pixels.dtype))
    np.testing.assert_array_equal(pixels[1], want["nir"][0].astype(pixels.dtype))
