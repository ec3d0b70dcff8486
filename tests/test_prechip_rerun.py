"""prechip re-runs: cubes of one selection never mix with cubes of another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stacchip.errors import ConfigError
from stacchip.processors import prechip
from tests.test_prechip import PLATFORM, build_scenes, load_cube, run_all_jobs

pytestmark = pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")


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
