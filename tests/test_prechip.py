"""stacchip-prechip on scenes with known pixels: membership, contents, encodings,
filters, determinism, skip-existing; locally and on the loopback S3 server."""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stacchip import storage
from stacchip.chipper import Chipper
from stacchip.errors import ConfigError
from stacchip.index import query, write_index
from stacchip.indexer import ChipIndexer, Sentinel2Indexer
from stacchip.processors import prechip
from stacchip.processors.bands import S2_BANDS, platform_bands
from stacchip.utils import load_item
from tests.builders import coded_pixels, materialize, real_item

PLATFORM = "sentinel-2-l2a"
CHIP = 32
#: 10980 / 60 = 183 px at "10 m" -> 5 x 5 chips of 32 px; the 20 m grid is 91 px.
FACTOR = 60
SCL_PER_CHIP = CHIP // 2
DATETIMES = ["2024-03-11T14:11:54.463Z", "2020-12-31T23:30:00Z", "2021-06-15T03:05:00Z"]


def scl_map(shape: tuple[int, int], salt: int) -> np.ndarray:
    """Scene classes per 20 m pixel: vegetation, whole cloudy chips, nodata in row 4.

    Chip (0, 4) is half nodata, chip (1, 4) all nodata; chips with
    ``(x + 2 y + salt) % 4 == 0`` are all cloud (class 9); chip (2, 0) is a
    quarter cloud shadow (class 3).
    """
    scl = np.full(shape, 4, dtype=np.uint8)
    for cy in range(5):
        for cx in range(5):
            if (cx + 2 * cy + salt) % 4 == 0:
                scl[cy * 16:(cy + 1) * 16, cx * 16:(cx + 1) * 16] = 9
    scl[0:8, 2 * 16:2 * 16 + 8] = 3
    scl[4 * 16:5 * 16, 0:8] = 0
    scl[4 * 16:5 * 16, 16:32] = 0
    return scl


