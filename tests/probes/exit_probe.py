"""An exit probe of the public entry points (not collected by pytest).

    python -m tests.probes.exit_probe [--runs 200] [--parallel 2] [--only query,chip_dataset,...]

Builds, in a temp dir, Sentinel-2-shaped scenes with their index files, the same index as
upstream's processors wrote it, and a compacted catalog; then runs every entry point ``--runs``
times in fresh processes, ``--parallel`` at a time (the abort this looks for showed under load,
in some runs of a batch and not in others), cycling through the index kinds:

* ``query``: ``query(open_index(DIR))``; ``read_index``: ``read_index(DIR)``
* ``chip_dataset``: ``ChipDataset`` read through a ``DataLoader`` with 2 forked workers
* ``prechip``: ``stacchip-prechip`` (npz, global mode; webdataset, locality mode)
* ``stats``: ``stacchip-stats`` over the index
* ``bulk_index``: ``stacchip index`` over an ndjson of the items, every task here
* ``compact``: ``stacchip compact``

A run that ends with SIGABRT (or prints ``terminate called``) is an abort; any other non-zero
exit is a failure. Prints one line per entry point and the totals; exits 1 when any aborted
or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

QUERY = "import sys; from stacchip.index import open_index, query; print(query(open_index(sys.argv[1])).num_rows)"
READ = "import sys; from stacchip.index import read_index; print(read_index(sys.argv[1]).num_rows)"
CHIPS = """
import sys
from torch.utils.data import DataLoader
from stacchip.ml import ChipDataset
ds = ChipDataset(sys.argv[1], root=sys.argv[2], assets=["red", "nir"])
n = sum(1 for _ in DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork"))
print(n)
"""


def build(root: Path) -> dict[str, Any]:
    """The scenes, their index (current), the same index as upstream wrote it, a compacted
    catalog, and an ndjson of the items."""
    import pyarrow.parquet as pq

    from stacchip.catalog import compact
    from stacchip.index import upstream_table
    from tests.builders import build_prechip_scenes

    scenes = build_prechip_scenes(root / "scenes", n_items=2)
    current = Path(scenes["index"])
    upstream = root / "upstream" / "index"
    for path in sorted(current.rglob("index_*.parquet")):
        out = upstream / path.relative_to(current)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(upstream_table(pq.read_table(path)), out)
    compacted = root / "compacted"
    compact([str(current)], str(compacted), row_group_rows=4, file_rows=8)
    items = root / "items.ndjson"
    items.write_text("\n".join(json.dumps(item) for item in scenes["items"]) + "\n")
    return {"data": scenes["data"], "current": str(current), "upstream": str(upstream),
            "compacted": str(compacted), "items": str(items)}


def commands(entry: str, k: int, paths: dict[str, Any], out: Path) -> list[str]:
    """The command of run ``k`` of ``entry``."""
    py = sys.executable
    kind = ("upstream", "current", "compacted")[k % 3]
    common = ["--data", paths["data"], "--platform", "sentinel-2-l2a", "--max-nodata", "none", "-q"]
    if entry == "query":
        return [py, "-c", QUERY, paths[kind]]
    if entry == "read_index":
        return [py, "-c", READ, paths[kind]]
    # The scenes' chips are smaller than upstream's only size (256): upstream-written files of
    # them read as 256-px chips, off the grid, so the entry points that read pixels take the
    # current files (and the compacted catalog where they take one).
    if entry == "chip_dataset":
        return [py, "-c", CHIPS, paths[("current", "compacted")[k % 2]], paths["data"]]
    if entry == "prechip":
        index = paths["current"]
        if k % 2:
            return [py, "-m", "stacchip.processors.prechip", *common, "--indexpath", index, "--chips",
                    str(out / f"wds{k}"), "--cube-size", "4", "--format", "webdataset", "--mode", "locality",
                    "--index", "0", "--workers", "2"]
        return [py, "-m", "stacchip.processors.prechip", *common, "--indexpath", index, "--chips",
                str(out / f"npz{k}"), "--cube-size", "4", "--all", "--workers", "2"]
    if entry == "stats":
        return [py, "-m", "stacchip.processors.stats", *common, "--indexpath", paths["current"],
                "--source", "index", "--output", str(out / f"stats{k}"), "--chips-per-job", "10", "--all",
                "--workers", "2"]
    if entry == "bulk_index":
        return [py, "-m", "stacchip.cli", "index", paths["items"], "--out", str(out / f"bulk{k}"), "--all"]
    if entry == "compact":
        return [py, "-m", "stacchip.cli", "compact", paths[("upstream", "current")[k % 2]], "--out",
                str(out / f"compact{k}")]
    raise ValueError(entry)


ENTRIES = ("query", "read_index", "chip_dataset", "prechip", "stats", "bulk_index", "compact")


def aborted(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) or "terminate called" in proc.stderr


def run(entry: str, runs: int, parallel: int, paths: dict[str, Any], out: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])

    def one(k: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(commands(entry, k, paths, out), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600, check=False)

    start = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, range(runs)))
    aborts = [r for r in results if aborted(r)]
    failures = [r for r in results if r.returncode and not aborted(r)]
    return {"entry": entry, "runs": runs, "aborts": len(aborts), "failures": len(failures),
            "seconds": round(time.monotonic() - start, 1),
            "example": (failures or aborts)[0].stderr[-800:] if failures or aborts else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="fresh processes per entry point")
    parser.add_argument("--parallel", type=int, default=2, help="processes at a time")
    parser.add_argument("--only", default=",".join(ENTRIES), help="entry points, comma-separated")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stacchip-exit-") as tmp:
        root = Path(tmp)
        paths = build(root)
        results = []
        for entry in args.only.split(","):
            out = root / "out" / entry
            out.mkdir(parents=True)
            result = run(entry, args.runs, args.parallel, paths, out)
            results.append(result)
            print(f"{entry:<14} {result['runs']:5d} runs  {result['aborts']:3d} aborted  {result['failures']:3d} failed"
                  f"  {result['seconds']:7.1f} s", flush=True)
            if result["example"]:
                print("  " + result["example"].strip().replace("\n", "\n  "), flush=True)
    total_aborts = sum(r["aborts"] for r in results)
    total_failures = sum(r["failures"] for r in results)
    print(f"total: {sum(r['runs'] for r in results)} runs, {total_aborts} aborted, {total_failures} failed; "
          f"load average {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if total_aborts or total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
