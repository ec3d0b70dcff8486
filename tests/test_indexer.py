import datetime as dt

import numpy as np
import pyarrow as pa
import pyproj
import pystac
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stacchip.errors import (
    AssetNotFoundError,
    AssetReadError,
    ChipOutOfRangeError,
    ConfigError,
    DatetimeError,
)
from stacchip.indexer import (
    ChipIndexer,
    LandsatIndexer,
    ModisIndexer,
    NoDataMaskChipIndexer,
    NoStatsChipIndexer,
    Sentinel1Indexer,
    Sentinel2Indexer,
)
from tests.builders import materialize, real_item, write_cog

UPSTREAM_COLUMNS = {
    "chipid": pa.string(),
    "date": pa.date32(),
    "chip_index_x": pa.uint16(),
    "chip_index_y": pa.uint16(),
    "cloud_cover_percentage": pa.float32(),
    "nodata_percentage": pa.float32(),
}


def _scl_pixels(key, asset, shape):
    rng = np.random.default_rng(7)
    if key == "scl":
        return rng.integers(0, 12, size=shape, dtype=np.uint8)[None]
    return rng.integers(1, 10000, size=(1, *shape), dtype=np.uint16)


def _landsat_pixels(key, asset, shape):
    rng = np.random.default_rng(3)
    if key == "qa_pixel":
        choices = np.array([21824, 1, 22280, 21952, 23888, 54596], dtype=np.uint16)
        return choices[rng.integers(0, len(choices), size=shape)][None]
    return rng.integers(1, 60000, size=(1, *shape), dtype=np.uint16)


