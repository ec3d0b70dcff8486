"""prechip's two modes and two formats next to their floors, and against the code before
issue 22, measured in the same run.

``python -m benchmarks.prechip_modes [--cache DIR] [--copies 8] [--quick] [--baseline REV]``

Catalog: ``--copies`` (at least 8) Earth-Search-shaped Sentinel-2 scenes of
:mod:`benchmarks.scene` (10980² 10 m and 5490² 20 m bands, 1024 px DEFLATE +
predictor 2 tiles, ~7 ms to decode each), indexed with ``Sentinel2Indexer``;
outputs of 128 chips of 10 bands at compression level 1, default filters
(nodata ≤ 5 %).

Cases, each in a fresh process (cold: no tile decoded before, its own peak RSS;
the OS page cache is warmed first so no case pays for the disk). The plan (the
selection, read from the index and every item's STAC JSON) is made before the
clock starts; what is timed is the array tasks' work:

* **locality**: ``run_job(t)`` for the first ``--tasks`` locality tasks
  (``--items-per-job`` items each, outputs mixing ``--mix-items``), ``--workers 2``;
* **global**: ``run_job(0)`` of the global mode with ``--global-cubes`` outputs per
  job (chips spread over every item of the catalog), ``--workers 2``;

each as npz cubes and as WebDataset shards (the same chips in the same order).

**Floors**, per case: the same chips read in row order with bare rasterio (2
threads, each owning its items' datasets, so no tile is decoded twice; chip
windows read band by band through GDAL's block cache, 20 m bands repeated x2),
plus writing the same outputs with the same codec (ISA-L through ``isal``) in 2
threads: npz with bare ``zipfile`` + numpy (the arrays the case wrote, loaded
before timing; each member's compressor an ``isal_zlib`` raw-DEFLATE one), shards
with bare ``tarfile`` into an ``isal.igzip`` stream (the members the case wrote,
read before timing). Floor time = read time + write time.

**Before issue 22** (``--baseline``, default the commit this work started from):
the same npz cases run by that commit's code (zlib level 1, written from a
``git archive`` of it into a temporary folder), on the same catalog.

The table gives outputs/min, chips/s, the ratio to the floor (floor time / case
time: 1.0 is the floor's speed), peak RSS, and the speed-up over the baseline.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.prechip_modes")
PLATFORM = "sentinel-2-l2a"
#: The code before issue 22 (the commit this work started from).
BASELINE = "21c0f664cda95b5d40ce7791f265db228517dafa"


def _rss() -> dict[str, float]:
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# --------------------------------------------------------------------------- workers


def w_mode(data: str, index: str, out: str, mode: str, jobs: list[int], workers: int,
           settings: dict[str, Any]) -> dict[str, Any]:
    """Run prechip array tasks ``jobs`` (the plan made first, untimed); outputs written and the time."""
    from stacchip.export import plan as plans
    from stacchip.processors import prechip

    cfg = prechip.PrechipConfig(data=data, index=index, output=out, platform=PLATFORM, mode=mode, **settings)
    t0 = time.perf_counter()
    plan = plans.obtain(cfg)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = []
    for job in jobs:
        written += prechip.run_job(job, cfg, workers=workers, plan=plan)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "plan_s": plan_s, "outputs": written, **_rss()}


#: The baseline's worker: its own API (prepare, job_ids, make_cubes), in a process whose
#: working folder is the baseline's source tree (so ``import stacchip`` is that code).
BASELINE_WORKER = """
import json, resource, sys, time
from stacchip.processors import prechip
a = json.loads(sys.argv[1])
cfg = prechip.PrechipConfig(data=a["data"], index=a["index"], output=a["out"], platform=a["platform"],
                            mode=a["mode"], **a["settings"])
sel = prechip.prepare(cfg)
t0 = time.perf_counter()
written = []
for job in a["jobs"]:
    written += prechip.make_cubes(cfg, prechip.job_ids(job, cfg, sel), workers=a["workers"], selection=sel)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "outputs": written, "stacchip": prechip.__file__,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _bare_chip(datasets: list[Any], x: int, y: int, chip: int) -> Any:
    import numpy as np
    from rasterio.windows import Window

    planes = []
    for ds in datasets:
        r = int(round(ds.transform.a / 10))
        size = chip // r
        a = ds.read(1, window=Window(x * size, y * size, size, size), boundless=False)
        if r > 1:
            a = a.repeat(r, axis=0).repeat(r, axis=1)
        planes.append(a)
    return np.stack(planes)


