"""Bulk indexing throughput: a stac-geoparquet catalog on a loopback S3 server, indexed by
``stacchip.catalog.bulk`` at the items' own ``s3://`` hrefs.

``python -m benchmarks.bulk_bench`` (``--items 30 --size 1098 --workers 1,2``):

1. builds one Earth-Search-shaped Sentinel-2 scene scaled down to ``--size`` 10 m pixels
   (``benchmarks.scene``: structured pixels, clouds, a nodata corner, DEFLATE +
   predictor 2 COGs, no 60 m bands) into a temp dir (or ``--cache``);
2. starts moto's standalone S3 server (``python -m moto.server``) on 127.0.0.1, uploads
   the scene's bands once and one SCL object per item (``scenes/{item_id}/SCL.tif``:
   every item reads its own key, so nothing is served from GDAL's caches of another);
3. writes the ``--items`` items as one stac-geoparquet file (``stac-geoparquet``, the
   test extra) and uploads it to ``s3://bench/catalog/items.parquet``;
4. runs, each in a fresh interpreter: a bare floor (rasterio opening and reading each
   item's SCL over ``/vsis3/``, nothing else), then for each ``--workers`` value a bulk
   run into an empty ``s3://bench/out-w{N}`` and a re-run over it (every item skipped
   after its index is read back and verified).

It prints items/s of each run and the mean time per item split into **metadata** (item
parse, indexer choice, grid, chip table), **QA read** (opening and block-reducing the SCL
band over S3) and **write** (GeoParquet encoding and the PUT), next to the source read
(GET + decoding every stac-geoparquet row to an item) and the floor. The machine's load
average is printed with them: figures from a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent
BUCKET = "bench"
CATALOG_KEY = "catalog/items.parquet"

logger = logging.getLogger("benchmarks.bulk_bench")


# --- workers (each in its own interpreter, printing one JSON line) -------------------------------


def w_bulk(source: str, out: str, workers: int) -> dict[str, Any]:
    from stacchip.catalog import bulk

    t0 = time.perf_counter()
    records = list(bulk.read_source(source))
    t1 = time.perf_counter()
    list(bulk.read_source(source))  # again, imports done and the S3 client made: GET + row decoding
    warm = time.perf_counter() - t1
    share = bulk.select(records, None, 1)
    summary = bulk.run(share, bulk.Settings(out=out), workers=workers, progress=False)
    return {
        "items": len(share),
        "indexed": summary.count("indexed"),
        "skipped": summary.count("skipped"),
        "failed": len(summary.failed),
        "errors": [o.error for o in summary.failed][:3],
        "chips": summary.chips,
        "source_s": t1 - t0,
        "source_warm_s": warm,
        "run_s": summary.seconds,
        "items_per_s": len(share) / summary.seconds if summary.seconds else 0.0,
        "per_item_s": summary.mean_times(),
        "check_s": (sum(o.times.get("check", 0.0) for o in summary.outcomes) / len(share)) if share else 0.0,
    }


def w_floor(hrefs: list[str]) -> dict[str, Any]:
    import rasterio

    from stacchip.reader import gdal_env, resolve_href

    times = []
    with gdal_env():
        for href in hrefs:
            t0 = time.perf_counter()
            with rasterio.open(resolve_href(href)) as ds:
                ds.read(1)
            times.append(time.perf_counter() - t0)
    return {"items": len(hrefs), "per_item_s": sum(times) / len(times), "items_per_s": len(times) / sum(times)}


WORKERS = {"bulk": w_bulk, "floor": w_floor}


def run_worker(name: str, env: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.bulk_bench", "--worker", name, "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the S3 server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """moto's standalone S3 server on 127.0.0.1 (as tests/services.py starts it)."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(logdir / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with opener.open(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start (log: {logdir / 'moto.log'})")

    def env(self) -> dict[str, str]:
        no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY"), "127.0.0.1", "localhost") if p)
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": no_proxy, "no_proxy": no_proxy,
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


# --- the catalog -----------------------------------------------------------------------------------


