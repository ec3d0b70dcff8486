"""Job plumbing (task index, settings, runner), sampling periods, search rules, storage copies."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pystac
import pytest

from stacchip import storage
from stacchip.errors import ConfigError, StorageNotFoundError
from stacchip.processors import jobs
from stacchip.processors.catalog import Catalog, Rule, Sort, apply, wants_signing
from stacchip.processors.publish import Bucket, Publisher, copy_plan, s3_form
from stacchip.processors.sampling import month_period, period, periods, pick_years, read_samples, sample_row
from tests.processors_support import file_server, write_samples

# --- task index -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "7"}, [7]),
        ({"JOB_COMPLETION_INDEX": "3"}, [3]),
        ({"SLURM_ARRAY_TASK_ID": "12"}, [12]),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "1", "JOB_COMPLETION_INDEX": "2"}, [1]),
        ({"JOB_COMPLETION_INDEX": "2", "STACCHIP_INDEX_OFFSET": "10000"}, [10002]),
    ],
)
def test_index_from_scheduler_environment(environ, expected):
    assert jobs.resolve_indices(environ=environ) == expected


def test_flags_win_over_environment():
    env = {"AWS_BATCH_JOB_ARRAY_INDEX": "7"}
    assert jobs.resolve_indices(index=2, environ=env) == [2]
    assert jobs.resolve_indices(range_spec="4:7", environ=env) == [4, 5, 6]
    assert jobs.resolve_indices(range_spec="4-6", environ=env) == [4, 5, 6]


@pytest.mark.parametrize("spec", ["5:5", "a:b", "-3:2", "7:3"])
def test_bad_ranges(spec):
    with pytest.raises(ConfigError, match="--range"):
        jobs.parse_range(spec)


def test_missing_or_bad_index():
    with pytest.raises(ConfigError, match="AWS_BATCH_JOB_ARRAY_INDEX"):
        jobs.resolve_indices(environ={})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID"):
        jobs.resolve_indices(environ={"SLURM_ARRAY_TASK_ID": "x"})
    with pytest.raises(ConfigError, match="--index"):
        jobs.resolve_indices(index=-1, environ={})


# --- settings -------------------------------------------------------------------------------------


def test_settings_from_flags_and_environment():
    env = {"A": "3", "F": "0.5", "B": "yes", "L": "2018-2020,2023", "S": "x"}
    assert jobs.env_int(None, "A", environ=env) == 3
    assert jobs.env_int(5, "A", environ=env) == 5
    assert jobs.env_float(None, "F", environ=env) == 0.5
    assert jobs.env_bool(None, "B", environ=env) is True
    assert jobs.env_bool(None, "MISSING", True, environ=env) is True
    assert jobs.env_list(None, "L", kind=int, environ=env) == [2018, 2019, 2020, 2023]
    assert jobs.env_str(None, "S", environ=env) == "x"
    assert jobs.env_str(None, "MISSING", "d", environ=env) == "d"
    with pytest.raises(ConfigError, match="MISSING"):
        jobs.env_str(None, "MISSING", required=True, flag="--m", environ=env)
    with pytest.raises(ConfigError, match="F=2.0 must be <= 1"):
        jobs.env_float(None, "F", maximum=1, environ={"F": "2"})
    with pytest.raises(ConfigError, match="B"):
        jobs.env_bool(None, "B", environ={"B": "maybe"})
    with pytest.raises(ConfigError, match="A"):
        jobs.env_int(None, "A", environ={"A": "1.5"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("clay-v1-data", "s3://clay-v1-data"),
        ("s3://bucket/prefix/", "s3://bucket/prefix"),
        ("./out", "./out"),
        ("/data/out", "/data/out"),
        ("file:///data/out", "/data/out"),
    ],
)
def test_output_root(value, expected):
    assert jobs.output_root(value) == expected


@pytest.mark.parametrize("value", ["", "Bad_Name", "a"])
def test_output_root_refuses(value):
    with pytest.raises(ConfigError):
        jobs.output_root(value)


@pytest.mark.parametrize("value", ["gs://bucket/corpus", "https://example.org/out", "az://container/x", "s3://", "s3:///"])
def test_output_root_refuses_unwritable_urls(value):
    """Storage writes only S3 and local paths; other URLs used to become local folders ("gs:/bucket")."""
    with pytest.raises(ConfigError, match="STACCHIP_BUCKET"):
        jobs.output_root(value)


# --- runner ----------------------------------------------------------------------------------------


def _square_or_fail(index: int) -> int:
    if index == 3:
        raise RuntimeError("task three breaks")
    return index * index


@pytest.mark.parametrize("workers", [1, 2])
def test_run_tasks_records_failures_and_keeps_going(workers):
    summary = jobs.run_tasks(_square_or_fail, range(5), workers=workers)
    assert [o.index for o in summary.outcomes] == [0, 1, 2, 3, 4]
    assert [o.result for o in summary.outcomes if o.ok] == [0, 1, 4, 16]
    assert [o.index for o in summary.failed] == [3]
    assert "task three breaks" in summary.failed[0].error
    assert jobs.main(lambda _: summary) == jobs.EXIT_TASK_FAILED


def test_main_exit_codes(capsys):
    def bad(_):
        raise ConfigError("STACCHIP_BUCKET is wrong")

    assert jobs.main(bad) == jobs.EXIT_CONFIG_ERROR
    assert "STACCHIP_BUCKET is wrong" in capsys.readouterr().err
    assert jobs.main(lambda _: jobs.RunSummary([jobs.TaskOutcome(0, True)])) == 0


# --- sampling -----------------------------------------------------------------------------------------


def test_periods_cover_whole_days():
    q1 = period(2020, "q1")
    assert q1.interval == "2020-01-01T00:00:00.000000Z/2020-03-31T23:59:59.999999Z"
    djf = period(2019, "djf")
    assert djf.start == dt.datetime(2019, 12, 1) and djf.end.date() == dt.date(2020, 2, 29)  # leap year
    assert period(2021, "01-15/02-10").end.date() == dt.date(2021, 2, 10)
    assert month_period(2023, 2).end.date() == dt.date(2023, 2, 28)
    assert [p.name for p in periods([2020, 2021], ["q1", "q3"])] == ["2020-q1", "2020-q3", "2021-q1", "2021-q3"]
    with pytest.raises(ConfigError, match="winter"):
        period(2020, "winter")


def test_pick_years_is_reproducible_and_distinct():
    years = pick_years(range(2018, 2024), 2, seed=5)
    assert len(set(years)) == 2 and years == pick_years(list(range(2018, 2024)), 2, seed=5)
    assert all(2018 <= y <= 2023 for y in years)
    assert len({tuple(pick_years(range(2018, 2024), 2, seed=s)) for s in range(30)}) > 5
    with pytest.raises(ConfigError):
        pick_years([2020], 2, seed=0)


def test_sample_file_rows(tmp_path):
    from shapely.geometry import box

    path = write_samples(tmp_path / "s.geojson", [{"name": "A", "geometry": box(0, 0, 1, 1)}, {"name": "B", "geometry": box(1, 1, 2, 2)}])
    read_samples.cache_clear()
    assert sample_row(str(path), 1, ["name"])["name"] == "B"
    with pytest.raises(ConfigError, match="beyond"):
        sample_row(str(path), 2)
    with pytest.raises(ConfigError, match="lacks column"):
        sample_row(str(path), 0, ["tile"])


def test_sample_file_over_http(tmp_path):
    from shapely.geometry import box

    write_samples(tmp_path / "web.geojson", [{"name": "Z", "geometry": box(0, 0, 1, 1)}])
    with file_server(tmp_path) as url:
        read_samples.cache_clear()
        assert sample_row(f"{url}/web.geojson", 0, ["name"])["name"] == "Z"
        with pytest.raises(ConfigError, match="cannot be read"):
            read_samples(f"{url}/missing.geojson")


# --- search rules applied client-side --------------------------------------------------------------


def _item(item_id, **props):
    return pystac.Item(item_id, None, None, dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), props)


def test_rules_and_sort_client_side():
    items = [
        _item("a", **{"eo:cloud_cover": 30.0, "platform": "LANDSAT_8"}),
        _item("b", **{"eo:cloud_cover": 5.0, "platform": "LANDSAT_7"}),
        _item("c", **{"eo:cloud_cover": 12.5, "platform": "LANDSAT_9"}),
        _item("d", **{"platform": "LANDSAT_9"}),  # no cloud cover: fails a cloud rule
        _item("e", **{"eo:cloud_cover": 80.0, "platform": "LANDSAT_9"}),
    ]
    rules = [Rule("platform", "in", ["LANDSAT_8", "LANDSAT_9"]), Rule("eo:cloud_cover", "lte", 75)]
    assert [i.id for i in apply(items, rules, [Sort("eo:cloud_cover")])] == ["c", "a"]
    assert [i.id for i in apply(items, [], [Sort("eo:cloud_cover", descending=True)])] == ["e", "a", "c", "b", "d"]
    assert Rule("x", "in", ("a",)).cql2() == {"op": "in", "args": [{"property": "x"}, ["a"]]}
    with pytest.raises(ConfigError):
        Rule("x", "like", 1)


def test_signing_mode():
    assert wants_signing("https://planetarycomputer.microsoft.com/api/stac/v1")
    assert not wants_signing("https://earth-search.aws.element84.com/v1")
    assert not wants_signing("https://planetarycomputer.microsoft.com/api/stac/v1", "none")
    with pytest.raises(ConfigError):
        wants_signing("x", "sometimes")


@pytest.mark.services
def test_rules_refused_by_the_server_are_applied_client_side(stac_api):
    import uuid

    collection = f"rules-{uuid.uuid4().hex[:8]}"
    raw = []
    for n, (platform, cloud) in enumerate([("LANDSAT_8", 40.0), ("LANDSAT_7", 2.0), ("LANDSAT_9", 20.0)]):
        raw.append({
            "type": "Feature", "stac_version": "1.0.0", "id": f"{collection}-{n}", "collection": collection,
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]},
            "bbox": [0, 0, 1, 1], "links": [], "assets": {},
            "properties": {"datetime": f"2020-0{n + 1}-01T00:00:00Z", "platform": platform, "eo:cloud_cover": cloud},
        })
    stac_api.load_collection(stac_api.make_collection(collection, raw))
    stac_api.load_items(raw)
    rules = [Rule("platform", "in", ["LANDSAT_8", "LANDSAT_9"])]
    catalog = Catalog(stac_api.url)
    assert catalog.can_filter and catalog.can_query
    expect = [f"{collection}-2", f"{collection}-0"]
    assert [i.id for i in catalog.search([collection], rules=rules, sort=[Sort("eo:cloud_cover")])] == expect
    catalog.can_filter = False  # the Query extension of this server has no "in": it answers 400
    assert [i.id for i in catalog.search([collection], rules=rules, sort=[Sort("eo:cloud_cover")])] == expect
    catalog.can_query = catalog.can_sort = False  # nothing server-side
    assert [i.id for i in catalog.search([collection], rules=rules, sort=[Sort("eo:cloud_cover")], limit=1)] == expect[:1]


# --- storage copies -------------------------------------------------------------------------------------


def test_s3_form_of_https_urls():
    assert s3_form("https://sentinel-cogs.s3.us-west-2.amazonaws.com/a/b.tif") == "s3://sentinel-cogs/a/b.tif"
    assert s3_form("https://s3.amazonaws.com/bucket/key.tif") == "s3://bucket/key.tif"
    assert s3_form("https://example.com/a.tif") is None


def test_copy_plan_orders_sources_by_destination():
    asset = pystac.Asset(
        "https://b.s3.us-west-2.amazonaws.com/k/x.tif",
        extra_fields={"alternate": {"s3": {"href": "s3://alt/k/x.tif", "storage:requester_pays": True}}},
    )
    to_s3 = copy_plan(asset, dest_is_s3=True)
    assert to_s3.sources == ["s3://alt/k/x.tif", "s3://b/k/x.tif", asset.href] and to_s3.request_payer
    assert copy_plan(asset, dest_is_s3=False).sources[0] == asset.href
    assert to_s3.filename == "x.tif"


def test_local_and_http_copies_are_whole(tmp_path):
    src = tmp_path / "src" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(b"x" * 100_000)
    storage.copy(src, tmp_path / "out" / "a.bin")
    assert (tmp_path / "out" / "a.bin").read_bytes() == src.read_bytes()
    with file_server(src.parent) as url:
        storage.copy(f"{url}/a.bin", tmp_path / "out" / "b.bin")
        with pytest.raises(StorageNotFoundError):
            storage.copy(f"{url}/missing.bin", tmp_path / "out" / "c.bin")
    assert (tmp_path / "out" / "b.bin").read_bytes() == src.read_bytes()
    assert not (tmp_path / "out" / "c.bin").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin", "b.bin"]  # no temp files left
    with pytest.raises(StorageNotFoundError):
        storage.copy(tmp_path / "nope", tmp_path / "out" / "d.bin")


@pytest.mark.services
def test_s3_copies_and_claims(s3_env, s3_bucket, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"payload" * 1000)
    storage.copy(src, f"s3://{s3_bucket}/up/a.bin")
    storage.copy(f"s3://{s3_bucket}/up/a.bin", f"s3://{s3_bucket}/server-side/a.bin", request_payer=True)
    storage.copy(f"s3://{s3_bucket}/server-side/a.bin", tmp_path / "down" / "a.bin")
    assert (tmp_path / "down" / "a.bin").read_bytes() == src.read_bytes()
    with pytest.raises(StorageNotFoundError):
        storage.copy(f"s3://{s3_bucket}/missing.bin", f"s3://{s3_bucket}/x.bin")
    assert not storage.exists(f"s3://{s3_bucket}/x.bin")
    url = f"s3://{s3_bucket}/claims/one.json"
    assert storage.create_if_absent(url, b"first") is True
    assert storage.create_if_absent(url, b"second") is False
    assert storage.read_bytes(url) == b"first"


def test_local_claims_have_one_winner(tmp_path):
    url = tmp_path / "claims" / "item.json"
    wins = []
    barrier = threading.Barrier(8)

    def race(n):
        barrier.wait()
        wins.append((n, storage.create_if_absent(url, f"task {n}".encode())))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, won in wins if won]
    assert len(winners) == 1
    assert url.read_bytes() == f"task {winners[0]}".encode()
    assert sorted(p.name for p in url.parent.iterdir()) == ["item.json"]


def test_publisher_claims_are_per_task(tmp_path):
    bucket = Bucket(str(tmp_path))
    first, second = Publisher(bucket, "s2/0"), Publisher(bucket, "s2/1")
    assert first.claim("p", "item") is None
    assert second.claim("p", "item") == "s2/0"
    assert first.claim("p", "item") is None  # a re-run of the owner may continue


def test_bucket_layout(tmp_path):
    s3 = Bucket("s3://bkt/prefix")
    assert s3.asset_url("naip", "id1", "a.tif") == "s3://bkt/prefix/naip/id1/a.tif"
    assert s3.item_url("naip", "id1") == "s3://bkt/prefix/naip/id1/stac_item.json"
    assert s3.index_url("naip", "id1") == "s3://bkt/prefix/index/naip/id1/index_id1.parquet"
    local = Bucket(str(tmp_path))
    assert Path(local.index_url("linz", "x")) == tmp_path / "index" / "linz" / "x" / "index_x.parquet"
