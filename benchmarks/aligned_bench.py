"""Random chips from chip-aligned scenes against the source layout, same run.

``python -m benchmarks.aligned_bench [--cache DIR] [--chips 60] [--repeats 3] [--json FILE]``

1. Builds (once, ``benchmarks.scene``) the Earth-Search-shaped Sentinel-2 scene:
   10980² 10 m and 5490² 20 m bands in 1024 px DEFLATE + predictor 2 tiles (~7 ms
   to decode a 10 m tile here), 16 copies under distinct paths.
2. Publishes copy 0 with the processors' ``aligned`` layout
   (:class:`stacchip.processors.publish.Publisher` with an
   :class:`~stacchip.processors.layout.AlignedLayout`, chip size 256: 256 px tiles
   at 10 m, 128 px at 20 m, 48 px at 60 m, ZSTD level 9) in a fresh process (its
   seconds and peak RSS are reported), then hard-links the files into 16 copies
   under distinct paths, as the source scene has.
3. Draws ``--chips`` indexed chips (nodata at most 50 %) over the 16 copies so
   that no two chips of one copy share a tile of any band in either layout (the
   source's 20 m tiles cover 8 x 8 chips), and reads them with the Chipper
   (10 bands: 4 x 10 m, 6 x 20 m) from each layout, each run in a fresh process
   whose datasets are opened before the clock starts by a chip outside every
   drawn tile. Layouts alternate run by run; the median of ``--repeats`` is
   reported with the CPU time per chip (less sensitive to a shared machine than
   wall time).
4. Checks the chips are identical between the layouts, and every band's pixels
   file against file, and reports both layouts' storage size.

The OS page cache is warm (every file was just read), so reads are decode-bound,
as in ``benchmarks.run``. Load averages before and after are printed: on a shared
machine they say how much the figures can be trusted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from benchmarks.common import parse_with_worker, serve_worker

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.aligned_bench")

CHIP = 256
#: Chips per side of one source tile of the coarsest chipped band (20 m, 1024 px = 2048 fine px).
SOURCE_TILE_CHIPS = 8
ALIGNED_DIR = "aligned"


# --------------------------------------------------------------------------- workers


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def w_write(item: str, root: str) -> dict[str, Any]:
    """Publish one scene in the aligned layout (what ``--layout aligned`` does per item)."""
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.processors.layout import AlignedLayout
    from stacchip.processors.publish import Bucket, CopyAsset, Publisher
    from stacchip.utils import load_item

    from benchmarks.scene import PLATFORM

    it = load_item(item)
    plan = {key: CopyAsset([a.href], Path(a.href).name) for key, a in it.assets.items()}
    t0, c0 = time.perf_counter(), _cpu_s()
    outcome = Publisher(Bucket(root), "bench/0", layout=AlignedLayout(chip_size=CHIP)).publish(
        it, PLATFORM, plan, lambda i: Sentinel2Indexer(i, chip_size=CHIP)
    )
    if outcome.status != "done":
        raise RuntimeError(f"aligned publish: {outcome.as_dict()}")
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "rss_mb": _rss_mb(),
            "bands": len(plan)}


def w_read(items: list[str], picks: list[list[int]], warm: list[int], threads: int | None) -> dict[str, Any]:
    """Read ``picks`` ([copy, x, y]) with one Chipper per copy; datasets opened first by chip ``warm``."""
    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer
    from stacchip.utils import load_item

    from benchmarks.scene import CHIP_BANDS

    chippers = [Chipper(NoStatsChipIndexer(load_item(p), chip_size=CHIP), assets=CHIP_BANDS, threads=threads)
                for p in items]
    for c in chippers:
        c.chip(*warm)
    t0, c0 = time.perf_counter(), _cpu_s()
    for s, x, y in picks:
        chippers[s].chip(x, y)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    threads_used = chippers[0].threads
    for c in chippers:
        c.close()
    return {"chips_per_s": len(picks) / wall, "cpu_ms_per_chip": 1000 * cpu / len(picks),
            "seconds": wall, "threads": threads_used}


WORKERS = {"write": w_write, "read": w_read}


def run_worker(name: str, timeout: float = 3600, **kwargs: Any) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.aligned_bench", "--worker", name,
           "--args", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def aligned_scene(scene: Any, cache: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Item paths of the aligned copies (written on first use: the write's figures, else None)."""
    from benchmarks.scene import PLATFORM, with_hrefs

    root = cache / ALIGNED_DIR
    ids = scene.item_ids
    first = root / PLATFORM / ids[0]
    write = None
    if not (root / "index" / PLATFORM / ids[0] / f"index_{ids[0]}.parquet").exists():
        logger.info("writing the aligned copy of %s", ids[0])
        write = run_worker("write", item=str(scene.item_paths[0]), root=str(root))
    base = json.loads((first / "stac_item.json").read_text())
    paths = [first / "stac_item.json"]
    for item_id in ids[1:]:
        folder = root / PLATFORM / item_id
        folder.mkdir(parents=True, exist_ok=True)
        for f in first.glob("*.tif"):
            if not (folder / f.name).exists():
                try:
                    os.link(f, folder / f.name)
                except OSError:
                    import shutil

                    shutil.copyfile(f, folder / f.name)
        item = with_hrefs(base, lambda key, name, folder=folder: str(folder / name))
        item["id"] = item_id
        (folder / "stac_item.json").write_text(json.dumps(item))
        paths.append(folder / "stac_item.json")
    return [str(p) for p in paths], write


