import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from stacchip.chipper import Chipper
from stacchip.indexer import Sentinel2Indexer
from stacchip.utils import load_indexer_local, load_item
from tests.builders import materialize, real_item


def run(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "stacchip.cli", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stacchip {args} failed: {proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def s2_item_file(tmp_path):
    def pixels(key, asset, shape):
        if key == "scl":
            scl = np.full(shape, 4, dtype=np.uint8)
            scl[50:, 50:] = 9
            return scl[None]
        bands = len(asset.get("eo:bands") or [None])
        dtype = (asset.get("raster:bands") or [{}])[0].get("data_type", "uint8")
        return np.random.default_rng(len(key)).integers(1, 200, size=(bands, *shape)).astype(dtype)

    item = materialize(real_item("sentinel-2"), tmp_path / "scene", factor=30, pixels=pixels)
    path = tmp_path / "scene" / "stac_item.json"
    path.write_text(json.dumps(item))
    return path


def test_index_then_chip(s2_item_file, tmp_path):
    out = tmp_path / "index.parquet"
    proc = run("index", str(s2_item_file), "--out", str(out), "--chip-size", "64")
    assert "25/25 chips" in proc.stdout and "Sentinel2Indexer" in proc.stdout
    table = pq.read_table(out)
    assert table.num_rows == 25
    item = load_item(s2_item_file)
    want = Sentinel2Indexer(item, chip_size=64).create_full_index()
    assert table.column("cloud_cover_percentage").to_pylist() == want.column("cloud_cover_percentage").to_pylist()
    chipid = f"{item.id}-3-4"
    npz = tmp_path / "chip.npz"
    run("chip", str(out), "--chipid", chipid, "--out", str(npz), "--assets", "red,coastal")
    with np.load(npz) as data:
        expected = Chipper(Sentinel2Indexer(item, chip_size=64), assets=["red", "coastal"]).chip(3, 4)
        assert sorted(data.files) == ["coastal", "red"]
        for key in expected:
            np.testing.assert_array_equal(data[key], expected[key])


def test_chip_of_an_edge_keep_index(s2_item_file, tmp_path):
    out = tmp_path / "index.parquet"
    proc = run("index", str(s2_item_file), "--out", str(out), "--chip-size", "64", "--edge", "keep")
    assert "36/36 chips" in proc.stdout  # 366 px: 5 whole chips and a partial one per axis
    item = load_item(s2_item_file)
    npz = tmp_path / "edge.npz"
    run("chip", str(out), "--chipid", f"{item.id}-5-2", "--out", str(npz), "--assets", "red")
    with np.load(npz) as data:
        ix = Sentinel2Indexer(item, chip_size=64, edge="keep")
        np.testing.assert_array_equal(data["red"], Chipper(ix, assets=["red"]).chip(5, 2)["red"])
        assert data["red"].shape == (1, 64, 64)
        assert np.all(data["red"][:, :, 366 - 5 * 64:] == 0)  # beyond the grid: fill


def test_chip_from_an_index_directory(s2_item_file, tmp_path):
    item = load_item(s2_item_file)
    root = tmp_path / "bucket" / "index"
    out = root / "sentinel-2-l2a" / item.id / f"index_{item.id}.parquet"
    run("index", str(s2_item_file), "--out", str(out), "--chip-size", "64")
    npz = tmp_path / "chip.npz"
    run("chip", str(root), "--chipid", f"{item.id}-1-1", "--out", str(npz), "--assets", "red")
    with np.load(npz) as data:
        want = Chipper(Sentinel2Indexer(item, chip_size=64), assets=["red"]).chip(1, 1)["red"]
        np.testing.assert_array_equal(data["red"], want)


def test_index_bad_item_writes_nothing(tmp_path):
    bad = tmp_path / "item.json"
    item = real_item("sentinel-2")
    for asset in item["assets"].values():
        asset.pop("proj:shape", None)
    bad.write_text(json.dumps(item))
    out = tmp_path / "out.parquet"
    proc = run("index", str(bad), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert "S2A_T20HNJ_20240311T140636_L2A" in proc.stderr and "proj:shape" in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]


def test_index_with_the_statless_base_indexer_is_a_named_error(s2_item_file, tmp_path):
    out = tmp_path / "index.parquet"
    proc = run("index", str(s2_item_file), "--out", str(out), "--indexer", "base", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nostats" in proc.stderr
    assert not out.exists()


def test_chip_unknown_chipid(s2_item_file, tmp_path):
    out = tmp_path / "index.parquet"
    run("index", str(s2_item_file), "--out", str(out), "--chip-size", "64")
    proc = run("chip", str(out), "--chipid", "nope-1-1", "--out", str(tmp_path / "c.npz"), check=False)
    assert proc.returncode == 2 and "nope-1-1" in proc.stderr
    assert not (tmp_path / "c.npz").exists()


def test_demo_runs_offline(tmp_path):
    proc = run("demo", "--dir", str(tmp_path / "demo"), "--size", "600")
    assert "chip grid:    2 x 2" in proc.stdout
    assert (tmp_path / "demo" / "stac_item.json").exists()
    index_files = list((tmp_path / "demo").glob("index_*.parquet"))
    assert len(index_files) == 1
    table = pq.read_table(index_files[0])
    assert 1 <= table.num_rows <= 4
    assert table.column("cloud_cover_percentage").to_numpy().max() > 0


def test_demo_smaller_than_a_chip_is_a_named_error(tmp_path):
    proc = run("demo", "--dir", str(tmp_path / "demo"), "--size", "100", check=False)
    assert proc.returncode == 2
    assert "--size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_load_indexer_local_bucket_layout(s2_item_file, tmp_path):
    item = load_item(s2_item_file)
    root = tmp_path / "bucket"
    (root / "sentinel-2-l2a" / item.id).mkdir(parents=True)
    (root / "sentinel-2-l2a" / item.id / "stac_item.json").write_text(s2_item_file.read_text())
    base = load_indexer_local(root, "sentinel-2-l2a", item.id)
    assert type(base).__name__ == "ChipIndexer" and base.size == 1  # 366 px / 256
    s2 = load_indexer_local(root, "sentinel-2-l2a", item.id, indexer="sentinel-2", chip_size=64)
    assert isinstance(s2, Sentinel2Indexer) and s2.size == 25


def test_relative_asset_hrefs_resolve_against_the_item(s2_item_file, tmp_path, monkeypatch):
    """Static catalogs (and stac-asset downloads) use hrefs relative to the item JSON."""
    item = load_item(s2_item_file)
    want = Chipper(Sentinel2Indexer(item, chip_size=64), assets=["red", "scl"]).chip(1, 2)
    raw = json.loads(s2_item_file.read_text())
    for asset in raw["assets"].values():
        if asset["href"].startswith(str(s2_item_file.parent)):
            asset["href"] = "./" + asset["href"][len(str(s2_item_file.parent)) + 1:]
    assert raw["assets"]["red"]["href"].startswith("./")
    root = tmp_path / "bucket"
    folder = root / "sentinel-2-l2a" / item.id
    folder.mkdir(parents=True)
    (folder / "stac_item.json").write_text(json.dumps(raw))
    for tif in s2_item_file.parent.glob("*.tif"):
        (folder / tif.name).symlink_to(tif)
    monkeypatch.chdir(tmp_path)  # not the item's folder
    ix = load_indexer_local("bucket", "sentinel-2-l2a", item.id, indexer="sentinel-2", chip_size=64)
    got = Chipper(ix, assets=["red", "scl"]).chip(1, 2)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert ix.create_full_index().num_rows == 25


@pytest.mark.services
def test_load_indexer_s3(s2_item_file, s3_bucket):
    from stacchip import storage
    from stacchip.utils import load_indexer_s3

    item = load_item(s2_item_file)
    storage.write_bytes(f"s3://{s3_bucket}/sentinel-2-l2a/{item.id}/stac_item.json", s2_item_file.read_bytes())
    ix = load_indexer_s3(s3_bucket, "sentinel-2-l2a", item.id, indexer=Sentinel2Indexer, chip_size=64)
    assert isinstance(ix, Sentinel2Indexer) and ix.item.id == item.id and ix.size == 25
