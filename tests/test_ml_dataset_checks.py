"""ChipDataset checks at construction: where the STAC items are and which assets, bands and labels
exist -- what a new user tries, and what each error tells them to do."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest

from stacchip.errors import AssetReadError, ConfigError
from stacchip.index import read_index, write_index
from stacchip.ml.dataset import ChipDataset
from stacchip.ml.items import ItemSource
from stacchip.ml.splits import assign_splits
from tests.ml_scenes import scene_fixture


scene = scene_fixture("ml_dataset_checks", dates_a=2, dates_b=1)


@pytest.fixture(scope="module")
def split_table(scene) -> pa.Table:
    # 60 px chips at 300 m are 18 km wide: blocks must be larger for straddle="drop"
    return assign_splits(read_index(scene.index_dir), block_size=50_000, straddle="drop", seed=0)


def test_split_table_needs_root_and_says_so(scene, split_table):
    with pytest.raises(ConfigError) as err:
        ChipDataset(split_table, split="train")
    message = str(err.value)
    for hint in ("root=", "{platform}/{item_id}/stac_item.json", "items=", "ItemSource.from_index"):
        assert hint in message
    # with root= the table works, and reads what the directory form reads
    train = ChipDataset(split_table, root=scene.root, split="train", assets=["red", "nir"])
    want = sum(1 for s in split_table.column("split").to_pylist() if s == "train")
    assert 0 < len(train) == want < split_table.num_rows
    by_dir = ChipDataset(scene.index_dir, assets=["red", "nir"])
    for k in (0, len(train) - 1):
        j = int(by_dir.rows_of([train.chipid[k]])[0])
        np.testing.assert_array_equal(train[k]["pixels"], by_dir[j]["pixels"])
        assert train[k]["split"] == "train"
    # the index files' item_href, reused for a table
    from_index = ChipDataset(split_table, items=ItemSource.from_index(scene.index_dir), split="train",
                             assets=["red", "nir"])
    np.testing.assert_array_equal(from_index[0]["pixels"], train[0]["pixels"])


def test_root_pointing_at_the_index_directory_is_named(scene, split_table):
    with pytest.raises(ConfigError, match="not the index directory") as err:
        ChipDataset(split_table, root=scene.index_dir)
    assert str(scene.index_dir) in str(err.value)


def test_index_files_without_item_href_say_what_to_pass(scene, tmp_path):
    bare = tmp_path / "index" / "chips.parquet"
    write_index(read_index(scene.index_dir), bare)  # as the processors write: no item_href
    with pytest.raises(ConfigError, match="record no item_href") as err:
        ChipDataset(str(bare.parent))
    assert "root=" in str(err.value)
    with pytest.raises(ConfigError, match="records an item_href"):
        ItemSource.from_index(bare.parent)
    assert len(ChipDataset(str(bare.parent), root=scene.root, assets=["red"])) == read_index(bare).num_rows


def _without_rasters(scene, tmp_path) -> dict:
    """The scene's items with every asset href pointing at a file that does not exist."""
    items = copy.deepcopy(scene.items)
    for item in items.values():
        for key, asset in item["assets"].items():
            asset["href"] = str(tmp_path / "missing" / f"{key}.tif")
    return items


def test_unknown_assets_fail_at_construction_without_opening_rasters(scene, split_table, tmp_path):
    items = _without_rasters(scene, tmp_path)
    first = split_table.column("item_id")[0].as_py()
    with pytest.raises(ConfigError) as err:
        ChipDataset(split_table, items=items, assets=["red", "B04"])
    message = str(err.value)
    assert "'B04'" in message and first in message and "assets=" in message
    assert "data assets: red, green, blue, nir, swir16" in message and "scl" in message
    with pytest.raises(ConfigError, match="label_asset=.*'landcover'"):
        ChipDataset(split_table, items=items, assets=["red"], label_asset="landcover")
    with pytest.raises(ConfigError, match=r"no band\(s\) \[1\]"):
        ChipDataset(split_table, items=items, assets=["red"], bands={"red": [1]})
    with pytest.raises(ConfigError, match="'scl', which is not read"):
        ChipDataset(split_table, items=items, bands={"scl": [0]})
    # valid names construct fine: nothing was opened, the first read is what fails
    ds = ChipDataset(split_table, items=items, assets=["red", "scl"], label_asset="label", bands={"red": [0]})
    assert len(ds._chippers) == 0
    with pytest.raises(AssetReadError):
        ds[0]
