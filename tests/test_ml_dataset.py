"""ChipDataset, ItemSource, label rasters and the item/block batch sampler."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import rasterio
from affine import Affine

from stacchip.chipper import Chipper
from stacchip.errors import ConfigError, IndexFileError, ItemError
from stacchip.index import read_index
from stacchip.indexer import Sentinel2Indexer
from stacchip.ml.dataset import ChipDataset
from stacchip.ml.items import ItemSource
from stacchip.ml.labels import LabelRaster
from stacchip.ml.samplers import ItemBlockBatchSampler
from tests.builders import write_cog
from tests.ml_scenes import CHIP_SIZE, LABEL_CLASSES, scene_fixture

RGBN = ["red", "green", "blue", "nir", "swir16"]


scene = scene_fixture("ml_dataset")


@pytest.fixture(scope="module")
def table(scene) -> pa.Table:
    return read_index(scene.index_dir)


def _chipper(scene, item_id: str) -> Chipper:
    return Chipper(Sentinel2Indexer(scene.items[item_id], chip_size=CHIP_SIZE), assets=RGBN + ["label"])


def test_samples_equal_the_chipper(scene, table):
    ds = ChipDataset(table, root=scene.root, assets=RGBN)
    assert len(ds) == table.num_rows
    rows = table.to_pylist()
    for i in (0, 7, len(ds) // 2, len(ds) - 1):
        sample = ds[i]
        row = rows[i]
        chip = _chipper(scene, row["item_id"]).chip(row["chip_index_x"], row["chip_index_y"])
        expected = np.concatenate([chip[k] for k in RGBN]).astype(np.float32)
        assert sample["pixels"].shape == (len(RGBN), CHIP_SIZE, CHIP_SIZE)
        assert sample["pixels"].dtype == np.float32
        np.testing.assert_array_equal(sample["pixels"], expected)
        assert sample["chipid"] == row["chipid"]
        assert sample["item_id"] == row["item_id"]
        assert sample["platform"] == row["platform"]
        assert sample["datetime"] == row["datetime"].isoformat().replace("+00:00", "Z")
        assert list(sample["chip_index"]) == [row["chip_index_x"], row["chip_index_y"]]
        b = row["bbox"]
        np.testing.assert_allclose(sample["bounds"], [b["xmin"], b["ymin"], b["xmax"], b["ymax"]])
        assert sample["cloud"] == pytest.approx(row["cloud_cover_percentage"])
    # chips differ between rows: the reads are not all the same window
    assert not np.array_equal(ds[0]["pixels"], ds[1]["pixels"])


def test_items_from_index_metadata_and_mapping(scene, table):
    by_meta = ChipDataset(scene.index_dir, assets=["red"])  # item_href recorded in each index file
    by_map = ChipDataset(table, items=scene.items, assets=["red"])
    by_paths = ChipDataset(
        table, items={i: str(scene.root / scene.platform / i / "stac_item.json") for i in scene.items},
        assets=["red"],
    )
    order = np.argsort(by_meta.chipid)
    k = int(order[5])
    j = int(by_map.rows_of([by_meta.chipid[k]])[0])
    np.testing.assert_array_equal(by_meta[k]["pixels"], by_map[j]["pixels"])
    np.testing.assert_array_equal(by_paths[j]["pixels"], by_map[j]["pixels"])
    by_source = ChipDataset(table, items=ItemSource(root=scene.root), assets=["red"])
    np.testing.assert_array_equal(by_source[j]["pixels"], by_map[j]["pixels"])


def test_bands_channel_names_and_default_assets(scene, table):
    ds = ChipDataset(table, root=scene.root, label_asset="label")
    names = ds.channel_names()
    assert names == ["red", "green", "blue", "nir", "swir16"]  # data bands: no scl (QA), no label
    assert ds[0]["pixels"].shape[0] == len(names)
    assert ChipDataset(table, root=scene.root).channel_names() == names  # labels role: never a default channel
    with_qa = ChipDataset(table, root=scene.root, assets=["red", "scl"])
    assert with_qa.channel_names() == ["red", "scl"] and with_qa[0]["pixels"].shape[0] == 2
    with pytest.raises(ConfigError, match="not in assets"):
        ChipDataset(table, root=scene.root, assets=["red"], bands={"nir": [0]})


def test_filters_select_rows(scene, table):
    cloudy = ChipDataset(table, root=scene.root, max_cloud=0.0)
    assert 0 < len(cloudy) < table.num_rows
    assert np.all(cloudy.cloud == 0.0)
    one = sorted(scene.items)[0]
    only = ChipDataset(scene.index_dir, item_id=one, start="2024-03-01", end="2024-03-12")
    assert set(only.item_id) == {one}
    with pytest.raises(IndexFileError, match="split"):
        ChipDataset(table, root=scene.root, split="train")


def test_normalize_forms(scene, table, tmp_path):
    raw = ChipDataset(table, root=scene.root, assets=["red", "nir"])[3]["pixels"]
    mean, std = [100.0, 200.0], [10.0, 20.0]
    expected = (raw - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    per_channel = ChipDataset(table, root=scene.root, assets=["red", "nir"], normalize={"mean": mean, "std": std})
    np.testing.assert_allclose(per_channel[3]["pixels"], expected, rtol=1e-6)
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps({"bands": {"red": {"mean": 100.0, "std": 10.0}, "nir": {"mean": 200.0, "std": 20.0}}}))
    from_file = ChipDataset(table, root=scene.root, assets=["red", "nir"], normalize=str(stats_file))
    np.testing.assert_allclose(from_file[3]["pixels"], expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="no statistics for .*asset 'blue'"):
        ChipDataset(table, root=scene.root, assets=["red", "blue"], normalize=str(stats_file))[0]


def test_transform_is_applied(scene, table):
    ds = ChipDataset(table, root=scene.root, assets=["red"], transform=lambda s: (s["pixels"].sum(), s["chipid"]))
    total, chipid = ds[2]
    assert chipid == table.column("chipid")[2].as_py()
    assert total == pytest.approx(float(ChipDataset(table, root=scene.root, assets=["red"])[2]["pixels"].sum()))


def test_label_asset_is_the_nearest_resampled_label(scene, table):
    ds = ChipDataset(table, root=scene.root, assets=["red"], label_asset="label")
    row = table.slice(10, 1).to_pylist()[0]
    sample = ds[10]
    chip = _chipper(scene, row["item_id"]).chip(row["chip_index_x"], row["chip_index_y"])
    assert sample["target"].shape == (CHIP_SIZE, CHIP_SIZE)
    assert sample["target"].dtype == np.int64
    np.testing.assert_array_equal(sample["target"], chip["label"][0])
    assert set(np.unique(sample["target"])) <= set(range(LABEL_CLASSES))
    assert len(np.unique(sample["target"])) > 1


def test_label_raster_same_crs_matches_label_asset(scene, table, tmp_path):
    item = scene.items[sorted(scene.items)[0]]
    lab = item["assets"]["label"]
    with rasterio.open(lab["href"]) as src:
        data, transform, crs = src.read(1), src.transform, src.crs
    path = write_cog(tmp_path / "landcover.tif", data, transform, crs)
    by_asset = ChipDataset(table, root=scene.root, assets=["red"], label_asset="label", item_id=item["id"])
    by_raster = ChipDataset(table, root=scene.root, assets=["red"], label_raster=str(path), item_id=item["id"])
    for i in (0, 5, len(by_asset) - 1):
        np.testing.assert_array_equal(by_raster[i]["target"], by_asset[i]["target"])


def test_label_raster_other_crs_is_warped_nearest(scene, table, tmp_path):
    # A lon/lat label map: one class west of a meridian, another east of it.
    item_id = sorted(scene.items)[0]
    ds0 = ChipDataset(table, root=scene.root, assets=["red"], item_id=item_id)
    minx, miny = ds0.bounds[:, 0].min() - 0.1, ds0.bounds[:, 1].min() - 0.1
    maxx, maxy = ds0.bounds[:, 2].max() + 0.1, ds0.bounds[:, 3].max() + 0.1
    res = 0.002
    w, h = int((maxx - minx) / res), int((maxy - miny) / res)
    lon = minx + (np.arange(w) + 0.5) * res
    split_lon = float(np.median((ds0.bounds[:, 0] + ds0.bounds[:, 2]) / 2))
    data = np.where(lon[None, :] < split_lon, 1, 2).astype(np.uint8).repeat(h, axis=0)
    path = write_cog(tmp_path / "lonlat.tif", data, Affine(res, 0, minx, 0, -res, maxy), "EPSG:4326", nodata=0)
    ds = ChipDataset(table, root=scene.root, assets=["red"], item_id=item_id, label_raster=LabelRaster(path))
    west = int(np.argmin(ds.bounds[:, 2]))
    east = int(np.argmax(ds.bounds[:, 0]))
    assert np.all(ds[west]["target"] == 1)
    assert np.all(ds[east]["target"] == 2)
    with pytest.raises(ConfigError, match="not both"):
        ChipDataset(table, root=scene.root, label_asset="label", label_raster=str(path))


def test_unknown_item_names_it(scene, table):
    with pytest.raises(ConfigError, match="no way to find STAC items"):
        ItemSource()
    source = ItemSource(items={"other": scene.items[sorted(scene.items)[0]]})
    with pytest.raises(ItemError, match=sorted(scene.items)[1]):
        source.get(scene.platform, sorted(scene.items)[1])
    missing = ItemSource(root=scene.root / "nowhere")
    with pytest.raises(ItemError, match="cannot read"):
        missing.get(scene.platform, sorted(scene.items)[0])


def test_pickle_drops_open_chippers(scene, table):
    ds = ChipDataset(table, root=scene.root, assets=["red"])
    first = ds[0]["pixels"]
    assert len(ds._chippers) == 1 and ds.items._cache
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._chippers) == 0 and not clone.items._cache
    np.testing.assert_array_equal(clone[0]["pixels"], first)
    ds.close()
    assert len(ds._chippers) == 0


def test_max_open_items_bounds_chippers(scene, table):
    ds = ChipDataset(table, root=scene.root, assets=["red"], max_open_items=2)
    seen = []
    for item_id in sorted(scene.items):
        i = int(np.flatnonzero(ds.item_id == item_id)[0])
        seen.append(ds[i]["pixels"])
        assert len(ds._chippers) <= 2
    assert len(seen) == len(scene.items)


def test_sampler_groups_blocks_and_covers_every_row_once(scene, table):
    ds = ChipDataset(table, root=scene.root, assets=["red"])
    sampler = ItemBlockBatchSampler(ds, batch_size=8, block=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(ds)))
    # each group (item, block) is contiguous in the order
    keys = [(ds.item_id[i], ds.x[i] // 3, ds.y[i] // 3) for i in flat]
    changes = sum(1 for a, b in zip(keys, keys[1:]) if a != b)
    assert changes == len(set(keys)) - 1
    assert list(ItemBlockBatchSampler(ds, 8, 3, seed=1)) == batches
    other = ItemBlockBatchSampler(ds, 8, 3, seed=1)
    other.set_epoch(1)
    assert list(other) != batches
    table_sampler = ItemBlockBatchSampler(table, batch_size=5, block=100, shuffle=False, drop_last=True)
    assert all(len(b) == 5 for b in table_sampler)
    assert len(table_sampler) == table.num_rows // 5
    with pytest.raises(ConfigError):
        ItemBlockBatchSampler(ds, batch_size=0)


def record_worker_state(sample: dict) -> dict:
    """Transform run in a DataLoader worker: which process owns the handles it used."""
    import os

    from torch.utils.data import get_worker_info

    info = get_worker_info()
    own = info.dataset
    pids = {c._datasets._pid for c in own._chippers.values()}
    sample["worker_pid"] = os.getpid()
    sample["handles_owned"] = bool(own._pid == os.getpid() and pids == {os.getpid()})
    return sample


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_two_workers(scene, table, context):
    import os

    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ds = ChipDataset(table, root=scene.root, assets=["red", "nir"], label_asset="label",
                     transform=record_worker_state)
    plain = ChipDataset(table, root=scene.root, assets=["red", "nir"], label_asset="label")
    with pytest.raises(AttributeError):  # outside a worker there is no worker info
        ds[0]
    ds.transform = None
    ds[0]  # the parent has open handles before the workers start
    assert len(ds._chippers) == 1
    ds.transform = record_worker_state
    sampler = ItemBlockBatchSampler(ds, batch_size=6, block=2, seed=3)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context=context)
    seen = []
    for batch, rows in zip(loader, sampler):
        assert isinstance(batch["pixels"], torch.Tensor)
        assert batch["pixels"].shape == (len(rows), 2, CHIP_SIZE, CHIP_SIZE)
        assert batch["target"].dtype == torch.int64
        assert list(batch["chipid"]) == [ds.chipid[r] for r in rows]
        assert bool(batch["handles_owned"].all())
        assert os.getpid() not in batch["worker_pid"].tolist()
        for k in (0, len(rows) - 1):
            direct = plain[rows[k]]
            np.testing.assert_array_equal(batch["pixels"][k].numpy(), direct["pixels"])
            np.testing.assert_array_equal(batch["target"][k].numpy(), direct["target"])
        assert batch["timestamp"].dtype == torch.int64
        seen.extend(batch["chipid"])
    assert sorted(seen) == sorted(ds.chipid.tolist())


def test_ml_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import stacchip.ml as ml\n"
        "from stacchip.ml import ChipDataset, ItemBlockBatchSampler, assign_splits, build_stacks\n"
        "import stacchip.ml.croissant, stacchip.ml.preview\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.services
def test_s3_data_root_and_index(scene, table, s3_bucket):
    """Items, COGs and index files in a bucket laid out as the processors write it."""
    from stacchip import storage

    bucket = f"s3://{s3_bucket}"
    for item_id, item in scene.items.items():
        remote = json.loads(json.dumps(item))
        for key, asset in remote["assets"].items():
            url = f"{bucket}/{scene.platform}/{item_id}/{Path(asset['href']).name}"
            storage.write_bytes(url, Path(asset["href"]).read_bytes())
            asset["href"] = url
        storage.write_bytes(f"{bucket}/{scene.platform}/{item_id}/stac_item.json", json.dumps(remote).encode())
    for path in scene.index_files:
        rel = Path(path).relative_to(scene.index_dir).as_posix()
        storage.write_bytes(f"{bucket}/index/{rel}", Path(path).read_bytes())
    remote_ds = ChipDataset(f"{bucket}/index/", root=bucket, assets=["red", "swir16"], label_asset="label")
    local_ds = ChipDataset(table, root=scene.root, assets=["red", "swir16"], label_asset="label")
    assert len(remote_ds) == len(local_ds)
    for k in (0, len(remote_ds) // 3, len(remote_ds) - 1):
        j = int(local_ds.rows_of([remote_ds.chipid[k]])[0])
        got, want = remote_ds[k], local_ds[j]
        np.testing.assert_array_equal(got["pixels"], want["pixels"])
        np.testing.assert_array_equal(got["target"], want["target"])
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    loader = DataLoader(remote_ds, batch_sampler=ItemBlockBatchSampler(remote_ds, 8, seed=0), num_workers=2,
                        multiprocessing_context="fork")
    batches = list(loader)
    assert sum(len(b["chipid"]) for b in batches) == len(remote_ds)
    first = batches[0]
    k = int(remote_ds.rows_of([first["chipid"][0]])[0])
    assert isinstance(first["pixels"], torch.Tensor)
    np.testing.assert_array_equal(first["pixels"][0].numpy(), remote_ds[k]["pixels"])


def test_band_selection_of_a_multiband_asset(tmp_path):
    """NAIP: one 4-band asset; keep three bands and normalise them with per-band statistics."""
    from stacchip.indexer import NoStatsChipIndexer
    from tests.builders import materialize, real_item

    item = materialize(real_item("naip"), tmp_path / "naip", factor=100)
    indexer = NoStatsChipIndexer(item, chip_size=32)
    table = indexer.create_full_index()
    assert table.num_rows == indexer.size > 1
    key = next(iter(item["assets"]))
    ds = ChipDataset(table, items={item["id"]: item}, bands={key: [2, 0, 1]})
    assert ds.channel_names() == [f"{key}:2", f"{key}:0", f"{key}:1"]
    row = table.to_pylist()[1]
    chip = Chipper(NoStatsChipIndexer(item, chip_size=32)).chip(row["chip_index_x"], row["chip_index_y"])[key]
    np.testing.assert_array_equal(ds[1]["pixels"], chip[[2, 0, 1]].astype(np.float32))
    stats = {key: {"mean": [10.0, 20.0, 30.0, 40.0], "std": [1.0, 2.0, 3.0, 4.0]}}
    normed = ChipDataset(table, items={item["id"]: item}, bands={key: [2, 0, 1]}, normalize=stats)[1]["pixels"]
    mean = np.array([30.0, 10.0, 20.0])[:, None, None]
    std = np.array([3.0, 1.0, 2.0])[:, None, None]
    np.testing.assert_allclose(normed, (chip[[2, 0, 1]] - mean) / std, rtol=1e-5)
    bad = {key: {"mean": [1.0, 2.0], "std": [1.0, 2.0]}}
    with pytest.raises(ConfigError, match="statistics values"):
        ChipDataset(table, items={item["id"]: item}, bands={key: [2, 0, 1]}, normalize=bad)[0]


def test_partial_edge_chips_of_an_edge_keep_index(scene):
    """Indexes made with edge='keep' hold partial chips at the right/bottom edges."""
    item = scene.items[sorted(scene.items)[-1]]
    indexer = Sentinel2Indexer(item, chip_size=CHIP_SIZE, chip_max_nodata=1.0, edge="keep")
    table = indexer.create_full_index()
    rows = table.to_pylist()
    edge_rows = [k for k, r in enumerate(rows) if r["chip_index_x"] == indexer.x_size - 1]
    assert edge_rows and indexer.grid.shape[1] % CHIP_SIZE != 0
    ds = ChipDataset(table, items=scene.items, assets=["red"])
    k = edge_rows[0]
    pixels = ds[k]["pixels"][0]
    inside = indexer.grid.shape[1] - (indexer.x_size - 1) * CHIP_SIZE
    want = Chipper(indexer, assets=["red"]).chip(rows[k]["chip_index_x"], rows[k]["chip_index_y"])["red"][0]
    np.testing.assert_array_equal(pixels, want)
    assert np.all(pixels[:, inside:] == 0)  # beyond the grid: the asset's nodata
    assert np.all(pixels[:, :inside] > 0)
