"""A hostile-input probe of the console scripts (not collected by pytest).

    python -m tests.probes.hostile_probe [--keep DIR]

Builds small scenes and index files in a temp dir, runs ``stacchip index``,
``stacchip chip``, ``stacchip-prechip`` and ``stacchip-stats`` over bad STAC
items, broken rasters, odd index files and nonsense flags, and sorts each
outcome into: clear error (exit 1 or 2, one stderr line, no traceback),
traceback, silent result (exit 0 where the input was bad, or a wrong exit
class), half-written output (a file at the final path after a failure), and
the good controls that must succeed. Prints one line per case and the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from affine import Affine

from tests.builders import materialize, real_item, write_cog


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: int  # exit status the contract asks for (0, 1 or 2)
    out: Path | None = None  # a final output that must not exist after a failure
    env: dict[str, str] | None = None


def _s2(tmp: Path, mutate: Callable[[dict[str, Any]], None] | None = None, name: str = "s2") -> Path:
    base = real_item("sentinel-2")
    base["assets"] = {k: v for k, v in base["assets"].items() if k in ("red", "nir", "scl")}

    def pixels(key: str, asset: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
        dtype = "uint8" if key == "scl" else "uint16"
        return np.full((1, *shape), 4, dtype=dtype)

    item = materialize(base, tmp / name, factor=20, pixels=pixels)
    if mutate is not None:
        mutate(item)
    path = tmp / name / "item.json"
    path.write_text(json.dumps(item))
    return path


def build(tmp: Path) -> list[Case]:
    cases: list[Case] = []

    def index_case(name: str, item_path: Path, expect: int = 2, *flags: str) -> None:
        out = tmp / "out" / f"{name}.parquet"
        cases.append(Case(name, ["stacchip", "index", str(item_path), "--out", str(out), *flags], expect, out))

    def raw_item(name: str, text: str) -> Path:
        path = tmp / "raw" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    good = _s2(tmp)
    index_case("good-item", good, 0)
    for name, text in [("json-list", "[]"), ("json-empty-object", "{}"), ("json-null", "null"),
                       ("json-string", '"x"'), ("json-number", "7"), ("not-json", "{oops"), ("empty-file", "")]:
        index_case(name, raw_item(name, text))

    def mutated(name: str, fn: Callable[[dict[str, Any]], None], expect: int = 2, *flags: str) -> None:
        index_case(name, _s2(tmp, fn, name), expect, *flags)

    def props(**kv: Any) -> Callable[[dict[str, Any]], None]:
        return lambda it: it["properties"].update(kv)

    def scl(**kv: Any) -> Callable[[dict[str, Any]], None]:
        return lambda it: it["assets"]["scl"].update(kv)

    mutated("datetime-null", props(datetime=None))
    mutated("datetime-garbage", props(datetime="yesterday"))
    mutated("id-empty", lambda it: it.update(id=""))
    mutated("id-number", lambda it: it.update(id=5))
    mutated("no-assets", lambda it: it.update(assets={}))
    mutated("href-null", scl(href=None))
    mutated("epsg-float", props(**{"proj:epsg": 32720.7}))
    mutated("epsg-string", props(**{"proj:epsg": "abc"}))
    mutated("epsg-geographic", props(**{"proj:epsg": 4326}))
    mutated("no-crs", lambda it: it["properties"].pop("proj:epsg", None) or it["properties"].pop("proj:code", None))
    mutated("shape-string", scl(**{"proj:shape": "99"}))
    mutated("shape-zero", scl(**{"proj:shape": [0, 5]}))
    mutated("shape-one-number", scl(**{"proj:shape": [5]}))
    mutated("shape-larger-than-file", scl(**{"proj:shape": [1024, 1024]}))
    mutated("transform-5-terms", scl(**{"proj:transform": [20, 0, 1, 0, -20]}))
    mutated("transform-rotated", scl(**{"proj:transform": [20, 1, 499980, 0, -20, 6400000]}))
    mutated("transform-strings", scl(**{"proj:transform": ["20", 0, 499980, 0, -20, 6400000]}))
    mutated("transform-off-grid", scl(**{"proj:transform": [20, 0, 500980, 0, -20, 6400000]}))
    mutated("scl-missing-file", scl(href=str(tmp / "nowhere.tif")))
    png = tmp / "fake.tif"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    mutated("scl-not-a-raster", scl(href=str(png)))
    other = write_cog(tmp / "other_crs.tif", np.full((1, 274, 274), 4, np.uint8),
                      Affine(400, 0, 499980, 0, -400, 6400000), "EPSG:32721")
    mutated("scl-other-crs", lambda it: it["assets"]["scl"].update(href=str(other)))
    index_case("chip-size-0", good, 2, "--chip-size", "0")
    index_case("chip-size-70000", good, 2, "--chip-size", "70000")
    index_case("max-nodata-2", good, 2, "--max-nodata", "2")
    index_case("max-nodata-nan", good, 2, "--max-nodata", "nan")
    index_case("unknown-indexer", good, 2, "--indexer", "spot")
    cases.append(Case("index-to-dead-s3", ["stacchip", "index", str(good), "--out", "s3://b/i.parquet"], 1,
                      env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                           "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"}))

    # index files for chip / prechip / stats
    idx = tmp / "index"
    idx.mkdir()
    subprocess.run([sys.executable, "-m", "stacchip.cli", "index", str(good), "--out", str(idx / "good.parquet"),
                    "--max-nodata", "1"], check=True, capture_output=True)
    table = pq.read_table(idx / "good.parquet")
    chipid = table.column("chipid")[0].as_py()
    cases.append(Case("chip-good", ["stacchip", "chip", str(idx / "good.parquet"), "--chipid", chipid,
                                    "--out", str(tmp / "out" / "c.npz")], 0))
    cases.append(Case("chip-unknown-id", ["stacchip", "chip", str(idx / "good.parquet"), "--chipid", "nope-1-1",
                                          "--out", str(tmp / "out" / "c2.npz")], 2, tmp / "out" / "c2.npz"))

    def bad_index(name: str, writer: Callable[[Path], None]) -> Path:
        folder = tmp / "bad" / name
        folder.mkdir(parents=True)
        writer(folder / "index_x.parquet")
        return folder

    bad = {
        "index-zero-bytes": bad_index("zero", lambda p: p.write_bytes(b"")),
        "index-truncated": bad_index("trunc", lambda p: p.write_bytes((idx / "good.parquet").read_bytes()[:300])),
        "index-text": bad_index("text", lambda p: p.write_text("chipid,date\n")),
        "index-other-table": bad_index("other", lambda p: pq.write_table(pa.table({"a": [1]}), p)),
        "index-mixed-schema": bad_index("mixed", lambda p: pq.write_table(
            table.set_column(2, "chip_index_x", pa.array(["x"] * table.num_rows)), p)),
    }
    for name, folder in bad.items():
        cases.append(Case(f"chip-{name}", ["stacchip", "chip", str(folder), "--chipid", chipid,
                                           "--out", str(tmp / "out" / f"{name}.npz")], 2, tmp / "out" / f"{name}.npz"))
        cases.append(Case(f"prechip-{name}", ["stacchip-prechip", "--data", str(tmp), "--indexpath", str(folder),
                                              "--chips", str(tmp / "cubes" / name), "--all"], 2,
                          tmp / "cubes" / name))
    dup = bad_index("dup", lambda p: pq.write_table(table, p))
    shutil.copy(idx / "good.parquet", dup / "index_y.parquet")
    cases.append(Case("prechip-duplicate-chipids", ["stacchip-prechip", "--data", str(tmp), "--indexpath", str(dup),
                                                    "--chips", str(tmp / "cubes" / "dup"), "--all"], 2,
                      tmp / "cubes" / "dup"))
    evil = bad_index("evil", lambda p: pq.write_table(
        table.set_column(table.schema.get_field_index("item_id"), "item_id",
                         pa.array(["../../elsewhere/evil"] * table.num_rows)), p))
    cases.append(Case("prechip-item-id-escapes", ["stacchip-prechip", "--data", str(tmp), "--indexpath", str(evil),
                                                  "--chips", str(tmp / "cubes" / "evil"), "--all"], 2,
                      tmp / "cubes" / "evil"))
    base = ["stacchip-prechip", "--data", str(tmp), "--indexpath", str(idx), "--all"]
    cases.append(Case("prechip-platform-matches-nothing", base + ["--chips", str(tmp / "cubes" / "p"),
                                                                  "--platform", "landsat-c2l2-sr"], 2))
    cases.append(Case("prechip-seed-negative", base + ["--chips", str(tmp / "cubes" / "s"), "--seed", "-1"], 2))
    cases.append(Case("prechip-cube-size-0", base + ["--chips", str(tmp / "cubes" / "z"), "--cube-size", "0"], 2))
    cases.append(Case("prechip-max-cloud-percent", base + ["--chips", str(tmp / "cubes" / "m"),
                                                           "--max-cloud", "20"], 2))
    stats = ["stacchip-stats", "--platform", "sentinel-2-l2a", "--source", "index", "--data", str(tmp),
             "--indexpath", str(idx), "--output", str(tmp / "stats"), "--all"]
    cases.append(Case("stats-bins-0", stats + ["--bins", "0", "--percentiles", "50"], 2))
    cases.append(Case("stats-hist-range-inf", stats + ["--hist-range", "0,inf", "--percentiles", "50"], 2))
    cases.append(Case("stats-no-cubes", ["stacchip-stats", "--platform", "sentinel-2-l2a", "--chips",
                                         str(tmp / "empty"), "--output", str(tmp / "stats2"), "--all"], 2))
    return cases


SCRIPTS = {
    "stacchip": "stacchip.cli",
    "stacchip-prechip": "stacchip.processors.prechip",
    "stacchip-stats": "stacchip.processors.stats",
}


def run(case: Case) -> tuple[str, str]:
    cmd = [sys.executable, "-m", SCRIPTS[case.argv[0]], *case.argv[1:]]
    env = {**os.environ, **(case.env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " WARNING " not in line
             and not line.startswith("WARNING")]
    if "Traceback" in proc.stderr:
        kind = "traceback"
    elif case.out is not None and proc.returncode != 0 and case.out.exists():
        kind = "half-written"
    elif case.expect == 0:
        kind = "ok" if proc.returncode == 0 else "failed-control"
    elif proc.returncode == 0:
        kind = "silent"
    elif proc.returncode != case.expect:
        kind = f"wrong-class({proc.returncode})"
    else:
        kind = "clear-error"
    last = lines[-1] if lines else ""
    return kind, last[:150]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="build the cases here and keep them")
    args = parser.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="stacchip-probe-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        cases = build(tmp)
        totals: dict[str, int] = {}
        for case in cases:
            kind, line = run(case)
            totals[kind] = totals.get(kind, 0) + 1
            print(f"{kind:16s} {case.name:34s} {line}")
        print(f"\n{len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
        bad = sum(v for k, v in totals.items() if k not in ("ok", "clear-error"))
        return 1 if bad else 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
