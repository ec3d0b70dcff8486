"""No pixels from a layout that does not match its file.

Stored layouts (an index file's ``layouts`` metadata, a JSON sidecar) that were
edited or corrupted are dropped with one warning and the file's header is read
again; layouts that fail their checks are never used; a local file rewritten at
the same size with its modification time put back is noticed (inode, ctime),
when it is opened and on every tile read; a remote layout without an ETag is
read again once per process. Each case gives GDAL's pixels of the file as it is
now (or a named error), through the library and through ``stacchip chip``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
from affine import Affine

from stacchip.chipper import Chipper
from stacchip.errors import LayoutError
from stacchip.index import write_index
from stacchip.indexer import NoStatsChipIndexer
from stacchip.tiles import layouts as layouts_module
from stacchip.tiles import reader as tiles_reader_module
from stacchip.tiles.layouts import LayoutStore, index_layouts, item_layouts, open_layout, sidecar_path
from stacchip.tiles.reader import TileFile, shared_cache
from stacchip.tiles.sources import Identity, LocalSource, StaleLayoutError
from stacchip.tiles.tiff import LAYOUT_VERSION, TILE_BYTE_COUNTS, TILE_OFFSETS, Layout
from tests.tiff_builders import pixels, write

CHIP = 64
CHIPS = [(0, 0), (1, 0), (3, 5), (7, 7)]


# --- a small two-band item --------------------------------------------------------------------


@pytest.fixture
def scene(tmp_path: Path) -> dict[str, Any]:
    """A 512 px 10 m band (uint16, DEFLATE + predictor 2, 128 px tiles) and a 256 px
    20 m two-band file (uint8, ZSTD), with their item (JSON) and an index file."""
    fine = write(tmp_path / "fine.tif", pixels("uint16", 1, (512, 512), seed=1), predictor=2, blocksize=128)
    coarse = write(tmp_path / "coarse.tif", pixels("uint8", 2, (256, 256), seed=2), compress="zstd",
                   blocksize=128, transform=Affine(20, 0, 500000, 0, -20, 4000000))
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "lay", "geometry": None, "links": [],
        "properties": {"datetime": "2024-05-01T10:30:00Z", "proj:epsg": 32633, "proj:shape": [512, 512],
                       "proj:transform": [10, 0, 500000, 0, -10, 4000000]},
        "assets": {"fine": {"href": str(fine), "type": "image/tiff; application=geotiff"},
                   "coarse": {"href": str(coarse), "type": "image/tiff; application=geotiff",
                              "proj:shape": [256, 256], "proj:transform": [20, 0, 500000, 0, -20, 4000000]}},
    }
    item_path = tmp_path / "item.json"
    item_path.write_text(json.dumps(item))
    index = tmp_path / "index_lay.parquet"
    pitem = pystac.Item.from_dict(item)
    write_index(NoStatsChipIndexer(pitem, chip_size=CHIP).create_full_index(), index,
                extra_metadata={"item_href": str(item_path), "layouts": index_layouts(pitem)})
    side = sidecar_path(index)
    item_layouts(pitem).save(side)
    return {"item": item, "item_path": item_path, "fine": str(fine), "coarse": str(coarse), "index": index,
            "sidecar": Path(side)}


@pytest.fixture(autouse=True)
def fresh_process_memory():
    """What a new process starts with: no warnings given, no headers confirmed, empty caches."""
    def reset():
        layouts_module._warned.clear()
        layouts_module._confirmed.clear()
        layouts_module.DEFAULT_STORE._layouts.clear()
        shared_cache().clear()

    reset()
    yield
    reset()


def _gdal_chips(item: dict[str, Any]) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    with Chipper(NoStatsChipIndexer(pystac.Item.from_dict(item), chip_size=CHIP), reader="gdal") as gdal:
        return {(x, y): gdal.chip(x, y) for x, y in CHIPS}


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str = "") -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        assert got[key].dtype == want[key].dtype, (what, key)
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{what} {key}")


@pytest.fixture
def header_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """hrefs whose header is read (parsed from the file), in order."""
    seen: list[str] = []
    real = layouts_module.read_layout

    def recording(href, *args):
        seen.append(href)
        return real(href, *args)

    monkeypatch.setattr(layouts_module, "read_layout", recording)
    monkeypatch.setattr(tiles_reader_module, "read_layout", recording)  # (TileFile.refresh)
    return seen


# --- tampering ----------------------------------------------------------------------------------


def _u64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<u8").copy()


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.astype("<u8").tobytes()).decode()


def _canonical_digest(layout: dict[str, Any], href: str) -> str:
    """The digest as the format defines it: sha256 of the canonical JSON of href + fields."""
    body = {k: v for k, v in layout.items() if k != "digest"}
    text = json.dumps({"href": href, "layout": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _swap_first_tiles(d: dict[str, Any]) -> None:
    for name in ("offsets", "counts"):
        a = _u64(d[name])
        a[[0, 1]] = a[[1, 0]]
        d[name] = _b64(a)


def _set_tile(name: str, value: int):
    def edit(d: dict[str, Any]) -> None:
        a = _u64(d[name])
        a[0] = np.uint64(value % 2**64)
        d[name] = _b64(a)
    return edit


def _forged(edit):
    """``edit``, then the digest recomputed: only the layout's own checks can catch it."""
    def forge(d: dict[str, Any], href: str) -> Any:
        edit(d)
        d["digest"] = _canonical_digest(d, href)
        return d
    return forge