def _s1_pixels(key, asset, shape):
    rng = np.random.default_rng(11 if key == "vv" else 12)
    data = rng.random(shape, dtype=np.float32)
    data[: shape[0] // 3, : shape[1] // 4] = -32768  # nodata block
    if key == "vh":
        data[-3:, -5:] = np.nan
    return data[None]


CASES = {
    # name: (factor, chip_size, indexer class, pixels)
    "sentinel-2": (30, 64, Sentinel2Indexer, _scl_pixels),
    "landsat": (30, 64, LandsatIndexer, _landsat_pixels),
    "naip": (20, 128, NoStatsChipIndexer, None),
    "sentinel-1": (50, 64, Sentinel1Indexer, _s1_pixels),
    "upstream-test": (1, 256, NoStatsChipIndexer, None),
}


@pytest.fixture(params=sorted(CASES))
def real_case(request, tmp_path):
    name = request.param
    factor, chip, cls, pixels = CASES[name]
    item = materialize(real_item(name), tmp_path, factor=factor, pixels=pixels)
    return name, item, chip, cls


def _expected_grid(item):
    """Finest grid read straight from the (scaled) item dict, independently of stacchip."""
    props = item["properties"]
    if "proj:shape" in props:
        return props["proj:shape"], props["proj:transform"]
    grids = [(a["proj:transform"][0], a["proj:shape"], a["proj:transform"])
             for a in item["assets"].values() if "proj:shape" in a]
    _, shape, transform = min(grids, key=lambda g: g[0])
    return shape, transform


def _epsg(item):
    props = item["properties"]
    return props.get("proj:epsg") or int(props["proj:code"].split(":")[1])


def test_every_real_item_indexes(real_case):
    name, item_dict, chip, cls = real_case
    item = pystac.Item.from_dict(item_dict)
    indexer = cls(item, chip_size=chip, chip_max_nodata=1.0)
    (rows, cols), t = _expected_grid(item_dict)
    assert indexer.shape == [rows, cols]
    assert indexer.x_size == cols // chip and indexer.y_size == rows // chip
    table = indexer.create_full_index()
    assert table.num_rows == indexer.size == (cols // chip) * (rows // chip)
    for column, typ in UPSTREAM_COLUMNS.items():
        assert table.schema.field(column).type == typ, column
    ids = table.column("chipid").to_pylist()
    assert ids[0] == f"{item.id}-0-0"
    assert ids[1] == f"{item.id}-1-0"
    assert ids[-1] == f"{item.id}-{indexer.x_size - 1}-{indexer.y_size - 1}"
    assert set(table.column("item_id").to_pylist()) == {item.id}
    # First chip polygon: corners of the chip reprojected to lon/lat independently.
    tr = pyproj.Transformer.from_crs(_epsg(item_dict), 4326, always_xy=True)
    x0, y0, res_x, res_y = t[2], t[5], t[0], t[4]
    corners = [(x0, y0), (x0 + chip * res_x, y0), (x0 + chip * res_x, y0 + chip * res_y), (x0, y0 + chip * res_y)]
    want = shapely.Polygon([tr.transform(x, y) for x, y in corners])
    got = shapely.from_wkb(table.column("geometry").chunk(0).storage[0].as_py())
    assert got.equals_exact(shapely.normalize(want), 1e-9) or shapely.normalize(got).equals_exact(
        shapely.normalize(want), 1e-9
    )
    assert indexer.get_chip_bbox(0, 0).equals_exact(got, 1e-12)
    # Fractions are fractions.
    cloud = table.column("cloud_cover_percentage").to_numpy()
    nodata = table.column("nodata_percentage").to_numpy()
    assert np.all((cloud >= 0) & (cloud <= 1)) and np.all((nodata >= 0) & (nodata <= 1))
    if cls in (Sentinel2Indexer, LandsatIndexer):
        assert cloud.max() > 0 and nodata.max() > 0
    if cls is Sentinel1Indexer:
        assert nodata.max() == 1.0 and np.all(cloud == 0)


def _fine_item(rows, cols, qa_res, qa_shape, qa_origin, path, crs="EPSG:32633", **props):
    return pystac.Item.from_dict(
        {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": "synthetic",
            "geometry": None,
            "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:code": crs,
                           "proj:shape": [rows, cols],
                           "proj:transform": [10, 0, 500000, 0, -10, 4000000], **props},
            "links": [],
            "assets": {
                "b": {"href": "unused.tif"},
                "scl": {"href": str(path), "proj:shape": list(qa_shape),
                        "proj:transform": [qa_res, 0, qa_origin[0], 0, -qa_res, qa_origin[1]]},
            },
        }
    )


def _reference_fractions(qa, qa_res, qa_origin, rows, cols, chip, decode):
    """Nearest-neighbour upsample of the QA band onto the 10 m grid, pixel by pixel
    (exact integer arithmetic), then chip-by-chip counts."""
    ny, nx = rows // chip, cols // chip
    r = np.arange(ny * chip)
    c = np.arange(nx * chip)
    # centre x = 500000 + (c + 0.5) * 10 ; column = floor((x - x0) / res), in integers x2.
    qc = np.floor_divide(2 * 500000 + (2 * c + 1) * 10 - 2 * qa_origin[0], 2 * qa_res)
    qr = np.floor_divide(2 * qa_origin[1] - (2 * 4000000 - (2 * r + 1) * 10), 2 * qa_res)
    inside = (qr[:, None] >= 0) & (qr[:, None] < qa.shape[0]) & (qc[None] >= 0) & (qc[None] < qa.shape[1])
    up = qa[np.clip(qr, 0, qa.shape[0] - 1)][:, np.clip(qc, 0, qa.shape[1] - 1)]
    cloud, nodata = decode(up)
    nodata = nodata | ~inside
    cloud = cloud & inside
    cf = cloud.reshape(ny, chip, nx, chip).mean(axis=(1, 3))
    nf = nodata.reshape(ny, chip, nx, chip).mean(axis=(1, 3))
    return cf.astype(np.float32), nf.astype(np.float32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(8, 120),
    cols=st.integers(8, 120),
    chip=st.integers(3, 40),
    qa_res=st.sampled_from([10, 20, 30, 25, 60, 70]),
    dx=st.integers(-40, 40),
    dy=st.integers(-40, 40),
    seed=st.integers(0, 1000),
)
def test_sentinel2_stats_equal_nearest_upsample(tmp_path_factory, rows, cols, chip, qa_res, dx, dy, seed):
    from stacchip import qa as qamod

    chip = min(chip, rows, cols)
    tmp = tmp_path_factory.mktemp("s2")
    qa_origin = (500000 + dx, 4000000 + dy)
    qa_shape = (int(np.ceil(rows * 10 / qa_res)) + 1, int(np.ceil(cols * 10 / qa_res)) + 1)
    qa = np.random.default_rng(seed).integers(0, 12, size=qa_shape, dtype=np.uint8)
    path = write_cog(tmp / "scl.tif", qa, Affine(qa_res, 0, qa_origin[0], 0, -qa_res, qa_origin[1]), "EPSG:32633")
    item = _fine_item(rows, cols, qa_res, qa_shape, qa_origin, path)
    indexer = Sentinel2Indexer(item, chip_size=chip, chip_max_nodata=1.0)
    table = indexer.create_full_index()
    want_cloud, want_nodata = _reference_fractions(qa, qa_res, qa_origin, rows, cols, chip, qamod.sentinel2_scl)
    got_cloud = table.column("cloud_cover_percentage").to_numpy().reshape(want_cloud.shape)
    got_nodata = table.column("nodata_percentage").to_numpy().reshape(want_nodata.shape)
    np.testing.assert_allclose(got_cloud, want_cloud, atol=1e-6)
    np.testing.assert_allclose(got_nodata, want_nodata, atol=1e-6)
    x, y = indexer.x_size - 1, indexer.y_size - 1
    assert indexer.get_stats(x, y) == pytest.approx((want_cloud[y, x], want_nodata[y, x]), abs=1e-6)


def _s2_item(tmp_path, scl, res=20, fine=10, **props):
    rows, cols = scl.shape[0] * res // fine, scl.shape[1] * res // fine
    path = write_cog(tmp_path / "scl.tif", scl, Affine(res, 0, 500000, 0, -res, 4000000), "EPSG:32633")
    return _fine_item(rows, cols, res, scl.shape, (500000, 4000000), path, **props)


def test_max_nodata_zero_means_no_nodata(tmp_path):
    scl = np.full((20, 20), 4, dtype=np.uint8)
    scl[0, 0] = 0  # one nodata pixel in chip (0, 0)
    scl[10:, 10:] = 0  # chip (1, 1) all nodata
    item = _s2_item(tmp_path, scl)
    t0 = Sentinel2Indexer(item, chip_size=20, chip_max_nodata=0).create_full_index()
    assert sorted(t0.column("chipid").to_pylist()) == ["synthetic-0-1", "synthetic-1-0"]
    t_half = Sentinel2Indexer(item, chip_size=20, chip_max_nodata=0.5).create_full_index()
    assert t_half.num_rows == 3
    t_all = Sentinel2Indexer(item, chip_size=20, chip_max_nodata=1).create_full_index()
    assert t_all.num_rows == 4
    assert t_all.column("nodata_percentage").to_pylist() == [pytest.approx(4 / 400), 0, 0, 1]


def test_index_columns_and_added_fields(tmp_path):
    scl = np.full((20, 20), 9, dtype=np.uint8)
    item = _s2_item(tmp_path, scl)
    item.collection_id = "sentinel-2-l2a"
    table = Sentinel2Indexer(item, chip_size=10).create_full_index()
    assert table.column_names[:7] == list(UPSTREAM_COLUMNS) + ["geometry"]
    assert table.schema.field("datetime").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("bbox").type.names == ["xmin", "ymin", "xmax", "ymax"]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["platform"] == "sentinel-2-l2a"
    assert row["date"] == dt.date(2024, 5, 1)
    assert row["datetime"] == dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.timezone.utc)
    assert row["chip_size"] == 10
    assert row["cloud_cover_percentage"] == 1.0
    poly = shapely.from_wkb(row["geometry"])
    assert row["bbox"]["xmin"] == pytest.approx(poly.bounds[0])
    assert row["bbox"]["ymax"] == pytest.approx(poly.bounds[3])


