"""Hostile input: bad STAC items, broken rasters, odd index files. Each ends in a named
error from the exception tree (or a correct result), never a raw traceback or a silent
wrong result; console scripts exit 2 with one line naming what was wrong."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stacchip.chipper import Chipper
from stacchip.errors import IndexFileError, ItemError, StacchipError
from stacchip.index import open_index, read_index, write_index
from stacchip.indexer import NoStatsChipIndexer, Sentinel2Indexer
from tests.builders import real_item, write_cog


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stacchip.cli", *args], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("content", ["[]", "{}", "null", '"an item"', "42", "{not json"])
def test_item_json_that_is_no_item_exits_2(tmp_path: Path, content: str) -> None:
    path = tmp_path / "item.json"
    path.write_text(content)
    _one_line_error(_run("index", str(path), "--out", str(tmp_path / "i.parquet")), "item.json")
    assert not (tmp_path / "i.parquet").exists()


def test_item_without_any_datetime_exits_2(tmp_path: Path) -> None:
    item = real_item("naip")
    item["properties"]["datetime"] = None
    item["properties"].pop("start_datetime", None)
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item))
    _one_line_error(_run("index", str(path), "--out", str(tmp_path / "i.parquet"), "--indexer", "naip"),
                    "datetime")
    assert not (tmp_path / "i.parquet").exists()


def test_item_without_assets_is_refused(tmp_path: Path) -> None:
    item = real_item("naip")
    item["assets"] = {}
    with pytest.raises(ItemError, match="no assets"):
        NoStatsChipIndexer(item)


# --- random garbage in item fields ---------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
FIELDS = [
    ("id",), ("type",), ("properties",), ("properties", "datetime"), ("properties", "start_datetime"),
    ("properties", "proj:epsg"), ("properties", "proj:code"), ("properties", "proj:shape"),
    ("properties", "proj:transform"), ("properties", "proj:wkt2"), ("properties", "proj:projjson"),
    ("assets",), ("assets", "asset"), ("assets", "asset", "href"), ("assets", "asset", "proj:shape"),
    ("assets", "asset", "proj:transform"), ("assets", "asset", "raster:bands"), ("bbox",), ("geometry",),
    ("collection",), ("stac_extensions",), ("links",),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_garbage_in_item_fields_never_gives_a_traceback(field: tuple[str, ...], value: Any) -> None:
    item = copy.deepcopy(real_item("naip"))
    target = item
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    try:
        table = NoStatsChipIndexer(item, chip_size=2048).create_full_index()
    except StacchipError:
        return
    # accepted: the index must then be a consistent one
    assert table.num_rows > 0
    ids = table.column("chipid").to_pylist()
    assert len(set(ids)) == len(ids)
    assert all(isinstance(v, str) and v for v in table.column("item_id").to_pylist())


# --- broken rasters ------------------------------------------------------------------------------


def _grid_item(tmp: Path, href: str, rows: int = 40, cols: int = 40, **asset: Any) -> dict[str, Any]:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": "edge", "bbox": [0, 0, 1, 1],
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
        "properties": {"datetime": "2024-05-01T00:00:00Z", "proj:epsg": 32633, "proj:shape": [rows, cols],
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {"b": {"href": href, "type": "image/tiff; application=geotiff", **asset}},
        "links": [], "stac_extensions": [],
    }


def test_uint8_band_with_nodata_outside_its_range_is_a_named_error(tmp_path: Path) -> None:
    # the declared nodata (-9999) cannot be stored in the band's uint8: filling the
    # part of an edge chip beyond the raster with it would wrap around silently
    path = write_cog(tmp_path / "b.tif", np.ones((1, 30, 30), np.uint8),
                     Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32633", blocksize=16)
    item = _grid_item(tmp_path, str(path), 30, 30, **{"raster:bands": [{"nodata": -9999}],
                                                       "proj:shape": [30, 30]})
    item["assets"]["b"]["proj:transform"] = [10, 0, 500000, 0, -10, 4000000]
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=16, edge="keep"))
    np.testing.assert_array_equal(chipper.chip(0, 0)["b"], np.ones((1, 16, 16), np.uint8))  # inside: fine
    with pytest.raises(ItemError, match=r"'b'.*-9999.*uint8"):
        chipper.chip(1, 1)


def test_index_of_a_scl_file_that_is_no_raster_fails_naming_it(tmp_path: Path) -> None:
    base = real_item("sentinel-2")
    (tmp_path / "scl.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    base["assets"] = {"scl": {**base["assets"]["scl"], "href": str(tmp_path / "scl.tif")}}
    with pytest.raises(StacchipError, match="scl"):
        Sentinel2Indexer(base).create_full_index()


def test_declared_shape_larger_than_the_file_is_a_named_error(tmp_path: Path) -> None:
    from stacchip.errors import GridMismatchError

    path = write_cog(tmp_path / "b.tif", np.ones((1, 16, 16), np.uint16),
                     Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32633", blocksize=16)
    item = _grid_item(tmp_path, str(path), 64, 64, **{"proj:shape": [64, 64],
                                                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]})
    with pytest.raises(GridMismatchError, match="16x16"):
        Chipper(NoStatsChipIndexer(item, chip_size=16)).chip(3, 3)


# --- odd index files -----------------------------------------------------------------------------


def _index(tmp: Path, name: str = "good") -> Path:
    import datetime as dt

    import shapely

    from stacchip.index import index_table

    table = index_table(
        item_id=name, platform="naip", datetime=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), chip_size=256,
        xs=np.arange(3), ys=np.zeros(3, int), cloud=np.zeros(3), nodata=np.zeros(3),
        polygons=np.array([shapely.box(i, 0, i + 1, 1) for i in range(3)]),
    )
    return Path(write_index(table, tmp / f"{name}.parquet"))


def test_mixed_schema_index_file_is_named(tmp_path: Path) -> None:
    good = _index(tmp_path)
    table = read_index(good).set_column(2, "chip_index_x", pa.array(["a", "b", "c"]))
    pq.write_table(table, tmp_path / "odd.parquet")
    with pytest.raises(IndexFileError, match="odd.parquet"):
        open_index(tmp_path)


def test_duplicate_chip_ids_stop_prechip_with_exit_2(tmp_path: Path) -> None:
    _index(tmp_path / "index", "same")
    import shutil

    shutil.copy(tmp_path / "index" / "same.parquet", tmp_path / "index" / "copy.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "stacchip.processors.prechip", "--data", str(tmp_path), "--indexpath",
         str(tmp_path / "index"), "--chips", str(tmp_path / "out"), "--platform", "naip", "--all",
         "--max-nodata", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "duplicate" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["missing", "not-a-raster"])
def test_qa_file_missing_or_not_a_raster_exits_2(tmp_path: Path, what: str) -> None:
    base = real_item("sentinel-2")
    scl = tmp_path / "scl.tif"
    if what == "not-a-raster":
        scl.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    base["assets"] = {"scl": {**base["assets"]["scl"], "href": str(scl)}}
    item = tmp_path / "item.json"
    item.write_text(json.dumps(base))
    line = _one_line_error(_run("index", str(item), "--out", str(tmp_path / "i.parquet")), "'scl'", "scl.tif")
    assert "not a readable raster" in line
    assert not (tmp_path / "i.parquet").exists()
