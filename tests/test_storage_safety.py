"""The path-safety helpers, temp files, checksum records and permissions of stacchip.storage."""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stacchip import storage
from stacchip.errors import UnsafePathError
from stacchip.reader import resolve_href
from stacchip.utils import item_key, item_url

ROOT = "/data/bucket"

BAD_SEGMENTS = [
    "", ".", "..", "../../x/.ssh", "a/b", "a\\b", "/abs", "x\x00y", "line\nbreak", "tab\there", "del\x7f",
    "c1\x85", "sep\u2028", ".hidden", ".ssh", "-rf", "%2e%2e", "%2E%2e", "%252e%252e", "a%2Fb", "a%5cb",
    "%2essh", "...", "x" * 256, "é" * 128, "\udcff",
]
GOOD_SEGMENTS = [
    "S2A_T20HNJ_20240311T141154_L2A", "B04.tif", "m_3008501_ne_16_060_20211115", "index_x.parquet",
    "LC08_L2SP_010011_20200101_02_T1", "a..b", "x...", "x-", "100%", "é" * 127, "space in name",
]


@pytest.mark.parametrize("name", BAD_SEGMENTS)
def test_unsafe_segments_are_refused_naming_what(name):
    with pytest.raises(UnsafePathError, match="^item id "):
        storage.safe_segment(name, "item id")
    with pytest.raises(UnsafePathError):
        storage.join_under(ROOT, "sentinel-2-l2a", name)
    with pytest.raises(UnsafePathError):
        item_key("sentinel-2-l2a", name)


@pytest.mark.parametrize("name", GOOD_SEGMENTS)
def test_safe_segments_pass_unchanged(name):
    assert storage.safe_segment(name) == name
    assert storage.join_under(ROOT, "p", name) == f"{ROOT}/p/{name}"
    assert storage.join_under("s3://bucket/prefix", "p", name) == f"s3://bucket/prefix/p/{name}"
    assert item_url("s3://bucket", "p", name) == f"s3://bucket/p/{name}/stac_item.json"


def test_non_strings_and_empty_roots_are_refused():
    for value in (None, 3, b"bytes"):
        with pytest.raises(UnsafePathError, match="not a string"):
            storage.safe_segment(value, "item id")
    with pytest.raises(UnsafePathError, match="empty root"):
        storage.join_under("", "a")
    with pytest.raises(UnsafePathError, match="empty root"):
        storage.under_root("", "a")


def _inside(result: str, root: str) -> bool:
    normal = posixpath.normpath(result)
    return normal == result and normal.startswith(root.rstrip("/") + "/")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_refused_or_stays_one_level_under_the_root(name):
    try:
        joined = storage.join_under(ROOT, name)
    except UnsafePathError:
        return
    assert _inside(joined, ROOT)
    assert posixpath.dirname(joined) == ROOT
    # percent-decoding (what an HTTP server or a URL parser might do) keeps it there too
    decoded = unquote(unquote(joined))
    assert posixpath.dirname(posixpath.normpath(decoded)) == ROOT
    s3 = storage.join_under("s3://bucket/p", name)
    assert s3 == f"s3://bucket/p/{name}" and "/" not in s3[len("s3://bucket/p/"):]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "", "a", "b.tif", "%2e%2e", "%2e", "%252e%252e", "..%2f", "x\\y", "%00"]),
                max_size=8))
def test_any_relative_path_is_refused_or_normalised_under_the_root(steps):
    path = "/".join(steps)
    try:
        result = storage.under_root(ROOT, path, "href")
    except UnsafePathError:
        return
    assert _inside(result, ROOT)
    decoded = posixpath.normpath(unquote(unquote(result)))
    assert decoded.startswith(ROOT + "/"), (path, result, decoded)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_under_root_with_arbitrary_text_never_leaves_the_root(text):
    try:
        result = storage.under_root(ROOT, text, "href")
    except UnsafePathError:
        return
    assert _inside(result, ROOT)
    assert posixpath.normpath(unquote(unquote(result))).startswith(ROOT + "/")


@pytest.mark.parametrize(
    "href",
    [
        "s3://bucket/../elsewhere/f.tif",
        "s3://bucket/a/../../elsewhere/f.tif",
        "s3://bucket/a/%2e%2e/%2e%2e/elsewhere/f.tif",
        "s3://bucket/%2E%2E/elsewhere/f.tif",
        "https://host/..%2f..%2felsewhere/f.tif",
        "/../../etc/passwd",
        "../elsewhere/f.tif",
        "s3://bucket/",
        "s3://bucket/a\\..\\..\\f.tif",
    ],
)
def test_resolve_href_refuses_escapes_under_a_mountpath(href, tmp_path):
    with pytest.raises(UnsafePathError, match="href"):
        resolve_href(href, str(tmp_path / "mount"))


