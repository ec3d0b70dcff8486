"""prechip over an index made with ``--edge keep`` (partial chips at the right/bottom edges)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stacchip.chipper import Chipper
from stacchip.index import write_index
from stacchip.indexer import ChipIndexer, Sentinel2Indexer
from stacchip.processors import prechip
from stacchip.processors.bands import S2_BANDS
from tests.test_prechip import CHIP, PLATFORM, build_scenes, load_cube, run_all_jobs

pytestmark = pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")


def test_edge_chips_are_cubed_with_the_outside_marked_nodata(tmp_path: Path) -> None:
    scenes = build_scenes(tmp_path / "scenes", n_items=1)
    item = scenes["items"][0]
    table = Sentinel2Indexer(item, chip_size=CHIP, chip_max_nodata=1.0, platform=PLATFORM,
                             edge="keep").create_full_index()
    xs = np.asarray(table.column("chip_index_x"))
    assert xs.max() == 5  # 183 px: five whole chips and a partial sixth
    index = write_index(table, tmp_path / "edge-index" / "index.parquet")
    cfg = prechip.PrechipConfig(data=scenes["data"], index=index, output=str(tmp_path / "out"), platform=PLATFORM,
                                cube_size=9, cubes_per_job=10, max_nodata=None, partial=True)
    urls = run_all_jobs(cfg)
    cubes = [load_cube(u) for u in urls]
    chipids = [c for cube in cubes for c in cube["chipids"].tolist()]
    assert sorted(chipids) == sorted(table.column("chipid").to_pylist())
    chipper = Chipper(ChipIndexer(item, chip_size=CHIP, edge="keep"))
    grid = 183  # pixels of the 10 m grid
    seen_edge = 0
    for cube in cubes:
        for k, chipid in enumerate(cube["chipids"].tolist()):
            _, x, y = chipid.rsplit("-", 2)
            x, y = int(x), int(y)
            chip = chipper.chip(x, y)
            expected = np.concatenate([chip[b] for b in S2_BANDS]).astype(np.float32)
            np.testing.assert_array_equal(cube["pixels"][k], expected)
            inside_x = grid - x * CHIP
            inside_y = grid - y * CHIP
            if inside_x < CHIP:
                seen_edge += 1
                assert cube["nodata_mask"][k][:, :, inside_x:].all()  # beyond the grid: nodata
            if inside_y < CHIP:
                assert cube["nodata_mask"][k][:, inside_y:, :].all()
    assert seen_edge == 6


def test_edge_chip_outside_is_nodata_when_the_fill_is_not_the_nodata_value(tmp_path: Path) -> None:
    """Sentinel-1 without declared nodata: the chipper fills beyond the grid with 0,
    the platform's nodata is -32768; the outside is still marked."""
    import json

    from stacchip.indexer import Sentinel1Indexer
    from tests.builders import materialize, real_item

    item = real_item("sentinel-1")
    item["collection"] = "sentinel-1-rtc"
    for asset in item["assets"].values():
        for band in asset.get("raster:bands") or []:
            band.pop("nodata", None)

    def pixels(key: str, asset: dict, shape: tuple[int, int]) -> np.ndarray:
        return np.random.default_rng(len(key)).random((1, *shape), dtype=np.float32) + 0.5

    scene = tmp_path / "data" / "sentinel-1-rtc" / item["id"]
    item = materialize(item, scene, factor=200, pixels=pixels)
    (scene / "stac_item.json").write_text(json.dumps(item))
    table = Sentinel1Indexer(item, chip_size=CHIP, chip_max_nodata=1.0, platform="sentinel-1-rtc",
                             edge="keep").create_full_index()
    index = write_index(table, tmp_path / "index" / "index.parquet")
    cfg = prechip.PrechipConfig(data=str(tmp_path / "data"), index=index, output=str(tmp_path / "out"),
                                platform="sentinel-1-rtc", cube_size=4, cubes_per_job=100, max_nodata=None,
                                partial=True)
    rows, cols = ChipIndexer(item, chip_size=CHIP).grid.shape
    assert cols % CHIP  # the scene has partial edge chips
    edge = 0
    for url in prechip.run_job(0, cfg):
        cube = load_cube(url)
        for k, chipid in enumerate(cube["chipids"].tolist()):
            _, x, y = (int(v) if i else v for i, v in enumerate(chipid.rsplit("-", 2)))
            inside_x, inside_y = cols - x * CHIP, rows - y * CHIP
            mask = cube["nodata_mask"][k]
            outside = np.zeros(mask.shape[1:], dtype=bool)
            outside[max(inside_y, 0):, :] = True
            outside[:, max(inside_x, 0):] = True
            assert (mask == outside[None]).all(), chipid  # the source pixels are all valid (>= 0.5)
            edge += int(outside.any())
    assert edge > 0
