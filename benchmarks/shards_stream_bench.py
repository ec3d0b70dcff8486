"""WebDataset shards streamed from an S3 server on loopback into a DataLoader, next to reading
the same bytes with obstore and decoding them, in one run.

``python -m benchmarks.shards_stream_bench [--shards 8] [--quick] [--workers 2]``

Shards: ``stacchip-prechip --format webdataset`` (global mode, 128 chips of 10 bands
per shard, ISA-L gzip level 1) from the Earth-Search-shaped scenes of
:mod:`benchmarks.scene`, uploaded to moto's S3 server on 127.0.0.1.

Cases, each in a fresh process:

* **webdataset**: ``DataLoader(wds.WebDataset(urls).decode(), num_workers=--workers)``
  over the presigned URLs :func:`stacchip.ml.shards.shard_urls` gives (``webdataset``
  streams them with ``curl``; shards split by worker), every sample's ``.npy``,
  ``.mask.npy`` and ``.json`` decoded into arrays and a dict;
* **floor**: the same shards read whole with ``obstore`` (one store, ``get`` per shard,
  the next shard fetched while one is decoded) and decoded the same way (``tarfile`` over the gzip stream, ``np.load``,
  ``json.loads``) in ``--workers`` processes (started, their imports done, before
  the clock), each its share of the shards.

Both count samples and pixel bytes (they must agree). Each case runs ``--repeat``
times, interleaved with the other; the fastest run of each is reported. Ratio = floor
time / case time.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.shards_stream_bench")
PLATFORM = "sentinel-2-l2a"
BUCKET = "shards-bench"


def _decode_tar(data: bytes) -> tuple[int, int]:
    """Samples and pixel bytes of one shard, decoded as webdataset's default decoders do."""
    import numpy as np

    samples = pixel_bytes = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        for member in tar:
            payload = tar.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".json"):
                json.loads(payload)
                samples += 1
            elif member.name.endswith(".npy"):
                array = np.load(io.BytesIO(payload), allow_pickle=False)
                if not member.name.endswith(".mask.npy"):
                    pixel_bytes += array.nbytes
    return samples, pixel_bytes


def _floor_share(args: tuple[str, list[str]]) -> tuple[int, int, int, float, float]:
    endpoint, keys = args
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, region="us-east-1", skip_signature=False,
                    access_key_id="bench", secret_access_key="bench",
                    client_options={"allow_http": True})
    samples = pixels = read = 0
    get_s = decode_s = 0.0

    def fetch(key: str) -> tuple[bytes, float]:
        t0 = time.perf_counter()
        return obstore.get(store, key).bytes().to_bytes(), time.perf_counter() - t0

    with ThreadPoolExecutor(1) as ahead:  # the next shard is fetched while this one is decoded
        pending = ahead.submit(fetch, keys[0]) if keys else None
        for k in range(len(keys)):
            assert pending is not None  # noqa: S101
            data, took = pending.result()
            pending = ahead.submit(fetch, keys[k + 1]) if k + 1 < len(keys) else None
            t1 = time.perf_counter()
            s, p = _decode_tar(data)
            get_s += took
            decode_s += time.perf_counter() - t1
            read += len(data)
            samples += s
            pixels += p
    return samples, pixels, read, get_s, decode_s


def _warm(_: int) -> int:
    import numpy  # noqa: F401
    import obstore  # noqa: F401

    return os.getpid()


def w_floor(endpoint: str, keys: list[str], workers: int) -> dict[str, Any]:
    import multiprocessing

    shares = [(endpoint, keys[w::workers]) for w in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_warm, range(workers))  # workers started and their imports done before the clock
        t0 = time.perf_counter()
        parts = pool.map(_floor_share, shares, chunksize=1)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples": sum(p[0] for p in parts), "pixel_bytes": sum(p[1] for p in parts),
            "bytes": sum(p[2] for p in parts), "get_s": [p[3] for p in parts], "decode_s": [p[4] for p in parts]}


def _count(sample: dict[str, Any]) -> tuple[int, int]:
    return 1, int(sample["npy"].nbytes)


def w_webdataset(urls: list[str], workers: int) -> dict[str, Any]:
    import webdataset as wds
    from torch.utils.data import DataLoader

    dataset = wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker,
                             nodesplitter=wds.single_node_only, empty_check=False).decode().map(_count)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    t0 = time.perf_counter()
    samples = pixels = 0
    for n, b in loader:
        samples += int(n)
        pixels += int(b)
    return {"seconds": time.perf_counter() - t0, "samples": samples, "pixel_bytes": pixels}


