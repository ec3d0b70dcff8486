"""Compaction of per-item index files (stacchip.catalog) and queries over the result."""

import datetime as dt
import json
import shutil
import subprocess

import duckdb
import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import shapely

from stacchip import cli
from stacchip.catalog import compact
from stacchip.catalog import manifest as mf
from stacchip.catalog.compaction import curve_order
from stacchip.catalog.hilbert import bbox_centres
from stacchip.errors import IndexFileError, UnsafePathError
from stacchip.index import SCHEMA, open_index, query

from tests.catalog_support import (  # noqa: F401
    FILE_ROWS,
    LS,
    RG,
    S2,
    UTC,
    all_rows,
    build,
    by_chip,
    item_specs,
    manifest_of,
    part_files,
    snapshot,
    tmp_root,
    write_item,
)


@pytest.fixture
def items(tmp_path):
    build(tmp_path, item_specs())
    # a stac_item.json beside the assets for one item without item_href: found by layout
    (tmp_path / LS / "T03-2022").mkdir(parents=True)
    (tmp_path / LS / "T03-2022" / "stac_item.json").write_text("{}")
    return tmp_path


@pytest.fixture
def compacted(items):
    dest = items / "compacted"
    result = compact(items / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    return items, dest, result


# --- content -----------------------------------------------------------------------------------


def test_compacted_rows_equal_the_inputs(compacted):
    root, dest, result = compacted
    originals = by_chip(pads.dataset(str(root / "index"), format="parquet", schema=SCHEMA).to_table())
    rows = by_chip(all_rows(dest))
    assert rows.num_rows == originals.num_rows == 38 * 25
    assert len(set(rows.column("chipid").to_pylist())) == rows.num_rows
    assert rows.equals(originals)
    assert result.items_added == 38 and result.rows == rows.num_rows and result.sources_read == 38


def test_partitioned_by_platform_and_year(compacted):
    _, dest, _ = compacted
    manifest = manifest_of(dest)
    expected = {f"{p}/year={y}" for p in (S2, LS) for y in (2021, 2022, 2023)}
    assert set(manifest["partitions"]) == expected
    for path in part_files(dest):
        rel = path.relative_to(dest)
        platform, year = rel.parts[0], int(rel.parts[1].removeprefix("year="))
        table = pq.read_table(path)
        assert set(table.column("platform").to_pylist()) == {platform}
        years = {t.year for t in table.column("datetime").to_pylist()}
        assert years == {year}
        assert rel.name.startswith("part-") and len(rel.parts) == 3


def test_rows_follow_the_curve(compacted):
    _, dest, _ = compacted
    ratios = []
    for path in part_files(dest):
        table = pq.read_table(path)
        if table.num_rows < 50:
            continue
        b = table.column("bbox").combine_chunks()
        lon, lat = bbox_centres(*(b.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")))
        step = np.hypot(np.diff(lon), np.diff(lat)).mean()
        shuffled = np.random.default_rng(0).permutation(len(lon))
        ratios.append(step / np.hypot(np.diff(lon[shuffled]), np.diff(lat[shuffled])).mean())
        assert np.array_equal(curve_order(table), np.arange(table.num_rows))  # already in curve order
    assert ratios and max(ratios) < 0.25, ratios


def test_row_group_and_file_sizes(compacted):
    _, dest, _ = compacted
    multi_file = False
    for part in manifest_of(dest)["partitions"].values():
        multi_file |= len(part["files"]) > 1
        for entry in part["files"]:
            md = pq.read_metadata(dest / entry["path"])
            sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            assert max(sizes) <= RG and all(s == RG for s in sizes[:-1])
            assert md.num_rows <= FILE_ROWS
            assert md.row_group(0).column(0).compression == "ZSTD"
            col = [md.schema.column(i).path for i in range(len(md.schema))].index("bbox.xmin")
            assert md.row_group(0).column(col).statistics.has_min_max
    assert multi_file


def test_manifest_records_files_extents_and_items(compacted):
    root, dest, _ = compacted
    manifest = manifest_of(dest)
    assert manifest["stacchip_compacted_index"] == 2 and "pending" not in manifest
    total = 0
    for key, part in manifest["partitions"].items():
        assert part["rows"] == sum(f["rows"] for f in part["files"])
        for entry in part["files"]:
            path = dest / entry["path"]
            assert entry["path"].startswith(key + "/")
            assert entry["bytes"] == path.stat().st_size
            pf = pq.ParquetFile(path)
            assert entry["rows"] == pf.metadata.num_rows
            assert len(entry["row_groups"]) == pf.metadata.num_row_groups
            for i, rg in enumerate(entry["row_groups"]):
                t = pf.read_row_group(i)
                b = t.column("bbox").combine_chunks()
                assert rg["rows"] == t.num_rows
                assert rg["bbox"] == [pc.min(b.field("xmin")).as_py(), pc.min(b.field("ymin")).as_py(),
                                      pc.max(b.field("xmax")).as_py(), pc.max(b.field("ymax")).as_py()]
                first, last = pc.min_max(t.column("datetime")).values()
                assert [mf.parse_time(s) for s in rg["datetime"]] == [first.as_py(), last.as_py()]
                assert rg["cloud"][0] == pytest.approx(pc.min(t.column("cloud_cover_percentage")).as_py())
            total += entry["rows"]
    assert manifest["rows"] == total == 38 * 25
    assert manifest["file_count"] == len(part_files(dest))
    assert manifest["datetime"][0].startswith("2021-") and manifest["datetime"][1].startswith("2023-")
    assert manifest["bbox"][0] == pytest.approx(-179.99) and manifest["bbox"][2] == pytest.approx(179.99)
    # item hrefs live in the provenance file, confined to the index root and the roots allowed
    with pytest.raises(UnsafePathError, match="outside the index root"):
        mf.item_hrefs(manifest, str(dest))
    hrefs = mf.item_hrefs(manifest, str(dest), ["/data", str(root)])
    assert hrefs["T00-2021"] == f"/data/{LS}/T00-2021/stac_item.json"  # from the file's metadata
    assert hrefs["T03-2022"] == str(root / LS / "T03-2022" / "stac_item.json")  # bucket layout, exists
    assert "T03-2021" not in hrefs  # neither: unknown, not guessed
    assert "sources" not in manifest and manifest["items"]["sources"] == 38 and manifest["items"]["items"] == 38
    prov = mf.provenance(str(dest), manifest).to_pylist()
    assert len({r["source"] for r in prov}) == 38 and len(prov) == 38
    src = next(r for r in prov if r["source"] == str(root / "index" / S2 / "AM-E" / "index_AM-E.parquet"))
    size = (root / "index" / S2 / "AM-E" / "index_AM-E.parquet").stat().st_size
    assert src["source_rows"] == 25 and src["partition"] == f"{S2}/year=2022" and src["item_id"] == "AM-E"
    assert src["fingerprint"].startswith(f"{size}:")
    assert not list(dest.glob("_items-*.parquet")) and len(list(dest.glob("_items-*.pq"))) == 1


# --- re-runs ---------------------------------------------------------------------------------------


def test_rerun_without_new_items_changes_nothing(compacted):
    root, dest, _ = compacted
    before, manifest = snapshot(dest), (dest / "_manifest.json").read_bytes()
    result = compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert result.sources_read == 0 and result.sources_skipped == 38
    assert result.files_written == [] and result.removed == []
    assert snapshot(dest) == before and (dest / "_manifest.json").read_bytes() == manifest


def test_rerun_appends_small_additions_and_leaves_other_partitions_alone(compacted):
    root, dest, _ = compacted
    before = snapshot(dest)
    key = f"{S2}/year=2022"
    old_rows = manifest_of(dest)["partitions"][key]["rows"]
    write_item(root, "NEW-1", S2, dt.datetime(2022, 8, 1, tzinfo=UTC), 2.0, 44.0, seed=99)
    result = compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert result.sources_read == 1 and result.items_added == 1
    assert result.appended == [key] and result.rewritten == [] and result.created == []
    after = snapshot(dest)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten, not even in `key`
    added = sorted(set(after) - set(before))
    assert added and all(k.startswith(key + "/") for k in added)
    part = manifest_of(dest)["partitions"][key]
    assert part["rows"] == old_rows + 25 and len({f["run"] for f in part["files"]}) == 2
    assert query(dest, item_id="NEW-1").num_rows == 25
    assert mf.item_hrefs(manifest_of(dest), str(dest), ["/data", str(root)])["NEW-1"].endswith("NEW-1/stac_item.json")
    assert len(list(dest.glob("_items-*.pq"))) == 1  # the previous run's provenance file is gone


def test_rerun_rewrites_partitions_receiving_many_or_replaced_items(compacted):
    root, dest, _ = compacted
    before = snapshot(dest)
    key, other = f"{LS}/year=2021", f"{S2}/year=2021"
    for i in range(4):  # 100 rows into a partition of 100: more than the append fraction
        write_item(root, f"BIG-{i}", LS, dt.datetime(2021, 3, 1 + i, tzinfo=UTC), -9.0 + i, 47.0, seed=i)
    # T01-2021 indexed again with other cloud values: its old rows are replaced
    replaced = write_item(root, "T01-2021", S2, dt.datetime(2021, 1, 2, 10, 30, tzinfo=UTC), -7.0, 40.0, seed=12345)
    result = compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert result.items_added == 4 and result.items_replaced == 1
    assert sorted(result.rewritten) == sorted([key, other])
    after = snapshot(dest)
    for rel in before:
        if rel.startswith((key + "/", other + "/")):
            assert rel not in after  # old files of rewritten partitions removed
        else:
            assert after[rel] == before[rel]
    rows = query(dest, item_id="T01-2021")
    assert rows.num_rows == 25  # no duplicates
    fresh = pq.read_table(replaced)
    assert by_chip(rows).column("cloud_cover_percentage").equals(by_chip(fresh).column("cloud_cover_percentage"))
    assert len({f["run"] for f in manifest_of(dest)["partitions"][key]["files"]}) == 1
    assert all_rows(dest).num_rows == (38 + 4) * 25


def test_damaged_partition_is_rebuilt_from_its_sources(compacted):
    root, dest, _ = compacted
    victim = dest / manifest_of(dest)["partitions"][f"{LS}/year=2023"]["files"][0]["path"]
    victim.unlink()
    result = compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert result.rewritten == [f"{LS}/year=2023"]
    assert all_rows(dest).num_rows == 38 * 25


def test_stray_part_files_without_manifest_are_not_taken_over(compacted):
    root, dest, _ = compacted
    (dest / "_manifest.json").unlink()
    with pytest.raises(IndexFileError, match="no manifest"):
        compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    result = compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS, rebuild=True)
    assert result.removed and all_rows(dest).num_rows == 38 * 25


def test_extra_columns_are_carried(tmp_path):
    write_item(tmp_path, "X1", S2, dt.datetime(2022, 1, 1, tzinfo=UTC), 0, 0, extra={"split": "train"})
    write_item(tmp_path, "X2", S2, dt.datetime(2022, 2, 1, tzinfo=UTC), 1, 0)
    dest = tmp_path / "c"
    compact(tmp_path / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    table = open_index(dest).to_table()
    assert table.schema.names == SCHEMA.names + ["split"]
    values = dict(zip(table.column("item_id").to_pylist(), table.column("split").to_pylist(), strict=True))
    assert values == {"X1": "train", "X2": None}


def test_unsafe_manifest_paths_are_refused(compacted):
    _, dest, _ = compacted
    manifest = manifest_of(dest)
    next(iter(manifest["partitions"].values()))["files"][0]["path"] = "../../outside.parquet"
    (dest / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError, match="relative path"):
        query(dest)


# --- queries -----------------------------------------------------------------------------------------

FILTERS = [
    dict(bbox=(-8.0, 42.5, -4.5, 44.5)),
    dict(bbox=(-8.0, 38.0, 3.0, 47.0), start="2022-01-01", end="2022-12-31", max_cloud=0.4),
    dict(bbox=(-10.0, 40.0, -9.8, 40.0)),  # a line on tile edges
    dict(start="2021-03-01T00:00:00Z", end=dt.date(2021, 6, 30), max_nodata=0.1),
    dict(bbox=(179.9, -1.0, -179.9, 2.0)),  # across the antimeridian
    dict(bbox=(179.0, 0.5, -179.95, 0.98), start="2022-06-02"),
    dict(platform=LS, max_cloud=0.2),
    dict(item_id=["T05-2023", "AM-W"], bbox=(-180, -90, 180, 90)),
    dict(bbox=(100.0, 10.0, 101.0, 11.0)),  # nothing there
]


@pytest.mark.parametrize("filters", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_query_over_compacted_equals_query_over_originals(compacted, filters):
    root, dest, _ = compacted
    want = by_chip(query(root / "index", **filters))
    got = by_chip(query(dest, **filters))
    assert got.equals(want)
    if filters.get("bbox") == (100.0, 10.0, 101.0, 11.0):
        assert want.num_rows == 0
    else:
        assert want.num_rows > 0
    manifest = mf.load(str(dest / "_manifest.json"))
    total = sum(len(f["row_groups"]) for p in manifest["partitions"].values() for f in p["files"])
    picked = sum(len(g) for _, g in mf.plan(manifest, str(dest), **filters))
    if "platform" not in filters and "max_nodata" not in filters:
        assert picked < total / 2, (picked, total)


def test_antimeridian_query_finds_both_sides(compacted):
    _, dest, _ = compacted
    ids = set(query(dest, bbox=(179.9, -1.0, -179.9, 2.0)).column("item_id").to_pylist())
    assert ids == {"AM-E", "AM-W"}


def test_pruned_query_reads_only_the_chosen_files_and_row_groups(compacted, monkeypatch):
    from stacchip import storage

    _, dest, _ = compacted
    manifest = mf.load(str(dest / "_manifest.json"))
    filters = dict(bbox=(-7.1, 42.8, -6.9, 43.0))
    opened = []
    real_open = storage.open_input

    def counting(url):  # the real reader, counted
        opened.append(str(url))
        return real_open(url)

    monkeypatch.setattr(storage, "open_input", counting)
    selection = mf.plan(manifest, **filters)
    got = query(dest, **filters)
    chosen = {str(dest / path) for path, _ in selection}
    assert set(opened) == chosen and got.num_rows > 0
    assert len(chosen) < len(part_files(dest))
    opened.clear()
    full = query(dest)
    assert len(set(opened)) == len(part_files(dest))
    want = full.filter(pa.array(shapely.intersects(shapely.from_wkb(full.column("geometry").to_pylist()),
                                                   shapely.box(-7.1, 42.8, -6.9, 43.0))))
    assert by_chip(got).equals(by_chip(want))
    # the scan covers the chosen row groups only: their rows, no more
    groups = {p: {i: rg["rows"] for i, rg in enumerate(f["row_groups"])}
              for part in manifest["partitions"].values() for f in part["files"] for p in [f["path"]]}
    chosen_rows = sum(groups[path][i] for path, rgs in selection for i in rgs)
    from stacchip.filters import Selection
    from stacchip.scan import read_rows

    pruned = mf.fragments_of(str(dest), manifest, selection)
    assert read_rows(pruned, SCHEMA, Selection(), ["chipid"]).num_rows == chosen_rows < manifest["rows"] / 3


def test_pyarrow_statistics_prune_row_groups_on_the_bbox_fields(compacted):
    # the open_index path (no manifest plan): pyarrow's own row-group statistics skip groups
    _, dest, _ = compacted
    dataset = open_index(dest).arrow_dataset()
    expr = ((pc.field("bbox", "xmin") <= -6.9) & (pc.field("bbox", "xmax") >= -7.1)
            & (pc.field("bbox", "ymin") <= 43.0) & (pc.field("bbox", "ymax") >= 42.8))
    kept = sum(len(f.split_by_row_group(expr)) for f in dataset.get_fragments())
    total = sum(f.num_row_groups for f in dataset.get_fragments())
    assert 0 < kept < total / 3
    manifest = mf.load(str(dest / "_manifest.json"))
    assert kept == sum(len(g) for _, g in mf.plan(manifest, bbox=(-7.1, 42.8, -6.9, 43.0)))


def test_open_index_uses_the_manifest_not_a_listing(compacted):
    _, dest, _ = compacted
    stray = dest / f"{S2}" / "year=2022" / "part-deadbeef-00000.parquet"
    shutil.copy(part_files(dest)[0], stray)  # e.g. left by a run that did not finish
    assert open_index(dest).to_table().num_rows == 38 * 25
    assert open_index(dest / "_manifest.json").to_table().num_rows == 38 * 25
    assert query(dest).num_rows == 38 * 25


def test_chip_dataset_finds_items_through_the_manifest(compacted, monkeypatch):
    _, dest, _ = compacted
    import stacchip.ml.dataset as mld

    def no_footers(files):
        raise AssertionError("footers read")

    import stacchip.ml.items as mli
    from stacchip.errors import ItemError

    monkeypatch.setattr(mld, "hrefs_from_index", no_footers)
    monkeypatch.setattr(mli, "hrefs_from_index", no_footers)
    with pytest.raises(UnsafePathError, match="T00-2021"):  # hrefs outside the index root: not taken as written
        mli.ItemSource.from_index(dest)
    items = mli.ItemSource.from_index(dest, item_roots=["/data/", str(tmp_root(dest))])
    assert items.hrefs["T00-2021"] == f"/data/{LS}/T00-2021/stac_item.json"
    assert items.location(LS, "T00-2021") == f"/data/{LS}/T00-2021/stac_item.json"
    # ChipDataset checks its assets against the items at construction: it looks them up
    # at the manifest's hrefs (these test items do not exist, so that lookup is what fails)
    with pytest.raises(ItemError, match=f"/data/{LS}/T00-2021/stac_item.json"):
        mld.ChipDataset(dest, bbox=(-10.0, 36.0, -9.0, 40.0), item_roots=["/data", str(tmp_root(dest))])


# --- other readers and the validator --------------------------------------------------------------


def test_duckdb_geopandas_and_pyarrow_read_the_dataset(compacted):
    root, dest, _ = compacted
    box = (-8.0, 42.5, -4.5, 44.5)
    want = set(query(root / "index", bbox=box).column("chipid").to_pylist())
    n, years = duckdb.sql(
        f"select count(*), count(distinct year) from read_parquet('{dest}/**/*.parquet')"
    ).fetchall()[0]
    assert (n, years) == (38 * 25, 3)
    hits = duckdb.sql(
        f"select chipid from read_parquet('{dest}/**/*.parquet') where bbox.xmin <= {box[2]} and "
        f"bbox.xmax >= {box[0]} and bbox.ymin <= {box[3]} and bbox.ymax >= {box[1]}"
    ).fetchall()
    assert {h[0] for h in hits} >= want
    gdf = gpd.read_parquet(dest, bbox=box)
    assert set(gdf["chipid"]) >= want and gdf.crs.to_epsg() in (4326, None) or gdf.crs.equals("OGC:CRS84")
    assert set(gdf[gdf.intersects(shapely.box(*box))]["chipid"]) == want
    assert pads.dataset(str(dest), format="parquet").to_table().num_rows == 38 * 25


def test_float_columns_are_byte_stream_split_and_read_alike_by_duckdb(compacted):
    """The part files' float columns (bbox covering, fractions) are BYTE_STREAM_SPLIT, the
    geometry plain, the ids dictionary-encoded; DuckDB reads the same values as pyarrow."""
    _, dest, _ = compacted
    path = max(part_files(dest), key=lambda p: pq.read_metadata(p).num_rows)
    md = pq.read_metadata(path)
    floats = {"bbox.xmin", "bbox.ymin", "bbox.xmax", "bbox.ymax", "cloud_cover_percentage", "nodata_percentage"}
    for g in range(md.num_row_groups):
        chunks = {md.row_group(g).column(i).path_in_schema: md.row_group(g).column(i)
                  for i in range(md.num_columns)}
        for name in floats:
            assert "BYTE_STREAM_SPLIT" in chunks[name].encodings, (name, chunks[name].encodings)
            assert chunks[name].statistics.has_min_max, name  # row-group pruning still has its statistics
        assert not any("DICTIONARY" in e for e in chunks["geometry"].encodings)
        assert any("DICTIONARY" in e for e in chunks["item_id"].encodings)
    ours = pq.read_table(path, columns=["chipid", "bbox", "cloud_cover_percentage", "nodata_percentage"])
    theirs = duckdb.sql(
        f"select chipid, bbox.xmin, bbox.ymin, bbox.xmax, bbox.ymax, cloud_cover_percentage, nodata_percentage "
        f"from read_parquet('{path}') order by chipid").fetchall()
    ours = ours.sort_by("chipid")
    bbox = ours.column("bbox").combine_chunks()
    expect = list(zip(ours.column("chipid").to_pylist(), *(bbox.field(k).to_pylist() for k in
                      ("xmin", "ymin", "xmax", "ymax")), ours.column("cloud_cover_percentage").to_pylist(),
                      ours.column("nodata_percentage").to_pylist(), strict=True))
    assert theirs == expect and len(expect) == md.num_rows


@pytest.mark.skipif(shutil.which("geoparquet-validator") is None,
                    reason="geoparquet-validator not installed (the test extra has it)")
def test_geoparquet_validator_passes_every_class(compacted):
    _, dest, _ = compacted
    out = subprocess.run(["geoparquet-validator", "check", "--max-files", "100", str(dest)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout
    assert f"{len(part_files(dest))} parquet files" in out.stderr
    big = max(part_files(dest), key=lambda p: pq.read_metadata(p).num_row_groups)
    one = subprocess.run(["geoparquet-validator", "check", "--json", str(big)], capture_output=True, text=True)
    assert one.returncode == 0, one.stdout
    assert "spatial-order" in one.stdout


# --- command line and S3 ------------------------------------------------------------------------------


def test_cli_compact(items, capsys):
    dest = items / "out"
    rc = cli.main(["compact", str(items / "index"), "--out", str(dest), "--row-group-rows", "20", "--file-rows", "100"])
    assert rc == 0
    assert "added 38 items" in capsys.readouterr().out
    assert manifest_of(dest)["rows"] == 38 * 25
    empty = items / "empty"
    empty.mkdir()
    assert cli.main(["compact", str(empty), "--out", str(dest)]) == 2
    assert "no .parquet index files" in capsys.readouterr().err


@pytest.mark.services
def test_compact_on_s3(tmp_path, s3_bucket):
    specs = item_specs()[:9] + item_specs()[-2:]
    build(tmp_path, specs)
    src = f"s3://{s3_bucket}/index"
    for path in (tmp_path / "index").rglob("*.parquet"):
        from stacchip import storage

        storage.write_bytes(f"{src}/{path.relative_to(tmp_path / 'index').as_posix()}", path.read_bytes())
    dest = f"s3://{s3_bucket}/compacted"
    result = compact(src, dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert result.rows == 11 * 25 and result.files_written
    for filters in FILTERS[:2] + FILTERS[4:6]:
        assert by_chip(query(dest, **filters)).equals(by_chip(query(tmp_path / "index", **filters)))
    again = compact(src, dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert again.sources_skipped == 11 and again.files_written == []
    hrefs = mf.item_hrefs(mf.load(f"{dest}/_manifest.json"), dest, ["/data"])
    assert hrefs["AM-E"].endswith("AM-E/stac_item.json")


def test_a_merged_source_spanning_partitions_is_split(tmp_path):
    from stacchip.index import merge_indexes

    paths = [write_item(tmp_path / "parts", f"M{y}", S2, dt.datetime(y, 5, 1, tzinfo=UTC), 5.0, 45.0, seed=y)
             for y in (2021, 2022)]
    paths.append(write_item(tmp_path / "parts", "ML", LS, dt.datetime(2022, 5, 2, tzinfo=UTC), 5.0, 45.0, seed=7))
    merged = merge_indexes([str(p) for p in paths], tmp_path / "merged" / "all.parquet")
    dest = tmp_path / "c"
    result = compact(merged, dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert sorted(result.created) == [f"{LS}/year=2022", f"{S2}/year=2021", f"{S2}/year=2022"]
    assert by_chip(all_rows(dest)).equals(by_chip(pq.read_table(merged, schema=SCHEMA)))
    rows = [r for r in mf.provenance(str(dest), manifest_of(dest)).to_pylist() if r["source"] == str(merged)]
    assert sorted({r["item_id"] for r in rows}) == ["M2021", "M2022", "ML"]
    assert len({r["partition"] for r in rows}) == 3
    assert query(dest, item_id="M2022", platform=S2).num_rows == 25
    assert compact(merged, dest, row_group_rows=RG, file_rows=FILE_ROWS).sources_skipped == 1


def test_a_file_that_is_no_index_is_named(tmp_path):
    bad = tmp_path / "src" / "x.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), bad)
    with pytest.raises(IndexFileError, match="x.parquet"):
        compact(tmp_path / "src", tmp_path / "c")
    assert not (tmp_path / "c" / "_manifest.json").exists()
