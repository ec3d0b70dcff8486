"""prechip's two modes next to their floors, measured in the same run (issue 12).

``python -m benchmarks.prechip_modes [--cache DIR] [--copies 8] [--quick]``

Catalog: ``--copies`` (at least 8) Earth-Search-shaped Sentinel-2 scenes of
:mod:`benchmarks.scene` (10980² 10 m and 5490² 20 m bands, 1024 px DEFLATE +
predictor 2 tiles, ~7 ms to decode each), indexed with ``Sentinel2Indexer``;
cubes of 128 chips of 10 bands at zlib level 1, default filters (nodata ≤ 5 %).

Cases, each in a fresh process (cold: no tile decoded before, its own peak RSS;
the OS page cache is warmed first so no case pays for the disk):

* **locality**: ``run_job(t)`` for the first ``--tasks`` locality tasks
  (``--items-per-job`` items each, cubes mixing ``--mix-items``), ``--workers 2``;
* **global**: ``run_job(0)`` of the global mode with ``--global-cubes`` cubes per
  job (chips spread over every item of the catalog), ``--workers 2``;
* **floor** of each: the same chips read in row order with bare rasterio (2
  threads, each owning its items' datasets, so no tile is decoded twice; chip
  windows read band by band through GDAL's block cache, 20 m bands repeated x2),
  plus writing the same cubes (the arrays the mode wrote, loaded before timing)
  with bare ``zipfile`` + numpy at the same zlib level in 2 threads. Floor
  time = read time + write time; cubes/min = cubes / floor time.

The table gives cubes/min, chips/s, the ratio to the floor and peak RSS (the
process; a child process if one ran).
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


def _rss() -> dict[str, float]:
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _config(data: str, index: str, out: str, mode: str, **kw: Any) -> Any:
    from stacchip.processors import prechip

    return prechip.PrechipConfig(data=data, index=index, output=out, platform=PLATFORM, mode=mode, **kw)


# --------------------------------------------------------------------------- workers


def w_mode(data: str, index: str, out: str, mode: str, jobs: list[int], workers: int,
           settings: dict[str, Any]) -> dict[str, Any]:
    """Run prechip array tasks ``jobs``; the cubes written and the time."""
    from stacchip.processors import prechip

    cfg = _config(data, index, out, mode, **settings)
    selection = prechip.prepare(cfg)
    t0 = time.perf_counter()
    written = []
    for job in jobs:
        written += prechip.make_cubes(cfg, prechip.job_ids(job, cfg, selection), workers=workers,
                                      selection=selection)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cubes": written, **_rss()}


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


def w_floor(data: str, chips: dict[str, list[list[int]]], cubes: list[str], level: int,
            threads: int = 2) -> dict[str, Any]:
    """Row-order read of ``chips`` (``{item_json: [[x, y], ...]}``) with bare rasterio in ``threads``
    threads (items dealt to threads), then writing ``cubes`` again at ``level`` in ``threads``."""
    import numpy as np
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

    def compress(arrays: dict[str, Any], target: str) -> int:
        sink = io.BytesIO()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level,
                             allowZip64=True) as zf:
            for name, a in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, a, allow_pickle=False)
        with open(target, "wb") as fh:
            fh.write(sink.getbuffer())
        return len(sink.getbuffer())

    write_s = 0.0
    with tempfile.TemporaryDirectory(prefix="prechip-floor-") as tmp, ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(cubes), threads):
            batch = []
            for url in cubes[start:start + threads]:  # loaded before timing
                with np.load(url, allow_pickle=False) as npz:
                    batch.append({k: npz[k] for k in npz.files})
            t0 = time.perf_counter()
            list(pool.map(compress, batch, [f"{tmp}/c{start + k}.npz" for k in range(len(batch))]))
            write_s += time.perf_counter() - t0
            del batch
            for k in range(threads):
                Path(f"{tmp}/c{start + k}.npz").unlink(missing_ok=True)
    return {"read_s": read_s, "write_s": write_s, "seconds": read_s + write_s, "chips": n_read, **_rss()}


WORKERS = {"mode": w_mode, "floor": w_floor}


def run_worker(name: str, **kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.prechip_modes", "--worker", name,
           "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- driver


def chips_of(cubes: list[str], data: str) -> dict[str, list[list[int]]]:
    """``{item_json: [[x, y], ...]}`` of the chips in ``cubes``."""
    import numpy as np

    from stacchip.utils import item_key

    out: dict[str, list[list[int]]] = {}
    for url in cubes:
        with np.load(url, allow_pickle=False) as npz:
            for chipid in npz["chipids"].tolist():
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
    p.add_argument("--global-cubes", type=int, default=8, help="cubes of the global job")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--level", type=int, default=1, help="zlib level")
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
    results: dict[str, Any] = {"load_before": os.getloadavg(), "copies": args.copies, "size": size}
    with tempfile.TemporaryDirectory(prefix="prechip-modes-", dir=cache) as tmp:
        for mode, settings, jobs in (("locality", loc, list(range(args.tasks))), ("global", glob, [0])):
            out = str(Path(tmp) / mode)
            logger.info("%s mode: tasks %s", mode, jobs)
            r = run_worker("mode", data=str(data), index=str(index), out=out, mode=mode, jobs=jobs,
                           workers=args.workers, settings=settings)
            cubes = r.pop("cubes")
            chips = chips_of(cubes, str(data))
            n_chips = sum(len(v) for v in chips.values())
            logger.info("%s floor: %d chips of %d items, %d cubes", mode, n_chips, len(chips), len(cubes))
            f = run_worker("floor", data=str(data), chips=chips, cubes=cubes, level=args.level)
            results[mode] = {**r, "n_cubes": len(cubes), "n_chips": n_chips, "items": len(chips),
                             "cubes_per_min": 60 * len(cubes) / r["seconds"], "chips_per_s": n_chips / r["seconds"],
                             "floor": {**f, "cubes_per_min": 60 * len(cubes) / f["seconds"]},
                             "ratio": f["seconds"] / r["seconds"]}
            for url in cubes:
                Path(url).unlink(missing_ok=True)
    results["load_after"] = os.getloadavg()
    print(f"catalog: {args.copies} items of {size}² px (10 m), cubes of 128 chips x 10 bands, zlib {args.level}, "
          f"{args.workers} workers; load average {results['load_before'][0]:.1f} before, "
          f"{results['load_after'][0]:.1f} after")
    print(f"{'mode':<10} {'cubes':>5} {'chips':>6} {'items':>5} {'cubes/min':>9} {'floor c/min':>11} "
          f"{'ratio':>6} {'floor read s':>12} {'floor write s':>13} {'peak RSS MB':>11} {'child RSS MB':>12}")
    for mode in ("locality", "global"):
        r = results[mode]
        print(f"{mode:<10} {r['n_cubes']:>5} {r['n_chips']:>6} {r['items']:>5} {r['cubes_per_min']:>9.1f} "
              f"{r['floor']['cubes_per_min']:>11.1f} {r['ratio']:>5.2f}x {r['floor']['read_s']:>12.1f} "
              f"{r['floor']['write_s']:>13.1f} {r['rss_mb']:>11.0f} {r['child_rss_mb']:>12.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
