"""Drop-in compatibility with upstream stacchip: ``create_index()`` exactly as upstream
returned it, and buckets whose index files upstream wrote (seven columns, native
geoarrow polygons, ``pyarrow.parquet.write_table``) read by every reader."""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pystac
import pytest
import shapely

from stacchip import storage
from stacchip.chipper import Chipper
from stacchip.errors import IndexFileError
from stacchip.index import (
    SCHEMA,
    UPSTREAM_COLUMNS,
    geometry_wkb,
    normalize_table,
    open_index,
    query,
    read_index,
    upgrade_index_file,
    write_index,
)
from stacchip.indexer import ChipIndexer, NoStatsChipIndexer, Sentinel2Indexer
from stacchip.processors import prechip
from stacchip.processors.bands import S2_BANDS
from stacchip.utils import load_item
from tests.builders import coded_pixels, materialize, real_item

PLATFORM = "sentinel-2-l2a"
#: 10980 / 20 = 549 px at "10 m": 2 x 2 chips of upstream's 256 px.
FACTOR = 20
UPSTREAM_TYPES = [pa.string(), pa.date32(), pa.uint16(), pa.uint16(), pa.float32(), pa.float32()]


def _s2_item(tmp: Path, item_id: str, when: str, salt: int) -> dict[str, Any]:
    base = real_item("sentinel-2")
    keep = set(S2_BANDS) | {"scl"}
    base["assets"] = {k: v for k, v in base["assets"].items() if k in keep}
    base["id"] = item_id
    base["collection"] = PLATFORM
    base["properties"]["datetime"] = when

    def pixels(key: str, asset: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
        if key == "scl":
            scl = np.full(shape, 4, dtype=np.uint8)
            scl[:64, :32] = 9  # 20 m pixels: cloud over 128 x 64 fine pixels of chip (0, 0)
            return scl[None]
        return coded_pixels(shape, 1, "uint16", salt + len(key))

    return materialize(base, tmp, factor=FACTOR, pixels=pixels)


def _upstream_index_file(root: Path, item: dict[str, Any]) -> Path:
    """An index file exactly as upstream's processors wrote it."""
    table = Sentinel2Indexer(pystac.Item.from_dict(item)).create_index()
    path = root / "index" / PLATFORM / item["id"] / f"index_{item['id']}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Clay-style bucket: scenes + stac_item.json + upstream-written index files."""
    root = tmp_path_factory.mktemp("upstream-bucket")
    items, files = [], []
    for i, when in enumerate(["2024-03-11T14:11:54Z", "2023-07-02T09:00:00Z"]):
        item_id = f"S2UP_{i}"
        scene = root / PLATFORM / item_id
        item = _s2_item(scene, item_id, when, i)
        (scene / "stac_item.json").write_text(json.dumps(item))
        items.append(item)
        files.append(_upstream_index_file(root, item))
    return {"root": root, "items": items, "files": files, "index": root / "index"}


# --- create_index() as upstream -------------------------------------------------------------


def test_create_index_returns_upstreams_seven_columns(bucket: dict[str, Any]) -> None:
    item = pystac.Item.from_dict(bucket["items"][0])
    indexer = Sentinel2Indexer(item)
    table = indexer.create_index()
    assert table.column_names == list(UPSTREAM_COLUMNS)
    assert [table.schema.field(i).type for i in range(6)] == UPSTREAM_TYPES
    geom_type = table.schema.field("geometry").type
    assert isinstance(geom_type, pa.ExtensionType) and geom_type.extension_name == "geoarrow.polygon"
    full = indexer.create_full_index()
    assert table.num_rows == full.num_rows == 4
    assert table.column("chipid").to_pylist() == full.column("chipid").to_pylist()
    # upstream-style code reads coordinates as rings of {"x", "y"} dicts
    ring = table.column("geometry")[0].as_py()[0]
    assert set(ring[0]) == {"x", "y"} and len(ring) == 5
    want = shapely.from_wkb(full.column("geometry")[0].as_py())
    got = shapely.Polygon([(p["x"], p["y"]) for p in ring])
    assert got.equals_exact(want, 1e-12)
    # chip (0, 0): 128 x 64 of its 256 x 256 fine pixels are cloud
    assert table.column("cloud_cover_percentage")[0].as_py() == pytest.approx(1 / 8)


def test_create_index_on_a_no_stats_indexer_is_upstreams_table() -> None:
    item = pystac.Item.from_dict(real_item("naip"))
    table = NoStatsChipIndexer(item, chip_size=4096).create_index()
    assert table.shape == (3 * 2, 7)
    assert table.column("date")[0].as_py() == dt.date(2021, 10, 24)
    lons = [p["x"] for p in table.column("geometry")[0].as_py()[0]]
    assert -70.95 < min(lons) < max(lons) < -70.8


# --- upstream-written index files, read by every reader ---------------------------------------


def test_upstream_files_read_with_item_platform_and_datetime(bucket: dict[str, Any]) -> None:
    table = read_index(bucket["index"])
    assert table.schema.names == SCHEMA.names
    assert table.num_rows == 8
    assert sorted(set(table.column("item_id").to_pylist())) == ["S2UP_0", "S2UP_1"]
    assert set(table.column("platform").to_pylist()) == {PLATFORM}
    assert set(table.column("chip_size").to_pylist()) == {256}
    when = {r["item_id"]: r["datetime"] for r in table.select(["item_id", "datetime"]).to_pylist()}
    assert when["S2UP_0"] == dt.datetime(2024, 3, 11, tzinfo=dt.timezone.utc)
    # the bbox struct holds each geometry's bounds
    row = table.slice(0, 1).to_pylist()[0]
    bounds = shapely.from_wkb(row["geometry"]).bounds
    assert [row["bbox"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == pytest.approx(list(bounds))


def test_query_over_upstream_files(bucket: dict[str, Any]) -> None:
    full = read_index(bucket["index"])
    first = shapely.from_wkb(full.column("geometry")[0].as_py())
    hit = query(bucket["index"], bbox=first.centroid.buffer(1e-4).bounds, start="2024-01-01")
    assert hit.column("chipid").to_pylist() == [full.column("chipid")[0].as_py()]
    assert query(bucket["index"], platform=PLATFORM, max_cloud=0.0).num_rows == 6


def test_old_and_new_files_mix_in_one_dataset(bucket: dict[str, Any], tmp_path: Path) -> None:
    item = bucket["items"][1]
    new = tmp_path / "index" / PLATFORM / "NEW" / "index_NEW.parquet"
    table = Sentinel2Indexer(pystac.Item.from_dict(item)).create_full_index()
    write_index(table, new)
    dataset = open_index([str(bucket["files"][0]), str(new)])
    both = dataset.to_table()
    assert both.num_rows == 8
    assert sorted(set(both.column("item_id").to_pylist())) == ["S2UP_0", "S2UP_1"]


def test_write_index_takes_upstreams_table(bucket: dict[str, Any], tmp_path: Path) -> None:
    item = pystac.Item.from_dict(bucket["items"][0])
    dest = tmp_path / "index" / PLATFORM / item.id / f"index_{item.id}.parquet"
    write_index(Sentinel2Indexer(item).create_index(), dest)
    back = read_index(dest)
    assert set(back.column("item_id").to_pylist()) == {item.id}
    assert set(back.column("platform").to_pylist()) == {PLATFORM}
    meta = json.loads(pq.read_schema(dest).metadata[b"geo"])
    assert meta["columns"]["geometry"]["encoding"] == "WKB"


def test_upgrade_rewrites_once_and_keeps_rows(bucket: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(bucket["index"], root / "index")
    before = read_index(root / "index").sort_by("chipid")
    out = subprocess.run(
        [sys.executable, "-m", "stacchip.cli", "upgrade-index", str(root / "index")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "2 of 2 index files rewritten" in out.stdout
    path = root / "index" / PLATFORM / "S2UP_0" / "index_S2UP_0.parquet"
    assert pq.read_schema(path).names == SCHEMA.names
    first_bytes = path.read_bytes()
    assert upgrade_index_file(path) is False  # idempotent
    assert path.read_bytes() == first_bytes
    after = read_index(root / "index").sort_by("chipid")
    assert after.equals(before)


def test_prechip_over_an_upstream_bucket_writes_cubes(bucket: dict[str, Any], tmp_path: Path) -> None:
    cfg = prechip.PrechipConfig(
        data=str(bucket["root"]), index=str(bucket["index"]), output=str(tmp_path / "cubes"),
        platform=PLATFORM, cube_size=4, cubes_per_job=2, max_nodata=None, partial=True,
    )
    selection = prechip.prepare(cfg)
    written: list[str] = []
    for job in range(prechip.job_count(selection.n_cubes, cfg.cubes_per_job)):
        written += prechip.run_job(job, cfg)
    assert len(written) == 2
    with np.load(io.BytesIO(storage.read_bytes(written[0])), allow_pickle=False) as npz:
        pixels, chipids = npz["pixels"], npz["chipids"]
    assert pixels.shape == (4, len(S2_BANDS), 256, 256)
    item_id, x, y = str(chipids[0]).rsplit("-", 2)
    item = load_item(bucket["root"] / PLATFORM / item_id / "stac_item.json")
    chip = Chipper(ChipIndexer(item)).chip(int(x), int(y))
    np.testing.assert_array_equal(pixels[0], np.concatenate([chip[b] for b in S2_BANDS]).astype(np.float32))


def test_stacchip_chip_over_an_upstream_bucket(bucket: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "chip.npz"
    run = subprocess.run(
        [sys.executable, "-m", "stacchip.cli", "chip", str(bucket["index"]), "--chipid", "S2UP_1-1-1",
         "--out", str(out), "--assets", "red"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    item = load_item(bucket["root"] / PLATFORM / "S2UP_1" / "stac_item.json")
    want = Chipper(ChipIndexer(item), assets=["red"]).chip(1, 1)["red"]
    with np.load(out) as npz:
        np.testing.assert_array_equal(npz["red"], want)


def test_chip_dataset_over_an_upstream_bucket(bucket: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from stacchip.ml import ChipDataset

    ds = ChipDataset(bucket["index"], root=str(bucket["root"]), assets=["red", "nir"])
    assert len(ds) == 8
    pixels = np.asarray(ds[0]["pixels"])
    assert pixels.shape == (2, 256, 256)
    item_id, x, y = str(ds.chipid[0]).rsplit("-", 2)
    item = load_item(bucket["root"] / PLATFORM / item_id / "stac_item.json")
    chip = Chipper(ChipIndexer(item), assets=["red", "nir"]).chip(int(x), int(y))
    np.testing.assert_array_equal(pixels[0], chip["red"][0].astype(pixels.dtype))


# --- geometry in any geoarrow encoding -------------------------------------------------------------


def _upstream_like(geometry: pa.Array) -> pa.Table:
    return pa.table({
        "chipid": pa.array(["IT-0-0", "IT-1-0"]),
        "date": pa.array([dt.date(2024, 1, 2)] * 2, pa.date32()),
        "chip_index_x": pa.array([0, 1], pa.uint16()),
        "chip_index_y": pa.array([0, 0], pa.uint16()),
        "cloud_cover_percentage": pa.array([0.1, 0.2], pa.float32()),
        "nodata_percentage": pa.array([0.0, 0.5], pa.float32()),
        "geometry": geometry,
    })


POLYS = [shapely.box(10, 20, 11, 21), shapely.box(11, 20, 12, 21)]


@pytest.mark.parametrize("encoding", ["wkb", "wkt", "native", "interleaved", "multipolygon", "large-wkb"])
def test_geometry_in_every_encoding_becomes_wkb(encoding: str) -> None:
    import geoarrow.pyarrow as ga

    geoms = [shapely.MultiPolygon([p]) for p in POLYS] if encoding == "multipolygon" else POLYS
    wkt = ga.as_wkt(pa.array([g.wkt for g in geoms]))
    column = {
        "wkb": pa.array([g.wkb for g in geoms]),
        "large-wkb": pa.array([g.wkb for g in geoms], pa.large_binary()),
        "wkt": pa.array([g.wkt for g in geoms]),
        "native": ga.as_geoarrow(wkt),
        "interleaved": ga.as_geoarrow(wkt, coord_type=ga.CoordType.INTERLEAVED),
        "multipolygon": ga.as_geoarrow(wkt),
    }[encoding]
    table = normalize_table(_upstream_like(column))
    got = shapely.from_wkb(table.column("geometry").to_pylist())
    assert len(got) == len(geoms) and all(g.equals(w) for g, w in zip(got, geoms, strict=True))
    assert table.column("item_id").to_pylist() == ["IT", "IT"]
    assert table.column("bbox")[1].as_py() == {"xmin": 11.0, "ymin": 20.0, "xmax": 12.0, "ymax": 21.0}


def test_geometry_of_another_kind_is_a_named_error() -> None:
    with pytest.raises(IndexFileError, match="geometry"):
        geometry_wkb(pa.array([1, 2]), "f.parquet")
    with pytest.raises(IndexFileError, match="no geometry"):
        geometry_wkb(pa.array([POLYS[0].wkb, None]), "f.parquet")


@pytest.mark.parametrize("content", [b"", b"PAR1 not really"])
def test_damaged_index_file_is_named(tmp_path: Path, content: bytes) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(_upstream_like(pa.array([p.wkb for p in POLYS])), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(content)
    with pytest.raises(IndexFileError, match="bad.parquet"):
        open_index([str(good), str(bad)])
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(IndexFileError, match="truncated.parquet"):
        open_index(truncated)


# --- pixels by the item's grid ------------------------------------------------------------------


def _small_item(tmp: Path, epsg: int = 32620, **asset_fields: Any) -> dict[str, Any]:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": "small", "bbox": [0, 0, 1, 1],
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
        "properties": {"datetime": "2024-05-01T00:00:00Z", "proj:epsg": epsg, "proj:shape": [64, 64],
                       "proj:transform": [10, 0, 500000, 0, -10, 6000000]},
        "assets": {"b": {"href": str(tmp / "b.tif"), "type": "image/tiff; application=geotiff", **asset_fields}},
        "links": [], "stac_extensions": [],
    }


def _write(path: Path, data: np.ndarray, **profile: Any) -> None:
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=data.shape[-1], height=data.shape[-2],
                       count=1, dtype=data.dtype.name, **profile) as dst:
        dst.write(data[None])


def test_file_without_crs_is_read_on_the_items_grid_with_one_warning(tmp_path: Path, caplog: Any) -> None:
    from affine import Affine

    data = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    _write(tmp_path / "b.tif", data, transform=Affine(3, 1, 7, 9, -1, 0))  # garbage, no CRS
    chipper = Chipper(NoStatsChipIndexer(_small_item(tmp_path), chip_size=16))
    with caplog.at_level("WARNING", logger="stacchip"):
        first = chipper.chip(1, 2)["b"][0]
        chipper.chip(3, 3)
    np.testing.assert_array_equal(first, data[32:48, 16:32])
    warnings = [r for r in caplog.records if "states no CRS" in r.getMessage()]
    assert len(warnings) == 1 and "'small'" in warnings[0].getMessage() and "'b'" in warnings[0].getMessage()


@pytest.mark.parametrize("case", ["crs", "size", "origin"])
def test_file_contradicting_the_item_is_a_named_error(tmp_path: Path, case: str) -> None:
    from affine import Affine

    from stacchip.errors import GridMismatchError

    size = 32 if case == "size" else 64
    x0 = 500000 + (6 if case == "origin" else 4)  # 0.6 px off is an error, 0.4 px is not
    crs = "EPSG:32621" if case == "crs" else "EPSG:32620"
    _write(tmp_path / "b.tif", np.ones((size, size), np.uint8), crs=crs,
           transform=Affine(10, 0, x0, 0, -10, 6000000))
    own = {"proj:shape": [64, 64], "proj:transform": [10, 0, 500000, 0, -10, 6000000]}
    chipper = Chipper(NoStatsChipIndexer(_small_item(tmp_path, **own), chip_size=16))
    with pytest.raises(GridMismatchError) as err:
        chipper.chip(0, 0)
    assert "'small'" in str(err.value) and "'b'" in str(err.value)
    assert ("EPSG:32621" in str(err.value)) == (case == "crs")


def test_file_within_half_a_pixel_reads_on_the_items_grid(tmp_path: Path) -> None:
    from affine import Affine

    data = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    _write(tmp_path / "b.tif", data, crs="EPSG:32620", transform=Affine(10, 0, 500004, 0, -10, 6000000))
    chip = Chipper(NoStatsChipIndexer(_small_item(tmp_path), chip_size=16)).chip(2, 1)["b"][0]
    np.testing.assert_array_equal(chip, data[16:32, 32:48])


def test_coarser_file_without_own_fields_is_aligned(tmp_path: Path) -> None:
    from affine import Affine

    data = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    _write(tmp_path / "b.tif", data, crs="EPSG:32620", transform=Affine(20, 0, 500000, 0, -20, 6000000))
    chip = Chipper(NoStatsChipIndexer(_small_item(tmp_path), chip_size=16)).chip(1, 0)["b"][0]
    np.testing.assert_array_equal(chip, np.repeat(np.repeat(data[0:8, 8:16], 2, 0), 2, 1))


def test_not_a_raster_is_an_error_never_zeros(tmp_path: Path) -> None:
    from stacchip.errors import AssetReadError

    (tmp_path / "b.tif").write_bytes(b"<html>not a raster</html>")
    with pytest.raises(AssetReadError, match="b.tif"):
        Chipper(NoStatsChipIndexer(_small_item(tmp_path), chip_size=16)).chip(0, 0)


@pytest.mark.parametrize("field, value", [
    ("proj:shape", "99"), ("proj:shape", [64]), ("proj:shape", [64, 0]), ("proj:shape", [64.5, 64]),
    ("proj:shape", [True, 64]), ("proj:epsg", 32620.7), ("proj:epsg", "32620"), ("proj:epsg", True),
    ("proj:transform", [10, 0, 500000, 0, -10]), ("proj:transform", ["10", 0, 500000, 0, -10, 6000000]),
])
def test_projection_fields_are_type_checked(tmp_path: Path, field: str, value: Any) -> None:
    from stacchip.errors import ProjectionError

    item = copy.deepcopy(_small_item(tmp_path))
    item["properties"][field] = value
    with pytest.raises(ProjectionError, match=field.replace(":", ".")):
        NoStatsChipIndexer(item)


def test_integral_float_epsg_is_accepted(tmp_path: Path) -> None:
    item = _small_item(tmp_path)
    item["properties"]["proj:epsg"] = 32620.0
    assert NoStatsChipIndexer(item, chip_size=16).crs.to_epsg() == 32620
    assert math.isclose(NoStatsChipIndexer(item, chip_size=16).bbox[0], 500000)
