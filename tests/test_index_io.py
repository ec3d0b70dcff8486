import datetime as dt
import json

import duckdb
import geopandas as gpd
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pyproj
import pystac
import pytest
import shapely
from affine import Affine

from stacchip.errors import ConfigError, IndexFileError
from stacchip.index import SCHEMA, open_index, query, read_index, read_metadata, write_index
from stacchip.indexer import Sentinel2Indexer
from tests.builders import write_cog


def _item(tmp_path, name, when, x0=500000, cloud_rows=0, collection="sentinel-2-l2a"):
    scl = np.full((20, 40), 4, dtype=np.uint8)
    scl[:cloud_rows] = 9
    path = write_cog(tmp_path / f"{name}.tif", scl, Affine(20, 0, x0, 0, -20, 4000000), "EPSG:32633")
    return pystac.Item.from_dict(
        {
            "type": "Feature", "stac_version": "1.0.0", "id": name, "collection": collection,
            "geometry": None, "links": [],
            "properties": {"datetime": when, "proj:epsg": 32633, "proj:shape": [40, 80],
                           "proj:transform": [10, 0, x0, 0, -10, 4000000]},
            "assets": {"scl": {"href": str(path)}},
        }
    )


@pytest.fixture
def indexes(tmp_path):
    """Three items: two in one place at different dates, one 100 km east."""
    out = tmp_path / "index"
    specs = [
        ("A", "2024-01-10T10:00:00Z", 500000, 10, "sentinel-2-l2a"),
        ("B", "2024-06-10T10:00:00Z", 500000, 0, "sentinel-2-l2a"),
        ("C", "2024-06-11T10:00:00Z", 600000, 20, "landsat-c2l2-sr"),
    ]
    paths = []
    for name, when, x0, cloud_rows, coll in specs:
        table = Sentinel2Indexer(_item(tmp_path, name, when, x0, cloud_rows, coll), chip_size=20).create_full_index()
        paths.append(write_index(table, out / coll / name / f"index_{name}.parquet",
                                 extra_metadata={"item_id": name}))
    return out, paths