def _plain(edit):
    def apply(d: dict[str, Any], href: str) -> Any:
        edit(d)
        return d
    return apply


def _replace(value: Any):
    return lambda d, href: value


def _drop(key: str):
    return _plain(lambda d: d.pop(key))


def _put(key: str, value: Any):
    return _plain(lambda d: d.__setitem__(key, value))


TAMPERS = {
    "swapped offsets": _plain(_swap_first_tiles),
    "wrong predictor": _put("predictor", 1),
    "wrong byte order": _put("little_endian", False),
    "byte count 2**40": _plain(_set_tile("counts", 2**40)),
    "negative offset": _plain(_set_tile("offsets", -1)),
    "layout is a string": _replace("not a layout"),
    "layout is a list": _replace([1, 2, 3]),
    "missing digest": _drop("digest"),
    "wrong digest": _put("digest", "sha256:" + "0" * 64),
    "missing field": _drop("offsets"),
    "wrong type": _put("width", "512"),
    "unknown field": _put("has_mask", True),
    "forged digest, byte count 2**40": _forged(_set_tile("counts", 2**40)),
    "forged digest, negative offset": _forged(_set_tile("offsets", -1)),
    "forged digest, tile width 0": _forged(lambda d: d.__setitem__("tile_width", 0)),
    "forged digest, unknown codec": _forged(lambda d: d.__setitem__("compression", 32773)),
    "forged digest, 3 offsets": _forged(lambda d: d.__setitem__("offsets", _b64(np.arange(3)))),
}