def test_start_datetime_used_without_datetime(tmp_path):
    scl = np.full((10, 10), 4, dtype=np.uint8)
    item = _s2_item(tmp_path, scl)
    item.datetime = None
    item.properties["datetime"] = None
    item.properties["start_datetime"] = "2023-12-31T23:59:59Z"
    item.properties["end_datetime"] = "2024-01-08T00:00:00Z"
    row = Sentinel2Indexer(item, chip_size=10).create_full_index().slice(0, 1).to_pylist()[0]
    assert row["date"] == dt.date(2023, 12, 31)
    assert row["datetime"] == dt.datetime(2023, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
    del item.properties["start_datetime"]
    with pytest.raises(DatetimeError, match="synthetic.*start_datetime"):
        Sentinel2Indexer(item, chip_size=10).create_full_index()


def test_nodata_mask_indexer(tmp_path):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))  # 20x20 fine grid
    mask = np.zeros((20, 20), dtype=bool)
    mask[:10, :5] = True
    idx = NoDataMaskChipIndexer(item, mask, chip_size=10, chip_max_nodata=1)
    table = idx.create_full_index()
    assert table.column("nodata_percentage").to_pylist() == [0.5, 0, 0, 0]
    assert table.column("cloud_cover_percentage").to_pylist() == [0, 0, 0, 0]
    # Upstream positional signature: (item, nodata_mask, chip_size, chip_max_nodata)
    assert NoDataMaskChipIndexer(item, mask, 10, 0.4).create_full_index().num_rows == 3
    # A coarser mask over the same extent is aligned by nearest neighbour.
    small = np.zeros((10, 10), dtype=bool)
    small[:5, :2] = True  # covers fine rows 0-9, cols 0-3 of chip (0, 0)
    coarse = NoDataMaskChipIndexer(item, small, chip_size=10, chip_max_nodata=1)
    assert coarse.create_full_index().column("nodata_percentage").to_pylist() == [pytest.approx(0.4), 0, 0, 0]