def test_geoparquet_metadata(indexes):
    _, paths = indexes
    meta = json.loads(pq.read_schema(paths[0]).metadata[b"geo"])
    assert meta["version"] == "1.1.0"
    assert meta["primary_column"] == "geometry"
    col = meta["columns"]["geometry"]
    assert col["encoding"] == "WKB"
    assert col["geometry_types"] == ["Polygon"]
    assert col["crs"] is not None
    assert pyproj.CRS.from_json_dict(col["crs"]).equals(pyproj.CRS.from_user_input("OGC:CRS84"))
    assert col["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    table = pq.read_table(paths[0])
    assert table.schema.equals(SCHEMA, check_metadata=False)
    geoms = shapely.from_wkb(table.column("geometry").to_pylist())
    lo = shapely.bounds(geoms).min(axis=0)
    hi = shapely.bounds(geoms).max(axis=0)
    assert col["bbox"] == pytest.approx([lo[0], lo[1], hi[2], hi[3]])
    md = pq.ParquetFile(paths[0]).metadata
    assert md.row_group(0).column(0).compression == "ZSTD"
    assert read_metadata(paths[0]) == {"item_id": "A"}


def test_read_with_geopandas_and_bbox_filter(indexes):
    _, paths = indexes
    gdf = gpd.read_parquet(paths[0])
    assert gdf.crs.equals(pyproj.CRS.from_user_input("OGC:CRS84")) or gdf.crs.to_epsg() == 4326
    assert len(gdf) == 8
    assert gdf.geometry.iloc[0].geom_type == "Polygon"
    first = gdf.geometry.iloc[0]
    minx, miny, maxx, maxy = first.bounds
    small = (minx + 1e-6, miny + 1e-6, minx + 2e-6, miny + 2e-6)
    hit = gpd.read_parquet(paths[0], bbox=small)
    assert 1 <= len(hit) < len(gdf)
    assert gdf.iloc[0]["chipid"] in set(hit["chipid"])


def test_read_with_duckdb(indexes):
    _, paths = indexes
    con = duckdb.connect()
    rows = con.execute(
        f"select count(*), min(chip_index_x), max(cloud_cover_percentage) from read_parquet('{paths[0]}')"
    ).fetchone()
    assert rows[0] == 8 and rows[1] == 0 and rows[2] == pytest.approx(1.0)
    n = con.execute(
        f"select count(*) from read_parquet({[str(p) for p in paths]!r}) where bbox.xmin > -70"
    ).fetchone()[0]
    assert n == 24


def test_pyarrow_dataset_over_directory(indexes):
    root, _ = indexes
    ds = pads.dataset(str(root), format="parquet")
    assert ds.count_rows() == 24
    merged = open_index(root)
    assert merged.count_rows() == 24
    table = read_index([root / "sentinel-2-l2a", root / "landsat-c2l2-sr"])
    assert sorted(set(table.column("item_id").to_pylist())) == ["A", "B", "C"]


def test_query_filters(indexes):
    root, paths = indexes
    ds = open_index(root)
    assert set(query(ds, platform="landsat-c2l2-sr").column("item_id").to_pylist()) == {"C"}
    assert set(query(ds, start="2024-06-01").column("item_id").to_pylist()) == {"B", "C"}
    assert set(query(ds, end=dt.date(2024, 1, 31)).column("item_id").to_pylist()) == {"A"}
    assert set(query(ds, start="2024-06-10T10:00:00Z", end="2024-06-10T10:00:00Z")
               .column("item_id").to_pylist()) == {"B"}
    clear = query(ds, max_cloud=0.0)
    assert set(clear.column("item_id").to_pylist()) == {"A", "B"}
    assert np.all(clear.column("cloud_cover_percentage").to_numpy() == 0)
    assert query(ds, max_nodata=0.0).num_rows == 24
    a = read_index(paths[0])
    box = shapely.from_wkb(a.column("geometry")[0].as_py()).bounds
    hits = query(ds, bbox=box)
    assert set(hits.column("item_id").to_pylist()) == {"A", "B"}
    assert 1 <= hits.num_rows <= 8
    assert query(ds, item_id=["C"], columns=["chipid"]).column_names == ["chipid"]


def test_query_time_range_dates_and_timezones(indexes):
    root, _ = indexes
    ds = open_index(root)

    def ids(**kw):
        return set(query(ds, **kw).column("item_id").to_pylist())

    # A date end includes that whole day (B is at 10:00 UTC on 2024-06-10).
    assert ids(start="2024-06-10", end="2024-06-10") == {"B"}
    assert ids(start=dt.date(2024, 6, 10), end=dt.date(2024, 6, 10)) == {"B"}
    assert ids(end="2024-06-10T09:59:59Z") == {"A"}
    # Offsets are honoured: 12:00+02:00 is B's instant exactly.
    assert ids(start="2024-06-10T12:00:00+02:00", end="2024-06-10T12:00:00+02:00") == {"B"}
    with pytest.raises(ConfigError, match="end"):
        query(ds, end="10th of June")


@pytest.mark.parametrize("kw", [{"bbox": (1, 2, 3)}, {"bbox": ("a", 0, 1, 1)}, {"bbox": (0, 10, 5, 1)},
                                {"max_cloud": "low"}, {"max_nodata": "x"}])
def test_query_bad_filters_are_named(indexes, kw):
    root, _ = indexes
    with pytest.raises(ConfigError, match=next(iter(kw))):
        query(open_index(root), **kw)


def test_query_bbox_across_the_antimeridian(indexes):
    root, paths = indexes
    ds = open_index(root)
    a = read_index(paths[0])
    lon0, lat0, lon1, lat1 = shapely.from_wkb(a.column("geometry")[0].as_py()).bounds
    # A box from lon1-0.001 east across 180 to -170 holds the first chip's east edge only.
    hit = query(ds, bbox=(lon1 - 1e-3, lat0, -170.0, lat1), item_id="A")
    assert 0 < hit.num_rows < a.num_rows
    miss = query(ds, bbox=(lon1 + 50, lat0, -170.0, lat1), item_id="A")
    assert miss.num_rows == 0


def test_index_date_is_the_utc_date():
    from stacchip.index import index_table

    when = dt.datetime(2024, 6, 10, 22, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    table = index_table(
        item_id="x", platform="p", datetime=when, chip_size=8, xs=np.array([0]), ys=np.array([0]),
        cloud=np.array([0.0]), nodata=np.array([0.0]), polygons=np.array([shapely.box(0, 0, 1, 1)]),
    )
    assert table.column("date")[0].as_py() == dt.date(2024, 6, 11)
    assert table.column("datetime")[0].as_py() == dt.datetime(2024, 6, 11, 3, 30, tzinfo=dt.timezone.utc)


def test_missing_index_sources(tmp_path):
    with pytest.raises(IndexFileError, match="no .parquet"):
        open_index(tmp_path)
    with pytest.raises(IndexFileError, match="nothing-here"):
        open_index(tmp_path / "nothing-here")


def test_failed_write_leaves_nothing(tmp_path, indexes):
    _, paths = indexes
    # a derivable column (bbox) is filled in; a column that cannot be derived is an error
    table = read_index(paths[0]).drop_columns(["nodata_percentage"])
    dest = tmp_path / "out" / "bad.parquet"
    with pytest.raises(IndexFileError, match="nodata_percentage"):
        write_index(table, dest)
    assert not dest.exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.services
def test_write_and_read_index_on_s3(indexes, s3_bucket):
    _, paths = indexes
    table = read_index(paths[0])
    url = f"s3://{s3_bucket}/index/sentinel-2-l2a/A/index_A.parquet"
    write_index(table, url, extra_metadata={"item_id": "A"})
    write_index(read_index(paths[1]), f"s3://{s3_bucket}/index/sentinel-2-l2a/B/index_B.parquet")
    assert read_metadata(url) == {"item_id": "A"}
    back = read_index(f"s3://{s3_bucket}/index/")
    assert back.num_rows == 16
    assert set(back.column("item_id").to_pylist()) == {"A", "B"}
    assert query(f"s3://{s3_bucket}/index", start="2024-06-01").num_rows == 8


def test_limits_keep_chips_exactly_at_the_limit(tmp_path):
    # 5 cloudy SCL pixels (20 fine pixels of 400) in chip (0, 0): 0.05, stored as float32(0.05) > 0.05.
    scl = np.full((20, 20), 4, dtype=np.uint8)
    scl[0, 0:5] = 9
    path = write_cog(tmp_path / "scl.tif", scl, Affine(20, 0, 500000, 0, -20, 4000000), "EPSG:32633")
    item = pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": "E", "geometry": None, "links": [],
        "properties": {"datetime": "2024-01-01T00:00:00Z", "proj:epsg": 32633, "proj:shape": [40, 40],
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {"scl": {"href": str(path)}},
    })
    out = write_index(Sentinel2Indexer(item, chip_size=20).create_full_index(), tmp_path / "i.parquet")
    table = read_index(out)
    assert table.column("cloud_cover_percentage").to_numpy()[0] == np.float32(0.05)
    assert np.float64(np.float32(0.05)) > 0.05
    assert query(out, max_cloud=0.05).num_rows == 4
    assert query(out, max_cloud=0.0499).num_rows == 3


def test_filters_are_declared_once_and_unknown_ones_refused(tmp_path):
    from stacchip.index import FILTERS, bbox_array, check_filters

    assert FILTERS == ("bbox", "start", "end", "max_cloud", "max_nodata", "platform", "item_id")
    assert check_filters({"bbox": None, "max_cloud": 0.1}) == {"max_cloud": 0.1}
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_clouds'"):
        query(tmp_path, max_clouds=0.1)
    assert bbox_array(SCHEMA.empty_table()).shape == (0, 4)
