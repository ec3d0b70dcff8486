"""Compaction under faults and hostile data: a damaged source, a failed or killed run, two writers
at once, a stale lock, a run stopped between commit and moves, and manifests that name files or
items outside the index root. Each as the user meets it: the command's exit status and message,
what the destination holds for stacchip's readers and for directory readers (DuckDB, pyarrow)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from stacchip import storage
from stacchip.catalog import commit, compact
from stacchip.catalog import manifest as mf
from stacchip.errors import IndexFileError, IndexLockedError, UnsafePathError
from stacchip.index import query
from tests.catalog_support import (
    FILE_ROWS,
    LS,
    RG,
    S2,
    UTC,
    build,
    by_chip,
    damage_data_page,
    item_specs,
    manifest_of,
    write_item,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), out.get("PYTHONPATH")) if p)
    return out


def run_compact(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stacchip.cli", "compact", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def duck_rows(dest: Path) -> int:
    """Rows a directory reader sees (DuckDB's ``**/*.parquet`` glob)."""
    return int(duckdb.sql(f"select count(*) from read_parquet('{dest}/**/*.parquet')").fetchall()[0][0])


def arrow_rows(dest: Path) -> int:
    """Rows pyarrow's directory discovery sees (what geopandas reads)."""
    return pads.dataset(str(dest), format="parquet").count_rows()


def state(dest: Path) -> dict[str, bytes]:
    """Every file under ``dest`` (hidden and ``_`` ones too) with its content."""
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


@pytest.fixture
def compacted(tmp_path):
    build(tmp_path, item_specs())
    dest = tmp_path / "compacted"
    compact(tmp_path / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    return tmp_path, dest


# --- damaged sources ---------------------------------------------------------------------------------


def test_a_damaged_source_is_named_exit_2_and_the_destination_stays_as_it_was(compacted):
    root, dest = compacted
    before = state(dest)
    rows, duck, arrow = manifest_of(dest)["rows"], duck_rows(dest), arrow_rows(dest)
    # a good new item in the partition compacted first (its run is staged), a damaged one in a later one
    write_item(root, "GOOD-NEW", LS, dt.datetime(2021, 9, 1, tzinfo=UTC), -9.5, 41.0, seed=5)
    bad = write_item(root, "BAD-NEW", S2, dt.datetime(2023, 9, 1, tzinfo=UTC), 1.0, 41.0, seed=6)
    damage_data_page(bad)
    res = run_compact(str(root / "index"), "--out", str(dest), "--row-group-rows", str(RG),
                      "--file-rows", str(FILE_ROWS))
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert str(bad) in line and "damaged" in line, line  # the file itself, not some partition's sources
    assert "index_GOOD-NEW" not in line
    assert state(dest) == before  # no part file, no staging directory, no lock, the same manifest
    assert (manifest_of(dest)["rows"], duck_rows(dest), arrow_rows(dest)) == (rows, duck, arrow)


def test_a_damaged_source_on_a_first_run_writes_nothing(tmp_path):
    build(tmp_path, item_specs()[:6])
    damage_data_page(next((tmp_path / "index").rglob("index_T01-2021.parquet")), "cloud_cover_percentage")
    dest = tmp_path / "c"
    with pytest.raises(IndexFileError, match="index_T01-2021.parquet"):
        compact(tmp_path / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert not [p for p in dest.rglob("*") if p.is_file()]


def test_a_source_whose_statistics_lie_is_named(tmp_path):
    # the footer says 2021 (one partition); one row is of 2022: refused, naming the file, not mis-filed
    path = write_item(tmp_path, "LIAR", S2, dt.datetime(2021, 12, 31, 23, tzinfo=UTC), 0.0, 0.0)
    table = pq.read_table(path)
    when = table.column("datetime").to_pylist()
    late = dt.datetime(2022, 1, 1, 1, tzinfo=UTC)
    when[-1] = late
    table = table.set_column(table.schema.get_field_index("datetime"), "datetime",
                             pa.array(when, pa.timestamp("us", tz="UTC")))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), path, compression="zstd")
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    real = int((late - dt.datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000).to_bytes(8, "little")
    fake = int((when[0] - dt.datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000).to_bytes(8, "little")
    footer = bytes(data[footer_start:])
    assert real in footer
    data[footer_start:] = footer.replace(real, fake)
    path.write_bytes(bytes(data))
    stats = pq.read_metadata(path).row_group(0).column(table.schema.get_field_index("datetime")).statistics
    assert stats.max_raw < int.from_bytes(real, "little")  # the footer now lies about the last row
    with pytest.raises(IndexFileError, match="index_LIAR.parquet.*not of sentinel-2-l2a in 2021"):
        compact(tmp_path / "index", tmp_path / "c", row_group_rows=RG, file_rows=FILE_ROWS)
    assert not (tmp_path / "c" / "_manifest.json").exists()


# --- one writer at a time -----------------------------------------------------------------------------


def test_a_second_writer_exits_2_naming_the_holder(compacted):
    root, dest = compacted
    lock = commit.acquire(str(dest), "test-run-1")
    try:
        res = run_compact(str(root / "index"), "--out", str(dest))
        assert res.returncode == 2, res.stderr
        line = res.stderr.strip().splitlines()[-1]
        assert f"pid {os.getpid()}" in line and socket.gethostname() in line and "run test-run-1" in line, line
        assert "--break-lock" in line and "stale" not in line  # this process is alive
        with pytest.raises(IndexLockedError, match="test-run-1"):
            compact(root / "index", dest)
    finally:
        lock.release()
    assert not (dest / "_lock.json").exists()
    assert run_compact(str(root / "index"), "--out", str(dest)).returncode == 0


def test_two_compactions_at_once_one_exits_2_and_every_row_is_there_once(tmp_path):
    for k in range(240):  # enough rows that a run holds the lock for a while
        write_item(tmp_path, f"I{k:03d}", S2, dt.datetime(2021 + k % 3, 1 + k % 12, 1, tzinfo=UTC),
                   -10 + (k % 20) * 0.5, 40 + (k // 20) * 0.5, n=10, seed=k)
    dest = tmp_path / "c"
    args = [str(tmp_path / "index"), "--out", str(dest), "--row-group-rows", "500", "--file-rows", "2000"]
    first = subprocess.Popen([sys.executable, "-m", "stacchip.cli", "compact", *args], env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (dest / "_lock.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        second = run_compact(*args)
        first_running = first.poll() is None
        out, err = first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
    assert first_running, "the first run ended before the second started; the catalog is too small"
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr, second.stderr
    rows = 240 * 100
    assert manifest_of(dest)["rows"] == rows == query(dest).num_rows == duck_rows(dest)
    assert len(set(query(dest, columns=["chipid"]).column("chipid").to_pylist())) == rows


def test_a_killed_run_leaves_the_destination_and_a_stale_lock_broken_by_break_lock(compacted):
    root, dest = compacted
    before = state(dest)
    rows, duck = manifest_of(dest)["rows"], duck_rows(dest)
    # a small partition (compacted first, its run staged soon) and a large one (holding the run up)
    write_item(root, "SMALL", LS, dt.datetime(2021, 8, 1, tzinfo=UTC), -9.0, 41.0, seed=11)
    for k in range(160):
        write_item(root, f"BIG{k:03d}", S2, dt.datetime(2023, 1 + k % 12, 2, tzinfo=UTC),
                   -5 + (k % 16) * 0.6, 38 + (k // 16) * 0.6, n=12, seed=100 + k)
    args = [str(root / "index"), "--out", str(dest), "--row-group-rows", str(RG), "--file-rows", str(FILE_ROWS)]
    proc = subprocess.Popen([sys.executable, "-m", "stacchip.cli", "compact", *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        staged: list[Path] = []
        while not staged and proc.poll() is None and time.monotonic() < deadline:
            staged = list((dest / "_staging").rglob("*.pq")) if (dest / "_staging").exists() else []
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert staged, "the run ended before it staged a file"
    # nothing committed: the manifest, the part files and what directory readers see are as before
    assert {k: v for k, v in state(dest).items() if not k.startswith(("_staging", "_lock"))} == before
    assert (manifest_of(dest)["rows"], duck_rows(dest), arrow_rows(dest), query(dest).num_rows) == (rows, duck,
                                                                                                     duck, rows)
    assert (dest / "_lock.json").exists()
    res = run_compact(*args)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert f"pid {proc.pid}" in line and "stale" in line and "--break-lock" in line, line
    res = run_compact(*args, "--break-lock")
    assert res.returncode == 0, res.stderr
    assert not (dest / "_staging").exists() and not (dest / "_lock.json").exists()
    total = rows + 25 + 160 * 144
    assert manifest_of(dest)["rows"] == total == duck_rows(dest) == query(dest).num_rows


@pytest.mark.services
def test_the_lock_on_s3_is_a_conditional_create(s3_bucket):
    dest = f"s3://{s3_bucket}/locked"
    lock = commit.acquire(dest, "run-a")
    try:
        with pytest.raises(IndexLockedError, match="run-a"):
            commit.acquire(dest, "run-b")
        assert lock.held()
    finally:
        lock.release()
    assert not storage.exists(f"{dest}/_lock.json")
    again = commit.acquire(dest, "run-b")
    broken = commit.acquire(dest, "run-c", break_lock=True)  # a writer that knows run-b is dead
    assert not again.held() and broken.held()
    with pytest.raises(IndexLockedError, match="taken over"):
        again.check(dest)
    again.release()  # not its lock any more: left alone
    assert broken.held()
    broken.release()


# --- between the commit and the moves --------------------------------------------------------------------


def test_files_not_yet_moved_are_read_where_staged_and_the_next_run_moves_them(compacted):
    root, dest = compacted
    manifest = manifest_of(dest)
    full = by_chip(query(dest))
    moved = manifest["partitions"][f"{S2}/year=2022"]["files"][0]
    staged = dest / "_staging" / "RUNX" / mf.staged_name(moved["path"])
    staged.parent.mkdir(parents=True)
    os.replace(dest / moved["path"], staged)
    manifest["pending"] = {"staging": "_staging/RUNX", "files": [moved["path"]], "remove": []}
    (dest / "_manifest.json").write_text(json.dumps(manifest))
    assert by_chip(query(dest)).equals(full)  # stacchip's readers find it where it is
    assert duck_rows(dest) == full.num_rows - moved["rows"]  # directory readers do not see it yet
    result = compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert result.files_written == []
    assert (dest / moved["path"]).exists() and not (dest / "_staging").exists()
    assert "pending" not in manifest_of(dest)
    assert duck_rows(dest) == full.num_rows and by_chip(query(dest)).equals(full)


# --- hostile manifests -------------------------------------------------------------------------------------


def test_a_part_file_symlinked_outside_the_root_is_refused(compacted, tmp_path_factory):
    root, dest = compacted
    entry = manifest_of(dest)["partitions"][f"{S2}/year=2022"]["files"][0]
    outside = tmp_path_factory.mktemp("elsewhere") / "other.parquet"
    os.replace(dest / entry["path"], outside)
    os.symlink(outside, dest / entry["path"])  # same size, same rows: only where it lies differs
    with pytest.raises(UnsafePathError, match="outside the index root"):
        query(dest)
    res = run_compact(str(root / "index"), "--out", str(dest))
    assert res.returncode == 2 and entry["path"] in res.stderr, res.stderr


def test_a_manifest_entry_without_path_is_named(compacted):
    root, dest = compacted
    manifest = manifest_of(dest)
    key = f"{LS}/year=2021"
    del manifest["partitions"][key]["files"][0]["path"]
    (dest / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match=f"partition '{key}' file #0 has no 'path'"):
        query(dest)
    res = run_compact(str(root / "index"), "--out", str(dest))
    assert res.returncode == 2 and "has no 'path'" in res.stderr and "KeyError" not in res.stderr


def _set_hrefs(dest: Path, hrefs: dict[str, str]) -> None:
    manifest = manifest_of(dest)
    path = dest / manifest["items"]["path"]
    table = pq.read_table(path)
    values = [hrefs.get(i, h) for i, h in zip(table.column("item_id").to_pylist(),
                                              table.column("item_href").to_pylist(), strict=True)]
    table = table.set_column(table.schema.get_field_index("item_href"), "item_href", pa.array(values, pa.string()))
    pq.write_table(table, path)


@pytest.mark.parametrize("href", ["/etc/hostname", "file:///etc/hostname", "../../etc/hostname",
                                  "http://169.254.169.254/latest/meta-data/"])
def test_item_hrefs_outside_the_root_are_refused(compacted, href):
    from stacchip.ml.items import ItemSource

    root, dest = compacted
    _set_hrefs(dest, {"T01-2021": href})
    with pytest.raises(UnsafePathError, match="T01-2021"):
        ItemSource.from_index(dest, item_roots=["/data", str(root)])


def test_item_hrefs_through_a_symlink_out_of_an_allowed_root_are_refused(compacted, tmp_path_factory):
    from stacchip.ml.items import ItemSource

    root, dest = compacted
    allowed = tmp_path_factory.mktemp("items")
    (allowed / "T01-2021").mkdir()
    (allowed / "T01-2021" / "stac_item.json").symlink_to("/etc/hostname")
    (allowed / "T00-2021").mkdir()
    (allowed / "T00-2021" / "stac_item.json").write_text("{}")
    _set_hrefs(dest, {"T00-2021": str(allowed / "T00-2021" / "stac_item.json")})
    assert ItemSource.from_index(dest, item_roots=["/data", str(root), str(allowed)]).hrefs["T00-2021"] \
        == str(allowed / "T00-2021" / "stac_item.json")
    _set_hrefs(dest, {"T01-2021": str(allowed / "T01-2021" / "stac_item.json")})
    with pytest.raises(UnsafePathError, match="T01-2021"):
        ItemSource.from_index(dest, item_roots=["/data", str(root), str(allowed)])


def test_a_format_1_manifest_is_read_confined_and_upgraded(compacted):
    root, dest = compacted
    manifest = manifest_of(dest)
    prov = mf.provenance(str(dest), manifest).to_pylist()
    sources: dict[str, dict] = {}
    for row in prov:
        size, mtime = row["fingerprint"].split(":")
        rec = sources.setdefault(row["source"], {"size": int(size), "mtime_ns": int(mtime),
                                                 "rows": row["source_rows"], "partitions": [], "items": {}})
        if row["partition"] not in rec["partitions"]:
            rec["partitions"].append(row["partition"])
        rec["items"][row["item_id"]] = row["item_href"]
    sources[next(iter(sources))]["items"] = {"T99": "/etc/hostname"}
    (dest / manifest.pop("items")["path"]).unlink()
    old = {**manifest, "stacchip_compacted_index": 1, "sources": sources}
    (dest / "_manifest.json").write_text(json.dumps(old))
    assert query(dest).num_rows == manifest["rows"]
    with pytest.raises(UnsafePathError, match="T99"):
        mf.hrefs_for(dest, ["/data", str(root)])
    # a re-run keeps what the old manifest records and writes format 2
    result = compact(root / "index", dest, row_group_rows=RG, file_rows=FILE_ROWS)
    assert result.files_written == [] and result.sources_skipped == 38
    assert manifest_of(dest)["stacchip_compacted_index"] == 2 and "sources" not in manifest_of(dest)
    assert len(list(dest.glob("_items-*.pq"))) == 1