def test_upstream_style_subclass_with_get_stats(tmp_path):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))

    class MyIndexer(ChipIndexer):
        def get_stats(self, x, y):
            return 0.25 * x, 0.5 * y

    table = MyIndexer(item, chip_size=10, chip_max_nodata=1).create_full_index()
    assert table.column("cloud_cover_percentage").to_pylist() == [0, 0.25, 0, 0.25]
    assert table.column("nodata_percentage").to_pylist() == [0, 0, 0.5, 0.5]


def test_base_indexer_has_no_stats(tmp_path):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))
    with pytest.raises(NotImplementedError):
        ChipIndexer(item, chip_size=10).get_stats(0, 0)


def test_landsat_reads_own_href_and_alternate_only_when_asked(tmp_path):
    qa = np.full((20, 20), 21824, dtype=np.uint16)
    alt = qa.copy()
    alt[:, :] = 22280  # all cloud in the alternate copy
    t = Affine(30, 0, 500000, 0, -30, 4000000)
    own = write_cog(tmp_path / "qa.tif", qa, t, "EPSG:32633")
    other = write_cog(tmp_path / "alt" / "qa.tif", alt, t, "EPSG:32633")
    item = pystac.Item.from_dict(
        {
            "type": "Feature", "stac_version": "1.0.0", "id": "LC09", "geometry": None, "links": [],
            "properties": {"datetime": "2024-03-11T23:34:56Z", "proj:epsg": 32633,
                           "proj:shape": [20, 20], "proj:transform": list(t)[:6]},
            "assets": {"qa_pixel": {"href": str(own), "alternate": {"s3": {
                "href": str(other), "storage:requester_pays": True}}}},
        }
    )
    assert LandsatIndexer(item, chip_size=10).create_full_index().column("cloud_cover_percentage").to_pylist() == [0] * 4
    alt_idx = LandsatIndexer(item, chip_size=10, alternate="s3")
    assert alt_idx.qa_href() == (str(other), {"AWS_REQUEST_PAYER": "requester"})
    assert alt_idx.create_full_index().column("cloud_cover_percentage").to_pylist() == [1] * 4
    with pytest.raises(AssetNotFoundError, match="LC09.*alternate.https"):
        LandsatIndexer(item, chip_size=10, alternate="https").create_full_index()


def test_modis_indexer_sinusoidal(tmp_path):
    wkt = pyproj.CRS.from_proj4("+proj=sinu +R=6371007.181 +nadgrids=@null +wktext").to_wkt()
    res = 463.312716528
    t = Affine(res, 0, -7783653.637667, 0, -res, 5559752.598333)
    state = np.zeros((24, 24), dtype=np.uint16)
    state[:12, :12] = 0b01  # cloudy
    state[:12, 12:] = 0b10  # mixed
    state[12:, :12] = 0b11  # not set, assumed clear
    state[12:, 12:] = 65535  # fill
    path = write_cog(tmp_path / "state.tif", state, t, wkt)
    item = pystac.Item.from_dict(
        {
            "type": "Feature", "stac_version": "1.0.0", "id": "MOD09A1", "geometry": None, "links": [],
            "properties": {"start_datetime": "2024-01-01T00:00:00Z", "end_datetime": "2024-01-08T23:59:59Z",
                           "datetime": None, "proj:wkt2": wkt, "proj:shape": [24, 24],
                           "proj:transform": list(t)[:6]},
            "assets": {"sur_refl_state_500m": {"href": str(path)}},
        }
    )
    table = ModisIndexer(item, chip_size=12, chip_max_nodata=1).create_full_index()
    assert table.column("cloud_cover_percentage").to_pylist() == [1, 1, 0, 0]
    assert table.column("nodata_percentage").to_pylist() == [0, 0, 0, 1]


