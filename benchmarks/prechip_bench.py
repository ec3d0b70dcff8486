"""Cubes per minute of ``stacchip-prechip``, next to upstream's approach, in one run.

Scenes: the Earth-Search-shaped Sentinel-2 scene of :mod:`benchmarks.scene`
(10980² 10 m and 5490² 20 m bands, 1024 px tiles, DEFLATE + predictor 2), in
``--copies`` copies under distinct paths, indexed with ``Sentinel2Indexer``.

Measured on the same cubes (same index, filters, seed and cube members):

* **ours**: :func:`stacchip.processors.prechip.make_cubes`: chips grouped by
  item, row order inside an item, one chipper (open datasets) per item per
  worker, a process pool kept for the run.
* **upstream approach**: for every chip, in the cube's random order, the item
  JSON is read again, a new indexer and chipper are made (so every asset is
  opened again) and the chip read; a new pool of ``--workers`` processes per
  cube, as upstream's ``process()`` did (``Pool(pool_size).starmap`` per cube).

Sources: local files, and the same files over the S3 protocol from s3rver on
127.0.0.1 (Node package in ``benchmarks/node_modules``; ``npm ci`` in
``benchmarks/`` installs it). Without node/s3rver the S3 rows are skipped and
the report says so.

Run: ``python -m benchmarks.prechip_bench [--quick] [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.scene import SceneSpec, build_scene
from stacchip import storage
from stacchip.chipper import Chipper
from stacchip.index import write_index
from stacchip.indexer import ChipIndexer, Sentinel2Indexer
from stacchip.processors import prechip
from stacchip.processors.bands import S2_BANDS
from stacchip.utils import item_key, load_item

logger = logging.getLogger("benchmarks.prechip")

PLATFORM = "sentinel-2-l2a"
HERE = Path(__file__).resolve().parent
S3RVER = HERE / "node_modules" / "s3rver" / "bin" / "s3rver.js"
BUCKET = "prechip-bench"


# --- the upstream approach (per-chip open, random order, pool per cube) ------------------------


def upstream_get_chip(data: str, item_id: str, x: int, y: int, chip_size: int) -> np.ndarray:
    """One chip the way upstream's ``get_chip`` did it: item JSON, indexer, chipper, read."""
    item = load_item(storage.join(data, item_key(PLATFORM, item_id)))
    chipper = Chipper(ChipIndexer(item, chip_size=chip_size), assets=S2_BANDS)
    try:
        chip = chipper.chip(x, y)
    finally:
        chipper.close()
    return np.vstack([chip[b] for b in S2_BANDS])


def upstream_cubes(config: prechip.PrechipConfig, selection: prechip.Selection, ids: list[int],
                   workers: int, output: str) -> None:
    """Make cubes ``ids`` the upstream way, writing to ``output``."""
    ctx = multiprocessing.get_context("spawn")
    for k in ids:
        rows = selection.table.take(prechip.cube_members(selection, k, config.cube_size))
        args = [
            (config.data, item_id, int(x), int(y), int(size))
            for item_id, x, y, size in zip(
                rows.column("item_id").to_pylist(), rows.column("chip_index_x").to_pylist(),
                rows.column("chip_index_y").to_pylist(), rows.column("chip_size").to_pylist(),
            )
        ]
        with ctx.Pool(workers) as pool:
            chips = pool.starmap(upstream_get_chip, args)
        pixels = np.stack(chips).astype(np.float32)
        mask = np.zeros(pixels.shape, dtype=bool)
        arrays = prechip.cube_arrays(rows, pixels, mask, S2_BANDS)
        sink = io.BytesIO()
        np.savez_compressed(sink, **arrays)  # upstream's writer (zlib level 6)
        storage.write_bytes(prechip.cube_url(output, PLATFORM, k), sink.getvalue())


# --- scenes, index, S3 server ---------------------------------------------------------------------


