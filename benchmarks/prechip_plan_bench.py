"""A prechip task's fixed cost on a catalog of 10⁵ items: set-up against its whole run.

``python -m benchmarks.prechip_plan_bench [--items 100000] [--chips-per-item 16] [--quick]``

Catalog: ``--items`` STAC items in the bucket layout (``{platform}/{id}/stac_item.json``),
each a copy (under its own id) of one of the 8 Earth-Search-shaped scenes of
:mod:`benchmarks.scene` (its COGs shared), and an index of ``--chips-per-item`` chips
of each (rows of the scene's own index, renamed), in ``--index-files`` GeoParquet
files. Built once into ``--cache``.

Measured, each in a fresh process:

* **plan**: ``stacchip-prechip``'s plan made and published (the selection: the whole
  index and every item's STAC JSON, read once for the whole array);
* **task j** (a few, not the one that made the plan), global and locality mode:
  ``run_job(j)`` with the plan published: ``setup`` is the time until its first chip
  is read (the plan's key -- one listing of the index --, ``plan.json``, its share,
  the manifest, the existing outputs), ``run`` the whole task; also the process's
  start and imports, a fixed cost of any Python command;
* **before issue 22** (``--baseline``): every task's set-up then, ``prepare()`` of
  the commit this work started from (the whole index and every item's JSON, in
  every task).

Target: a task's set-up at most 5 % of its run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import parse_with_worker, serve_worker
from benchmarks.prechip_modes import BASELINE, baseline_tree

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.prechip_plan_bench")
PLATFORM = "sentinel-2-l2a"


def build_catalog(cache: Path, items: int, chips_per_item: int, index_files: int, quick: bool) -> tuple[Path, Path]:
    """The synthetic catalog (``data``, ``index``), built once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from benchmarks.prechip_bench import prepare_data
    from benchmarks.scene import SceneSpec
    from stacchip.index import read_index, write_index

    root = cache / f"catalog-{items}-{chips_per_item}-{index_files}"
    data, index = root / "data", root / "index"
    done = root / "done.json"
    if done.exists():
        return data, index
    size = 2640 if quick else 10980
    src_data, src_index, scenes = prepare_data(cache / ("scenes-quick" if quick else "scenes"),
                                               SceneSpec(size10=size, copies=8, with_60m=False))
    tables = [read_index(src_index / PLATFORM / s["id"] / f"index_{s['id']}.parquet") for s in scenes]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    per_file = -(-items // index_files)
    for f in range(index_files):
        parts = []
        for k in range(f * per_file, min(items, (f + 1) * per_file)):
            scene = scenes[k % len(scenes)]
            item_id = f"S2B_SYN_{k:06d}"
            item = copy.deepcopy(scene)
            item["id"] = item_id
            folder = data / PLATFORM / item_id
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "stac_item.json").write_text(json.dumps(item))
            table = tables[k % len(tables)]
            rows = table.take(pa.array(np.sort(rng.choice(table.num_rows, chips_per_item, replace=False))))
            old = rows.column("chipid").to_pylist()
            rows = rows.set_column(rows.schema.get_field_index("chipid"), "chipid",
                                   pa.array([item_id + c[len(scene["id"]):] for c in old]))
            rows = rows.set_column(rows.schema.get_field_index("item_id"), "item_id",
                                   pa.array([item_id] * rows.num_rows))
            parts.append(rows)
        merged = pa.concat_tables(parts)
        assert pc.all(pc.starts_with(merged.column("chipid"), "S2B_SYN_")).as_py()  # noqa: S101
        write_index(merged, index / f"part-{f:04d}.parquet")
        logger.info("index file %d/%d (%.0f s)", f + 1, index_files, time.perf_counter() - t0)
    done.write_text(json.dumps({"items": items, "seconds": time.perf_counter() - t0}))
    return data, index


def _config(data: str, index: str, out: str, mode: str) -> Any:
    from stacchip.processors import prechip

    return prechip.PrechipConfig(data=data, index=index, output=out, platform=PLATFORM, mode=mode,
                                 cubes_per_job=10, items_per_job=8, mix_items=4, max_nodata=None)


def w_plan(data: str, index: str, out: str, mode: str) -> dict[str, Any]:
    from stacchip.export import plan as plans

    t0 = time.perf_counter()
    plan = plans.obtain(_config(data, index, out, mode))
    return {"seconds": time.perf_counter() - t0, "tasks": plan.n_tasks, "outputs": plan.n_outputs}