def test_missing_qa_asset_named(tmp_path):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))
    del item.assets["scl"]
    with pytest.raises(AssetNotFoundError, match="synthetic.*'scl'"):
        Sentinel2Indexer(item, chip_size=10).create_full_index()


def test_unreadable_qa_href_named(tmp_path):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))
    item.assets["scl"].href = str(tmp_path / "missing.tif")
    with pytest.raises(AssetReadError, match="scl.*missing.tif"):
        Sentinel2Indexer(item, chip_size=10).create_full_index()


@pytest.mark.parametrize("chip_size", [0, -1, 2.5, "256", True])
def test_bad_chip_size(tmp_path, chip_size):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))
    with pytest.raises(ConfigError, match="chip_size"):
        Sentinel2Indexer(item, chip_size=chip_size)


@pytest.mark.parametrize("max_nodata", [-0.1, 1.5, "x"])
def test_bad_max_nodata(tmp_path, max_nodata):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))
    with pytest.raises(ConfigError, match="chip_max_nodata"):
        Sentinel2Indexer(item, chip_size=10, chip_max_nodata=max_nodata)


def test_chip_out_of_range(tmp_path):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))
    idx = Sentinel2Indexer(item, chip_size=10)
    with pytest.raises(ChipOutOfRangeError, match="synthetic.*\\(2, 0\\)"):
        idx.get_chip_bbox(2, 0)
    with pytest.raises(IndexError):
        idx.get_stats(0, -1)


def test_indexer_accepts_item_dict(tmp_path):
    item = _s2_item(tmp_path, np.full((10, 10), 4, dtype=np.uint8))
    idx = Sentinel2Indexer(item.to_dict(), chip_size=10)
    assert idx.item.id == "synthetic" and idx.size == 4
    assert idx.crs.to_epsg() == 32633
    assert idx.bbox == (500000, 4000000 - 200, 500200, 4000000)


def test_edge_rule_keep_counts_partial_chips(tmp_path):
    scl = np.full((15, 25), 4, dtype=np.uint8)  # fine grid 30 x 50 at 10 m
    item = _s2_item(tmp_path, scl)
    drop = Sentinel2Indexer(item, chip_size=20, chip_max_nodata=1)
    keep = Sentinel2Indexer(item, chip_size=20, chip_max_nodata=1, edge="keep")
    assert (drop.x_size, drop.y_size) == (2, 1)
    assert (keep.x_size, keep.y_size) == (3, 2)
    table = keep.create_full_index()
    nodata = np.array(table.column("nodata_percentage").to_pylist()).reshape(2, 3)
    # Partial chips: the part beyond the 30 x 50 grid is nodata.
    np.testing.assert_allclose(nodata, [[0, 0, 0.5], [0.5, 0.5, 0.75]], atol=1e-6)
    nostats = NoStatsChipIndexer(item, chip_size=20, chip_max_nodata=1, edge="keep").create_full_index()
    np.testing.assert_allclose(nostats.column("nodata_percentage").to_numpy().reshape(2, 3), nodata, atol=1e-6)
    assert Sentinel2Indexer(item, chip_size=20, edge="keep").create_full_index().num_rows == 5  # 0.75 dropped
    with pytest.raises(ConfigError, match="edge"):
        Sentinel2Indexer(item, chip_size=20, edge="pad")
    from stacchip.chipper import Chipper

    chip = Chipper(keep, assets=["scl"]).chip(2, 1)["scl"]
    assert chip.shape == (1, 20, 20)
    assert np.all(chip[0, :10, :10] == 4) and np.all(chip[0, 10:, :] == 0) and np.all(chip[0, :, 10:] == 0)


def test_planetary_computer_scl_key(tmp_path):
    scl = np.full((10, 10), 9, dtype=np.uint8)
    item = _s2_item(tmp_path, scl)
    item.assets["SCL"] = item.assets.pop("scl")  # Planetary Computer names it SCL
    from stacchip.indexer import guess_indexer

    assert guess_indexer(item) is Sentinel2Indexer
    table = Sentinel2Indexer(item, chip_size=10).create_full_index()
    assert table.column("cloud_cover_percentage").to_pylist() == [1.0] * 4
    del item.assets["SCL"]
    with pytest.raises(AssetNotFoundError, match="'scl'"):
        Sentinel2Indexer(item, chip_size=10).create_full_index()