WORKERS = {"floor": w_floor, "webdataset": w_webdataset}


def run_worker(name: str, env: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.shards_stream_bench", "--worker", name,
           "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=HERE.parent, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _start_moto(logdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = open(logdir / "moto.log", "wb")  # noqa: SIM115 - closed with the server
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while True:
        try:
            opener.open(endpoint + "/moto-api/", timeout=2).read()
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=HERE / ".cache" / "prechip", help="scene/index cache")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs of each case, interleaved; the fastest is reported")
    p.add_argument("--quick", action="store_true", help="small scenes (2640² px)")
    p.add_argument("--json", type=Path)
    args = parse_with_worker(p, argv)
    if args.worker:
        return serve_worker(WORKERS, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from benchmarks.prechip_bench import prepare_data
    from benchmarks.scene import SceneSpec
    from stacchip import storage
    from stacchip.ml.shards import shard_urls
    from stacchip.processors import prechip

    size = 2640 if args.quick else 10980
    cache = args.cache.with_name(args.cache.name + "-quick") if args.quick else args.cache
    data, index, _ = prepare_data(cache, SceneSpec(size10=size, copies=8, with_60m=False))
    with tempfile.TemporaryDirectory(prefix="shards-stream-", dir=cache) as tmp:
        out = Path(tmp) / "shards"
        cfg = prechip.PrechipConfig(data=str(data), index=str(index), output=str(out), platform=PLATFORM,
                                    format="webdataset", cubes_per_job=args.shards)
        t0 = time.perf_counter()
        written = prechip.run_job(0, cfg, workers=2)
        logger.info("%d shards written in %.0f s", len(written), time.perf_counter() - t0)
        server, endpoint = _start_moto(Path(tmp))
        saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                                 "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "NO_PROXY")}
        try:  # (from here on the server is stopped whatever happens)
            os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
                               "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost"})
            storage.reset()
            storage.s3_client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
            chips = f"s3://{BUCKET}/chips"
            folder = Path(prechip.manifest_url(str(out), PLATFORM)).parent
            for path in sorted(folder.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    storage.copy(str(path), f"{chips}/{prechip.VERSION}/{PLATFORM}/{path.name}")
            urls = shard_urls(chips, PLATFORM, allow_missing=True)  # (only task 0's shards were made)
            keys = [f"chips/{prechip.VERSION}/{PLATFORM}/{Path(u).name}" for u in written]
            size_bytes = sum(Path(u).stat().st_size for u in written)
            env = dict(os.environ)
            runs: dict[str, list[dict[str, Any]]] = {"webdataset": [], "floor": []}
            for _ in range(max(1, args.repeat)):  # interleaved: both see the same machine load
                runs["webdataset"].append(run_worker("webdataset", env, urls=urls, workers=args.workers))
                runs["floor"].append(run_worker("floor", env, endpoint=endpoint, keys=keys, workers=args.workers))
            wds_r = min(runs["webdataset"], key=lambda r: r["seconds"])
            floor = min(runs["floor"], key=lambda r: r["seconds"])
        finally:
            server.terminate()
            server.wait(30)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage.reset()
    if (wds_r["samples"], wds_r["pixel_bytes"]) != (floor["samples"], floor["pixel_bytes"]):
        raise RuntimeError(f"the two readers disagree: {wds_r} vs {floor}")
    result = {"shards": len(written), "bytes": size_bytes, "samples": floor["samples"], "webdataset": wds_r,
              "floor": floor, "runs": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
              "ratio": floor["seconds"] / wds_r["seconds"], "load": os.getloadavg()}
    mb = size_bytes / 1e6
    print(f"{len(written)} shards, {mb:.0f} MB (gzip), {floor['samples']} samples, {args.workers} workers, "
          f"moto S3 on loopback; load average {result['load'][0]:.1f}")
    print(f"{'case':<12} {'seconds':>8} {'samples/s':>10} {'MB/s (file)':>12}")
    for name, r in (("webdataset", wds_r), ("floor", floor)):
        print(f"{name:<12} {r['seconds']:>8.1f} {r['samples'] / r['seconds']:>10.1f} {mb / r['seconds']:>12.1f}")
    print(f"ratio (floor time / webdataset time): {result['ratio']:.2f}x; all runs (s): {result['runs']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