def w_read_floor(chips: dict[str, list[list[int]]], threads: int = 2) -> dict[str, Any]:
    """Row-order read of ``chips`` (``{item_json: [[x, y], ...]}``) with bare rasterio in ``threads``
    threads (items dealt to threads)."""
    import rasterio
    from rasterio.env import set_gdal_config

    from benchmarks.scene import CHIP_BANDS
    from stacchip.utils import load_item

    set_gdal_config("GDAL_CACHEMAX", 512 * 2**20)  # bytes (rasterio sets it with GDALSetCacheMax64)
    set_gdal_config("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    items = sorted(chips)
    hrefs = {p: [load_item(p).assets[k].href for k in CHIP_BANDS] for p in items}
    shares = [items[t::threads] for t in range(threads)]
    opened = {p: [rasterio.open(h) for h in hrefs[p]] for p in items}  # opened before timing

    def read_share(share: list[str]) -> int:
        n = 0
        for p in share:
            for x, y in sorted(chips[p], key=lambda c: (c[1], c[0])):
                _bare_chip(opened[p], x, y, 256)
                n += 1
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n_read = sum(pool.map(read_share, shares))
    read_s = time.perf_counter() - t0
    for group in opened.values():
        for ds in group:
            ds.close()
    return {"read_s": read_s, "chips": n_read, **_rss()}


def _npz_floor(arrays: dict[str, Any], target: str, level: int) -> None:
    import numpy as np
    from isal import isal_zlib

    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as member:
                member._compressor = isal_zlib.compressobj(min(3, level), isal_zlib.DEFLATED, -15)  # type: ignore[attr-defined]
                np.lib.format.write_array(member, a, allow_pickle=False)
    with open(target, "wb") as fh:
        fh.write(sink.getbuffer())


def _tar_floor(members: list[tuple[str, bytes]], target: str, level: int) -> None:
    from isal import igzip

    sink = io.BytesIO()
    with igzip.IGzipFile(fileobj=sink, mode="wb", compresslevel=min(3, level), mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with open(target, "wb") as fh:
        fh.write(sink.getbuffer())


def _load_output(url: str) -> Any:
    import numpy as np

    if url.endswith(".npz"):
        with np.load(url, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    with tarfile.open(url, "r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def w_write_floor(outputs: list[str], level: int, threads: int = 2) -> dict[str, Any]:
    """Write ``outputs`` again (npz cubes or tar shards, what they hold loaded before timing) with
    bare zipfile / tarfile and ISA-L at ``level``, in ``threads`` threads."""
    write_s = 0.0
    with tempfile.TemporaryDirectory(prefix="prechip-floor-") as tmp, ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(outputs), threads):
            batch = [_load_output(u) for u in outputs[start:start + threads]]  # loaded before timing
            targets = [f"{tmp}/o{start + k}" for k in range(len(batch))]
            t0 = time.perf_counter()
            list(pool.map(lambda b, t: (_npz_floor if isinstance(b, dict) else _tar_floor)(b, t, level),
                          batch, targets))
            write_s += time.perf_counter() - t0
            del batch
            for t in targets:
                Path(t).unlink(missing_ok=True)
    return {"write_s": write_s, **_rss()}


WORKERS = {"mode": w_mode, "read_floor": w_read_floor, "write_floor": w_write_floor}


def run_worker(name: str, **kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.prechip_modes", "--worker", name,
           "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run_baseline(tree: Path, **kwargs: Any) -> dict[str, Any]:
    """The baseline worker in a fresh process importing the baseline's code from ``tree``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", BASELINE_WORKER, json.dumps(kwargs)],
                          capture_output=True, text=True, timeout=7200, cwd=tree, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline worker failed: {proc.stderr[-3000:]}")
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not result["stacchip"].startswith(str(tree)):
        raise RuntimeError(f"the baseline worker imported {result['stacchip']}, not the baseline's code")
    return result


def baseline_tree(rev: str, into: Path) -> Path:
    """The source tree of commit ``rev`` (``git archive``) in ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "stacchip"], cwd=HERE.parent, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


# --------------------------------------------------------------------------- driver


def chips_of(outputs: list[str], data: str) -> dict[str, list[list[int]]]:
    """``{item_json: [[x, y], ...]}`` of the chips in ``outputs`` (cubes or shards)."""
    from stacchip.export.shards import read_shard
    from stacchip.utils import item_key

    out: dict[str, list[list[int]]] = {}
    for url in outputs:
        if url.endswith(".npz"):
            chipids = _load_output(url)["chipids"].tolist()
        else:
            chipids = [s["json"]["chipid"] for s in read_shard(Path(url).read_bytes())]
        for chipid in chipids:
            item_id, x, y = chipid.rsplit("-", 2)
            out.setdefault(str(Path(data) / item_key(PLATFORM, item_id)), []).append([int(x), int(y)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=HERE / ".cache" / "prechip", help="scene/index cache")
    p.add_argument("--copies", type=int, default=8, help="items in the catalog (at least 8)")
    p.add_argument("--tasks", type=int, default=1, help="locality tasks to run")
    p.add_argument("--items-per-job", type=int, default=2)
    p.add_argument("--mix-items", type=int, default=2)
    p.add_argument("--global-cubes", type=int, default=8, help="outputs of the global job")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--level", type=int, default=1, help="compression level")
    p.add_argument("--baseline", default=BASELINE, help="commit whose code is compared (npz); 'none' to skip")
    p.add_argument("--quick", action="store_true", help="small scenes (2640² px), for a smoke run")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = parse_with_worker(p, argv)
    if args.worker:
        return serve_worker(WORKERS, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from benchmarks.prechip_bench import prepare_data, warm_page_cache
    from benchmarks.scene import SceneSpec

    size = 2640 if args.quick else 10980
    cache = args.cache.with_name(args.cache.name + "-quick") if args.quick else args.cache
    data, index, items = prepare_data(cache, SceneSpec(size10=size, copies=args.copies, with_60m=False))
    logger.info("page cache warmed in %.1f s", warm_page_cache(items))
    common = {"compress_level": args.level}
    loc = {**common, "items_per_job": args.items_per_job, "mix_items": args.mix_items}
    glob = {**common, "cubes_per_job": args.global_cubes}
    results: dict[str, Any] = {"load_before": os.getloadavg(), "copies": args.copies, "size": size, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="prechip-modes-", dir=cache) as tmp:
        tree = None if args.baseline == "none" else baseline_tree(args.baseline, Path(tmp) / "baseline")
        for mode, settings, jobs in (("locality", loc, list(range(args.tasks))), ("global", glob, [0])):
            read = None
            for fmt in ("npz", "webdataset"):
                out = str(Path(tmp) / f"{mode}-{fmt}")
                logger.info("%s mode, %s: tasks %s", mode, fmt, jobs)
                r = run_worker("mode", data=str(data), index=str(index), out=out, mode=mode, jobs=jobs,
                               workers=args.workers, settings={**settings, "format": fmt})
                outputs = r.pop("outputs")
                chips = chips_of(outputs, str(data))
                n_chips = sum(len(v) for v in chips.values())
                if read is None:  # the same chips in both formats: one read floor per mode
                    logger.info("%s read floor: %d chips of %d items", mode, n_chips, len(chips))
                    read = run_worker("read_floor", chips=chips)
                w = run_worker("write_floor", outputs=outputs, level=args.level)
                floor_s = read["read_s"] + w["write_s"]
                case = {**r, "outputs": len(outputs), "chips": n_chips, "items": len(chips),
                        "per_min": 60 * len(outputs) / r["seconds"], "chips_per_s": n_chips / r["seconds"],
                        "floor": {"read_s": read["read_s"], "write_s": w["write_s"], "seconds": floor_s,
                                  "per_min": 60 * len(outputs) / floor_s},
                        "ratio": floor_s / r["seconds"]}
                if fmt == "npz" and tree is not None:
                    logger.info("%s mode, npz, baseline %s", mode, args.baseline[:10])
                    b = run_baseline(tree, data=str(data), index=str(index), out=str(Path(tmp) / f"{mode}-base"),
                                     mode=mode, jobs=jobs, workers=args.workers, platform=PLATFORM,
                                     settings=settings)
                    case["baseline"] = {"seconds": b["seconds"], "outputs": len(b["outputs"]),
                                        "per_min": 60 * len(b["outputs"]) / b["seconds"], "rss_mb": b["rss_mb"]}
                    case["speedup"] = case["per_min"] / case["baseline"]["per_min"]
                    if len(b["outputs"]) != len(outputs):
                        raise RuntimeError(f"baseline wrote {len(b['outputs'])} cubes, this code {len(outputs)}")
                results["cases"][f"{mode}/{fmt}"] = case
                for url in outputs:
                    Path(url).unlink(missing_ok=True)
    results["load_after"] = os.getloadavg()
    print(f"catalog: {args.copies} items of {size}² px (10 m), outputs of 128 chips x 10 bands, level {args.level} "
          f"(ISA-L), {args.workers} workers; load average {results['load_before'][0]:.1f} before, "
          f"{results['load_after'][0]:.1f} after")
    print(f"{'case':<20} {'outs':>4} {'chips':>6} {'items':>5} {'outs/min':>8} {'floor/min':>9} {'ratio':>6} "
          f"{'floor read s':>12} {'floor write s':>13} {'RSS MB':>7} {'before/min':>10} {'speedup':>7}")
    for name, r in results["cases"].items():
        base = r.get("baseline")
        print(f"{name:<20} {r['outputs']:>4} {r['chips']:>6} {r['items']:>5} {r['per_min']:>8.1f} "
              f"{r['floor']['per_min']:>9.1f} {r['ratio']:>5.2f}x {r['floor']['read_s']:>12.1f} "
              f"{r['floor']['write_s']:>13.1f} {r['rss_mb']:>7.0f} "
              + (f"{base['per_min']:>10.1f} {r['speedup']:>6.2f}x" if base else f"{'-':>10} {'-':>7}"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