def w_task(data: str, index: str, out: str, mode: str, task: int, started: float) -> dict[str, Any]:
    from stacchip.processors import prechip

    imported = time.time() - started  # process start and imports (from the clock read by the parent)

    timings: dict[str, float] = {}
    written = prechip.run_job(task, _config(data, index, out, mode), workers=2, timings=timings)
    return {"start_s": imported, **timings, "outputs": len(written)}


WORKERS = {"plan": w_plan, "task": w_task}

BASELINE_PREPARE = """
import json, sys, time
from stacchip.processors import prechip
a = json.loads(sys.argv[1])
cfg = prechip.PrechipConfig(data=a["data"], index=a["index"], output=a["out"], platform=a["platform"],
                            mode=a["mode"], cubes_per_job=10, items_per_job=8, mix_items=4, max_nodata=None)
t0 = time.perf_counter()
sel = prechip.prepare(cfg)
print(json.dumps({"seconds": time.perf_counter() - t0, "chips": sel.table.num_rows, "file": prechip.__file__}))
"""


def run_worker(name: str, **kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.prechip_plan_bench", "--worker", name,
           "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=HERE / ".cache" / "prechip-plan", help="catalog cache")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--chips-per-item", type=int, default=16)
    p.add_argument("--index-files", type=int, default=100)
    p.add_argument("--tasks", default="1,mid,last", help="task indices to time (mid, last: of the plan)")
    p.add_argument("--modes", default="global,locality", help="modes to time")
    p.add_argument("--baseline", default=BASELINE, help="commit whose prepare() is timed; 'none' to skip")
    p.add_argument("--quick", action="store_true", help="small scenes (2640² px)")
    p.add_argument("--json", type=Path)
    args = parse_with_worker(p, argv)
    if args.worker:
        return serve_worker(WORKERS, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data, index = build_catalog(args.cache, args.items, args.chips_per_item, args.index_files, args.quick)
    results: dict[str, Any] = {"items": args.items, "chips_per_item": args.chips_per_item,
                               "index_files": args.index_files, "load_before": os.getloadavg(), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="prechip-plan-", dir=args.cache) as tmp:
        for mode in args.modes.split(","):
            out = str(Path(tmp) / mode)
            logger.info("%s: making the plan", mode)
            plan = run_worker("plan", data=str(data), index=str(index), out=out, mode=mode)
            last = plan["tasks"] - 1
            tasks = [{"mid": last // 2, "last": last}.get(t, None) if not t.isdigit() else int(t)
                     for t in args.tasks.split(",")]
            runs = []
            for task in tasks:
                logger.info("%s: task %d of %d", mode, task, plan["tasks"])
                runs.append({"task": task, **run_worker("task", data=str(data), index=str(index), out=out, mode=mode,
                                                        task=task, started=time.time())})
            results["modes"][mode] = {"plan": plan, "tasks": runs}
        if args.baseline != "none":
            tree = baseline_tree(args.baseline, Path(tmp) / "baseline")
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["PYTHONPATH"] = str(tree)
            logger.info("baseline: prepare() of every task")
            proc = subprocess.run([sys.executable, "-W", "ignore", "-c", BASELINE_PREPARE, json.dumps(
                {"data": str(data), "index": str(index), "out": tmp, "platform": PLATFORM, "mode": "global"})],
                capture_output=True, text=True, timeout=7200, cwd=tree, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            results["baseline_setup_s"] = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    results["load_after"] = os.getloadavg()
    print(f"catalog: {args.items} items, {args.chips_per_item} chips each, {args.index_files} index files; "
          f"load average {results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after")
    print(f"{'mode':<9} {'plan s':>7} {'tasks':>6} {'task':>6} {'outs':>5} {'setup s':>8} {'run s':>7} "
          f"{'setup/run':>9} {'start+imports s':>15}")
    for mode, r in results["modes"].items():
        for t in r["tasks"]:
            print(f"{mode:<9} {r['plan']['seconds']:>7.1f} {r['plan']['tasks']:>6} {t['task']:>6} {t['outputs']:>5} "
                  f"{t['setup_s']:>8.2f} {t['run_s']:>7.1f} {100 * t['setup_s'] / t['run_s']:>8.1f}% "
                  f"{t['start_s']:>15.2f}")
    if "baseline_setup_s" in results:
        print(f"before issue 22, every task's set-up (prepare): {results['baseline_setup_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