def test_resolve_href_keeps_upstream_re_rooting(tmp_path):
    mount = str(tmp_path / "mount")
    assert resolve_href("s3://bucket/a/b.tif", mount) == f"{mount}/a/b.tif"
    assert resolve_href("s3://bucket/a/./c/../b.tif", mount) == f"{mount}/a/b.tif"
    assert resolve_href("https://host/a/b.tif?sig=x", mount) == f"{mount}/a/b.tif"
    assert resolve_href("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"  # no mountpath: unchanged


# --- temporary files -------------------------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_stale_temps_of_one_target_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "cube_1.npz"
    stale = tmp_path / ".cube_1.npz.ab12cd_9.part"
    boto = tmp_path / ".cube_1.npz.zz00zz00.part.0aF3bC9d"
    fresh = tmp_path / ".cube_1.npz.fresh000.part"
    other = tmp_path / ".cube_10.npz.ab12cd_9.part"
    lookalike = tmp_path / ".cube_1.npz.sha256.json"
    for path in (stale, boto, fresh, other, lookalike):
        path.write_bytes(b"x")
    for path in (stale, boto, other, lookalike):
        _age(path, 3600)
    started = time.time() - 60
    os.utime(fresh, (started + 30, started + 30))  # touched after the run started: a write under way
    removed = storage.remove_stale_temps(str(target), before=started)
    assert sorted(removed) == sorted([str(stale), str(boto)])
    assert not stale.exists() and not boto.exists()
    assert fresh.exists() and other.exists() and lookalike.exists()
    assert storage.remove_stale_temps(str(tmp_path / "missing-dir" / "x"), before=started) == []
    assert storage.remove_stale_temps("s3://bucket/cube_1.npz", before=started) == []


def test_stale_temps_in_a_folder(tmp_path):
    names = [".B04.tif.abcdefgh.part", ".stac_item.json.12345678.part", ".x.tif.abcdefgh.part.DEADBEEF"]
    keep = ["B04.tif", ".B04.tif.sha256.json", ".notatemp.part", ".B04.tif.ABCDEFGH.part"]
    for name in names + keep:
        (tmp_path / name).write_bytes(b"x")
        _age(tmp_path / name, 600)
    removed = storage.remove_stale_temps_in(str(tmp_path), before=time.time())
    assert sorted(Path(p).name for p in removed) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_write_leaves_no_temp_and_a_failed_copy_leaves_nothing(tmp_path):
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(str(target), b"abc")
    assert target.read_bytes() == b"abc"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
    with pytest.raises(storage.StorageNotFoundError):
        storage.copy(str(tmp_path / "nope.bin"), str(tmp_path / "d" / "g.bin"), attempts=1)
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


# --- permissions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask_permissions(umask, mode, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    old = os.umask(umask)
    try:
        storage.write_bytes(str(tmp_path / "a.bin"), b"a")
        storage.write_bytes(str(tmp_path / "a.bin"), b"again")  # replacing keeps the umask's mode
        storage.copy(str(source), str(tmp_path / "copy.bin"))
        storage.put_file(str(source), f"file://{tmp_path}/put.bin")
        assert storage.create_if_absent(str(tmp_path / "claim.json"), b"{}")
        storage.write_recorded(str(tmp_path / "rec.bin"), b"recorded")
        reference = tmp_path / "open.bin"
        with open(reference, "wb") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(reference.stat().st_mode) == mode
    for name in ("a.bin", "copy.bin", "put.bin", "claim.json", "rec.bin", ".rec.bin.sha256.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# --- checksum records --------------------------------------------------------------------------------------


def test_verify_local(tmp_path):
    url = str(tmp_path / "cube_0.npz")
    assert storage.verify(url).status == storage.MISSING
    storage.write_bytes(url, b"no record")
    assert storage.verify(url).status == storage.UNRECORDED
    storage.write_recorded(url, b"0123456789" * 100)
    assert storage.verify(url).ok
    record = Path(storage.record_url(url))
    assert record.name == ".cube_0.npz.sha256.json"
    with open(url, "r+b") as fh:  # truncated
        fh.truncate(500)
    check = storage.verify(url)
    assert check.status == storage.DAMAGED and "500 bytes" in check.detail
    storage.write_recorded(url, b"0123456789" * 100)
    with open(url, "r+b") as fh:  # same size, one byte changed
        fh.seek(10)
        fh.write(b"X")
    check = storage.verify(url)
    assert check.status == storage.DAMAGED and "SHA-256" in check.detail
    record.write_text("{not json")
    assert storage.verify(url).status == storage.DAMAGED


@pytest.mark.services
def test_verify_s3(s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    url = f"s3://{s3_bucket}/cubes/cube_0.npz"
    assert storage.verify(url).status == storage.MISSING
    storage.write_recorded(url, b"abcdef" * 1000)
    head = client.head_object(Bucket=s3_bucket, Key="cubes/cube_0.npz")
    # the object keeps its checksum: re-runs need not download the cube
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"abcdef" * 1000).hexdigest()
    assert storage.verify(url).ok
    assert client.head_object(Bucket=s3_bucket, Key="cubes/.cube_0.npz.sha256.json")["ContentLength"] > 0
    client.put_object(Bucket=s3_bucket, Key="cubes/cube_0.npz", Body=b"abcdef" * 500)  # truncated
    assert storage.verify(url).status == storage.DAMAGED
    client.put_object(Bucket=s3_bucket, Key="cubes/cube_0.npz", Body=b"abcdeX" + b"abcdef" * 999)  # same size
    check = storage.verify(url)
    assert check.status == storage.DAMAGED and "SHA-256" in check.detail
    client.put_object(Bucket=s3_bucket, Key="cubes/plain.npz", Body=b"x")
    assert storage.verify(f"s3://{s3_bucket}/cubes/plain.npz").status == storage.UNRECORDED
