"""No abort at exit from the entry points the index and prechip tests do not run many times:
ChipDataset through a DataLoader with forked workers, and bulk `stacchip index` (the probe
tests/probes/exit_probe.py runs every entry point 200 times; this runs a few in CI)."""

from __future__ import annotations

import pytest

from tests.probes import exit_probe

RUNS = 8


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return exit_probe.build(tmp_path_factory.mktemp("exit-probe"))


@pytest.mark.parametrize("entry", ["chip_dataset", "bulk_index"])
def test_entry_point_never_aborts_at_exit(paths, tmp_path, entry):
    pytest.importorskip("torch")
    result = exit_probe.run(entry, RUNS, 2, paths, tmp_path)
    assert result["aborts"] == 0 and result["failures"] == 0, result
    assert result["runs"] == RUNS


def test_the_probe_tells_an_abort_from_a_failure(tmp_path):
    import subprocess
    import sys

    abort = subprocess.run([sys.executable, "-c", "import os; os.abort()"], capture_output=True, text=True,
                           check=False)
    fail = subprocess.run([sys.executable, "-c", "raise SystemExit(2)"], capture_output=True, text=True, check=False)
    assert exit_probe.aborted(abort) and not exit_probe.aborted(fail)
