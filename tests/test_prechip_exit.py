"""No abort at exit: stacchip-prechip (both formats) and stacchip-stats, run in many fresh
processes, all end with their own status (never SIGABRT from a thread pool torn down while the
interpreter finalizes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes

REPO = Path(__file__).resolve().parents[1]
#: Fresh processes per command (the abort, when there was one, came in a few runs of a hundred).
RUNS = 17


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_prechip_scenes(tmp_path_factory.mktemp("exit-scenes"), n_items=1)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_prechip_and_stats_never_abort_at_exit(scenes: dict[str, Any], tmp_path: Path) -> None:
    common = ["--data", scenes["data"], "--indexpath", scenes["index"], "--platform", PLATFORM, "--max-nodata",
              "none", "-q"]
    commands = []
    for k in range(RUNS):
        commands.append(["-m", "stacchip.processors.prechip", *common, "--chips", str(tmp_path / f"npz{k}"),
                         "--cube-size", "4", "--all", "--workers", "2"])
        commands.append(["-m", "stacchip.processors.prechip", *common, "--chips", str(tmp_path / f"wds{k}"),
                         "--cube-size", "4", "--format", "webdataset", "--mode", "locality", "--index", "0",
                         "--workers", "2"])
        commands.append(["-m", "stacchip.processors.stats", *common, "--source", "index", "--output",
                         str(tmp_path / f"stats{k}"), "--chips-per-job", "10", "--all", "--workers", "2"])
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, commands))
    aborted = [(c, r.returncode, r.stderr[-1500:]) for c, r in zip(commands, results, strict=True)
               if r.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) or "Aborted" in r.stderr
               or "terminate called" in r.stderr]
    assert not aborted, aborted[:3]
    failed = [(c, r.returncode, r.stderr[-1500:]) for c, r in zip(commands, results, strict=True) if r.returncode]
    assert not failed, failed[:3]
    assert len(results) == 3 * RUNS >= 50
    assert all(list((tmp_path / f"npz{k}").rglob("cube_*.npz")) for k in range(RUNS))
    assert all(list((tmp_path / f"wds{k}").rglob("shard-*.tar.gz")) for k in range(RUNS))
    assert all((tmp_path / f"stats{k}" / "stats" / PLATFORM / "stats.json").exists() for k in range(RUNS))
