"""Reads at the floor (issue 11): the tile read path next to cold floors measured in the same run.

``python -m benchmarks.tiles_bench --cache DIR [--quick]`` builds (once) the
Earth-Search-shaped scene of :mod:`benchmarks.scene` (16 copies), then runs every
case in a fresh subprocess (caches and peak RSS its own) and prints:

* **cold floor**: bare rasterio, 2 threads, datasets opened once per thread
  before timing, chips chosen so that no two share a tile of any band (every
  tile decoded fresh: 10 tiles per 10-band chip), local and over ``s3://``;
* **row-order scan** of one scene (``Chipper.chips`` in row order and in block
  order), local, next to its own floor (:func:`w_row_floor`: bare rasterio, 2
  threads, the same chips, cold);
* **16-scene random** chips (the cold floor's picks: no shared tiles), one
  ``chip()`` at a time and with ``chips()`` read-ahead per scene, local and
  over ``s3://`` (``s3rver`` from ``benchmarks/package.json`` on loopback,
  behind a counting :class:`benchmarks.run.DelayProxy` with no delay);
* **one scene over s3://**: random chips of one scene (one per 20 m tile: no
  shared tiles) read with ``Chipper.chips`` read-ahead (default depth, every
  chip ahead, and every chip ahead with a 64 MB tile cache: peak RSS stays
  bounded by the cache budget whatever the depth), next to the bound of
  :func:`w_one_bound` (bare transfer of the same tiles + their decode);
* **https**: the 16-scene random cases again through a TLS endpoint with a private
  CA's certificate (``AWS_CA_BUNDLE``), client CPU per chip next to local;
* per case: chips/s, client CPU per chip (``time.process_time`` of the client
  process: every thread, the server not included), requests per chip (timed
  part only: headers are read when files are opened, before timing) and peak RSS.

The machine may be shared with other work: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any
from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.tiles_bench")


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _counter() -> int:
    from benchmarks.run import proxy_requests

    port = os.environ.get("STACCHIP_BENCH_COUNTER")
    return proxy_requests(int(port)) if port else 0


def cold_picks(n_scenes: int, grid: int, per_tile20: int, n: int, seed: int) -> list[tuple[int, int, int]]:
    """``n`` chips ``(scene, x, y)`` of which no two share a tile of any band:
    one chip per (scene, 20 m tile); ``per_tile20`` chips per 20 m tile side
    (8 for 256-px chips and 1024-px tiles: a 20 m tile spans 2 x 2 10 m tiles)."""
    rng = random.Random(seed)
    cells = [(s, tx, ty) for s in range(n_scenes) for ty in range(-(-grid // per_tile20))
             for tx in range(-(-grid // per_tile20))]
    rng.shuffle(cells)
    out = []
    for s, tx, ty in cells[:n]:
        x = min(grid - 1, tx * per_tile20 + rng.randrange(per_tile20))
        y = min(grid - 1, ty * per_tile20 + rng.randrange(per_tile20))
        out.append((s, x, y))
    return out


def _measure(fn: Any, n: int) -> dict[str, float]:
    r0 = _counter()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    req = _counter() - r0
    return {"chips_per_s": n / dt, "cpu_ms_per_chip": 1000 * cpu / n, "requests_per_chip": req / n,
            "seconds": dt, "rss_mb": _rss_mb(), "chips": n}


# --------------------------------------------------------------------------- workers


def w_floor(items: list[str], picks: list[list[int]], threads: int = 2) -> dict[str, float]:
    """Bare rasterio, ``threads`` threads, datasets opened per thread before timing."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from rasterio.env import set_gdal_config

    from benchmarks.run import _bare_read, _floor_env, _load_items
    from benchmarks.scene import CHIP_BANDS

    for k, v in _floor_env().items():
        set_gdal_config(k, v)
    hrefs = [[it.assets[k].href.replace("s3://", "/vsis3/", 1) for k in CHIP_BANDS] for it in _load_items(items)]
    local = threading.local()
    barrier = threading.Barrier(threads)

    def datasets(s: int) -> list[Any]:
        cache = getattr(local, "ds", None)
        if cache is None:
            cache = local.ds = {}
        if s not in cache:
            cache[s] = [rasterio.open(h) for h in hrefs[s]]
        return cache[s]

    def open_all(_: int) -> None:
        for s in range(len(hrefs)):
            datasets(s)
        barrier.wait()  # every thread opens its own, all before timing

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(open_all, range(threads)))
        res = _measure(lambda: list(pool.map(lambda p: _bare_read(datasets(p[0]), p[1], p[2]), picks)), len(picks))
    res["threads"] = threads
    return res