def build_catalog(scene_dir: Path, size: int, n_items: int, client: Any, tmp: Path) -> tuple[list[dict[str, Any]], float]:
    """Upload the scene's bands, one SCL per item and the stac-geoparquet catalog; the items
    and the scene build seconds."""
    import stac_geoparquet.arrow as sga

    from benchmarks.scene import SceneSpec, build_scene

    t0 = time.perf_counter()
    scene = build_scene(scene_dir, SceneSpec(size10=size, blocksize=256, with_60m=False, copies=1))
    built = time.perf_counter() - t0
    base = scene.item(0)
    folder = scene.item_paths[0].parent
    client.create_bucket(Bucket=BUCKET)
    for asset in base["assets"].values():
        name = Path(asset["href"]).name
        if name != "SCL.tif":
            client.upload_file(str(folder / name), BUCKET, f"base/{name}")
    items = []
    for k in range(n_items):
        item = json.loads(json.dumps(base))
        item["id"] = f"S2A_BENCH_{k:03d}"
        item["collection"] = "sentinel-2-c1-l2a"
        item["properties"]["datetime"] = f"2024-{k % 12 + 1:02d}-{k % 28 + 1:02d}T14:06:36Z"
        for key, asset in item["assets"].items():
            name = Path(asset["href"]).name
            if key == "scl":
                client.upload_file(str(folder / name), BUCKET, f"scenes/{item['id']}/{name}")
                asset["href"] = f"s3://{BUCKET}/scenes/{item['id']}/{name}"
            else:
                asset["href"] = f"s3://{BUCKET}/base/{name}"
        items.append(item)
    path = tmp / "items.parquet"
    sga.to_parquet(sga.parse_stac_items_to_arrow(items), path)
    client.upload_file(str(path), BUCKET, CATALOG_KEY)
    return items, built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=30, help="items in the catalog (default 30)")
    parser.add_argument("--size", type=int, default=1098,
                        help="10 m band side in pixels, a multiple of 6 (default 1098: a tenth of a scene)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run (default 1,2)")
    parser.add_argument("--cache", default=None, help="scene cache directory (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parse_with_worker(parser, argv)
    if args.worker:
        return serve_worker(WORKERS, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "rasterio", "stac_geoparquet"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="stacchip-bulk-bench-") as tmp_text:
        tmp = Path(tmp_text)
        server = MotoServer(tmp)
        try:
            env = {**os.environ, **server.env()}
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
            import boto3

            client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                                  aws_access_key_id="bench", aws_secret_access_key="bench")
            scene_dir = Path(args.cache) if args.cache else tmp / "scene"
            items, built = build_catalog(scene_dir, args.size, args.items, client, tmp)
            source = f"s3://{BUCKET}/{CATALOG_KEY}"
            results: dict[str, Any] = {
                "items": args.items, "size10": args.size, "scene_build_s": built,
                "load_avg": os.getloadavg(), "cpus": os.cpu_count(),
            }
            results["floor"] = run_worker("floor", env, hrefs=[i["assets"]["scl"]["href"] for i in items])
            for n in workers:
                out = f"s3://{BUCKET}/out-w{n}"
                results[f"bulk_w{n}"] = run_worker("bulk", env, source=source, out=out, workers=n)
                results[f"rerun_w{n}"] = run_worker("bulk", env, source=source, out=out, workers=n)
        finally:
            server.stop()
    report(results, workers)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def report(results: dict[str, Any], workers: list[int]) -> None:
    floor = results["floor"]
    print(f"bulk indexing: {results['items']} Sentinel-2-shaped items ({results['size10']} px 10 m bands), "
          f"stac-geoparquet and COGs on moto S3 (loopback); {results['cpus']} CPUs, load average "
          + " ".join(f"{v:.2f}" for v in results["load_avg"]))
    print(f"  floor: bare rasterio open + read of each SCL over /vsis3/: {floor['items_per_s']:.1f} items/s "
          f"({floor['per_item_s'] * 1000:.0f} ms per item)")
    for n in workers:
        r, again = results[f"bulk_w{n}"], results[f"rerun_w{n}"]
        t = r["per_item_s"]
        print(f"  workers={n}: {r['items_per_s']:.2f} items/s ({r['indexed']} indexed, {r['chips']} chips, "
              f"{r['failed']} failed, {r['run_s']:.1f} s after reading the catalog in {r['source_s'] * 1000:.0f} ms, "
              f"{r['source_warm_s'] * 1000:.0f} ms warm); "
              f"per item: metadata {t['metadata'] * 1000:.0f} ms, QA read {t['qa'] * 1000:.0f} ms, "
              f"write {t['write'] * 1000:.0f} ms (+ {t['check'] * 1000:.0f} ms looking for an index first)")
        print(f"     re-run: {again['items_per_s']:.2f} items/s ({again['skipped']} verified and skipped, "
              f"{again['check_s'] * 1000:.0f} ms check per item)")
        if r["failed"]:
            print(f"     failures: {r['errors']}")


if __name__ == "__main__":
    sys.exit(main())