def _tamper_doc(doc: dict[str, Any], href: str, how: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    doc["layouts"][href] = TAMPERS[how](doc["layouts"][href], href)
    return doc


def _rewrite_index_metadata(index: Path, edit) -> None:
    table = pq.read_table(index)
    meta = dict(table.schema.metadata)
    meta[b"stacchip"] = edit(meta[b"stacchip"])
    pq.write_table(table.replace_schema_metadata(meta), index)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("where", ["sidecar", "index"])
@pytest.mark.parametrize("how", list(TAMPERS))
def test_tampered_stored_layout_is_read_again(scene, where, how, header_reads, caplog):
    fine = scene["fine"]
    if where == "sidecar":
        doc = json.loads(scene["sidecar"].read_text())
        scene["sidecar"].write_text(json.dumps(_tamper_doc(doc, fine, how)))
        path = scene["sidecar"]
    else:
        def edit(raw: bytes) -> bytes:
            meta = json.loads(raw)
            meta["layouts"] = _tamper_doc(meta["layouts"], fine, how)
            return json.dumps(meta).encode()
        _rewrite_index_metadata(scene["index"], edit)
        path = scene["index"]
    want = _gdal_chips(scene["item"])
    item = pystac.Item.from_dict(scene["item"])
    with caplog.at_level(logging.INFO, logger="stacchip.tiles.layouts"):
        for _ in range(2):  # two chippers loading the same file: still one warning
            with Chipper(NoStatsChipIndexer(item, chip_size=CHIP), layouts=str(path)) as chipper:
                assert chipper.tile_file("fine") is not None
                for x, y in CHIPS:
                    _same(chipper.chip(x, y), want[(x, y)], f"{how} {x},{y}")
    assert header_reads == [fine, fine]  # only the tampered one, once per store that lacked it
    warned = [m for m in _warnings(caplog) if fine in m]
    assert len(warned) == 1 and "header is read again" in warned[0], _warnings(caplog)
    assert not [m for m in _warnings(caplog) if scene["coarse"] in m]


@pytest.mark.parametrize("how", ["swapped offsets", "byte count 2**40", "negative offset", "layout is a string",
                                 "missing digest", "forged digest, negative offset"])
def test_stacchip_chip_with_a_tampered_index_gives_gdals_pixels(scene, how):
    fine = scene["fine"]

    def edit(raw: bytes) -> bytes:
        meta = json.loads(raw)
        meta["layouts"] = _tamper_doc(meta["layouts"], fine, how)
        return json.dumps(meta).encode()

    _rewrite_index_metadata(scene["index"], edit)
    out = scene["index"].parent / "chip.npz"
    proc = _chip(scene["index"], "lay-3-5", out)
    assert proc.returncode == 0, proc.stderr
    got = dict(np.load(out))
    _same(got, _gdal_chips(scene["item"])[(3, 5)], how)
    warned = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1 and fine in warned[0], proc.stderr


def _chip(index: Path, chipid: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stacchip.cli", "chip", str(index), "--chipid", chipid,
                           "--out", str(out)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("metadata", [b"{not json", b'"a string"', b"[1, 2]"])
def test_stacchip_chip_with_corrupt_index_metadata_exits_2(scene, metadata):
    _rewrite_index_metadata(scene["index"], lambda raw: metadata)
    out = scene["index"].parent / "chip.npz"
    proc = _chip(scene["index"], "lay-3-5", out)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "index_lay.parquet" in lines[0] and "metadata" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_layouts_document_of_the_wrong_shape_is_ignored(scene, header_reads, caplog):
    doc = json.loads(scene["sidecar"].read_text())
    want = _gdal_chips(scene["item"])
    item = pystac.Item.from_dict(scene["item"])
    for bad in ({**doc, "layouts": "abc"}, {**doc, "format": "other"}, ["x"], "text", None):
        scene["sidecar"].write_text(json.dumps(bad))
        layouts_module._warned.clear()
        header_reads.clear()
        with caplog.at_level(logging.WARNING, logger="stacchip.tiles.layouts"):
            caplog.clear()
            with Chipper(NoStatsChipIndexer(item, chip_size=CHIP), layouts=str(scene["sidecar"])) as chipper:
                _same(chipper.chip(3, 5), want[(3, 5)], repr(bad))
        assert sorted(header_reads) == sorted([scene["fine"], scene["coarse"]])
        assert len(_warnings(caplog)) == 1, (bad, _warnings(caplog))
    scene["sidecar"].write_text("{not json")
    assert LayoutStore(path=scene["sidecar"]).hrefs() == []


def test_older_layouts_are_read_again_quietly(scene, header_reads, caplog):
    doc = json.loads(scene["sidecar"].read_text())
    for d in doc["layouts"].values():
        d["version"] = 1
    doc["version"] = 1
    scene["sidecar"].write_text(json.dumps(doc))
    with caplog.at_level(logging.INFO, logger="stacchip.tiles.layouts"):
        store = LayoutStore(path=scene["sidecar"])
        assert len(store) == 0
        open_layout(scene["fine"], LocalSource(scene["fine"]), store)
    assert header_reads == [scene["fine"]]
    assert not _warnings(caplog)
    assert any("version 1" in r.getMessage() for r in caplog.records)


def test_layouts_given_in_memory_are_checked_too(scene, header_reads, caplog):
    good = LayoutStore(path=scene["sidecar"]).get(scene["fine"])
    assert good is not None and good.problems() == []
    from dataclasses import replace

    bad_counts = good.counts.copy()
    bad_counts[0] = 2**40
    for bad in (replace(good, counts=bad_counts), replace(good, tile_width=0), replace(good, dtype="complex64"),
                replace(good, offsets=good.offsets[:3])):
        assert bad.problems(), bad
        store = LayoutStore({scene["fine"]: bad})
        header_reads.clear()
        with caplog.at_level(logging.WARNING, logger="stacchip.tiles.layouts"):
            got = open_layout(scene["fine"], LocalSource(scene["fine"]), store)
        assert header_reads == [scene["fine"]] and got is not bad and got.problems() == []
        assert got.offsets.tolist() == good.offsets.tolist()
    assert len([m for m in _warnings(caplog) if scene["fine"] in m]) == 1  # once per file per process


def test_from_json_names_what_is_wrong(scene):
    d = json.loads(scene["sidecar"].read_text())["layouts"][scene["fine"]]
    assert Layout.from_json(d, scene["fine"]).digest(scene["fine"]) == d["digest"] == \
        _canonical_digest(d, scene["fine"])
    cases = {
        "a layout is a JSON object": "text", "lacks field": {**{k: v for k, v in d.items() if k != "counts"}},
        "unknown field": {**d, "x": 1}, "field 'width'": {**d, "width": 5.5},
        "field 'offsets' is not base64": {**d, "offsets": "!!"},
        "8-byte integers": {**d, "offsets": base64.b64encode(b"abc").decode()},
        "field 'dtype'": {**d, "dtype": "object"}, "field 'little_endian'": {**d, "little_endian": 1},
        "field 'geotransform'": {**d, "geotransform": [1, 2, float("inf"), 4, 5, 6]},
        "digest does not match": {**d, "epsg": 4326},
        "version": {**d, "version": LAYOUT_VERSION + 1},
    }
    for message, bad in cases.items():
        with pytest.raises(LayoutError, match=message):
            Layout.from_json(bad, scene["fine"])


# --- the file changed under its layout ---------------------------------------------------------


def _swap_tiles_in_file(path: str, in_place: bool) -> None:
    """Rewrite ``path`` at the same size with the first two tiles' offsets and counts
    swapped (other pixels, same bytes), its modification time put back."""
    import tifffile

    before = os.stat(path)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        where = [(tags[code].valueoffset, tif.tiff.byteorder + {3: "u2", 4: "u4", 16: "u8"}[int(tags[code].dtype)])
                 for code in (TILE_OFFSETS, TILE_BYTE_COUNTS)]
    raw = bytearray(Path(path).read_bytes())
    for at, dtype in where:
        n = 2 * np.dtype(dtype).itemsize
        a = np.frombuffer(bytes(raw[at:at + n]), dtype)
        raw[at:at + n] = a[::-1].tobytes()
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
    if in_place:
        with open(path, "r+b") as fh:
            fh.write(bytes(raw))
    else:
        tmp = path + ".new"
        Path(tmp).write_bytes(bytes(raw))
        os.replace(tmp, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert (after.st_ino, after.st_ctime_ns) != (before.st_ino, before.st_ctime_ns)


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "replaced"])
def test_same_size_rewrite_with_mtime_restored_gives_the_new_pixels(scene, in_place, header_reads):
    old = _gdal_chips(scene["item"])
    _swap_tiles_in_file(scene["fine"], in_place)
    new = _gdal_chips(scene["item"])
    assert not np.array_equal(old[(0, 0)]["fine"], new[(0, 0)]["fine"])  # the rewrite changed chip (0, 0)
    item = pystac.Item.from_dict(scene["item"])
    with Chipper(NoStatsChipIndexer(item, chip_size=CHIP), layouts=str(scene["sidecar"])) as chipper:
        for x, y in CHIPS:
            _same(chipper.chip(x, y), new[(x, y)], f"{x},{y}")
    assert header_reads == [scene["fine"]]  # the stored layout was not trusted
    out = scene["index"].parent / "chip.npz"
    proc = _chip(scene["index"], "lay-0-0", out)
    assert proc.returncode == 0, proc.stderr
    _same(dict(np.load(out)), new[(0, 0)], "stacchip chip")


def test_a_file_changed_in_place_under_an_open_chipper_is_read_again(scene, header_reads):
    item = pystac.Item.from_dict(scene["item"])
    old = _gdal_chips(scene["item"])
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=CHIP), reader="tiles", threads=2)
    _same(chipper.chip(0, 0), old[(0, 0)], "before")
    _swap_tiles_in_file(scene["fine"], in_place=True)
    new = _gdal_chips(scene["item"])
    # Tiles this process already holds are served from its cache (documented) ...
    _same(chipper.chip(0, 0), old[(0, 0)], "cached")
    # ... but every read that reaches the disk checks the file, and reads its header again.
    shared_cache().clear()
    header_reads.clear()
    for x, y in CHIPS:
        _same(chipper.chip(x, y), new[(x, y)], f"after {x},{y}")
    assert header_reads == [scene["fine"]]
    chipper.close()


