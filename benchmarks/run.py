"""Throughput report: stacchip next to the bare-I/O floor and the upstream approach.

One command (``python -m benchmarks.run --cache DIR``) builds the Earth-Search-shaped
Sentinel-2 scene once (``benchmarks.scene``), then measures, each case in a fresh
subprocess so caches and peak RSS are its own, the median of ``--repeats`` runs:

* index one scene: seconds and peak RSS (``ours``: ``Sentinel2Indexer.create_index``;
  ``floor``: bare rasterio reading SCL whole plus a numpy block reduction;
  ``upstream``: SCL upsampled to 10 m and a Python loop over chips, as upstream did);
* random 10-band chips within one scene and drawn across 16 scenes;
* row-order chips (a whole-scene export);
* random chips across the 16 scenes through ``s3://`` hrefs served by ``s3rver``
  (npm, files on disk) on loopback, direct and behind a 20 ms-per-request delay
  proxy, next to a bare threaded rasterio floor (16 threads, datasets opened once
  per thread) on the same server.

Chips are 256 x 256 at 10 m with 4 x 10 m and 6 x 20 m bands; 20 m bands are
upsampled by nearest neighbour in every variant (what the Chipper returns).
``floor`` opens datasets once and reads each band's native window; ``upstream``
opens every asset for every chip and reads with ``out_shape`` resampling.
The OS page cache is warmed before measuring, so local figures are decode-bound.
Other processes on the machine are reported (load average) next to the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable
from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.run")

CHIP = 256
S3_BUCKET = "bench"
S3_KEY = "S3RVER"  # s3rver's default credentials


# --------------------------------------------------------------------------- workers
# Each worker runs in its own process and prints one JSON line.


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_items(paths: list[str]) -> list[Any]:
    from stacchip.utils import load_item

    return [load_item(p) for p in paths]


def _picks(n_scenes: int, n: int, seed: int, grid: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(n_scenes), rng.randrange(grid), rng.randrange(grid)) for _ in range(n)]


def w_index_ours(item: str) -> dict[str, float]:
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.utils import load_item

    it = load_item(item)
    t0 = time.perf_counter()
    table = Sentinel2Indexer(it).create_full_index()
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb(), "rows": table.num_rows}


def w_index_floor(item: str) -> dict[str, float]:
    import numpy as np
    import rasterio

    href = json.loads(Path(item).read_text())["assets"]["scl"]["href"]
    t0 = time.perf_counter()
    with rasterio.open(href) as ds:
        scl = ds.read(1)
    lut = np.zeros(256, dtype=np.uint8)
    lut[[1, 3, 8, 9, 10]] = 1
    n = scl.shape[0] // (CHIP // 2)
    m = n * (CHIP // 2)
    cloud = lut[scl[:m, :m]].reshape(n, CHIP // 2, n, CHIP // 2).sum(axis=(1, 3), dtype=np.uint32)
    nodata = (scl[:m, :m] == 0).reshape(n, CHIP // 2, n, CHIP // 2).sum(axis=(1, 3), dtype=np.uint32)
    frac = nodata / (CHIP // 2) ** 2
    kept = int((frac <= 0.5).sum())
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb(), "rows": kept, "cloud": float(cloud.mean())}


def w_index_upstream(item: str) -> dict[str, float]:
    """Upstream's approach: SCL upsampled to the 10 m shape, a loop over chips."""
    import numpy as np
    import pyproj
    import rasterio
    from rasterio.enums import Resampling
    from shapely.geometry import box
    from shapely.ops import transform

    d = json.loads(Path(item).read_text())
    href = d["assets"]["scl"]["href"]
    shape = d["assets"]["red"]["proj:shape"]
    tr = d["assets"]["red"]["proj:transform"]
    t0 = time.perf_counter()
    with rasterio.open(href) as ds:
        scl = ds.read(out_shape=(1, *shape), resampling=Resampling.nearest)[0]
    project = pyproj.Transformer.from_crs(d["properties"]["proj:epsg"], 4326, always_xy=True).transform
    rows = []
    for y in range(shape[0] // CHIP):
        for x in range(shape[1] // CHIP):
            c = scl[y * CHIP:(y + 1) * CHIP, x * CHIP:(x + 1) * CHIP]
            cloud = int(np.isin(c, [1, 3, 8, 9, 10]).sum()) / c.size
            nodata = float(np.sum(c == 0)) / c.size
            geom = transform(project, box(tr[2] + x * tr[0] * CHIP, tr[5] + (y + 1) * tr[4] * CHIP,
                                          tr[2] + (x + 1) * tr[0] * CHIP, tr[5] + y * tr[4] * CHIP)).wkt
            if nodata <= 0.5:
                rows.append((f"{d['id']}-{x}-{y}", cloud, nodata, geom))
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb(), "rows": len(rows)}


def _ours_chippers(items: list[str], threads: int | None) -> list[Any]:
    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer
    from benchmarks.scene import CHIP_BANDS

    return [Chipper(NoStatsChipIndexer(it), assets=CHIP_BANDS, threads=threads) for it in _load_items(items)]


def read_picks(chippers: list[Any], picks: Any, batch: bool) -> None:
    """Read chips ``(scene, x, y)`` one ``chip()`` at a time, or (``batch``) as a training
    loader with read-ahead does: grouped per scene, ``chips()`` reading ahead in parallel."""
    if not batch:
        for s, x, y in picks:
            chippers[s].chip(x, y)
        return
    by_scene: dict[int, list[tuple[int, int]]] = {}
    for s, x, y in picks:
        by_scene.setdefault(s, []).append((x, y))
    for s, pos in by_scene.items():
        for _ in chippers[s].chips(pos):
            pass


def w_random_ours(items: list[str], n: int, seed: int, threads: int | None = None,
                  batch: bool = False) -> dict[str, float]:
    chippers = _ours_chippers(items, threads)
    picks = _picks(len(items), n, seed, chippers[0].indexer.x_size)
    for c in chippers:  # open every dataset first, as the floor does
        c.chip(0, 0)
    t0 = time.perf_counter()
    read_picks(chippers, picks, batch)
    dt = time.perf_counter() - t0
    for c in chippers:
        c.close()
    return {"chips_per_s": n / dt, "threads": chippers[0].threads}


def _bare_read(datasets: list[Any], x: int, y: int) -> list[Any]:
    from rasterio.windows import Window

    out = []
    for ds in datasets:
        r = ds.transform.a // 10
        size = int(CHIP // r)
        a = ds.read(window=Window(x * size, y * size, size, size))
        if r > 1:
            a = a.repeat(int(r), axis=1).repeat(int(r), axis=2)
        out.append(a)
    return out


def _floor_env() -> dict[str, str]:
    from stacchip.reader import gdal_options

    opts = {k: v for k, v in gdal_options().items() if k.startswith("AWS_")}
    opts["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"
    return opts


def w_random_floor(items: list[str], n: int, seed: int, threads: int = 1) -> dict[str, float]:
    """Bare rasterio: datasets opened once per thread, bands read one after another."""
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from rasterio.env import set_gdal_config

    from benchmarks.scene import CHIP_BANDS

    for k, v in _floor_env().items():
        set_gdal_config(k, v)
    hrefs = [[it.assets[k].href for k in CHIP_BANDS] for it in _load_items(items)]
    hrefs = [[h.replace("s3://", "/vsis3/", 1) for h in row] for row in hrefs]
    local = threading.local()

    def datasets(s: int) -> list[Any]:
        cache = getattr(local, "ds", None)
        if cache is None:
            cache = local.ds = {}
        if s not in cache:
            cache[s] = [rasterio.open(h) for h in hrefs[s]]
        return cache[s]

    with rasterio.open(hrefs[0][0]) as ds:
        grid = ds.width // CHIP
    picks = _picks(len(items), n, seed, grid)
    with ThreadPoolExecutor(threads) as pool:
        # open every dataset in every thread first (not timed)
        list(pool.map(lambda s: [datasets(s) for _ in range(1)], [s for s in range(len(items)) for _ in range(threads)]))
        t0 = time.perf_counter()
        list(pool.map(lambda p: _bare_read(datasets(p[0]), p[1], p[2]), picks))
        dt = time.perf_counter() - t0
    return {"chips_per_s": n / dt, "threads": threads}


def w_random_upstream(items: list[str], n: int, seed: int) -> dict[str, float]:
    """Upstream's chipper: every asset opened for every chip, out_shape resampling."""
    import math

    import rasterio
    from rasterio.enums import Resampling
    from rasterio.env import set_gdal_config
    from rasterio.windows import Window

    from benchmarks.scene import CHIP_BANDS

    for k, v in _floor_env().items():
        set_gdal_config(k, v)
    its = _load_items(items)
    shape = its[0].assets["red"].extra_fields["proj:shape"]
    picks = _picks(len(items), n, seed, shape[1] // CHIP)
    t0 = time.perf_counter()
    for s, x, y in picks:
        for key in CHIP_BANDS:
            with rasterio.open(its[s].assets[key].href) as src:
                factor = shape[0] / src.height
                window = Window(math.floor(x * CHIP / factor), math.floor(y * CHIP / factor),
                                math.ceil(CHIP / factor), math.ceil(CHIP / factor))
                src.read(window=window, out_shape=(src.count, CHIP, CHIP), resampling=Resampling.nearest)
    return {"chips_per_s": n / (time.perf_counter() - t0)}


def w_row_ours(item: str, n: int) -> dict[str, float]:
    chipper = _ours_chippers([item], None)[0]
    grid = chipper.indexer.x_size
    positions = [(x, y) for y in range(grid) for x in range(grid)][:n]
    t0 = time.perf_counter()
    for _ in chipper.chips(positions):
        pass
    dt = time.perf_counter() - t0
    chipper.close()
    return {"chips_per_s": len(positions) / dt, "threads": chipper.threads}


def w_row_floor(item: str, n: int) -> dict[str, float]:
    import rasterio

    from benchmarks.scene import CHIP_BANDS

    it = _load_items([item])[0]
    datasets = [rasterio.open(it.assets[k].href) for k in CHIP_BANDS]
    grid = datasets[0].width // CHIP
    positions = [(x, y) for y in range(grid) for x in range(grid)][:n]
    t0 = time.perf_counter()
    for x, y in positions:
        _bare_read(datasets, x, y)
    return {"chips_per_s": len(positions) / (time.perf_counter() - t0), "threads": 1}


def w_row_upstream(item: str, n: int) -> dict[str, float]:
    import math

    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from benchmarks.scene import CHIP_BANDS

    it = _load_items([item])[0]
    shape = it.assets["red"].extra_fields["proj:shape"]
    grid = shape[1] // CHIP
    positions = [(x, y) for y in range(grid) for x in range(grid)][:n]
    t0 = time.perf_counter()
    for x, y in positions:
        for key in CHIP_BANDS:
            with rasterio.open(it.assets[key].href) as src:
                factor = shape[0] / src.height
                window = Window(math.floor(x * CHIP / factor), math.floor(y * CHIP / factor),
                                math.ceil(CHIP / factor), math.ceil(CHIP / factor))
                src.read(window=window, out_shape=(src.count, CHIP, CHIP), resampling=Resampling.nearest)
    return {"chips_per_s": len(positions) / (time.perf_counter() - t0)}


WORKERS: dict[str, Callable[..., dict[str, float]]] = {
    name[2:]: fn for name, fn in globals().items() if name.startswith("w_") and callable(fn)
}


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3rver:
    """``s3rver`` (npm) on loopback serving the scene files, hard-linked into its store."""

    def __init__(self, scene: Any, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        store = root / S3_BUCKET
        for item_path in scene.item_paths:
            folder = item_path.parent
            rel = folder.relative_to(scene.root)
            for f in folder.glob("*.tif"):
                dest = store / rel / f"{f.name}._S3rver_object"
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(f, dest)
                    except OSError:
                        shutil.copyfile(f, dest)
        binary = HERE / "node_modules" / ".bin" / "s3rver"
        if not binary.exists():
            subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=HERE, check=True)
        self.proc = subprocess.Popen(
            [str(binary), "-d", str(root), "-a", "127.0.0.1", "-p", str(self.port), "--silent",
             "--allow-mismatched-signatures", "--no-vhost-buckets"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("s3rver did not start")

    def href(self, scene_root: Path, path: str) -> str:
        return f"s3://{S3_BUCKET}/{Path(path).relative_to(scene_root)}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class DelayProxy:
    """TCP proxy on loopback delaying every client request by ``delay`` seconds.

    It counts the HTTP requests it relays (client chunks that start with a
    request line); ``counter_port`` answers every connection with that count,
    so a worker process can read it before and after what it times."""

    METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ", b"OPTIONS ")

    def __init__(self, upstream_port: int, delay: float, tls: tuple[str, str] | None = None) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        #: ``(certificate chain, key)`` PEM files: clients speak HTTPS to the proxy.
        self.tls = tls
        self.requests = 0
        self.port = _free_port()
        self.counter_port = _free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("delay proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                       count: bool = False) -> None:
            try:
                while data := await reader.read(65536):
                    if count and data.startswith(self.METHODS):
                        self.requests += 1
                    if delay:
                        await asyncio.sleep(delay)  # one chunk from the client = one request
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                cw.close()
                return
            await asyncio.gather(pipe(cr, uw, self.delay, count=True), pipe(ur, cw, 0.0))

        async def report(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(str(self.requests).encode())
            await w.drain()
            w.close()

        async def main() -> None:
            self.counter = await asyncio.start_server(report, "127.0.0.1", self.counter_port)
            context = None
            if self.tls is not None:
                import ssl

                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(*self.tls)
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port, ssl=context)
            self.ready.set()
            async with self.server:
                await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except (asyncio.CancelledError, RuntimeError):
            pass

    def stop(self) -> None:
        def _close() -> None:
            self.server.close()
            self.counter.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(_close)
        self.thread.join(timeout=10)


def proxy_requests(counter_port: int | None) -> int:
    """Requests a :class:`DelayProxy` relayed so far (``counter_port`` from its owner), or 0."""
    if not counter_port:
        return 0
    with socket.create_connection(("127.0.0.1", int(counter_port)), timeout=10) as s:
        return int(s.recv(64).decode() or 0)


# --------------------------------------------------------------------------- driver


def run_worker(name: str, env: dict[str, str] | None = None, timeout: float = 1800, **kwargs: Any) -> dict[str, float]:
    """Run one worker in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.run", "--worker", name, "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of(repeats: int, name: str, key: str, **kwargs: Any) -> dict[str, Any]:
    runs = []
    for r in range(repeats):
        kw = dict(kwargs)
        if "seed" in kw:
            kw["seed"] = kwargs["seed"] + r
        runs.append(run_worker(name, **kw))
    values = [r[key] for r in runs]
    out = {key: statistics.median(values), "runs": values}
    if "rss_mb" in runs[0] and key != "rss_mb":
        out["rss_mb"] = statistics.median(r["rss_mb"] for r in runs)
    if "threads" in runs[0]:
        out["threads"] = runs[0]["threads"]
    return out


def warm_page_cache(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(16 << 20):
                pass


def s3_items(scene: Any, server: S3rver, tmp: Path) -> list[str]:
    from benchmarks.scene import with_hrefs

    out = []
    for k, item_path in enumerate(scene.item_paths):
        item = json.loads(item_path.read_text())
        folder = item_path.parent
        s3 = with_hrefs(item, lambda key, name: server.href(scene.root, str(folder / name)))
        path = tmp / f"s3_item_{k:02d}.json"
        path.write_text(json.dumps(s3))
        out.append(str(path))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(HERE / ".cache" / "scene"), help="scene cache directory")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--quick", action="store_true", help="fewer chips per run (a smoke run)")
    parser.add_argument("--only", default="index,random,row,s3", help="sections to run")
    args = parse_with_worker(parser, argv)
    if args.worker:
        return serve_worker(WORKERS, args)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.scene import build_scene

    scene = build_scene(args.cache)
    items = [str(p) for p in scene.item_paths]
    files = sorted(p for p in Path(args.cache).rglob("*.tif"))
    logger.info("warming the page cache (%d files)", len(files))
    warm_page_cache(files)
    sections = set(args.only.split(","))
    n_rand = 60 if args.quick else 200
    n_row = 200 if args.quick else 600
    n_s3 = 40 if args.quick else 120
    R = args.repeats
    results: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    rows: list[tuple[str, str, str, str, str]] = []

    def fmt(d: dict[str, Any] | None, key: str, unit: str) -> str:
        if d is None:
            return "n/a"
        return f"{d[key]:.3g} {unit}"

    def safe(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        try:
            return fn()
        except Exception as exc:  # report and go on: one broken case is n/a, not a crash
            logger.warning("%s: %s", label, exc)
            return None

    if "index" in sections:
        logger.info("index one scene")
        res = {v: safe(f"index {v}", lambda v=v: median_of(R, f"index_{v}", "seconds", item=items[0]))
               for v in ("ours", "floor", "upstream")}
        results["index"] = res
        rows.append(("index one scene (s)", fmt(res["ours"], "seconds", "s"), fmt(res["floor"], "seconds", "s"),
                     fmt(res["upstream"], "seconds", "s"), "<= 0.35 s"))
        rows.append(("index peak RSS", fmt(res["ours"], "rss_mb", "MB"), fmt(res["floor"], "rss_mb", "MB"),
                     fmt(res["upstream"], "rss_mb", "MB"), "<= 150 MB"))
    if "random" in sections:
        for label, n_sc in (("1 scene", 1), ("16 scenes", len(items))):
            logger.info("random chips, %s", label)
            sub = items[:n_sc]
            res = {
                "ours": safe("ours", lambda: median_of(R, "random_ours", "chips_per_s", items=sub, n=n_rand, seed=1)),
                "ours_batch": safe("ours batch", lambda: median_of(R, "random_ours", "chips_per_s", items=sub,
                                                                     n=n_rand, seed=1, batch=True)),
                "floor_1": safe("floor", lambda: median_of(R, "random_floor", "chips_per_s", items=sub, n=n_rand, seed=1)),
                "floor_2": safe("floor 2", lambda: median_of(R, "random_floor", "chips_per_s", items=sub, n=n_rand,
                                                             seed=1, threads=2)),
                "upstream": safe("upstream", lambda: median_of(R, "random_upstream", "chips_per_s", items=sub,
                                                               n=max(20, n_rand // 4), seed=1)),
            }
            results[f"random_{n_sc}"] = res
            rows.append((f"random chips/s, {label}", fmt(res["ours"], "chips_per_s", ""),
                         f"{fmt(res['floor_1'], 'chips_per_s', '')} (1 thr) / {fmt(res['floor_2'], 'chips_per_s', '')} (2 thr)",
                         fmt(res["upstream"], "chips_per_s", ""), ">= 35 (16 scenes)"))
            rows.append((f"  read-ahead chips(), {label}", fmt(res["ours_batch"], "chips_per_s", ""), "", "", ""))
    if "row" in sections:
        logger.info("row-order chips")
        res = {
            "ours": safe("ours", lambda: median_of(R, "row_ours", "chips_per_s", item=items[0], n=n_row)),
            "floor": safe("floor", lambda: median_of(R, "row_floor", "chips_per_s", item=items[0], n=n_row)),
            "upstream": safe("upstream", lambda: median_of(R, "row_upstream", "chips_per_s", item=items[0],
                                                           n=max(40, n_row // 10))),
        }
        results["row"] = res
        rows.append(("row-order chips/s", fmt(res["ours"], "chips_per_s", ""), fmt(res["floor"], "chips_per_s", ""),
                     fmt(res["upstream"], "chips_per_s", ""), ">= 250"))
    if "s3" in sections:
        tmp = Path(args.cache) / ".s3"
        tmp.mkdir(parents=True, exist_ok=True)
        server = safe("s3rver", lambda: S3rver(scene, tmp / "store"))
        if server is not None:
            s3 = s3_items(scene, server, tmp)
            env_base = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_KEY,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
            try:
                # first GET of every object makes s3rver write its .md5 file: do it untimed
                run_worker("random_floor", env={**env_base, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}"},
                           items=s3, n=len(s3), seed=0, threads=16)
                for label, delay in (("direct", 0.0), ("20 ms", 0.020)):
                    proxy = DelayProxy(server.port, delay) if delay else None
                    port = proxy.port if proxy else server.port
                    env = {**env_base, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
                    logger.info("s3 random chips, %s", label)
                    res = {
                        "ours": safe("ours", lambda: median_of(R, "random_ours", "chips_per_s", env=env, items=s3,
                                                               n=n_s3, seed=3)),
                        "ours_batch": safe("ours batch", lambda: median_of(R, "random_ours", "chips_per_s", env=env,
                                                                           items=s3, n=n_s3, seed=3, batch=True)),
                        "floor_16": safe("floor", lambda: median_of(R, "random_floor", "chips_per_s", env=env,
                                                                    items=s3, n=n_s3, seed=3, threads=16)),
                        "floor_1": safe("floor 1", lambda: median_of(R, "random_floor", "chips_per_s", env=env,
                                                                     items=s3, n=max(20, n_s3 // 3), seed=3)),
                        "upstream": safe("upstream", lambda: median_of(R, "random_upstream", "chips_per_s", env=env,
                                                                       items=s3, n=max(10, n_s3 // 6), seed=3)),
                    }
                    if proxy:
                        proxy.stop()
                    results[f"s3_{label}"] = res
                    rows.append((f"S3 random chips/s, {label}", fmt(res["ours"], "chips_per_s", ""),
                                 f"{fmt(res['floor_16'], 'chips_per_s', '')} (16 thr) / {fmt(res['floor_1'], 'chips_per_s', '')} (1 thr)",
                                 fmt(res["upstream"], "chips_per_s", ""), ">= 7x upstream (20 ms)"))
                    rows.append((f"  read-ahead chips(), S3 {label}", fmt(res["ours_batch"], "chips_per_s", ""), "", "", ""))
            finally:
                server.stop()
    results["load_average_after"] = os.getloadavg()
    widths = [max(len(r[i]) for r in rows + [("case", "stacchip", "floor (same run)", "upstream approach", "target")])
              for i in range(5)]
    header = ("case", "stacchip", "floor (same run)", "upstream approach", "target")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"load average before/after: {results['load_average_before']} / {results['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