def prepare_data(cache: Path, spec: SceneSpec) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Bucket layout (``{platform}/{id}/stac_item.json``) and one index file per item."""
    scene = build_scene(cache / "scene", spec)
    data = cache / "data"
    index = cache / "index"
    items = []
    for k in range(spec.copies):
        item = scene.item(k)
        item["collection"] = PLATFORM
        folder = data / PLATFORM / item["id"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "stac_item.json").write_text(json.dumps(item))
        target = index / PLATFORM / item["id"] / f"index_{item['id']}.parquet"
        if not target.exists():
            t0 = time.perf_counter()
            table = Sentinel2Indexer(item, chip_size=256, chip_max_nodata=1.0, platform=PLATFORM).create_full_index()
            write_index(table, target)
            logger.info("indexed %s: %d chips in %.1f s", item["id"], table.num_rows, time.perf_counter() - t0)
        items.append(item)
    return data, index, items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3rver:
    """s3rver on 127.0.0.1 in a subprocess, stopped by :meth:`stop`."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        self.log = open(directory.parent / "s3rver.log", "wb")
        self.proc = subprocess.Popen(
            ["node", str(S3RVER), "-d", str(directory), "-a", "127.0.0.1", "-p", str(self.port), "--silent",
             "--allow-mismatched-signatures", "--no-vhost-buckets", "--configure-bucket", BUCKET],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:
            try:
                opener.open(self.endpoint + "/", timeout=2).read()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("s3rver did not start") from None
                time.sleep(0.2)

    def environ(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def upload(items: list[dict[str, Any]], data: Path, index: Path) -> None:
    """Scenes (hrefs rewritten to s3://), items and index files into the bucket."""
    from boto3.s3.transfer import TransferConfig

    client = storage.s3_client()
    config = TransferConfig(multipart_threshold=64 * 1024**2, max_concurrency=4)
    for item in items:
        moved = json.loads(json.dumps(item))
        for asset in moved["assets"].values():
            key = f"{PLATFORM}/{item['id']}/{Path(asset['href']).name}"
            client.upload_file(asset["href"], BUCKET, key, Config=config)  # type: ignore[attr-defined]
            asset["href"] = f"s3://{BUCKET}/{key}"
        storage.write_bytes(f"s3://{BUCKET}/{item_key(PLATFORM, item['id'])}", json.dumps(moved).encode())
    for path in index.rglob("*.parquet"):
        storage.write_bytes(f"s3://{BUCKET}/index/{path.relative_to(index).as_posix()}", path.read_bytes())


# --- measuring ------------------------------------------------------------------------------------------


def warm_page_cache(items: list[dict[str, Any]]) -> float:
    """Read every scene file once, so no approach pays for a cold OS page cache; returns seconds."""
    t0 = time.perf_counter()
    seen = set()
    for item in items:
        for asset in item["assets"].values():
            path = Path(asset["href"])
            key = path.stat().st_ino
            if key in seen:
                continue
            seen.add(key)
            with open(path, "rb") as fh:
                while fh.read(16 * 1024**2):
                    pass
    return time.perf_counter() - t0


def measure(label: str, config: prechip.PrechipConfig, ids: list[int], workers: int, out: str) -> dict[str, Any]:
    selection = prechip.prepare(config)
    ours_cfg = prechip.PrechipConfig(**{**config.__dict__, "output": storage.join(out, "ours")})
    t0 = time.perf_counter()
    written = prechip.make_cubes(ours_cfg, ids, workers=workers, selection=selection)
    ours = time.perf_counter() - t0
    # ours with upstream's compression level, to separate reading from compressing
    l6_cfg = prechip.PrechipConfig(**{**config.__dict__, "output": storage.join(out, "ours6"), "compress_level": 6})
    t0 = time.perf_counter()
    prechip.make_cubes(l6_cfg, ids, workers=workers, selection=selection)
    ours6 = time.perf_counter() - t0
    t0 = time.perf_counter()
    upstream_cubes(config, selection, ids, workers, storage.join(out, "upstream"))
    upstream = time.perf_counter() - t0
    # same pixels either way
    for k in ids[:1]:
        a = np.load(io.BytesIO(storage.read_bytes(prechip.cube_url(storage.join(out, "ours"), PLATFORM, k))))
        b = np.load(io.BytesIO(storage.read_bytes(prechip.cube_url(storage.join(out, "upstream"), PLATFORM, k))))
        if not np.array_equal(a["pixels"], b["pixels"]):
            raise RuntimeError(f"{label}: cube {k} differs between the two approaches")
    n = len(written)
    chips = n * config.cube_size
    return {
        "source": label, "cubes": n, "chips": chips, "workers": workers,
        "ours_s": round(ours, 2), "ours_level6_s": round(ours6, 2), "upstream_s": round(upstream, 2),
        "ours_cubes_per_min": round(60 * n / ours, 2), "ours_level6_cubes_per_min": round(60 * n / ours6, 2),
        "upstream_cubes_per_min": round(60 * n / upstream, 2),
        "ours_chips_per_s": round(chips / ours, 1), "upstream_chips_per_s": round(chips / upstream, 1),
        "speedup": round(upstream / ours, 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=HERE / ".cache" / "prechip", help="scene/index cache")
    p.add_argument("--size", type=int, default=10980, help="10 m band side in pixels (multiple of 6)")
    p.add_argument("--copies", type=int, default=4, help="scenes (items) in the bucket")
    p.add_argument("--cubes", type=int, default=4, help="cubes to make per approach and source")
    p.add_argument("--cube-size", type=int, default=prechip.CUBESIZE, help="chips per cube")
    p.add_argument("--workers", type=int, default=2, help="processes (STACCHIP_POOL_SIZE)")
    p.add_argument("--no-s3", action="store_true", help="local files only")
    p.add_argument("--quick", action="store_true", help="small scene, 2 copies, 2 cubes of 32 chips")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "stacchip.processors.prechip"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a.quick:
        a.size, a.copies, a.cubes, a.cube_size = 2640, 2, 2, 32
    spec = SceneSpec(size10=a.size, copies=a.copies, with_60m=False)
    cache = a.cache if not a.quick else a.cache.with_name(a.cache.name + "-quick")
    data, index, items = prepare_data(cache, spec)
    ids = list(range(a.cubes))
    results = []
    notes = []
    with tempfile.TemporaryDirectory(prefix="prechip-bench-") as tmp:
        config = prechip.PrechipConfig(data=str(data), index=str(index), output=tmp, platform=PLATFORM,
                                       cube_size=a.cube_size)
        sel = prechip.prepare(config)
        if sel.n_cubes < a.cubes:
            raise SystemExit(f"the index makes only {sel.n_cubes} cubes; lower --cubes or raise --copies")
        logger.info("%d chips pass the filters; %d cubes of %d", sel.table.num_rows, sel.n_cubes, a.cube_size)
        logger.info("page cache warmed in %.1f s", warm_page_cache(items))
        results.append(measure("local", config, ids, a.workers, tmp))
        if a.no_s3:
            notes.append("S3 skipped (--no-s3)")
        elif shutil.which("node") is None or not S3RVER.exists():
            notes.append("S3 skipped: node or benchmarks/node_modules/s3rver missing (npm ci in benchmarks/)")
        else:
            server = S3rver(Path(tmp) / "s3rver")
            saved = {k: os.environ.get(k) for k in server.environ()}
            os.environ.update(server.environ())
            storage.reset()
            try:
                t0 = time.perf_counter()
                upload(items, data, index)
                logger.info("uploaded to s3rver in %.1f s", time.perf_counter() - t0)
                s3_config = prechip.PrechipConfig(data=f"s3://{BUCKET}", index=f"s3://{BUCKET}/index/",
                                                  output=f"s3://{BUCKET}/cubes", platform=PLATFORM,
                                                  cube_size=a.cube_size)
                results.append(measure("s3 (s3rver)", s3_config, ids, a.workers, f"s3://{BUCKET}/cubes"))
            finally:
                server.stop()
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                storage.reset()
    header = (f"{'source':<12} {'cubes':>5} {'chips':>6} {'ours cubes/min':>15} {'ours zlib-6':>12} "
              f"{'upstream cubes/min':>19} {'speedup':>8}")
    print(f"scene {a.size}² px x {a.copies} items, {a.cube_size} chips/cube, {a.workers} workers, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(header)
    for r in results:
        print(f"{r['source']:<12} {r['cubes']:>5} {r['chips']:>6} {r['ours_cubes_per_min']:>15} "
              f"{r['ours_level6_cubes_per_min']:>12} {r['upstream_cubes_per_min']:>19} {r['speedup']:>7}x")
    for note in notes:
        print(note)
    if a.json:
        a.json.write_text(json.dumps({"results": results, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