def band_pixels(shape: tuple[int, int], band: int, salt: int, scl: np.ndarray) -> np.ndarray:
    """Known uint16 values (1..60000) with 0 (the declared nodata) under SCL class 0."""
    rows, cols = shape
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    values = (1 + (r * 7 + c * 3 + band * 101 + salt * 1000) % 60000).astype(np.uint16)
    step = 2 if rows > scl.shape[0] else 1  # 10 m pixel r lies in 20 m pixel r // 2
    rr = np.minimum(np.arange(rows) // step, scl.shape[0] - 1)
    cc = np.minimum(np.arange(cols) // step, scl.shape[1] - 1)
    under = scl[np.ix_(rr, cc)]
    values[under == 0] = 0
    return values[None]


def build_scenes(root: Path, n_items: int = 3) -> dict[str, Any]:
    """Scenes in the bucket layout under ``root/data`` and their indexes under ``root/index``."""
    data = root / "data"
    index_dir = root / "index" / PLATFORM
    base = real_item("sentinel-2")
    keep = set(S2_BANDS) | {"scl"}
    base["assets"] = {k: v for k, v in base["assets"].items() if k in keep}
    items = []
    for i in range(n_items):
        item = copy.deepcopy(base)
        item["id"] = f"S2TEST_{i}"
        item["collection"] = PLATFORM
        item["properties"]["datetime"] = DATETIMES[i % len(DATETIMES)]
        scene = data / PLATFORM / item["id"]
        scl_shape = [
            max(1, math.floor(v / FACTOR)) for v in base["assets"]["scl"]["proj:shape"]
        ]
        scl = scl_map(tuple(scl_shape), i)

        def pixels(key: str, asset: dict[str, Any], shape: tuple[int, int], scl=scl, i=i) -> np.ndarray:
            if key == "scl":
                return scl[None]
            if key in S2_BANDS:
                return band_pixels(shape, S2_BANDS.index(key), i, scl)
            return coded_pixels(shape, 1, "uint16", i)

        item = materialize(item, scene, factor=FACTOR, pixels=pixels)
        (scene / "stac_item.json").write_text(json.dumps(item))
        table = Sentinel2Indexer(item, chip_size=CHIP, chip_max_nodata=1.0, platform=PLATFORM).create_full_index()
        write_index(table, index_dir / item["id"] / f"index_{item['id']}.parquet")
        items.append(item)
    return {"root": root, "data": str(data), "index": str(root / "index"), "items": items}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_scenes(tmp_path_factory.mktemp("prechip-scenes"))


def config(scenes: dict[str, Any], out: Path | str, **kw: Any) -> prechip.PrechipConfig:
    kw.setdefault("cube_size", 8)
    kw.setdefault("cubes_per_job", 3)
    kw.setdefault("max_nodata", None)
    return prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(out), platform=PLATFORM, **kw)


def load_cube(url: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def run_all_jobs(cfg: prechip.PrechipConfig, workers: int = 1) -> list[str]:
    selection = prechip.prepare(cfg)
    written = []
    for job in range(prechip.job_count(selection.n_cubes, cfg.cubes_per_job)):
        written += prechip.run_job(job, cfg, workers=workers)
    return written


def chipper_stack(item_json: str, x: int, y: int) -> np.ndarray:
    item = load_item(item_json)
    chip = Chipper(ChipIndexer(item, chip_size=CHIP)).chip(x, y)
    return np.concatenate([chip[b] for b in S2_BANDS]).astype(np.float32)


@pytest.fixture(scope="module")
def all_cubes(scenes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("cubes")
    cfg = config(scenes, out, partial=True)
    written = run_all_jobs(cfg)
    return {"cfg": cfg, "written": written, "cubes": [load_cube(u) for u in written]}


def test_every_chip_in_exactly_one_cube(scenes: dict[str, Any], all_cubes: dict[str, Any]) -> None:
    everything = query(scenes["index"]).column("chipid").to_pylist()
    assert len(everything) == 75
    seen = [c for cube in all_cubes["cubes"] for c in cube["chipids"].tolist()]
    assert len(seen) == len(set(seen)), "a chip is in two cubes"
    assert sorted(seen) == sorted(everything)
    sizes = [len(cube["chipids"]) for cube in all_cubes["cubes"]]
    assert sizes == [8] * 9 + [3]
    names = sorted(int(Path(u).stem.split("_")[1]) for u in all_cubes["written"])
    assert names == list(range(10))
    assert all(f"/{prechip.VERSION}/{PLATFORM}/cube_" in u for u in all_cubes["written"])


def test_without_partial_the_remainder_is_left_out(scenes: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(scenes, tmp_path, partial=False)
    selection = prechip.prepare(cfg)
    assert selection.n_cubes == 75 // 8
    written = run_all_jobs(cfg)
    assert len(written) == 9
    assert all(len(load_cube(u)["chipids"]) == 8 for u in written)


def test_cube_contents_equal_the_chipper(scenes: dict[str, Any], all_cubes: dict[str, Any]) -> None:
    items = {it["id"]: it for it in scenes["items"]}
    masked_chips = 0
    for cube in all_cubes["cubes"]:
        n = len(cube["chipids"])
        assert cube["pixels"].shape == (n, 10, CHIP, CHIP) and cube["pixels"].dtype == np.float32
        assert cube["nodata_mask"].shape == cube["pixels"].shape and cube["nodata_mask"].dtype == bool
        for name in ("lon_norm", "lat_norm", "week_norm", "hour_norm"):
            assert cube[name].shape == (n, 2) and cube[name].dtype == np.float32
        assert cube["bands"].tolist() == S2_BANDS
        for k, chipid in enumerate(cube["chipids"].tolist()):
            item_id, x, y = chipid.rsplit("-", 2)
            assert cube["item_ids"][k] == item_id and item_id in items
            path = Path(scenes["data"]) / PLATFORM / item_id / "stac_item.json"
            expected = chipper_stack(str(path), int(x), int(y))
            np.testing.assert_array_equal(cube["pixels"][k], expected)
            np.testing.assert_array_equal(cube["nodata_mask"][k], expected == 0)
            masked_chips += int(cube["nodata_mask"][k].any())
    # chips (0, 4) and (1, 4) of each item hold nodata
    assert masked_chips == 6


def test_latlon_and_time_encodings_by_hand(scenes: dict[str, Any], all_cubes: dict[str, Any]) -> None:
    items = {it["id"]: it for it in scenes["items"]}
    for cube in all_cubes["cubes"]:
        for k, chipid in enumerate(cube["chipids"].tolist()):
            item_id, x, y = chipid.rsplit("-", 2)
            item = items[item_id]
            bounds = ChipIndexer(item, chip_size=CHIP).get_chip_bbox(int(x), int(y)).bounds
            lon = (bounds[0] + bounds[2]) / 2
            lat = (bounds[1] + bounds[3]) / 2
            assert -40 < lat < -30 and -70 < lon < -60  # T20HNJ, Argentina
            np.testing.assert_allclose(cube["lat_norm"][k], [math.sin(math.radians(lat)), math.cos(math.radians(lat))], atol=1e-6)
            np.testing.assert_allclose(cube["lon_norm"][k], [math.sin(math.radians(lon)), math.cos(math.radians(lon))], atol=1e-6)
            t = dt.datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00"))
            start = dt.datetime(t.year, 1, 1, tzinfo=dt.UTC)
            end = dt.datetime(t.year + 1, 1, 1, tzinfo=dt.UTC)
            year_angle = 2 * math.pi * (t - start) / (end - start)
            hours = t.hour + t.minute / 60 + (t.second + t.microsecond / 1e6) / 3600
            hour_angle = 2 * math.pi * hours / 24
            np.testing.assert_allclose(cube["week_norm"][k], [math.sin(year_angle), math.cos(year_angle)], atol=1e-6)
            np.testing.assert_allclose(cube["hour_norm"][k], [math.sin(hour_angle), math.cos(hour_angle)], atol=1e-6)
            assert str(cube["datetimes"][k].astype("datetime64[ms]")) == t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23]


def test_week_53_does_not_collide_with_week_1() -> None:
    week53 = dt.datetime(2020, 12, 31, 12)  # ISO week 53 of 2020
    week1 = dt.datetime(2020, 1, 1, 12)  # ISO week 1 of 2020
    assert week53.isocalendar().week == 53 and week1.isocalendar().week == 1
    # upstream: 2*pi*week/52 gives the same angle for both
    assert math.isclose(math.sin(53 * 2 * math.pi / 52), math.sin(1 * 2 * math.pi / 52))
    (w53, h53), (w1, _) = prechip.normalize_timestamp(week53), prechip.normalize_timestamp(week1)
    assert abs(w53[0] - w1[0]) > 1e-3 or abs(w53[1] - w1[1]) > 1e-3
    # neighbouring days are neighbours on the circle, 53 is not far from 1
    gap = math.atan2(w1[0], w1[1]) - math.atan2(w53[0], w53[1])
    assert math.isclose(gap % (2 * math.pi), 2 * math.pi / 366, rel_tol=1e-4)
    assert h53 == pytest.approx((0.0, -1.0), abs=1e-7)  # noon UTC
    # a datetime's real hour is used, not noon
    assert prechip.normalize_timestamp(dt.datetime(2020, 1, 1, 6))[1] == pytest.approx((1.0, 0.0), abs=1e-7)


def test_normalize_latlon_returns_lat_then_lon() -> None:
    (lat_s, lat_c), (lon_s, lon_c) = prechip.normalize_latlon((10.0, 40.0, 12.0, 42.0))
    assert (lat_s, lat_c) == pytest.approx((math.sin(math.radians(41.0)), math.cos(math.radians(41.0))), abs=1e-6)
    assert (lon_s, lon_c) == pytest.approx((math.sin(math.radians(11.0)), math.cos(math.radians(11.0))), abs=1e-6)
    lon, lat = prechip.bbox_centres(np.array([[-179.9, 0.0, 179.9, 1.0]]))
    assert abs(abs(lon[0]) - 180.0) < 1e-9 and lat[0] == pytest.approx(0.5)


def test_filters(scenes: dict[str, Any], tmp_path: Path) -> None:
    table = query(scenes["index"])
    nodata = np.asarray(table.column("nodata_percentage"))
    cloud = np.asarray(table.column("cloud_cover_percentage"))
    ids = np.asarray(table.column("chipid").to_pylist())
    assert (nodata > 0).sum() == 6 and (cloud > 0).sum() > 6 and (cloud == 0).sum() > 20
    cases = [
        ({"max_nodata": 0.0}, nodata == 0),
        ({"max_nodata": 0.5}, nodata <= 0.5),
        ({"max_cloud": 0.0}, cloud == 0),
        ({"max_cloud": 0.25}, cloud <= 0.25),
        ({"max_cloud": 0.0, "max_nodata": 0.0}, (cloud == 0) & (nodata == 0)),
    ]
    for kw, keep in cases:
        sel = prechip.prepare(config(scenes, tmp_path, **kw))
        assert sorted(sel.table.column("chipid").to_pylist()) == sorted(ids[keep].tolist()), kw
    cfg = config(scenes, tmp_path / "f", max_nodata=0.0, max_cloud=0.0, partial=True)
    chips = [c for u in run_all_jobs(cfg) for c in load_cube(u)["chipids"].tolist()]
    assert sorted(chips) == sorted(ids[(cloud == 0) & (nodata == 0)].tolist())


def test_same_seed_same_cubes_whatever_the_jobs(scenes: dict[str, Any], all_cubes: dict[str, Any], tmp_path: Path) -> None:
    # other job split, cubes made in reverse order one by one, a process pool
    cfg = config(scenes, tmp_path, partial=True, cubes_per_job=4)
    selection = prechip.prepare(cfg)
    for k in reversed(range(selection.n_cubes)):
        prechip.make_cubes(cfg, [k], selection=selection, workers=2 if k == 0 else 1)
    for k, cube in enumerate(all_cubes["cubes"]):
        k_id = int(Path(all_cubes["written"][k]).stem.split("_")[1])
        other = load_cube(prechip.cube_url(str(tmp_path), PLATFORM, k_id))
        assert set(other) == set(cube)
        for name in cube:
            np.testing.assert_array_equal(other[name], cube[name], err_msg=name)
    other_seed = prechip.prepare(config(scenes, tmp_path, seed=7, partial=True))
    a = prechip.cube_members(selection, 0, 8)
    b = prechip.cube_members(other_seed, 0, 8)
    assert a.tolist() != b.tolist()


def test_cube_membership_is_random_not_by_item(scenes: dict[str, Any], all_cubes: dict[str, Any]) -> None:
    # with 3 items of 25 chips, cubes grouped by item would hold one or two items
    mixes = [len(set(cube["item_ids"].tolist())) for cube in all_cubes["cubes"][:9]]
    assert max(mixes) == 3


def test_existing_cubes_are_skipped(scenes: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(scenes, tmp_path)
    first = prechip.run_job(0, cfg)
    assert len(first) == 3
    stamps = {u: Path(u).stat().st_mtime_ns for u in first}
    assert prechip.run_job(0, cfg) == []  # whole cubes matching their records: skipped
    assert {u: Path(u).stat().st_mtime_ns for u in first} == stamps
    # a cube that is not what its record says is not skipped as done: it is written again
    marker = b"not a cube"
    Path(first[1]).write_bytes(marker)
    assert prechip.run_job(0, cfg) == [first[1]]
    assert load_cube(first[1])["pixels"].shape[0] == 8
    Path(first[2]).unlink()
    assert prechip.run_job(0, cfg) == [first[2]]
    assert Path(first[0]).stat().st_mtime_ns == stamps[first[0]]
    cfg.overwrite = True
    assert len(prechip.run_job(0, cfg)) == 3
    assert load_cube(first[1])["pixels"].shape[0] == 8
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]
    assert leftovers == []
    dry = config(scenes, tmp_path / "dry", dry_run=True)
    assert prechip.run_job(0, dry) == []
    assert not (tmp_path / "dry").exists()


def test_cli_array_job_from_environment(scenes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "1")
    monkeypatch.setenv("STACCHIP_DATA_BUCKET", scenes["data"])
    monkeypatch.setenv("STACCHIP_INDEXPATH", scenes["index"])
    monkeypatch.setenv("STACCHIP_CHIP_BUCKET", str(tmp_path))
    monkeypatch.setenv("STACCHIP_PLATFORM", PLATFORM)
    monkeypatch.setenv("STACCHIP_CUBES_PER_JOB", "2")
    monkeypatch.setenv("STACCHIP_CUBE_SIZE", "8")
    monkeypatch.setenv("STACCHIP_MAX_NODATA", "0")
    assert prechip.main(["-q"]) == 0
    files = sorted(p.name for p in (tmp_path / prechip.VERSION / PLATFORM).glob("*.npz"))
    assert files == ["cube_2.npz", "cube_3.npz"]
    cube = load_cube(str(tmp_path / prechip.VERSION / PLATFORM / "cube_2.npz"))
    nodata = dict(zip(query(scenes["index"]).column("chipid").to_pylist(),
                      query(scenes["index"]).column("nodata_percentage").to_pylist()))
    assert all(nodata[c] == 0 for c in cube["chipids"].tolist())
    assert not cube["nodata_mask"].any()


def test_cli_all_jobs_over_a_process_pool(scenes: dict[str, Any], all_cubes: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--data", scenes["data"], "--indexpath", scenes["index"], "--chips", str(tmp_path),
            "--platform", PLATFORM, "--cube-size", "8", "--cubes-per-job", "4", "--max-nodata", "none",
            "--partial", "--all", "--workers", "2", "-q"]
    assert prechip.main(argv) == 0
    for url, cube in zip(all_cubes["written"], all_cubes["cubes"]):
        other = load_cube(str(tmp_path / prechip.VERSION / PLATFORM / Path(url).name))
        np.testing.assert_array_equal(other["pixels"], cube["pixels"])
        assert other["chipids"].tolist() == cube["chipids"].tolist()


def test_cli_configuration_errors(scenes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("STACCHIP_DATA_BUCKET", "AWS_BATCH_JOB_ARRAY_INDEX"):
        monkeypatch.delenv(var, raising=False)
    assert prechip.main(["--indexpath", scenes["index"], "--chips", str(tmp_path), "--index", "0"]) == 2
    assert "STACCHIP_DATA_BUCKET" in capsys.readouterr().err
    base = ["--data", scenes["data"], "--indexpath", scenes["index"], "--chips", str(tmp_path), "--index", "0"]
    assert prechip.main(base + ["--max-nodata", "5"]) == 2
    assert "--max-nodata='5'" in capsys.readouterr().err
    monkeypatch.setenv("STACCHIP_MAX_CLOUD", "lots")
    assert prechip.main(base) == 2
    assert "STACCHIP_MAX_CLOUD='lots'" in capsys.readouterr().err
    monkeypatch.delenv("STACCHIP_MAX_CLOUD")
    assert prechip.main(base + ["--platform", "no-such-platform"]) == 2
    assert "no-such-platform" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        platform_bands("no-such-platform")


@pytest.mark.services
def test_s3_sources_and_output(scenes: dict[str, Any], all_cubes: dict[str, Any], s3_bucket: str) -> None:
    """Scenes, items, index and cubes all on the loopback S3 server."""
    import boto3

    client = boto3.client("s3")
    data_root = Path(scenes["data"])
    for item in scenes["items"]:
        moved = copy.deepcopy(item)
        for asset in moved["assets"].values():
            rel = Path(asset["href"]).relative_to(data_root).as_posix()
            client.upload_file(asset["href"], s3_bucket, rel)
            asset["href"] = f"s3://{s3_bucket}/{rel}"
        client.put_object(Bucket=s3_bucket, Key=f"{PLATFORM}/{item['id']}/stac_item.json",
                          Body=json.dumps(moved).encode())
    for path in Path(scenes["index"]).rglob("*.parquet"):
        client.upload_file(str(path), s3_bucket, "index/" + path.relative_to(scenes["index"]).as_posix())
    cfg = prechip.PrechipConfig(
        data=f"s3://{s3_bucket}", index=f"s3://{s3_bucket}/index/", output=f"s3://{s3_bucket}/cubes",
        platform=PLATFORM, cube_size=8, cubes_per_job=3, max_nodata=None, partial=True,
    )
    written = run_all_jobs(cfg)
    assert len(written) == len(all_cubes["written"])
    for url, cube in zip(sorted(written), sorted(all_cubes["written"])):
        assert Path(url).name == Path(cube).name
        a, b = load_cube(url), load_cube(cube)
        for name in b:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # skip-existing on S3
    assert prechip.run_job(0, cfg) == []


def test_npz_levels_load_like_savez_compressed(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    arrays = {
        "pixels": rng.integers(0, 5000, size=(3, 2, 8, 8)).astype(np.float32),
        "chipids": np.asarray(["a-0-1", "b-2-3", "c-4-5"], dtype=str),
        "nodata_mask": rng.random((3, 2, 8, 8)) < 0.2,
    }
    sizes = {}
    for level in (0, 1, 9):
        data = prechip.cube_bytes(arrays, level)
        sizes[level] = len(data)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            assert sorted(npz.files) == sorted(arrays)
            for name, value in arrays.items():
                np.testing.assert_array_equal(npz[name], value)
    assert sizes[0] > sizes[1] >= sizes[9]
    with pytest.raises(ConfigError):
        prechip.cube_bytes(arrays, 10)


def test_items_lacking_a_band_are_left_out_up_front(scenes: dict[str, Any], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The platform's bands are a contract: an item without one is left out of the
    selection (counted and named in the log and the manifest); every other chip is in a cube."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(scenes["data"], data)
    broken = data / PLATFORM / "S2TEST_2" / "stac_item.json"
    item = json.loads(broken.read_text())
    del item["assets"]["swir22"]
    broken.write_text(json.dumps(item))
    cfg = config(scenes, tmp_path / "out", partial=True, cubes_per_job=100, cube_size=2)
    cfg.data = str(data)
    everything = prechip.select_chips(cfg.index, PLATFORM, None, None)
    with caplog.at_level("WARNING", logger="stacchip.processors.prechip"):
        selection = prechip.prepare(cfg)
    assert set(selection.excluded) == {"S2TEST_2"} and "swir22" in selection.excluded["S2TEST_2"]
    assert "S2TEST_2" in caplog.text and "swir22" in caplog.text
    kept = [r for r in everything.column("item_id").to_pylist() if r != "S2TEST_2"]
    assert selection.table.num_rows == len(kept) > 0
    written = prechip.run_job(0, cfg)
    assert len(written) == selection.n_cubes == math.ceil(len(kept) / 2)
    seen = [str(c) for u in written for c in load_cube(u)["chipids"]]
    assert sorted(seen) == sorted(c for c in everything.column("chipid").to_pylist() if not c.startswith("S2TEST_2-"))
    manifest = json.loads(storage.read_bytes(prechip.manifest_url(cfg.output, PLATFORM)))
    assert list(manifest["excluded_items"]) == ["S2TEST_2"]


@pytest.mark.parametrize("name,platform,factor", [("naip", "naip", 100), ("sentinel-1", "sentinel-1-rtc", 200)])
def test_other_platforms_band_order_and_nodata(name: str, platform: str, factor: int, tmp_path: Path) -> None:
    """NAIP (one 4-band asset, no declared nodata: the platform's 0) and Sentinel-1
    (vv/vh float32, nodata -32768 and NaN)."""
    from stacchip.indexer import NoStatsChipIndexer, Sentinel1Indexer

    item = real_item(name)
    item["collection"] = platform
    item["id"] = item["id"].replace(".tif", "")

    def pixels(key: str, asset: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
        if name == "naip":
            data = coded_pixels(shape, 4, "uint8", 1)
            data[:, :10, :10] = 0
            return data
        rng = np.random.default_rng(len(key))
        data = rng.random((1, *shape), dtype=np.float32)
        data[:, :12, :20] = -32768
        data[:, 40:44, 3:9] = np.nan
        return data

    scene = tmp_path / "data" / platform / item["id"]
    item = materialize(item, scene, factor=factor, pixels=pixels)
    (scene / "stac_item.json").write_text(json.dumps(item))
    cls = NoStatsChipIndexer if name == "naip" else Sentinel1Indexer
    table = cls(item, chip_size=CHIP, chip_max_nodata=1.0, platform=platform).create_full_index()
    write_index(table, tmp_path / "index" / f"index_{item['id']}.parquet")
    cfg = prechip.PrechipConfig(data=str(tmp_path / "data"), index=str(tmp_path / "index"), output=str(tmp_path / "out"),
                                platform=platform, cube_size=3, cubes_per_job=100, max_nodata=None, partial=True)
    written = prechip.run_job(0, cfg)
    spec = platform_bands(platform)
    seen = []
    masked = 0
    for url in written:
        cube = load_cube(url)
        assert cube["bands"].tolist() == list(spec.band_order)
        for k, chipid in enumerate(cube["chipids"].tolist()):
            _, x, y = chipid.rsplit("-", 2)
            chip = Chipper(ChipIndexer(load_item(str(scene / "stac_item.json")), chip_size=CHIP)).chip(int(x), int(y))
            if name == "naip":
                expected = chip["asset"].astype(np.float32)
                nodata = expected == 0
            else:
                expected = np.concatenate([chip["vv"], chip["vh"]]).astype(np.float32)
                nodata = (expected == -32768) | np.isnan(expected)
            np.testing.assert_array_equal(cube["pixels"][k], expected)
            np.testing.assert_array_equal(cube["nodata_mask"][k], nodata)
            masked += int(nodata.any())
            seen.append(chipid)
    assert sorted(seen) == sorted(table.column("chipid").to_pylist())
    assert masked >= 1
