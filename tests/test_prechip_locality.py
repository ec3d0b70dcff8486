"""stacchip-prechip's locality mode: items dealt to tasks, each item read once in tile
order (strips of rows, block order inside), cubes mixing a few items; the same pixels
as the global mode, deterministic re-runs, and the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from stacchip.errors import ConfigError
from stacchip.export import locality
from stacchip.index import query
from stacchip.processors import prechip
from tests.builders import PRECHIP_CHIP as CHIP
from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes, load_cube, run_all_jobs, upload_prechip_bucket

#: 2 chip rows of 32 px per round: the 5 x 5 chip scenes are read in 3 rounds
STRIP = 2 * CHIP


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_prechip_scenes(tmp_path_factory.mktemp("locality-scenes"), n_items=5)


def config(scenes: dict[str, Any], out: Path | str, **kw: Any) -> prechip.PrechipConfig:
    kw.setdefault("cube_size", 8)
    kw.setdefault("max_nodata", None)
    kw.setdefault("mode", "locality")
    kw.setdefault("items_per_job", 2)
    kw.setdefault("mix_items", 2)
    kw.setdefault("strip_px", STRIP)
    return prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(out), platform=PLATFORM, **kw)


@pytest.fixture(scope="module")
def made(scenes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("locality-cubes")
    cfg = config(scenes, out, partial=True)
    written = run_all_jobs(cfg, workers=2)
    return {"cfg": cfg, "written": written, "cubes": {int(Path(u).stem.split("_")[1]): load_cube(u) for u in written}}


@pytest.fixture(scope="module")
def global_pixels(scenes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = config(scenes, tmp_path_factory.mktemp("global-cubes"), mode="global", cubes_per_job=4, partial=True)
    out = {}
    for url in run_all_jobs(cfg):
        cube = load_cube(url)
        for k, chipid in enumerate(cube["chipids"].tolist()):
            out[chipid] = (cube["pixels"][k], cube["nodata_mask"][k])
    return out


def test_items_are_dealt_to_tasks_by_a_seeded_shuffle(scenes: dict[str, Any], tmp_path: Path) -> None:
    sel = prechip.prepare(config(scenes, tmp_path))
    assert sel.dealing is not None
    tasks = sel.dealing.tasks
    assert [len(t) for t in tasks] == [2, 2, 1]
    flat = [i for t in tasks for i in t]
    assert sorted(flat) == sorted(it["id"] for it in scenes["items"])
    other = prechip.prepare(config(scenes, tmp_path, seed=3)).dealing
    assert other is not None
    assert [i for t in other.tasks for i in t] != flat  # another seed deals another way
    again = prechip.prepare(config(scenes, tmp_path)).dealing
    assert again is not None and again.tasks == tasks
    # cube numbers run over the tasks; each task makes chips // cube_size cubes
    assert sel.dealing.chips == (50, 50, 25)
    assert sel.dealing.first_cube == (0, 6, 12) and sel.n_cubes == 15
    assert prechip.prepare(config(scenes, tmp_path, partial=True)).n_cubes == 7 + 7 + 4
    assert prechip.jobs_of(config(scenes, tmp_path), sel) == 3


def test_every_chip_in_exactly_one_cube_of_its_task(scenes: dict[str, Any], made: dict[str, Any]) -> None:
    cfg = made["cfg"]
    sel = prechip.prepare(cfg)
    assert sel.dealing is not None
    everything = query(scenes["index"]).column("chipid").to_pylist()
    seen = [c for cube in made["cubes"].values() for c in cube["chipids"].tolist()]
    assert len(seen) == len(set(seen)) == len(everything) == 125
    assert sorted(seen) == sorted(everything)
    assert sorted(made["cubes"]) == list(range(sel.n_cubes))
    for task, items in enumerate(sel.dealing.tasks):
        ids = prechip.job_ids(task, cfg, sel)
        held = {i for k in ids for i in made["cubes"][k]["item_ids"].tolist()}
        assert held == set(items), f"task {task}'s cubes hold chips of other tasks' items"
        sizes = [len(made["cubes"][k]["chipids"]) for k in ids]
        assert sizes[:-1] == [8] * (len(ids) - 1) and 0 < sizes[-1] <= 8


def test_without_partial_a_task_leaves_out_fewer_than_a_cube(scenes: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(scenes, tmp_path)
    written = run_all_jobs(cfg)
    cubes = [load_cube(u) for u in written]
    assert len(cubes) == 15 and all(len(c["chipids"]) == 8 for c in cubes)
    assert len({c for cube in cubes for c in cube["chipids"].tolist()}) == 120  # 2 + 2 + 1 chips left out


def test_pixels_and_masks_equal_the_global_modes(made: dict[str, Any], global_pixels: dict[str, Any]) -> None:
    masked = 0
    for cube in made["cubes"].values():
        assert cube["pixels"].dtype == np.float32 and cube["pixels"].shape[1:] == (10, CHIP, CHIP)
        for k, chipid in enumerate(cube["chipids"].tolist()):
            pixels, mask = global_pixels[chipid]
            np.testing.assert_array_equal(cube["pixels"][k], pixels, err_msg=chipid)
            np.testing.assert_array_equal(cube["nodata_mask"][k], mask, err_msg=chipid)
            masked += int(mask.any())
            assert chipid.startswith(str(cube["item_ids"][k]) + "-")
    assert masked == 10  # chips (0, 4) and (1, 4) of each of the 5 items hold nodata


def test_cubes_mix_the_items_read_side_by_side(scenes: dict[str, Any], made: dict[str, Any], tmp_path: Path) -> None:
    mixes = [len(set(c["item_ids"].tolist())) for c in made["cubes"].values()]
    assert max(mixes) == 2  # mix_items=2: two items side by side, never more
    # one item at a time: a cube holds one item, except one carried over a window boundary
    cfg = config(scenes, tmp_path, mix_items=1, items_per_job=5, partial=True)
    cubes = [load_cube(u) for u in run_all_jobs(cfg)]
    two = [c for c in cubes if len(set(c["item_ids"].tolist())) > 1]
    assert len(two) <= 4 and all(len(set(c["item_ids"].tolist())) == 2 for c in two)
    assert len(two) < len(cubes)
    # chips are shuffled within a cube, not in row order
    rows = [[tuple(map(int, c.rsplit("-", 2)[1:])) for c in cube["chipids"].tolist()] for cube in cubes]
    assert any(r != sorted(r, key=lambda p: (p[1], p[0])) for r in rows)


def test_each_item_is_read_once_in_strips_in_tile_order(scenes: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(scenes, tmp_path, partial=True)
    sel = prechip.prepare(cfg)
    assert sel.dealing is not None
    table = sel.table
    ys = table.column("chip_index_y").to_numpy()
    xs = table.column("chip_index_x").to_numpy()
    for task in range(len(sel.dealing.tasks)):
        plan = locality.plan_task(table, sel.dealing, task, cfg.seed, cfg.cube_size, cfg.mix_items, True, STRIP)
        read = np.concatenate([rows for rnd in plan.rounds for _, rows in rnd.reads])
        assert len(read) == len(set(read.tolist())), "a chip is read twice"
        strips: dict[str, list[int]] = {}
        for rnd in plan.rounds:
            for item_id, rows in rnd.reads:
                assert set(table.column("item_id").take(pa.array(rows)).to_pylist()) == {item_id}
                strip = set((ys[rows] * CHIP // STRIP).tolist())
                assert len(strip) == 1, "a read spans more than one strip"
                strips.setdefault(item_id, []).append(strip.pop())
                order = list(zip(ys[rows].tolist(), xs[rows].tolist(), strict=True))
                assert order == sorted(order)
        assert all(s == sorted(set(s)) for s in strips.values()), "an item's strip is read twice or out of order"
        cubed = np.concatenate([rows for rnd in plan.rounds for _, rows in rnd.cubes])
        assert sorted(cubed.tolist()) == sorted(read.tolist())


def test_reruns_skip_whole_cubes_and_remake_damaged_ones_identically(
    scenes: dict[str, Any], made: dict[str, Any], tmp_path: Path
) -> None:
    cfg = dataclasses.replace(made["cfg"], output=str(tmp_path))
    first = prechip.run_job(1, cfg)
    assert [int(Path(u).stem.split("_")[1]) for u in first] == prechip.job_ids(1, cfg, prechip.prepare(cfg))
    for u in first:  # same cubes as the run with 2 writer threads
        k = int(Path(u).stem.split("_")[1])
        np.testing.assert_array_equal(load_cube(u)["pixels"], made["cubes"][k]["pixels"])
        assert load_cube(u)["chipids"].tolist() == made["cubes"][k]["chipids"].tolist()
    stamps = {u: Path(u).stat().st_mtime_ns for u in first}
    assert prechip.run_job(1, cfg) == []
    Path(first[1]).write_bytes(b"not a cube")
    assert prechip.run_job(1, cfg, workers=2) == [first[1]]
    k = int(Path(first[1]).stem.split("_")[1])
    assert load_cube(first[1])["chipids"].tolist() == made["cubes"][k]["chipids"].tolist()
    assert Path(first[0]).stat().st_mtime_ns == stamps[first[0]]
    manifest = json.loads(Path(prechip.manifest_url(str(tmp_path), PLATFORM)).read_text())
    assert manifest["mode"] == "locality" and manifest["items_per_job"] == 2 and manifest["mix_items"] == 2


def test_another_mode_or_mixing_into_the_same_place_is_refused(made: dict[str, Any]) -> None:
    for change in ({"mode": "global"}, {"mix_items": 1}, {"items_per_job": 3}, {"partial": False}):
        cfg = dataclasses.replace(made["cfg"], **change)
        with pytest.raises(ConfigError, match="another selection"):
            prechip.run_job(0, cfg)


def test_cli_locality_all_jobs_and_array_tasks(scenes: dict[str, Any], made: dict[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--data", scenes["data"], "--indexpath", scenes["index"], "--chips", str(tmp_path / "all"),
            "--platform", PLATFORM, "--cube-size", "8", "--max-nodata", "none", "--partial",
            "--mode", "locality", "--items-per-job", "2", "--mix-items", "2", "-q"]
    # strip height is not a flag: compare with cubes made at the default strip
    default = dataclasses.replace(made["cfg"], strip_px=locality.STRIP_PX, output=str(tmp_path / "lib"))
    expected = {Path(u).name: load_cube(u) for u in run_all_jobs(default)}
    assert prechip.main(argv + ["--all", "--workers", "2"]) == 0
    got = sorted((tmp_path / "all" / prechip.VERSION / PLATFORM).glob("*.npz"))
    assert sorted(p.name for p in got) == sorted(expected)
    for path in got:
        assert load_cube(str(path))["chipids"].tolist() == expected[path.name]["chipids"].tolist()
    # an array task from the environment makes its task's cubes
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "2")
    monkeypatch.setenv("STACCHIP_PRECHIP_MODE", "locality")
    one = [a if a != str(tmp_path / "all") else str(tmp_path / "one") for a in argv if a not in ("--mode", "locality")]
    assert prechip.main(one) == 0
    assert sorted(p.name for p in (tmp_path / "one" / prechip.VERSION / PLATFORM).glob("*.npz")) == [
        "cube_14.npz", "cube_15.npz", "cube_16.npz", "cube_17.npz"]
    capsys.readouterr()
    # a task beyond the dealing has done its job: exit 0 and one warning line, nothing written
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "3")
    before = sorted(p.name for p in (tmp_path / "one").rglob("*"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert prechip.main(one) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "task 3: nothing to do" in warned[0] and "tasks 0..2" in warned[0], warned
    assert sorted(p.name for p in (tmp_path / "one").rglob("*")) == before
    # bad settings: exit 2 naming what is wrong
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX")
    assert prechip.main(argv + ["--index", "0", "--mode", "shuffled"]) == 2
    assert "'shuffled'" in capsys.readouterr().err
    assert prechip.main(argv + ["--index", "0", "--mix-items", "0"]) == 2
    assert "--mix-items" in capsys.readouterr().err


@pytest.mark.services
def test_s3_sources_and_output(scenes: dict[str, Any], made: dict[str, Any], s3_bucket: str) -> None:
    """Scenes, items, index and cubes on the loopback S3 server: the same cubes as from local files."""
    upload_prechip_bucket(scenes, s3_bucket)
    cfg = dataclasses.replace(made["cfg"], data=f"s3://{s3_bucket}", index=f"s3://{s3_bucket}/index/",
                              output=f"s3://{s3_bucket}/cubes")
    written = run_all_jobs(cfg, workers=2)
    assert sorted(int(u.rsplit("_", 1)[1].split(".")[0]) for u in written) == sorted(made["cubes"])
    for url in written:
        k = int(url.rsplit("_", 1)[1].split(".")[0])
        cube = load_cube(url)
        assert cube["chipids"].tolist() == made["cubes"][k]["chipids"].tolist()
        np.testing.assert_array_equal(cube["pixels"], made["cubes"][k]["pixels"])
    assert prechip.run_job(0, cfg) == []  # whole cubes on S3 are skipped


def test_a_task_whose_chips_make_no_cube_succeeds_writing_nothing(
    scenes: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(scenes, tmp_path, cube_size=30)  # tasks of 50, 50 and 25 chips
    sel = prechip.prepare(cfg)
    assert sel.dealing is not None and sel.n_cubes == 2
    assert prechip.job_ids(2, cfg, sel) == []
    with caplog.at_level("WARNING"):
        assert prechip.run_job(2, cfg) == []
    assert "task 2: its 25 chips make no cube of 30" in caplog.text
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    assert not list(tmp_path.rglob("*.npz"))
    for var in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--data", scenes["data"], "--indexpath", scenes["index"], "--chips", str(tmp_path / "cli"),
            "--platform", PLATFORM, "--cube-size", "30", "--max-nodata", "none", "--mode", "locality",
            "--items-per-job", "2", "--mix-items", "2", "--all", "-q"]
    assert prechip.main(argv) == 0
    assert len(list((tmp_path / "cli").rglob("*.npz"))) == 2


def test_a_failed_write_stops_the_task_with_its_error(scenes: dict[str, Any], tmp_path: Path) -> None:
    from stacchip.errors import StorageError

    cfg = config(scenes, tmp_path, partial=True)
    sel = prechip.prepare(cfg)
    assert sel.dealing is not None
    plan = locality.plan_task(sel.table, sel.dealing, 0, cfg.seed, cfg.cube_size, cfg.mix_items, True, STRIP)
    read_item, _ = prechip._plan_io(cfg, sel.platform, sel.table)
    written: list[int] = []

    def write(cube_id: int, rows: np.ndarray, chips: list) -> str:
        if cube_id == plan.first_cube + 2:
            raise StorageError(f"cannot write cube {cube_id}: disk full")
        written.append(cube_id)
        return str(cube_id)

    for workers in (1, 3):
        with pytest.raises(StorageError, match="disk full"):
            locality.run_plan(plan, set(range(plan.first_cube, plan.first_cube + plan.n_cubes)), read_item,
                              write, workers)
    assert plan.first_cube + 2 not in written
    prechip.close_open_items()