def test_read_checked_refuses_bytes_of_a_changed_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    src = LocalSource(str(path))
    expect = src.identity
    assert expect.inode is not None and expect.ctime is not None
    assert src.read_checked(0, 10, expect) == b"x" * 10
    st = os.stat(path)
    time.sleep(0.05)
    with open(path, "r+b") as fh:
        fh.write(b"y" * 10)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StaleLayoutError, match="changed"):
        src.read_checked(0, 10, expect)
    assert src.read(0, 10) == b"y" * 10  # (unchecked reads are the header's)
    assert src.head()[1] != expect and src.identity.same_local_file(src.stat())
    assert not Identity(100, None, st.st_mtime_ns, None, None).same_local_file(src.stat())  # unknown: not the same
    src.close()


# --- a remote file without an ETag ------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path):
    import functools
    import http.server
    import threading

    from tests.test_chipper import _RangeHandler  # static files with Range support, no ETag

    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_remote_layout_without_etag_is_read_again_once_per_process(scene, http_root, header_reads):
    root, base = http_root
    served = root / "fine.tif"
    served.write_bytes(Path(scene["fine"]).read_bytes())
    url = f"{base}/fine.tif"
    first = TileFile(url, store=LayoutStore())
    assert first.layout.etag is None  # this server sends none: no If-Match can check it
    side = root.parent / "remote.layouts.json"
    LayoutStore({url: first.layout}).save(side)
    first.close()
    assert header_reads == [url]
    # The same process trusts the layout it read (once per process) ...
    again = TileFile(url, store=LayoutStore(path=side))
    assert header_reads == [url] and again.layout.offsets.tolist() == first.layout.offsets.tolist()
    again.close()
    # ... a new process reads the header once before using the stored layout, and so sees
    # a file replaced by another of the same size.
    _swap_tiles_in_file(str(served), in_place=False)
    layouts_module._confirmed.clear()
    shared_cache().clear()
    fresh = TileFile(url, store=LayoutStore(path=side))
    assert header_reads == [url, url]
    assert fresh.layout.offsets[:2].tolist() == first.layout.offsets[:2][::-1].tolist()
    with rasterio.open(served) as ds:
        want = ds.read(1, window=((0, 128), (0, 256)))
    got = fresh.read(np.arange(128), np.arange(256), 0).result()[0]
    np.testing.assert_array_equal(got, want)
    fresh.close()


def test_an_open_chipper_keeps_the_file_it_opened_when_it_is_replaced(scene, header_reads):
    """A new file under the same name (rename over it): an open chipper reads the file it
    opened, with that file's layout, as an open GDAL dataset does; a new chipper the new file."""
    item = pystac.Item.from_dict(scene["item"])
    old = _gdal_chips(scene["item"])
    chipper = Chipper(NoStatsChipIndexer(item, chip_size=CHIP), reader="tiles")
    _same(chipper.chip(7, 7), old[(7, 7)], "before")
    _swap_tiles_in_file(scene["fine"], in_place=False)
    shared_cache().clear()
    header_reads.clear()
    _same(chipper.chip(0, 0), old[(0, 0)], "open chipper")
    # (unlinking the old file changed its ctime: its header was read again, the same file's)
    assert header_reads in ([], [scene["fine"]])
    chipper.close()
    header_reads.clear()
    with Chipper(NoStatsChipIndexer(item, chip_size=CHIP), reader="tiles") as fresh:
        _same(fresh.chip(0, 0), _gdal_chips(scene["item"])[(0, 0)], "new chipper")
    assert header_reads == [scene["fine"]]