def draw_chips(item_path: str, copies: int, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """``n`` picks ``[copy, x, y]`` of indexed chips, no two of one copy in one source tile of any band,
    none in the tile of the returned warm-up chip (the last chip of the index)."""
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.utils import load_item

    xs, ys = Sentinel2Indexer(load_item(item_path), chip_size=CHIP).kept_chips
    kept = list(zip(xs.tolist(), ys.tolist()))
    warm = max(kept, key=lambda p: (p[1], p[0]))
    warm_tile = (warm[0] // SOURCE_TILE_CHIPS, warm[1] // SOURCE_TILE_CHIPS)
    rng = random.Random(seed)
    candidates = [(s, x, y) for s in range(copies) for x, y in kept]
    rng.shuffle(candidates)
    used: set[tuple[int, int, int]] = set()
    picks: list[list[int]] = []
    for s, x, y in candidates:
        tile = (x // SOURCE_TILE_CHIPS, y // SOURCE_TILE_CHIPS)
        if tile == warm_tile or (s, *tile) in used:
            continue
        used.add((s, *tile))
        picks.append([s, x, y])
        if len(picks) == n:
            break
    if len(picks) < n:
        raise RuntimeError(f"only {len(picks)} chips without a shared tile; ask for fewer")
    return picks, list(warm)


def verify(source_items: list[str], aligned_items: list[str], picks: list[list[int]]) -> dict[str, Any]:
    """Chips equal across the layouts, and every band's pixels file against file."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer
    from stacchip.utils import load_item

    from benchmarks.scene import CHIP_BANDS

    src, ali = load_item(source_items[0]), load_item(aligned_items[0])
    with Chipper(NoStatsChipIndexer(src, chip_size=CHIP), assets=CHIP_BANDS) as a, \
            Chipper(NoStatsChipIndexer(ali, chip_size=CHIP), assets=CHIP_BANDS) as b:
        for _, x, y in picks:
            ca, cb = a.chip(x, y), b.chip(x, y)
            for key in CHIP_BANDS:
                if not np.array_equal(ca[key], cb[key]):
                    raise AssertionError(f"chip ({x}, {y}) band {key} differs between the layouts")
    blocks = {}
    for key, asset in src.assets.items():
        with rasterio.open(asset.href) as s, rasterio.open(ali.assets[key].href) as d:
            if (s.width, s.height, s.count, s.dtypes, s.crs, s.transform, s.nodata) != \
                    (d.width, d.height, d.count, d.dtypes, d.crs, d.transform, d.nodata):
                raise AssertionError(f"band {key}: the aligned file's header differs")
            step = s.block_shapes[0][0]
            for r0 in range(0, s.height, step):
                w = Window(0, r0, s.width, min(step, s.height - r0))
                if not np.array_equal(s.read(window=w), d.read(window=w)):
                    raise AssertionError(f"band {key}: pixels differ in rows {r0}..{r0 + step}")
            blocks[key] = {"source": s.block_shapes[0], "aligned": d.block_shapes[0],
                           "codec": f"{s.compression.value} -> {d.compression.value}"}
    return {"chips_equal": len(picks), "files_equal": len(blocks), "blocks": blocks}


def tile_decode_ms(path: str, n: int = 16) -> float:
    """Median ms to decode one tile of ``path`` (distinct tiles, fresh handle)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as ds:
        bh, bw = ds.block_shapes[0]
        rows, cols = ds.height // bh, ds.width // bw
        cells = [(r, c) for r in range(rows) for c in range(cols)][:: max(1, rows * cols // n)][:n]
        times = []
        for r, c in cells:
            t0 = time.perf_counter()
            ds.read(1, window=Window(c * bw, r * bh, bw, bh))
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def sizes(item_path: str, keys: list[str] | None = None) -> int:
    item = json.loads(Path(item_path).read_text())
    return sum(Path(a["href"]).stat().st_size for k, a in item["assets"].items() if keys is None or k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(HERE / ".cache" / "scene"), help="scene cache directory")
    parser.add_argument("--chips", type=int, default=60, help="random chips per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per layout (median)")
    parser.add_argument("--threads", type=int, default=None, help="Chipper threads (default: its own choice)")
    parser.add_argument("--seed", type=int, default=12, help="seed of the chip draw")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parse_with_worker(parser, argv)
    if args.worker:
        return serve_worker(WORKERS, args)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.scene import CHIP_BANDS, build_scene

    results: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    cache = Path(args.cache).resolve()
    scene = build_scene(cache)
    source_items = [str(p) for p in scene.item_paths]
    aligned_items, write = aligned_scene(scene, cache)
    results["aligned_write"] = write
    picks, warm = draw_chips(source_items[0], len(source_items), args.chips, args.seed)
    logger.info("%d chips over %d copies; warming the page cache", len(picks), len({p[0] for p in picks}))
    for p in {Path(json.loads(Path(i).read_text())["assets"][k]["href"]).resolve()
              for i in (source_items[0], aligned_items[0]) for k in CHIP_BANDS}:
        with open(p, "rb") as fh:
            while fh.read(16 << 20):
                pass

    runs: dict[str, list[dict[str, Any]]] = {"source": [], "aligned": []}
    for r in range(args.repeats):
        for layout, items in (("source", source_items), ("aligned", aligned_items)) if r % 2 == 0 else \
                (("aligned", aligned_items), ("source", source_items)):
            res = run_worker("read", items=items, picks=picks, warm=warm, threads=args.threads)
            logger.info("run %d %s: %.1f chips/s, %.1f ms CPU per chip", r, layout, res["chips_per_s"],
                        res["cpu_ms_per_chip"])
            runs[layout].append(res)
    summary = {
        layout: {
            "chips_per_s": statistics.median(x["chips_per_s"] for x in rs),
            "cpu_ms_per_chip": statistics.median(x["cpu_ms_per_chip"] for x in rs),
            "runs": [round(x["chips_per_s"], 2) for x in rs],
            "threads": rs[0]["threads"],
        }
        for layout, rs in runs.items()
    }
    results["random"] = summary
    logger.info("checking pixels (chips, then every band file against file)")
    results["verify"] = verify(source_items, aligned_items, picks)
    src_item = json.loads(Path(source_items[0]).read_text())
    ali_item = json.loads(Path(aligned_items[0]).read_text())
    results["decode_ms_per_tile"] = {
        "source 10 m (1024 px)": tile_decode_ms(src_item["assets"]["red"]["href"]),
        "aligned 10 m (256 px)": tile_decode_ms(ali_item["assets"]["red"]["href"]),
        "source 20 m (1024 px)": tile_decode_ms(src_item["assets"]["nir08"]["href"]),
        "aligned 20 m (128 px)": tile_decode_ms(ali_item["assets"]["nir08"]["href"]),
    }
    results["storage_mb"] = {
        "source, all bands": sizes(source_items[0]) / 1e6,
        "aligned, all bands": sizes(aligned_items[0]) / 1e6,
        "source, 10 chip bands": sizes(source_items[0], CHIP_BANDS) / 1e6,
        "aligned, 10 chip bands": sizes(aligned_items[0], CHIP_BANDS) / 1e6,
    }
    results["load_average_after"] = os.getloadavg()

    s, a = summary["source"], summary["aligned"]
    print(f"random 10-band chips, {len(picks)} per run, no shared tiles, {s['threads']} Chipper threads, "
          f"median of {args.repeats} fresh processes each")
    print(f"  source layout  (1024 px DEFLATE): {s['chips_per_s']:7.1f} chips/s  {s['cpu_ms_per_chip']:6.1f} ms CPU/chip  runs {s['runs']}")
    print(f"  aligned layout (chip tiles, ZSTD): {a['chips_per_s']:6.1f} chips/s  {a['cpu_ms_per_chip']:6.1f} ms CPU/chip  runs {a['runs']}")
    print(f"  speed-up: {a['chips_per_s'] / s['chips_per_s']:.1f}x wall, "
          f"{s['cpu_ms_per_chip'] / a['cpu_ms_per_chip']:.1f}x CPU   (target >= 3x)")
    v = results["verify"]
    print(f"pixels identical: {v['chips_equal']} chips x {len(CHIP_BANDS)} bands, {v['files_equal']} band files")
    for key, b in v["blocks"].items():
        print(f"  {key:9s} blocks {b['source']} -> {b['aligned']}  {b['codec']}")
    print("tile decode (ms, median): " + ", ".join(f"{k} {v:.2f}" for k, v in results["decode_ms_per_tile"].items()))
    print("storage (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in results["storage_mb"].items()))
    if write:
        print(f"aligned write of one scene ({write['bands']} bands): {write['seconds']:.0f} s wall, "
              f"{write['cpu_s']:.0f} s CPU, peak RSS {write['rss_mb']:.0f} MB")
    print(f"load average before/after: {results['load_average_before']} / {results['load_average_after']} "
          f"({results['cpus']} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