def w_row_floor(item: str, n: int, threads: int = 2) -> dict[str, float]:
    """The row-order scan floor: bare rasterio, ``threads`` threads, cold.

    What a skilled rasterio user scanning the first ``n`` chips (row order) would
    write: the chips are split into tasks by the coarsest tile grid of the bands
    (one task per 20 m tile: 8 x 8 chips, 2 x 2 tiles of each 10 m band), each
    thread owns its datasets (opened before timing) and takes tasks from a
    shared queue, reads one window per band covering the task's chips (aligned to
    tiles, so no tile is decoded twice and none by two threads), and cuts the
    chips from it: 10 m bands as views, 20 m bands upsampled nearest x2 to the
    10 m grid (``repeat``), as the chipper returns them."""
    import math
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from rasterio.env import set_gdal_config
    from rasterio.windows import Window

    from benchmarks.run import CHIP, _floor_env, _load_items
    from benchmarks.scene import CHIP_BANDS

    for k, v in _floor_env().items():
        set_gdal_config(k, v)
    (it,) = _load_items([item])
    hrefs = [it.assets[k].href for k in CHIP_BANDS]
    with rasterio.open(hrefs[0]) as ds0:
        grid = ds0.width // CHIP
    per_task = 1
    for h in hrefs:  # chips per tile side, every band; tasks align to all of them
        with rasterio.open(h) as ds:
            ratio = int(ds.transform.a // 10)
            per_task = math.lcm(per_task, max(1, ds.block_shapes[0][1] * ratio // CHIP))
    positions = [(x, y) for y in range(grid) for x in range(grid)][:n]
    tasks: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for x, y in positions:
        tasks.setdefault((y // per_task, x // per_task), []).append((x, y))
    local = threading.local()
    barrier = threading.Barrier(threads)

    def open_all(_: int) -> None:
        local.ds = [rasterio.open(h) for h in hrefs]
        barrier.wait()

    def run_task(chips: list[tuple[int, int]]) -> int:
        x0, x1 = min(x for x, _ in chips), max(x for x, _ in chips) + 1
        y0, y1 = min(y for _, y in chips), max(y for _, y in chips) + 1
        out: list[list[Any]] = [[] for _ in chips]
        for ds in local.ds:
            r = int(ds.transform.a // 10)
            size = CHIP // r
            a = ds.read(window=Window(x0 * size, y0 * size, (x1 - x0) * size, (y1 - y0) * size))
            for k, (x, y) in enumerate(chips):
                c = a[:, (y - y0) * size:(y - y0 + 1) * size, (x - x0) * size:(x - x0 + 1) * size]
                if r > 1:
                    c = c.repeat(r, axis=1).repeat(r, axis=2)
                out[k].append(c)
        return len(out)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(open_all, range(threads)))
        res = _measure(lambda: sum(pool.map(run_task, list(tasks.values()))), len(positions))
    res["threads"] = threads
    res["tasks"] = len(tasks)
    return res


def _chippers(items: list[str], reader: str | None = None) -> list[Any]:
    from benchmarks.run import _load_items
    from benchmarks.scene import CHIP_BANDS
    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer

    return [Chipper(NoStatsChipIndexer(it), assets=CHIP_BANDS, reader=reader) for it in _load_items(items)]


def _opened(chippers: list[Any]) -> None:
    """Open every file (layouts read, grids checked) and start with an empty tile cache."""
    from stacchip.tiles.reader import shared_cache

    for c in chippers:
        c.open()
    shared_cache().clear()


def w_random(items: list[str], picks: list[list[int]], batch: bool = False,
             reader: str | None = None) -> dict[str, float]:
    chippers = _chippers(items, reader)
    _opened(chippers)

    from benchmarks.run import read_picks

    res = _measure(lambda: read_picks(chippers, picks, batch), len(picks))
    res["threads"] = chippers[0].threads
    res["tile_path"] = all(chippers[0].tile_file(k) is not None for k in chippers[0].asset_keys)
    for c in chippers:
        c.close()
    return res


def w_row(item: str, n: int, order: str = "given", reader: str | None = None) -> dict[str, float]:
    (chipper,) = _chippers([item], reader)
    _opened([chipper])
    grid = chipper.indexer.x_size
    positions = [(x, y) for y in range(grid) for x in range(grid)][:n]

    def run() -> None:
        for _ in chipper.chips(positions, order=order):
            pass

    res = _measure(run, len(positions))
    res["threads"] = chipper.threads
    chipper.close()
    return res


def w_one(item: str, picks: list[list[int]], prefetch: int | None = None) -> dict[str, float]:
    """Random chips of one scene read with ``Chipper.chips`` read-ahead (``prefetch``:
    chips ahead; ``None`` for the default depth)."""
    (chipper,) = _chippers([item])
    _opened([chipper])
    positions = [(x, y) for _, x, y in picks]

    def run() -> None:
        for _ in chipper.chips(positions, prefetch=prefetch):
            pass

    res = _measure(run, len(positions))
    res["prefetch"] = -1 if prefetch is None else prefetch
    res["cache_mb"] = _cache_mb()
    chipper.close()
    return res


def _cache_mb() -> float:
    from stacchip.tiles.reader import shared_cache

    return shared_cache().budget / 2**20


def _tile_ranges(item: str, picks: list[list[int]]) -> list[tuple[str, int, int, Any]]:
    """``(asset key, offset, count, layout)`` of every distinct tile the chips need."""
    from stacchip.tiles.reader import _plan

    (chipper,) = _chippers([item])
    seen: dict[tuple[str, Any], tuple[str, int, int, Any]] = {}
    for _, x, y in picks:
        for key in chipper.asset_keys:
            f = chipper.tile_file(key)
            rows, _, _ = chipper._axis(key, f, 0, y)
            cols, _, _ = chipper._axis(key, f, 1, x)
            plan = _plan(f.layout, rows, cols)
            for tile in (plan.keys if plan is not None else []):
                i = f.layout.tile_index(*tile)
                if int(f.layout.counts[i]):
                    seen[(key, tile)] = (key, int(f.layout.offsets[i]), int(f.layout.counts[i]), f.layout)
    chipper.close()
    return list(seen.values())


def w_one_bound(item: str, s3_item: str, picks: list[list[int]], in_flight: int = 16,
                threads: int = 2) -> dict[str, float]:
    """The bound of the one-scene read-ahead case, from its two parts measured apart.

    * **transfer**: the loopback server's bare transfer of exactly the tiles the
      chips need (each distinct tile once, ``in_flight`` concurrent ranged GETs,
      bytes received, nothing decoded), with obstore's async API and with bare
      urllib3 threads: ``T`` seconds, the faster of the two;
    * **decode**: decoding those same bytes (already in memory) on ``threads``
      threads: ``D`` seconds.

    The bound is ``n / (T + D)`` chips/s, i.e. per chip
    ``1 / (1 / transfer_rate + 1 / decode_rate)``: on these 2 cores the server
    (s3rver and the proxy), the client's network receive and the decoder all
    compete for the same CPU, so a read that overlaps transfer and decode
    perfectly still needs about the CPU time of both; running each at its own
    full rate one after the other is what the two allow together. A read above
    1.0x has overlapped them better than that (transfer leaving a core idle).
    Layouts come from the local copy of the same files (identical bytes)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import obstore

    from benchmarks.run import _load_items
    from stacchip.storage import clients, settings
    from stacchip.tiles.decode import decode_tile

    tiles = _tile_ranges(item, picks)
    (it,) = _load_items([s3_item])
    hrefs = {key: it.assets[key].href for key in {t[0] for t in tiles}}
    stores = {key: clients.client_for(h) for key, h in hrefs.items()}  # (client, path), as the tile path's
    for client, path in stores.values():  # connection set up before timing, as the chipper's open does
        obstore.get_range(client.store, path, start=0, length=16)

    async def fetch_all() -> list[Any]:
        sem = asyncio.Semaphore(in_flight)

        async def one(key: str, offset: int, count: int) -> Any:
            client, path = stores[key]
            async with sem:
                return await obstore.get_range_async(client.store, path, start=offset, end=offset + count)

        return await asyncio.gather(*[one(k, o, c) for k, o, c, _ in tiles])

    def fetch_urllib3() -> list[Any]:
        """The same GETs with bare urllib3 (presigned URLs; the client of forked children),
        ``in_flight`` threads, each received into its own buffer."""
        conf = settings()
        urls = {k: client.sign(path) for k, (client, path) in stores.items()}
        pool = clients.pool_for(next(iter(urls.values())), conf)

        def one(t: Any) -> Any:
            key, offset, count, _ = t
            resp = pool.request("GET", urls[key], headers={"Range": f"bytes={offset}-{offset + count - 1}"},
                                preload_content=False)
            buf = np.empty(count, np.uint8)
            view, got = memoryview(buf), 0
            while got < count:
                got += resp.readinto(view[got:])
            resp.release_conn()
            return buf

        with ThreadPoolExecutor(in_flight) as pool_threads:
            return list(pool_threads.map(one, tiles))

    timings = {}
    for name, fetch in (("obstore", lambda: asyncio.run(fetch_all())), ("urllib3", fetch_urllib3)):
        r0 = _counter()
        c0, t0 = time.process_time(), time.perf_counter()
        blobs = fetch()
        timings[name] = (time.perf_counter() - t0, time.process_time() - c0, _counter() - r0)
    fastest = min(timings, key=lambda k: timings[k][0])  # the stricter bound
    transfer, transfer_cpu, requests = timings[fastest]
    c0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda a: decode_tile(a[0][3], a[1]), zip(tiles, blobs, strict=True)))
    decode, decode_cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(picks)
    return {"chips_per_s": n / (transfer + decode), "transfer_s": transfer, "decode_s": decode,
            "transfer_chips_per_s": n / transfer, "decode_chips_per_s": n / decode,
            "cpu_ms_per_chip": 1000 * (transfer_cpu + decode_cpu) / n, "requests_per_chip": requests / n,
            "transfer_cpu_ms_per_tile": 1000 * transfer_cpu / len(tiles),
            "decode_cpu_ms_per_tile": 1000 * decode_cpu / len(tiles),
            "tiles": len(tiles), "mb": sum(t[2] for t in tiles) / 1e6, "rss_mb": _rss_mb(), "chips": n,
            "transfer_s_obstore": timings["obstore"][0], "transfer_s_urllib3": timings["urllib3"][0]}


WORKERS = {name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("w_") and callable(fn)}


def run_worker(name: str, env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    import subprocess

    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.tiles_bench", "--worker", name,
           "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=HERE.parent, check=False,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one driver for every case
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(HERE / ".cache" / "scene"), help="scene cache directory")
    parser.add_argument("--quick", action="store_true", help="fewer chips per case")
    parser.add_argument("--only", default="row,local,s3,https,one", help="sections: row, local, s3, https, one")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (medians)")
    args = parse_with_worker(parser, argv)
    if args.worker:
        return serve_worker(WORKERS, args)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.run import S3_KEY, DelayProxy, S3rver, s3_items, warm_page_cache
    from benchmarks.scene import build_scene

    scene = build_scene(args.cache)
    items = [str(p) for p in scene.item_paths]
    warm_page_cache(sorted(Path(args.cache).rglob("*.tif")))
    grid = scene.spec.size10 // 256
    per20 = max(1, scene.spec.blocksize * 2 // 256)
    n_rand = 64 if args.quick else 200
    n_row = 300 if args.quick else grid * grid
    n_one = (-(-grid // per20)) ** 2  # one chip per 20 m tile of one scene: no shared tiles
    sections = set(args.only.split(","))
    results: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(),
                               "n_random": n_rand, "n_row": n_row, "repeats": args.repeats}
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, worker: str, **kw: Any) -> None:
        logger.info("  %s", name)
        runs.setdefault(name, []).append(run_worker(worker, **kw))

    server = proxy = tls_proxy = None
    env: dict[str, str] = {}
    env_https: dict[str, str] = {}
    try:
        if sections & {"s3", "one", "https"}:
            tmp = Path(args.cache) / ".s3"
            tmp.mkdir(parents=True, exist_ok=True)
            server = S3rver(scene, tmp / "store")
            proxy = DelayProxy(server.port, 0.0)
            s3 = s3_items(scene, server, tmp)
            env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
                   "STACCHIP_BENCH_COUNTER": str(proxy.counter_port)}
            # the first GET of each object makes s3rver write its metadata: once, untimed
            run_worker("floor", env=env, items=s3, picks=[[k, 0, 0] for k in range(len(s3))], threads=2)
        if "https" in sections:  # the same server behind TLS with a private CA's certificate
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1")
            ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
            cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
            tls_proxy = DelayProxy(server.port, 0.0, tls=(str(tmp / "server.pem"), str(tmp / "server.pem")))
            env_https = {**env, "AWS_ENDPOINT_URL": f"https://127.0.0.1:{tls_proxy.port}",
                         "AWS_CA_BUNDLE": str(tmp / "ca.pem"), "STACCHIP_BENCH_COUNTER": str(tls_proxy.counter_port),
                         # the bare-rasterio floor reads through GDAL configured by hand
                         "GDAL_CURL_CA_BUNDLE": str(tmp / "ca.pem"), "CURL_CA_BUNDLE": str(tmp / "ca.pem")}
        # Repeats interleave the cases (local and s3 side by side), so a busy moment of
        # the shared machine does not fall on one case only; figures are medians.
        for r in range(args.repeats):
            logger.info("repeat %d of %d", r + 1, args.repeats)
            picks = [list(p) for p in cold_picks(len(items), grid, per20, n_rand, seed=11 + r)]
            if "local" in sections:
                record("floor_local", "floor", items=items, picks=picks, threads=2)
                record("random_local", "random", items=items, picks=picks)
                record("random_local_batch", "random", items=items, picks=picks, batch=True)
            if "s3" in sections:
                record("floor_s3", "floor", env=env, items=s3, picks=picks, threads=2)
                record("random_s3", "random", env=env, items=s3, picks=picks)
                record("random_s3_batch", "random", env=env, items=s3, picks=picks, batch=True)
            if "https" in sections:
                record("floor_https", "floor", env=env_https, items=s3, picks=picks, threads=2)
                record("random_https", "random", env=env_https, items=s3, picks=picks)
                record("random_https_batch", "random", env=env_https, items=s3, picks=picks, batch=True)
            if "one" in sections:
                k = r % len(items)
                one = [[0, x, y] for _, x, y in cold_picks(1, grid, per20, n_one, seed=31 + r)]
                record("one_bound", "one_bound", env=env, item=items[k], s3_item=s3[k], picks=one)
                record("one_s3", "one", env=env, item=s3[k], picks=one)
                record("one_s3_deep", "one", env=env, item=s3[k], picks=one, prefetch=len(one))
                record("one_s3_deep64", "one", env={**env, "STACCHIP_TILE_CACHE_MB": "64"}, item=s3[k],
                       picks=one, prefetch=len(one))
            if "row" in sections:
                record("floor_row", "row_floor", item=items[r % len(items)], n=n_row, threads=2)
                record("row_local", "row", item=items[r % len(items)], n=n_row)
                record("row_local_block", "row", item=items[r % len(items)], n=n_row, order="block")
    finally:
        if tls_proxy is not None:
            tls_proxy.stop()
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
    import statistics

    results["runs"] = runs
    for name, rs in runs.items():
        med = {k: statistics.median([r[k] for r in rs]) for k in rs[0]
               if isinstance(rs[0][k], (int, float)) and not isinstance(rs[0][k], bool)}
        med["runs_chips_per_s"] = [round(r["chips_per_s"], 2) for r in rs]
        results[name] = med
    results["load_average_after"] = os.getloadavg()

    def row(label: str, key: str, floor: str | None) -> str:
        r = results.get(key)
        if r is None:
            return ""
        f = results.get(floor) if floor else None
        ratio = f" = {r['chips_per_s'] / f['chips_per_s']:.2f}x floor ({f['chips_per_s']:.1f}/s)" if f else ""
        return (f"{label:<34} {r['chips_per_s']:8.1f} chips/s{ratio:<26} {r['cpu_ms_per_chip']:7.1f} ms CPU/chip"
                f" {r['requests_per_chip']:6.2f} req/chip {r['rss_mb']:7.0f} MB peak RSS")

    lines = [
        row("row-order floor, local (2 thr)", "floor_row", None),
        row("row-order scan, local", "row_local", "floor_row"),
        row("block-order scan, local", "row_local_block", "floor_row"),
        row("cold floor, local (2 thr)", "floor_local", None),
        row("16-scene random chip(), local", "random_local", "floor_local"),
        row("16-scene random chips(), local", "random_local_batch", "floor_local"),
        row("cold floor, s3 (2 thr)", "floor_s3", None),
        row("16-scene random chip(), s3", "random_s3", "floor_s3"),
        row("16-scene random chips(), s3", "random_s3_batch", "floor_s3"),
        row("cold floor, https (2 thr)", "floor_https", None),
        row("16-scene random chip(), https", "random_https", "floor_https"),
        row("16-scene random chips(), https", "random_https_batch", "floor_https"),
        row("one scene: transfer+decode bound", "one_bound", None),
        row("one scene random chips(), s3", "one_s3", "one_bound"),
        row("  read-ahead = every chip", "one_s3_deep", "one_bound"),
        row("  every chip, 64 MB tile cache", "one_s3_deep64", "one_bound"),
    ]
    print("\n".join(line for line in lines if line))
    b = results.get("one_bound")
    if b:
        print(f"  one-scene bound: {b['tiles']:.0f} tiles, {b['mb']:.0f} MB; transfer {b['transfer_s']:.2f} s"
              f" ({b['transfer_chips_per_s']:.1f} chips/s, {b['transfer_cpu_ms_per_tile']:.2f} ms CPU/tile),"
              f" decode {b['decode_s']:.2f} s ({b['decode_chips_per_s']:.1f} chips/s,"
              f" {b['decode_cpu_ms_per_tile']:.2f} ms CPU/tile); bound = n / (T + D);"
              f" perfect-overlap ceiling n / max(T, D) = {b['chips'] / max(b['transfer_s'], b['decode_s']):.1f}"
              f" chips/s; bare transfer obstore {b['transfer_s_obstore']:.2f} s,"
              f" urllib3 {b['transfer_s_urllib3']:.2f} s")
        for name in ("one_s3", "one_s3_deep", "one_s3_deep64"):
            if name in results:
                print(f"  {name}: tile cache {results[name]['cache_mb']:.0f} MB,"
                      f" peak RSS {results[name]['rss_mb']:.0f} MB")
    for name in ("floor_row", "row_local", "row_local_block", "random_local", "random_s3"):
        if name in results:
            print(f"  {name} chips/s per run: {results[name]['runs_chips_per_s']}")
    if "random_s3" in results and "random_local" in results:
        print(f"client CPU per chip, s3 / local: "
              f"{results['random_s3']['cpu_ms_per_chip'] / results['random_local']['cpu_ms_per_chip']:.2f}x (chip()), "
              f"{results['random_s3_batch']['cpu_ms_per_chip'] / results['random_local_batch']['cpu_ms_per_chip']:.2f}x"
              " (chips()) [ratio of medians]")
        for s3_case, local_case in (("random_s3", "random_local"), ("random_s3_batch", "random_local_batch")):
            pairs = [a["cpu_ms_per_chip"] / b["cpu_ms_per_chip"]
                     for a, b in zip(runs[s3_case], runs[local_case], strict=True)]
            results[f"{s3_case}_cpu_ratio_per_repeat"] = pairs
            print(f"  {s3_case} / {local_case} CPU per repeat: {[round(x, 2) for x in pairs]},"
                  f" median {statistics.median(pairs):.2f}x")
    if "random_https" in results and "random_local" in results:
        print(f"client CPU per chip, https / local: "
              f"{results['random_https']['cpu_ms_per_chip']:.1f} / {results['random_local']['cpu_ms_per_chip']:.1f} ms"
              f" = {results['random_https']['cpu_ms_per_chip'] / results['random_local']['cpu_ms_per_chip']:.2f}x"
              f" (chip()); {results['random_https_batch']['cpu_ms_per_chip']:.1f} /"
              f" {results['random_local_batch']['cpu_ms_per_chip']:.1f} ms (chips())")
    print(f"tiles per chip in the random cases: 10 (no two chips share a tile); "
          f"load average before/after: {results['load_average_before']} / {results['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
