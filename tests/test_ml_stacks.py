"""Time stacks: grouping by grid and chip position, selection rules, (T, C, H, W) reads."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from stacchip.errors import ConfigError
from stacchip.index import read_index
from stacchip.ml.dataset import ChipDataset
from stacchip.ml.items import ItemSource
from stacchip.ml.stacks import TimeStackDataset, build_stacks, select
from tests.ml_scenes import CHIP_SIZE, scene_fixture


scene = scene_fixture("ml_stacks", dates_a=5, dates_b=2)


@pytest.fixture(scope="module")
def table(scene) -> pa.Table:
    return read_index(scene.index_dir)


def _rows(table: pa.Table) -> list[dict]:
    return table.select(
        ["item_id", "chip_index_x", "chip_index_y", "datetime", "cloud_cover_percentage", "nodata_percentage"]
    ).to_pylist()


def _position_members(rows: list[dict], tile: str) -> dict[tuple[int, int], list[int]]:
    """Expected members: rows of ``tile`` at each chip position."""
    out: dict[tuple[int, int], list[int]] = {}
    for k, r in enumerate(rows):
        if f"_T{tile}_" in r["item_id"]:
            out.setdefault((r["chip_index_x"], r["chip_index_y"]), []).append(k)
    return out


def test_all_rule_stacks_every_date_of_a_position_in_time_order(scene, table):
    stacks = build_stacks(table, ItemSource(root=scene.root), rule="all")
    rows = _rows(table)
    expected = {}
    for tile in ("20HNJ", "20HPJ"):
        for pos, members in _position_members(rows, tile).items():
            expected[(tile, pos)] = sorted(members)
    assert len(stacks) == len(expected)  # the two tiles never share a stack
    for stack in stacks:
        items = {rows[r]["item_id"] for r in stack.rows}
        tiles = {i.split("_")[1][1:] for i in items}
        assert len(tiles) == 1
        pos = {(rows[r]["chip_index_x"], rows[r]["chip_index_y"]) for r in stack.rows}
        assert len(pos) == 1
        assert sorted(stack.rows) == expected[(tiles.pop(), pos.pop())]
        times = [rows[r]["datetime"] for r in stack.rows]
        assert times == sorted(times) and len(set(times)) == len(times)
        assert stack.datetimes == times
    assert max(len(s) for s in stacks) == 5


def test_least_cloudy_per_month(scene, table):
    rows = _rows(table)
    stacks = build_stacks(table, ItemSource(root=scene.root), rule="least_cloudy", period="month")
    some_cloud_choice = False
    for stack in stacks:
        full = next(s for s in build_stacks(table, ItemSource(root=scene.root), rule="all") if s.key == stack.key)
        by_month: dict[tuple[int, int], list[int]] = {}
        for r in full.rows:
            d = rows[r]["datetime"]
            by_month.setdefault((d.year, d.month), []).append(r)
        assert len(stack) == len(by_month)
        for r in stack.rows:
            d = rows[r]["datetime"]
            group = by_month[(d.year, d.month)]
            best = min(rows[g]["cloud_cover_percentage"] for g in group)
            assert rows[r]["cloud_cover_percentage"] == best
            if len(group) > 1 and len({rows[g]["cloud_cover_percentage"] for g in group}) > 1:
                some_cloud_choice = True
        times = [rows[r]["datetime"] for r in stack.rows]
        assert times == sorted(times)
    assert some_cloud_choice  # the fixture has months with two dates of different cloud


def test_first_middle_last_and_evenly(scene, table):
    source = ItemSource(root=scene.root)
    full = {s.key: s for s in build_stacks(table, source, rule="all")}
    fml = build_stacks(table, source, rule="first_middle_last")
    assert fml and all(len(s) == 3 for s in fml)
    for s in fml:
        members = full[s.key].rows
        n = len(members)
        assert s.rows == (members[0], members[(n - 1) // 2], members[-1])
    # stacks with fewer than three dates are left out
    assert {k for k, s in full.items() if len(s) >= 3} == {s.key for s in fml}
    ev = build_stacks(table, source, rule="evenly", length=2, min_length=2)
    assert all(s.rows == (full[s.key].rows[0], full[s.key].rows[-1]) for s in ev)


def test_tile_grid_equals_item_grid_here(scene, table):
    by_items = build_stacks(table, ItemSource(root=scene.root))
    by_tile = build_stacks(table, grid="tile")
    assert sorted(s.rows for s in by_items) == sorted(s.rows for s in by_tile)


def test_periods_and_rules_are_checked():
    ts = np.array([0, 10, 20], dtype=np.int64) * 86_400_000_000
    cloud = np.array([0.5, 0.1, 0.3])
    nodata = np.zeros(3)
    assert select(ts, cloud, nodata, "least_cloudy", period=15).tolist() == [1, 2]
    assert select(ts, cloud, nodata, "least_cloudy", period=dt.timedelta(days=100)).tolist() == [1]
    ranges = [("1970-01-01", "1970-01-05"), (dt.date(1970, 1, 15), "1970-01-31T00:00:00Z")]
    assert select(ts, cloud, nodata, "least_cloudy", period=ranges).tolist() == [0, 2]
    with pytest.raises(ConfigError, match="period"):
        select(ts, cloud, nodata, "least_cloudy", period="fortnight")
    with pytest.raises(ConfigError, match="needs a period"):
        select(ts, cloud, nodata, "least_cloudy")
    with pytest.raises(ConfigError, match="unknown stack rule"):
        select(ts, cloud, nodata, "median")


def test_stack_dataset_reads_t_c_h_w(scene, table):
    ds = ChipDataset(table, root=scene.root, assets=["red", "nir"], label_asset="label")
    stacks = TimeStackDataset(ds, rule="first_middle_last")
    assert len(stacks) > 0
    sample = stacks[len(stacks) // 2]
    stack = stacks.stacks[len(stacks) // 2]
    assert sample["pixels"].shape == (3, 2, CHIP_SIZE, CHIP_SIZE)
    assert sample["target"].shape == (3, CHIP_SIZE, CHIP_SIZE)
    for t, r in enumerate(stack.rows):
        np.testing.assert_array_equal(sample["pixels"][t], ds[r]["pixels"])
        assert sample["chipids"][t] == ds.chipid[r]
    assert sample["timestamps"].tolist() == list(stack.timestamps)
    assert np.all(np.diff(sample["timestamps"]) > 0)
    assert sample["datetimes"] == sorted(sample["datetimes"])
    # different dates carry different pixels
    assert not np.array_equal(sample["pixels"][0], sample["pixels"][2])
    with pytest.raises(IndexError):
        stacks[len(stacks)]


def test_stack_dataset_with_dataloader(scene, table):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ds = ChipDataset(table, root=scene.root, assets=["red"])
    stacks = TimeStackDataset(ds, rule="first_middle_last")
    loader = DataLoader(stacks, batch_size=4, num_workers=2, multiprocessing_context="fork")
    batch = next(iter(loader))
    assert isinstance(batch["pixels"], torch.Tensor)
    assert tuple(batch["pixels"].shape) == (4, 3, 1, CHIP_SIZE, CHIP_SIZE)
    np.testing.assert_array_equal(batch["pixels"][1].numpy(), stacks[1]["pixels"])
