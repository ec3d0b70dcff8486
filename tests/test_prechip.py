"""stacchip-prechip on scenes with known pixels: membership, contents, encodings,
filters, determinism, skip-existing, re-runs, partial edge chips; locally and on the
loopback S3 server. (Its parts: tests/test_export_*.py, tests/test_encodings.py.)"""

from __future__ import annotations

import dataclasses
import datetime as dt
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
from tests.builders import PRECHIP_CHIP as CHIP
from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes as build_scenes
from tests.builders import coded_pixels, load_cube, materialize, real_item, run_all_jobs, upload_prechip_bucket


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_scenes(tmp_path_factory.mktemp("prechip-scenes"))


def config(scenes: dict[str, Any], out: Path | str, **kw: Any) -> prechip.PrechipConfig:
    kw.setdefault("cube_size", 8)
    kw.setdefault("cubes_per_job", 3)
    kw.setdefault("max_nodata", None)
    return prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(out), platform=PLATFORM, **kw)


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
    cfg = dataclasses.replace(cfg, overwrite=True)
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
    upload_prechip_bucket(scenes, s3_bucket)
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
    cfg = dataclasses.replace(cfg, data=str(data))
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


# --- re-runs: cubes of one selection never mix with cubes of another -------------------------------


@pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")
def test_rerun_with_another_selection_is_refused(tmp_path: Path) -> None:
    scenes = build_scenes(tmp_path / "scenes", n_items=1)
    out = tmp_path / "out"

    def cfg(**kw: object) -> prechip.PrechipConfig:
        kw.setdefault("max_nodata", None)
        return prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(out),
                                     platform=PLATFORM, cube_size=4, cubes_per_job=2, **kw)

    first = run_all_jobs(cfg())
    assert len(first) == 6
    before = {u: Path(u).stat().st_mtime_ns for u in first}
    assert run_all_jobs(cfg()) == []  # the same selection: every cube is skipped
    # another seed (or other filters) would put the same chips in other cubes: the old
    # cubes and new ones together would repeat some chips and miss others
    for changed in ({"seed": 7}, {"max_nodata": 0.0}, {"cube_size": 5}):
        kw = dict(changed)
        size = kw.pop("cube_size", 4)
        conf = prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(out), platform=PLATFORM,
                                     cube_size=size, cubes_per_job=2, **{"max_nodata": None, **kw})
        with pytest.raises(ConfigError, match="another selection"):
            prechip.run_job(0, conf)
    assert {u: Path(u).stat().st_mtime_ns for u in first} == before
    # --overwrite replaces them and records the new selection
    again = run_all_jobs(cfg(seed=7, overwrite=True))
    assert sorted(again) == sorted(first)
    manifest = json.loads((out / prechip.VERSION / PLATFORM / "prechip_manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["chips"] == 25
    members = sorted(c for u in again for c in load_cube(u)["chipids"].tolist())
    assert len(members) == len(set(members)) == 24
    assert run_all_jobs(cfg(seed=7)) == []


# --- indexes made with --edge keep (partial chips at the right/bottom edges) --------------------------


@pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")
def test_edge_chips_are_cubed_with_the_outside_marked_nodata(tmp_path: Path) -> None:
    scenes = build_scenes(tmp_path / "scenes", n_items=1)
    item = scenes["items"][0]
    table = Sentinel2Indexer(item, chip_size=CHIP, chip_max_nodata=1.0, platform=PLATFORM,
                             edge="keep").create_full_index()
    xs = np.asarray(table.column("chip_index_x"))
    assert xs.max() == 5  # 183 px: five whole chips and a partial sixth
    index = write_index(table, tmp_path / "edge-index" / "index.parquet")
    cfg = prechip.PrechipConfig(data=scenes["data"], index=index, output=str(tmp_path / "out"), platform=PLATFORM,
                                cube_size=9, cubes_per_job=10, max_nodata=None, partial=True)
    urls = run_all_jobs(cfg)
    cubes = [load_cube(u) for u in urls]
    chipids = [c for cube in cubes for c in cube["chipids"].tolist()]
    assert sorted(chipids) == sorted(table.column("chipid").to_pylist())
    chipper = Chipper(ChipIndexer(item, chip_size=CHIP, edge="keep"))
    grid = 183  # pixels of the 10 m grid
    seen_edge = 0
    for cube in cubes:
        for k, chipid in enumerate(cube["chipids"].tolist()):
            _, x, y = chipid.rsplit("-", 2)
            x, y = int(x), int(y)
            chip = chipper.chip(x, y)
            expected = np.concatenate([chip[b] for b in S2_BANDS]).astype(np.float32)
            np.testing.assert_array_equal(cube["pixels"][k], expected)
            inside_x = grid - x * CHIP
            inside_y = grid - y * CHIP
            if inside_x < CHIP:
                seen_edge += 1
                assert cube["nodata_mask"][k][:, :, inside_x:].all()  # beyond the grid: nodata
            if inside_y < CHIP:
                assert cube["nodata_mask"][k][:, inside_y:, :].all()
    assert seen_edge == 6


@pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")
def test_edge_chip_outside_is_nodata_when_the_fill_is_not_the_nodata_value(tmp_path: Path) -> None:
    """Sentinel-1 without declared nodata: the chipper fills beyond the grid with 0,
    the platform's nodata is -32768; the outside is still marked."""
    import json

    from stacchip.indexer import Sentinel1Indexer
    from tests.builders import materialize, real_item

    item = real_item("sentinel-1")
    item["collection"] = "sentinel-1-rtc"
    for asset in item["assets"].values():
        for band in asset.get("raster:bands") or []:
            band.pop("nodata", None)

    def pixels(key: str, asset: dict, shape: tuple[int, int]) -> np.ndarray:
        return np.random.default_rng(len(key)).random((1, *shape), dtype=np.float32) + 0.5

    scene = tmp_path / "data" / "sentinel-1-rtc" / item["id"]
    item = materialize(item, scene, factor=200, pixels=pixels)
    (scene / "stac_item.json").write_text(json.dumps(item))
    table = Sentinel1Indexer(item, chip_size=CHIP, chip_max_nodata=1.0, platform="sentinel-1-rtc",
                             edge="keep").create_full_index()
    index = write_index(table, tmp_path / "index" / "index.parquet")
    cfg = prechip.PrechipConfig(data=str(tmp_path / "data"), index=index, output=str(tmp_path / "out"),
                                platform="sentinel-1-rtc", cube_size=4, cubes_per_job=100, max_nodata=None,
                                partial=True)
    rows, cols = ChipIndexer(item, chip_size=CHIP).grid.shape
    assert cols % CHIP  # the scene has partial edge chips
    edge = 0
    for url in prechip.run_job(0, cfg):
        cube = load_cube(url)
        for k, chipid in enumerate(cube["chipids"].tolist()):
            _, x, y = (int(v) if i else v for i, v in enumerate(chipid.rsplit("-", 2)))
            inside_x, inside_y = cols - x * CHIP, rows - y * CHIP
            mask = cube["nodata_mask"][k]
            outside = np.zeros(mask.shape[1:], dtype=bool)
            outside[max(inside_y, 0):, :] = True
            outside[:, max(inside_x, 0):] = True
            assert (mask == outside[None]).all(), chipid  # the source pixels are all valid (>= 0.5)
            edge += int(outside.any())
    assert edge > 0
