"""The two compaction engines write the same dataset: DuckDB on this machine and Dask on a real
``dask.distributed`` cluster of two worker processes (LocalCluster on loopback) -- the same
partitions, part files, row groups and rows in the same order; a source a worker cannot read is
named as it is on one machine."""

from __future__ import annotations

import datetime as dt

import pyarrow.parquet as pq
import pytest

from stacchip.catalog import compact
from stacchip.catalog.parts import sort_order
from stacchip.errors import IndexFileError
from stacchip.index import query
from tests.catalog_support import LS, S2, UTC, build, by_chip, damage_data_page, item_specs, manifest_of, write_item

distributed = pytest.importorskip("dask.distributed")

RG, FILE_ROWS = 40, 120  # several files per partition, several row groups per file


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, host="127.0.0.1")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    specs = item_specs()
    build(root, specs)
    for k in range(30):  # a bigger partition: files spanning several sorted Dask partitions
        write_item(root, f"X{k:02d}", S2, dt.datetime(2022, 1 + k % 12, 3, tzinfo=UTC),
                   -8 + (k % 6) * 0.3, 42 + (k // 6) * 0.3, n=8, seed=500 + k)
    return root


def files_of(dest):
    """``{partition: [(rows of each row group as tables), ...] per part file}`` in manifest order."""
    out = {}
    for key, part in manifest_of(dest)["partitions"].items():
        tables = []
        for entry in part["files"]:
            pf = pq.ParquetFile(dest / entry["path"])
            tables.append([pf.read_row_group(i) for i in range(pf.metadata.num_row_groups)])
        out[key] = tables
    return out


def test_dask_on_two_workers_writes_what_duckdb_writes(catalog, client, tmp_path):
    embedded, spread = tmp_path / "duckdb", tmp_path / "dask"
    a = compact(catalog / "index", embedded, row_group_rows=RG, file_rows=FILE_ROWS)
    b = compact(catalog / "index", spread, row_group_rows=RG, file_rows=FILE_ROWS, engine="dask", client=client)
    assert a.rows == b.rows == 38 * 25 + 30 * 64
    assert sorted(a.created) == sorted(b.created)
    left, right = files_of(embedded), files_of(spread)
    assert left.keys() == right.keys()
    multi = 0
    for key in left:
        assert len(left[key]) == len(right[key]), key
        multi += len(left[key]) > 1
        for groups_a, groups_b in zip(left[key], right[key], strict=True):
            assert [g.num_rows for g in groups_a] == [g.num_rows for g in groups_b]
            for ga, gb in zip(groups_a, groups_b, strict=True):
                assert ga.equals(gb)  # same rows, same order, same types
            whole = pq.read_table(embedded / manifest_of(embedded)["partitions"][key]["files"][0]["path"])
            assert (sort_order(whole) == range(whole.num_rows)).all()
    assert multi >= 2
    # the manifests record the same extents, file by file
    for key, part in manifest_of(embedded)["partitions"].items():
        other = manifest_of(spread)["partitions"][key]
        strip = [{k: v for k, v in f.items() if k not in ("path", "run", "bytes")} for f in part["files"]]
        assert strip == [{k: v for k, v in f.items() if k not in ("path", "run", "bytes")} for f in other["files"]]
    assert by_chip(query(spread)).equals(by_chip(query(embedded)))


def test_dask_re_runs_append_and_rewrite_as_duckdb_does(catalog, client, tmp_path):
    embedded, spread = tmp_path / "duckdb", tmp_path / "dask"
    for dest, kw in ((embedded, {}), (spread, {"engine": "dask", "client": client})):
        compact(catalog / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS, **kw)
    extra = tmp_path / "more"
    write_item(extra, "T01-2021", S2, dt.datetime(2021, 1, 2, 10, 30, tzinfo=UTC), -7.0, 40.0, seed=777)  # replaces
    write_item(extra, "NEW-LS", LS, dt.datetime(2022, 4, 1, tzinfo=UTC), -9.0, 43.0, seed=778)  # appends
    results = []
    for dest, kw in ((embedded, {}), (spread, {"engine": "dask", "client": client})):
        results.append(compact([catalog / "index", extra / "index"], dest, row_group_rows=RG,
                               file_rows=FILE_ROWS, append_fraction=0.5, **kw))
    a, b = results
    assert (a.rewritten, a.appended, a.items_replaced) == (b.rewritten, b.appended, b.items_replaced)
    assert a.rewritten and a.appended
    left, right = files_of(embedded), files_of(spread)
    for key in left:
        assert [[g.num_rows for g in f] for f in left[key]] == [[g.num_rows for g in f] for f in right[key]]
        for fa, fb in zip(left[key], right[key], strict=True):
            assert all(ga.equals(gb) for ga, gb in zip(fa, fb, strict=True))


def test_a_damaged_source_is_named_from_a_worker(catalog, client, tmp_path):
    root = tmp_path / "src"
    build(root, item_specs()[:4])
    bad = next((root / "index").rglob("index_T01-2021.parquet"))
    damage_data_page(bad)
    dest = tmp_path / "c"
    with pytest.raises(IndexFileError, match="index_T01-2021.parquet"):
        compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS, engine="dask", client=client)
    assert not (dest / "_manifest.json").exists() and not (dest / "_staging").exists()
    assert not list(dest.rglob("*.parquet"))
