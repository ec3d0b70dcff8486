"""ChipDataset normalised with stacchip-stats output of a platform whose bands share one asset (NAIP)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stacchip.errors import ConfigError
from stacchip.index import write_index
from stacchip.indexer import NoStatsChipIndexer
from stacchip.ml.dataset import ChipDataset
from tests.builders import coded_pixels, materialize, real_item

pytestmark = pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")


def test_naip_stats_by_band_name_normalise_the_image_asset(tmp_path: Path) -> None:
    item = real_item("naip")
    item["collection"] = "naip"
    item["id"] = item["id"].replace(".tif", "")
    scene = tmp_path / "data" / "naip" / item["id"]
    item = materialize(item, scene, factor=100, pixels=lambda key, asset, shape: coded_pixels(shape, 4, "uint8", 1))
    (scene / "stac_item.json").write_text(json.dumps(item))
    table = NoStatsChipIndexer(item, chip_size=16, chip_max_nodata=1.0, platform="naip").create_full_index()
    index = write_index(table, tmp_path / "index" / "index.parquet")
    means = {"red": 10.0, "green": 20.0, "blue": 30.0, "nir": 40.0}
    stds = {"red": 2.0, "green": 4.0, "blue": 5.0, "nir": 8.0}
    stats_json = tmp_path / "stats.json"  # the layout stacchip-stats writes
    stats_json.write_text(json.dumps({"platform": "naip", "bands": {
        b: {"count": 1, "mean": means[b], "std": stds[b], "min": 0, "max": 255} for b in means}}))
    raw = ChipDataset(index, root=tmp_path / "data")
    norm = ChipDataset(index, root=tmp_path / "data", normalize=str(stats_json))
    pixels = raw[0]["pixels"]
    assert pixels.shape[0] == 4
    order = ["red", "green", "blue", "nir"]  # NAIP's band order of the 4-band asset
    expected = (pixels - np.array([means[b] for b in order])[:, None, None]) / np.array(
        [stds[b] for b in order])[:, None, None]
    np.testing.assert_allclose(norm[0]["pixels"], expected.astype(np.float32), rtol=1e-6)
    # some bands only
    (key,) = raw.asset_keys(raw.chipper("naip", raw.item_id[0], int(raw.chip_size[0])))
    two = ChipDataset(index, root=tmp_path / "data", bands={key: [3, 0]}, normalize=str(stats_json))
    np.testing.assert_allclose(two[0]["pixels"], expected[[3, 0]].astype(np.float32), rtol=1e-6)
    # a band without statistics is named
    del means["nir"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"bands": {b: {"mean": means[b], "std": stds[b]} for b in means}}))
    with pytest.raises(ConfigError, match="'nir'"):
        ChipDataset(index, root=tmp_path / "data", normalize=str(partial))[0]
