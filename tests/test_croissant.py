"""``stacchip croissant``: Croissant 1.1 + GeoCroissant + RAI, validated and loaded by mlcroissant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from stacchip.cli import main
from stacchip.errors import ConfigError
from stacchip.index import read_index, write_index
from stacchip.ml.croissant import GEOCROISSANT_1_0, RAI_FIELDS, croissant_metadata, write_croissant
from stacchip.ml.items import ItemSource
from stacchip.ml.splits import assign_splits
from tests.ml_scenes import FACTOR, scene_fixture

mlc = pytest.importorskip("mlcroissant")


scene = scene_fixture("croissant", dates_a=2, dates_b=1)


def _load(path: Path):
    dataset = mlc.Dataset(jsonld=str(path))
    issues = dataset.metadata.ctx.issues
    assert not issues.errors, issues.errors
    assert not issues.warnings, issues.warnings
    return dataset


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def test_single_file_validates_and_records_equal_the_index(scene, tmp_path):
    index_file = scene.index_files[0]
    out = tmp_path / "croissant.json"
    write_croissant([str(index_file)], out, items=ItemSource(root=scene.root), name="s2-chips")
    doc = json.loads(out.read_text())
    assert doc["distribution"][0]["@type"] == "cr:FileObject"
    content = doc["distribution"][0]["contentUrl"]
    assert not Path(content).is_absolute()
    assert (out.parent / content).resolve() == Path(index_file).resolve()
    dataset = _load(out)
    records = list(dataset.records("chips"))
    table = read_index(index_file)
    assert len(records) == table.num_rows
    by_id = {_text(r["chips/chipid"]): r for r in records}
    for row in table.to_pylist():
        rec = by_id[row["chipid"]]
        assert rec["chips/chip_index_x"] == row["chip_index_x"]
        assert rec["chips/chip_index_y"] == row["chip_index_y"]
        assert rec["chips/cloud_cover_percentage"] == pytest.approx(row["cloud_cover_percentage"])
        assert _text(rec["chips/item_id"]) == row["item_id"]
        assert rec["chips/bbox"]["chips/bbox/xmin"] == pytest.approx(row["bbox"]["xmin"])
        assert rec["chips/geometry"] == row["geometry"]


def test_many_files_as_a_fileset(scene, tmp_path):
    outside = tmp_path / "meta" / "croissant.json"
    outside.parent.mkdir()
    with pytest.raises(ConfigError, match="at or above the index directory"):
        write_croissant([str(scene.index_dir)], outside)
    out = scene.index_dir.parent / "croissant.json"
    write_croissant([str(scene.index_dir)], out)
    doc = json.loads(out.read_text())
    fileset = doc["distribution"][0]
    assert fileset["@type"] == "cr:FileSet"
    assert len(fileset["includes"]) == len(scene.index_files)
    assert all(p.startswith("index/") for p in fileset["includes"])
    records = list(_load(out).records("chips"))
    table = read_index(scene.index_dir)
    assert sorted(_text(r["chips/chipid"]) for r in records) == sorted(table.column("chipid").to_pylist())


def test_geocroissant_terms_and_coverage(scene, tmp_path):
    doc = croissant_metadata(str(scene.index_dir), out_dir=scene.index_dir.parent, items=ItemSource(root=scene.root))
    assert doc["conformsTo"][0] == "http://mlcommons.org/croissant/1.1"
    assert GEOCROISSANT_1_0 in doc["conformsTo"]
    assert doc["@context"]["geocr"] == "http://mlcommons.org/croissant/geo/"
    assert doc["geocr:coordinateReferenceSystem"] == "EPSG:32720"
    assert doc["geocr:spatialResolution"] == {"@type": "QuantitativeValue", "value": 10.0 * FACTOR, "unitText": "m"}
    names = doc["geocr:bandConfiguration"]["geocr:bandNameList"]
    assert {"red", "green", "blue", "nir", "swir16"} <= set(names)
    assert doc["geocr:bandConfiguration"]["geocr:totalBands"] == len(names)
    red = next(b for b in doc["geocr:spectralBandMetadata"] if b["name"] == "red")
    assert red["geocr:centerWavelength"]["value"] == pytest.approx(665.0)
    table = read_index(scene.index_dir)
    bbox = table.column("bbox").combine_chunks()
    south, west, north, east = (float(v) for v in doc["spatialCoverage"]["geo"]["box"].split())
    assert west == pytest.approx(pc.min(bbox.field("xmin")).as_py(), abs=1e-5)
    assert north == pytest.approx(pc.max(bbox.field("ymax")).as_py(), abs=1e-5)
    assert south < north and west < east
    start, end = doc["temporalCoverage"].split("/")
    times = sorted(t.isoformat().replace("+00:00", "Z") for t in table.column("datetime").to_pylist())
    assert (start, end) == (times[0], times[-1])
    assert doc["rai:dataCollectionTimeFrame"] == [times[0], times[-1]]
    # Without items: geometry CRS and user-given facts.
    bare = croissant_metadata(str(scene.index_dir), out_dir=scene.index_dir.parent, resolution_m=10.0, band_names=["a", "b"])
    assert bare["geocr:coordinateReferenceSystem"] == "OGC:CRS84"
    assert bare["geocr:spatialResolution"]["value"] == 10.0
    assert bare["geocr:bandConfiguration"]["geocr:bandNameList"] == ["a", "b"]


def test_cli_rai_flags_round_trip_through_mlcroissant(scene, capsys):
    out = scene.index_dir.parent / "cli_croissant.json"
    rc = main([
        "croissant", str(scene.index_dir), "--out", str(out), "--name", "chips", "--validate",
        "--data-root", str(scene.root), "--url", "https://example.org/chips", "--cite-as", "Chips (2026)",
        "--rai-data-collection", "Sentinel-2 L2A scenes from Earth Search",
        "--rai-data-collection-type", "satellite imagery",
        "--rai-data-biases", "one MGRS tile", "--rai-data-biases", "one season",
        "--rai-data-limitations", "synthetic pixels",
        "--rai-data-use-cases", "land cover segmentation",
        "--rai-personal-sensitive-information", "none",
        "--rai-data-social-impact", "low",
        "--rai-data-release-maintenance-plan", "none",
        "--creator", "Ada", "--keyword", "crops",
    ])
    assert rc == 0
    assert "valid" in capsys.readouterr().out
    meta = _load(out).metadata
    assert meta.data_collection == "Sentinel-2 L2A scenes from Earth Search"
    assert meta.data_collection_type == ["satellite imagery"]
    assert meta.data_biases == ["one MGRS tile", "one season"]
    assert meta.data_limitations == ["synthetic pixels"]
    assert meta.data_use_cases == ["land cover segmentation"]
    assert meta.personal_sensitive_information == ["none"]
    assert meta.data_social_impact == "low"
    assert meta.data_release_maintenance_plan == "none"
    assert meta.url == "https://example.org/chips"
    assert meta.cite_as == "Chips (2026)"
    assert meta.data_preprocessing_protocol and "px" in meta.data_preprocessing_protocol[0]
    doc = json.loads(out.read_text())
    assert doc["creator"] == [{"@type": "sc:Person", "name": "Ada"}]
    assert doc["keywords"] == ["crops"]
    assert set(k[4:] for k in doc if k.startswith("rai:")) <= set(RAI_FIELDS)


def test_split_column_and_cubes_are_described(scene, tmp_path):
    table = assign_splits(read_index(scene.index_dir), block_size=30_000.0)
    index_file = tmp_path / "index" / "chips.parquet"
    write_index(table, index_file)
    cubes = tmp_path / "cubes"
    cubes.mkdir()
    np.savez(cubes / "cube_00000.npz", pixels=np.zeros((2, 3, 4, 4), dtype=np.uint16))
    out = tmp_path / "croissant.json"
    write_croissant([str(index_file)], out, cubes=[str(cubes)])
    doc = json.loads(out.read_text())
    field_names = [f["name"] for f in doc["recordSet"][0]["field"]]
    assert "split" in field_names and "split_block" in field_names
    assert doc["distribution"][1]["includes"] == "cubes/*.npz"
    records = list(_load(out).records("chips"))
    assert sorted(_text(r["chips/split"]) for r in records) == sorted(table.column("split").to_pylist())


def test_bad_inputs_are_named(scene, tmp_path):
    with pytest.raises(ConfigError, match="dataWhatever"):
        croissant_metadata(str(scene.index_dir), out_dir=scene.index_dir.parent, rai={"dataWhatever": "x"})


def test_cli_without_items_asks_for_data_root(scene, tmp_path, capsys):
    """Index files without item_href (as the processors write them): no silent CRS-less metadata."""
    index_file = tmp_path / "index" / "chips.parquet"
    write_index(read_index(scene.index_dir), index_file)
    out = tmp_path / "croissant.json"
    rc = main(["croissant", str(index_file.parent), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "--data-root" in err and "--crs, --resolution and --bands" in err
    assert len(err.strip().splitlines()) == 1
    rc = main(["croissant", str(index_file.parent), "--out", str(out), "--data-root", str(scene.root)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["geocr:coordinateReferenceSystem"] == "EPSG:32720"
    assert doc["geocr:spatialResolution"]["value"] == 10.0 * FACTOR
    assert "red" in doc["geocr:bandConfiguration"]["geocr:bandNameList"]
    # or every fact stated by hand
    rc = main(["croissant", str(index_file.parent), "--out", str(out), "--crs", "EPSG:32720",
               "--resolution", "300", "--bands", "red,nir"])
    assert rc == 0
    assert json.loads(out.read_text())["geocr:bandConfiguration"]["geocr:bandNameList"] == ["red", "nir"]
    # index files of `stacchip index` record item_href: the facts come from the items, no flag needed
    rc = main(["croissant", str(scene.index_files[0]), "--out", str(tmp_path / "from_href.json")])
    assert rc == 0
    assert json.loads((tmp_path / "from_href.json").read_text())["geocr:coordinateReferenceSystem"] == "EPSG:32720"
