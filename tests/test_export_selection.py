"""stacchip.export.selection: which chips an export takes (filters at their limit: the index stores
fractions as float32)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import shapely

from stacchip.index import index_table, write_index
from stacchip.export import selection


def test_a_chip_exactly_at_the_limit_passes(tmp_path: Path) -> None:
    nodata = np.array([0.0, 0.05, 0.3, 0.0500001, 0.0])
    cloud = np.array([0.1, 0.0, 0.0, 0.0, 0.3])
    table = index_table(
        item_id="S2A_T20HNJ_20240105_0_L2A", platform="sentinel-2-l2a",
        datetime=dt.datetime(2024, 1, 5, 14, 3, tzinfo=dt.UTC), chip_size=100,
        xs=np.arange(5), ys=np.zeros(5), cloud=cloud, nodata=nodata,
        polygons=np.array([shapely.box(i * 0.01, 0, (i + 1) * 0.01, 0.01) for i in range(5)]),
    )
    path = write_index(table, tmp_path / "index.parquet")

    def kept(**kw: float | None) -> list[int]:
        sel = selection.select_chips(path, "sentinel-2-l2a", **kw)
        return sorted(int(c.rsplit("-", 2)[1]) for c in sel.column("chipid").to_pylist())

    # 5 of 100x100 pixels nodata is a fraction of exactly 0.05: --max-nodata 0.05 keeps it
    assert kept(max_nodata=0.05) == [0, 1, 4]
    assert kept(max_nodata=0.3, max_cloud=None) == [0, 1, 2, 3, 4]
    assert kept(max_nodata=None, max_cloud=0.1) == [0, 1, 2, 3]
    assert kept(max_nodata=0.0, max_cloud=0.0) == []
    assert kept(max_nodata=0.05, max_cloud=0.0) == [1]


def test_prechip_keeps_every_moved_name_importable():
    from stacchip.export import chip_reader, cube, plan
    from stacchip.processors import prechip

    for module, names in (
        (selection, ["select_chips", "permutation", "prepare", "Selection", "items_lacking_bands", "check_item_ids",
                     "explain_selection", "check_selection", "empty_selection", "cube_members", "cube_count",
                     "DEFAULT_SEED", "DEFAULT_MAX_NODATA", "COLUMNS"]),
        (chip_reader, ["ReadTask", "_OpenItem", "read_task", "plan_reads", "ChipReader", "ReadResult",
                       "close_open_items", "TASK_CHIPS", "CHIPPER_CACHE"]),
        (cube, ["cube_arrays", "cube_bytes", "write_cube", "cube_damage", "existing_cube_ok",
                "cube_url", "manifest_url", "VERSION", "CUBESIZE", "DEFAULT_COMPRESS_LEVEL"]),
        (plan, ["check_manifest"]),
    ):
        for name in names:
            assert getattr(prechip, name) is getattr(module, name), name
