"""Spatial splits: whole blocks per split, deterministic, reports, written as a column."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import shapely

from stacchip.errors import ConfigError, IndexFileError
from stacchip.index import index_table, read_index, write_index
from stacchip.ml.dataset import ChipDataset
from stacchip.ml.splits import (
    assign_splits, block_ids, format_report, label_class_report, split_report, tile_of,
)
from tests.ml_scenes import scene_fixture


def grid_table(n: int = 60, step: float = 0.02, x0: float = 10.0, y0: float = 0.0, item: str = "synthetic") -> pa.Table:
    """``n x n`` lon/lat chips of ``step`` degrees, with varying cloud."""
    xs, ys = np.meshgrid(np.arange(n), np.arange(n))
    xs, ys = xs.ravel(), ys.ravel()
    polys = shapely.box(x0 + xs * step, y0 - (ys + 1) * step, x0 + (xs + 1) * step, y0 - ys * step)
    return index_table(
        item_id=item, platform="synthetic", datetime=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        chip_size=64, xs=xs, ys=ys, cloud=(xs % 7) / 7.0, nodata=np.zeros(len(xs)), polygons=polys,
    )


scene = scene_fixture("ml_splits")


def _split_of_block(table: pa.Table) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for block, split in zip(table.column("split_block").to_pylist(), table.column("split").to_pylist()):
        out.setdefault(block, set()).add(split)
    return out


@pytest.mark.parametrize("kwargs", [
    {"by": "grid", "block_size": 10_000.0},
    {"by": "grid", "block_size": 0.1, "units": "deg"},
    {"by": "item"},
])
def test_blocks_never_share_splits_and_fractions_hold(kwargs):
    table = grid_table()
    out = assign_splits(table, **kwargs, seed=7)
    assert out.num_rows == table.num_rows
    per_block = _split_of_block(out)
    assert all(len(s) == 1 for s in per_block.values())
    if kwargs["by"] != "item":
        assert len(per_block) > 50
        counts = {s: sum(1 for v in per_block.values() if v == {s}) for s in ("train", "val", "test")}
        assert 0.65 < counts["train"] / len(per_block) < 0.92
        assert counts["val"] > 0 and counts["test"] > 0


def test_degree_blocks_follow_the_chip_centres():
    out = assign_splits(grid_table(), by="grid", block_size=0.1, units="deg")
    b = out.column("bbox").combine_chunks()
    cx = (b.field("xmin").to_numpy() + b.field("xmax").to_numpy()) / 2
    cy = (b.field("ymin").to_numpy() + b.field("ymax").to_numpy()) / 2
    expected = [f"deg0.1:{int(np.floor(x / 0.1))}_{int(np.floor(y / 0.1))}" for x, y in zip(cx, cy)]
    assert out.column("split_block").to_pylist() == expected


def test_assignment_is_deterministic_and_seeded(tmp_path):
    table = grid_table()
    a = assign_splits(table, block_size=10_000.0, seed=1).column("split").to_pylist()
    b = assign_splits(table, block_size=10_000.0, seed=1).column("split").to_pylist()
    c = assign_splits(table, block_size=10_000.0, seed=2).column("split").to_pylist()
    assert a == b
    assert a != c
    # Same result in a fresh interpreter with another hash seed.
    path = tmp_path / "grid.parquet"
    write_index(table, path)
    code = (
        "import json, sys\n"
        "from stacchip.index import read_index\n"
        "from stacchip.ml.splits import assign_splits\n"
        f"t = assign_splits(read_index({str(path)!r}), block_size=10000.0, seed=1)\n"
        "print(json.dumps(t.column('split').to_pylist()))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == a
    # Adding rows never moves existing blocks.
    more = pa.concat_tables([table, grid_table(n=10, x0=20.0, item="other")])
    assert assign_splits(more, block_size=10_000.0, seed=1).column("split").to_pylist()[: table.num_rows] == a


def test_straddle_drop_leaves_no_overlap_between_splits():
    table = grid_table(n=40, step=0.03)
    out = assign_splits(table, block_size=15_000.0, straddle="drop", seed=3)
    split = np.array(out.column("split").to_pylist(), dtype=object)
    assert (split == None).any() and (split != None).any()  # noqa: E711 - elementwise
    geoms = shapely.from_wkb(np.asarray(out.column("geometry").to_pylist(), dtype=object))
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    both = (split[left] != None) & (split[right] != None)  # noqa: E711
    touching = shapely.area(shapely.intersection(geoms[left], geoms[right])) > 0
    assert not np.any(both & touching & (split[left] != split[right]))
    with pytest.raises(ConfigError, match="larger than chips"):
        assign_splits(table, block_size=1000.0, straddle="drop")


def test_tile_split_keeps_every_date_of_a_tile_together(scene):
    table = read_index(scene.index_dir)
    out = assign_splits(table, by="tile", seed=0)
    tiles = {}
    for item_id, split in zip(out.column("item_id").to_pylist(), out.column("split").to_pylist()):
        tiles.setdefault(tile_of(item_id), set()).add(split)
    assert set(tiles) == {"20HNJ", "20HPJ"}
    assert all(len(v) == 1 for v in tiles.values())
    assert tile_of("LC09_L2SR_086107_20240311_20240312_02_T2_SR") == "086107"
    assert tile_of("naip_m_4207009_ne_19_060_20211024") == "naip_m_4207009_ne_19_060_20211024"


def test_report_balances_and_formats(scene):
    table = read_index(scene.index_dir)
    out = assign_splits(table, block_size=30_000.0, seed=0)
    report = split_report(out, class_column="item_id")
    assert sum(e["chips"] for e in report.values()) == table.num_rows
    assert sum(e["chip_fraction"] for e in report.values()) == pytest.approx(1.0)
    assert sum(e["area_fraction"] for e in report.values()) == pytest.approx(1.0)
    for name, e in report.items():
        # 60 px chips at 300 m: 18 km squares, ~324 km² each (equal-area)
        assert e["area_km2"] / e["chips"] == pytest.approx(324.0, rel=0.02)
        assert sum(c["chips"] for c in e["classes"].values()) == e["chips"]
    text = format_report(report)
    assert all(name in text for name in report)
    with pytest.raises(IndexFileError):
        split_report(table)
    with pytest.raises(IndexFileError, match="nope"):
        split_report(out, class_column="nope")


def test_split_column_round_trips_and_filters_the_dataset(scene, tmp_path):
    table = read_index(scene.index_dir)
    out = assign_splits(table, block_size=30_000.0, seed=0)
    dest = tmp_path / "split_index.parquet"
    write_index(out, dest)
    import pyarrow.parquet as pq

    stored = pq.read_table(dest)
    assert stored.column("split").to_pylist() == out.column("split").to_pylist()
    train = ChipDataset(dest, root=scene.root, split="train", assets=["red"])
    assert 0 < len(train) < table.num_rows
    assert set(train.split) == {"train"}
    assert train[0]["split"] == "train"
    n_train = sum(1 for s in out.column("split").to_pylist() if s == "train")
    assert len(train) == n_train


def test_bad_arguments_are_named():
    table = grid_table(n=4)
    with pytest.raises(ConfigError, match="block_size"):
        assign_splits(table, block_size=None)
    with pytest.raises(ConfigError, match="units"):
        block_ids(table, block_size=1.0, units="km")
    with pytest.raises(ConfigError, match="by="):
        assign_splits(table, by="country")
    with pytest.raises(ConfigError, match="fractions"):
        assign_splits(table, fractions={"train": -1.0})


def test_label_class_report_counts_every_target_pixel(scene):
    table = assign_splits(read_index(scene.index_dir), block_size=30_000.0, seed=0)
    ds = ChipDataset(table, root=scene.root, assets=["red"], label_asset="label")
    report = label_class_report(ds)
    chips = {name: e["chips"] for name, e in split_report(table).items()}
    assert set(report) == set(chips)
    for name, entry in report.items():
        assert entry["pixels"] == chips[name] * 60 * 60
        assert sum(c["pixels"] for c in entry["classes"].values()) == entry["pixels"]
        assert sum(c["fraction"] for c in entry["classes"].values()) == pytest.approx(1.0)
    # brute force on one split
    name = sorted(report)[0]
    rows = [i for i in range(len(ds)) if ds.split[i] == name]
    values = np.concatenate([ds[i]["target"].ravel() for i in rows])
    for cls, c in report[name]["classes"].items():
        assert c["pixels"] == int((values == int(cls)).sum())
    with pytest.raises(ConfigError, match="label"):
        label_class_report(ChipDataset(table, root=scene.root, assets=["red"]))
