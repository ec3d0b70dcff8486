"""prechip's plan: made once by the first task, read by the others (their share and the items
they touch only), found again by its key, remade when the index or a setting changes, safe
when array tasks start together."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stacchip.errors import ConfigError
from stacchip.export import plan as plans
from stacchip.export import selection
from stacchip.index import read_index, write_index
from stacchip.processors import prechip
from tests.builders import PRECHIP_CHIP as CHIP
from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes, load_cube, run_all_jobs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_prechip_scenes(tmp_path_factory.mktemp("plan-scenes"), n_items=5)


def config(data: str, index: str, out: Path | str, **kw: Any) -> prechip.PrechipConfig:
    kw.setdefault("cube_size", 8)
    kw.setdefault("cubes_per_job", 3)
    kw.setdefault("max_nodata", None)
    kw.setdefault("partial", True)
    return prechip.PrechipConfig(data=data, index=index, output=str(out), platform=PLATFORM, **kw)


def plan_files(out: Path) -> list[Path]:
    return sorted((out / prechip.VERSION / plans.PLAN_FOLDER).glob("*/plan.json"))


@pytest.mark.parametrize("mode", ["global", "locality"])
def test_other_tasks_read_only_their_share_and_their_items(scenes: dict[str, Any], tmp_path: Path, mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(scenes["data"], data)
    kw = {"mode": mode, "items_per_job": 2, "mix_items": 2, "strip_px": 2 * CHIP}
    reference = {Path(u).name: load_cube(u)["chipids"].tolist()
                 for u in run_all_jobs(config(scenes["data"], scenes["index"], tmp_path / "ref", **kw))}
    cfg = config(str(data), scenes["index"], tmp_path / "out", **kw)
    first = prechip.run_job(0, cfg)
    assert len(plan_files(tmp_path / "out")) == 1
    record = json.loads(plan_files(tmp_path / "out")[0].read_text())
    n_tasks = len(record["tasks"]["first_output"])
    assert n_tasks >= 2 and record["chips"] == 125 and record["platform"] == PLATFORM
    # task 1 must neither prepare a selection (index + every item's JSON) nor read other tasks' items
    share, facts = plans.Plan(record["key"], str(plan_files(tmp_path / "out")[0].parent), record).share(1)
    mine = set(share.column("item_id").to_pylist())
    assert 0 < len(mine) and (len(mine) < 5 or mode == "global")  # global shares draw from every item
    for item in (data / PLATFORM).iterdir():
        if item.name not in mine:
            (item / "stac_item.json").unlink()  # reading it now would fail

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a task with a published plan read the whole selection")

    monkeypatch.setattr(selection, "prepare", refuse)
    monkeypatch.setattr(selection, "select_chips", refuse)
    second = prechip.run_job(1, cfg)
    assert second and all(Path(u).name in reference for u in second)
    for url in first + second:
        assert load_cube(url)["chipids"].tolist() == reference[Path(url).name]
    assert {i for u in second for i in load_cube(u)["item_ids"].tolist()} <= mine
    assert len(plan_files(tmp_path / "out")) == 1


def test_the_key_names_the_plan_and_a_changed_index_makes_another(scenes: dict[str, Any], tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(scenes["index"], index)
    cfg = config(scenes["data"], str(index), tmp_path / "out")
    written = run_all_jobs(cfg)
    assert len(plan_files(tmp_path / "out")) == 1
    assert run_all_jobs(cfg) == []  # the same key: the same plan, every cube skipped
    assert len(plan_files(tmp_path / "out")) == 1
    # the index rewritten with the same rows: another key (another plan), the same membership
    files = sorted(index.rglob("*.parquet"))
    time.sleep(0.01)
    write_index(read_index(files[0]), files[0])
    assert run_all_jobs(cfg) == []
    assert len(plan_files(tmp_path / "out")) == 2
    # a setting that changes membership, or an item's chips gone from the index: refused (exit 2)
    with pytest.raises(ConfigError, match="another selection"):
        prechip.run_job(0, dataclasses.replace(cfg, seed=9))
    files[1].unlink()
    with pytest.raises(ConfigError, match="another selection"):
        prechip.run_job(0, cfg)
    assert all(Path(u).exists() for u in written)  # nothing of the old outputs was touched
    remade = run_all_jobs(dataclasses.replace(cfg, overwrite=True))
    assert remade and len({c for u in remade for c in load_cube(u)["chipids"].tolist()}) == 100


def test_a_damaged_share_is_named(scenes: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(scenes["data"], scenes["index"], tmp_path)
    prechip.run_job(0, cfg)
    share = plan_files(tmp_path)[0].parent / plans.share_name(1)
    share.write_bytes(share.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=str(share.name)):
        prechip.run_job(1, cfg)


def test_a_claim_whose_task_died_is_taken_over(scenes: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(scenes["data"], scenes["index"], tmp_path, plan_wait=0.5)
    key, _, _ = plans.plan_key(cfg)
    claim = Path(plans.plan_folder(str(tmp_path), key)) / "claim.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"host": "gone", "pid": 1, "time": time.time()}))
    started = time.monotonic()
    assert prechip.run_job(2, cfg)
    assert time.monotonic() - started >= 0.5  # it waited for the claimant first
    assert len(plan_files(tmp_path)) == 1


def test_array_tasks_started_together_make_one_plan(scenes: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--data", scenes["data"], "--indexpath", scenes["index"], "--chips", str(out), "--platform", PLATFORM,
            "--cube-size", "8", "--cubes-per-job", "4", "--max-nodata", "none", "--partial"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    procs = [subprocess.Popen([sys.executable, "-m", "stacchip.processors.prechip", *args, "--index", str(j)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for j in range(5)]  # 125 chips: 16 cubes in tasks 0..3, and one task too many
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 5, "\n".join(log[-2000:] for log in logs)
    made = [log for log in logs if "made in" in log]
    assert len(made) == 1, "the plan was made more than once"
    assert len(plan_files(out)) == 1
    assert "task 4: nothing to do" in logs[4]
    cubes = sorted((out / prechip.VERSION / PLATFORM).glob("cube_*.npz"))
    assert len(cubes) == 16
    chips = [c for p in cubes for c in load_cube(str(p))["chipids"].tolist()]
    assert len(chips) == len(set(chips)) == 125


def test_plan_step_prints_the_array_size_and_dry_run_writes_nothing(scenes: dict[str, Any], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", scenes["data"], "--indexpath", scenes["index"], "--platform", PLATFORM, "--cube-size", "8",
            "--cubes-per-job", "4", "--max-nodata", "none", "-q"]
    assert prechip.main(argv + ["--chips", str(tmp_path / "dry"), "--plan", "--dry-run"]) == 0
    assert "15 cubes of 8 chips in 4 tasks" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    assert prechip.main(argv + ["--chips", str(tmp_path / "out"), "--plan"]) == 0
    assert "array indices 0..3" in capsys.readouterr().out
    assert len(plan_files(tmp_path / "out")) == 1
    assert not list((tmp_path / "out").rglob("*.npz"))
