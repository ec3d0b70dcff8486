"""Bulk indexing against hostile input: entries that are not structurally STAC items (in ndjson,
stac-geoparquet and STAC API pages) fail alone; a STAC API whose paging loops, never ends or
answers 500; item ids of 235-255 bytes; stac-geoparquet read by row group. The API here is a
small loopback server that misbehaves on purpose (the well-behaved one, stac-fastapi-pgstac, is
in test_catalog_bulk.py)."""

from __future__ import annotations

import copy
import http.server
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stacchip.catalog import bulk
from stacchip.catalog.stac_api import Pager, link_key, status_kind
from stacchip.errors import ServiceError
from stacchip.index import read_index
from tests.test_catalog_bulk import (
    IDS,
    PLATFORM,
    count,
    expected_rows,
    index_path,
    local_indexes,
    make_items,
    run_index,
    summary_line,
    write_geoparquet,
    write_ndjson,
)
from tests.processors_support import sentinel2_base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real Sentinel-2 item with COGs scaled down 10x (as in test_catalog_bulk.py)."""
    return sentinel2_base(tmp_path_factory.mktemp("hostile-base"), factor=10)


def broken(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Copies of good items with one field of the wrong JSON type each."""
    out = {}
    for n, (name, field, value) in enumerate([
        ("BAD_ASSETS_STR", "assets", "s3://x/y.tif"),
        ("BAD_PROPS_STR", "properties", "cloudy"),
        ("BAD_LINKS_STR", "links", "self"),
        ("BAD_ASSET_NO_HREF", "assets", {"scl": {"type": "image/tiff"}}),
        ("BAD_BBOX_STR", "bbox", "1,2,3,4"),
    ]):
        item = copy.deepcopy(items[n % len(items)])
        item["id"] = name
        item[field] = value
        out[name] = item
    return out


# --- entries that are no items ------------------------------------------------------------------------


def test_structurally_bad_ndjson_entries_fail_alone(base: dict[str, Any], tmp_path: Path) -> None:
    items = make_items(base, tmp_path / "scenes", ids=IDS[:3])
    bad = broken(items)
    source = write_ndjson([items[0], *bad.values(), items[1], items[2]], tmp_path / "mixed.ndjson")
    out = tmp_path / "out"
    res = run_index(str(source), "--out", str(out))
    assert res.returncode == 2, res.stderr[-3000:]  # every failure is bad input
    errors = res.stderr.splitlines()
    for name in bad:
        line = next((ln for ln in errors if name in ln), None)
        assert line is not None and "not a valid STAC item" in line, (name, res.stderr[-2000:])
    assert "object has no attribute" not in res.stderr and "internal error" not in res.stderr
    line = summary_line(res)
    assert count(line, "indexed") == 3 and count(line, "failed") == len(bad), line
    final = local_indexes(out)
    assert sorted(final) == sorted(IDS[:3])
    for item in items:
        assert read_index(final[item["id"]]).to_pylist() == expected_rows(item)


def test_stac_geoparquet_rows_of_the_wrong_shape_fail_alone(base: dict[str, Any], tmp_path: Path) -> None:
    items = make_items(base, tmp_path / "scenes", ids=IDS[:2])
    (tmp_path / "cat").mkdir()
    write_geoparquet(items, tmp_path / "cat" / "good.parquet")
    # a file whose assets and properties columns hold JSON strings (a writer that did not nest them)
    pq.write_table(pa.table({
        "type": ["Feature", "Feature"], "stac_version": ["1.0.0", "1.0.0"], "id": ["ROW_BAD_1", "ROW_BAD_2"],
        "assets": [json.dumps(items[0]["assets"]), json.dumps(items[1]["assets"])],
        "properties": ["{}", "{}"], "datetime": ["2020-01-10T14:00:00Z"] * 2,
    }), tmp_path / "cat" / "strings.parquet")
    out = tmp_path / "out"
    res = run_index(str(tmp_path / "cat"), "--out", str(out))
    assert res.returncode == 2, res.stderr[-3000:]
    for name in ("ROW_BAD_1", "ROW_BAD_2"):
        assert any(name in ln and "not a valid STAC item" in ln for ln in res.stderr.splitlines()), res.stderr
    assert sorted(local_indexes(out)) == sorted(IDS[:2])


def test_stac_geoparquet_is_read_by_row_group_each_task_only_its_own(base: dict[str, Any], tmp_path: Path) -> None:
    import stac_geoparquet.arrow as sga

    items = make_items(base, tmp_path / "scenes")
    path = tmp_path / "rg.parquet"
    table = sga.parse_stac_items_to_arrow(items).read_all()
    pq.write_table(table, path, row_group_size=1)  # one item per row group
    assert pq.read_metadata(path).num_row_groups == len(IDS)
    for task in (0, 1):
        tally = bulk.Tally()
        mine = [i for i in IDS if bulk.task_of(i, 2) == task]
        records = list(bulk.read_source(path, lambda key, t=task: bulk.task_of(key, 2) == t, tally))
        assert sorted(r.key for r in records) == sorted(mine)
        assert tally.entries == len(IDS) and tally.row_groups == len(IDS)
        assert tally.row_groups_read == len(mine) < len(IDS)  # the other task's row groups: ids only


# --- long ids -------------------------------------------------------------------------------------------


def test_item_ids_of_235_to_255_bytes(base: dict[str, Any], tmp_path: Path) -> None:
    long_ids = ["L" * 235, "M" * 241, "N" * 242, "O" * 255]
    items = make_items(base, tmp_path / "scenes", ids=long_ids)
    source = write_ndjson(items, tmp_path / "long.ndjson")
    out = tmp_path / "out"
    res = run_index(str(source), "--out", str(out))
    # ids up to 241 bytes fit the local file name index_{id}.parquet (255 bytes); longer ones are bad input
    assert res.returncode == 2, res.stderr[-3000:]
    assert sorted(local_indexes(out)) == sorted(long_ids[:2])
    for item_id in long_ids[2:]:
        assert any(item_id[:40] in ln and "at most 255" in ln for ln in res.stderr.splitlines()), res.stderr
    assert "File name too long" not in res.stderr
    for item in items[:2]:
        assert read_index(index_path(out, item["id"])).to_pylist() == expected_rows(item)
    assert not [p for p in out.rglob(".*") if p.name.endswith(".part")]


@pytest.mark.services
def test_item_ids_of_255_bytes_on_s3(base: dict[str, Any], s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    items = make_items(base, tmp_path / "scenes", ids=["Q" * 255])
    source = write_ndjson(items, tmp_path / "long.ndjson")
    res = run_index(str(source), "--out", f"s3://{s3_bucket}/long")
    assert res.returncode == 0, res.stderr[-3000:]
    path = f"s3://{s3_bucket}/long/index/{PLATFORM}/{'Q' * 255}/index_{'Q' * 255}.parquet"
    assert read_index(path).to_pylist() == expected_rows(items[0])


# --- paging, apart from the transport ------------------------------------------------------------------------


def page(ids: list[str], token: str | None) -> dict[str, Any]:
    links = [] if token is None else [{"rel": "next", "href": "http://x/search", "method": "POST",
                                        "body": {"token": token}, "merge": True}]
    return {"type": "FeatureCollection", "features": [{"id": i} for i in ids], "links": links}


def test_pager_stops_on_a_repeated_next_link_a_page_limit_and_max_items() -> None:
    def feed(pager: Pager, pages: list[dict[str, Any]]) -> tuple[list[str], int]:
        asked = 0

        def fetch() -> Iterator[dict[str, Any]]:
            nonlocal asked
            for p in pages:
                asked += 1
                yield p

        return [f["id"] for f in pager.follow(fetch())], asked

    looping = [page(["a", "b"], "T1"), page(["c"], "T2"), page(["c"], "T2"), page(["c"], "T2")]
    pager = Pager()
    got, asked = feed(pager, looping)
    # the third page links to the page it is: paging stops there, not a request more
    assert got == ["a", "b", "c", "c"] and asked == 3 and "already fetched" in (pager.stopped or "")
    endless = [page([f"i{n}"], f"T{n + 1}") for n in range(1000)]
    pager = Pager(max_pages=5)
    got, asked = feed(pager, endless)
    assert len(got) == 5 and asked == 5 and "--max-pages 5" in (pager.stopped or "")
    pager = Pager(max_items=3)
    got, asked = feed(pager, [page(["a", "b"], "T1"), page(["c", "d"], "T2"), page(["e"], None)])
    assert got == ["a", "b", "c"] and asked == 2
    pager = Pager()
    assert feed(pager, [page(["a"], "T1"), page(["b"], None)]) == (["a", "b"], 2) and pager.stopped is None
    # POST paging: the same href with another body is another page
    assert link_key({"href": "h", "method": "POST", "body": {"token": 1}}) != link_key(
        {"href": "h", "method": "POST", "body": {"token": 2}})
    with pytest.raises(ServiceError, match="page 1"):
        Pager().take(["not", "a", "page"])
    assert [status_kind(s) for s in (500, 503, 429, 408, None, 400, 404, 422)] == ["retry"] * 5 + ["refused"] * 3


# --- a misbehaving STAC API on loopback --------------------------------------------------------------------------


class HostileApi:
    """A minimal STAC API (landing page, POST /search) whose paging misbehaves as told:
    ``repeat`` (the second page links to itself), ``endless`` (every page links to a new one),
    ``error`` (search answers HTTP 500)."""

    def __init__(self, items: list[dict[str, Any]], mode: str) -> None:
        self.items, self.mode, self.searches = items, mode, 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") in ("", "/"):
                    self.reply(200, api.landing())
                elif self.path.startswith("/search"):
                    self.reply(*api.search({}))
                else:
                    self.reply(404, {"code": "NotFound"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                self.reply(*api.search(body))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def landing(self) -> dict[str, Any]:
        return {"type": "Catalog", "id": "hostile", "description": "loops", "stac_version": "1.0.0",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                "links": [{"rel": "self", "href": self.url}, {"rel": "root", "href": self.url},
                          {"rel": "search", "href": f"{self.url}/search", "method": "POST",
                           "type": "application/geo+json"},
                          {"rel": "search", "href": f"{self.url}/search", "method": "GET",
                           "type": "application/geo+json"}]}

    def search(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.searches += 1
        if self.mode == "error":
            return 500, {"code": "InternalServerError", "description": "database is down"}
        token = int(body.get("token") or 0)
        features = [self.items[token % len(self.items)]]
        if self.mode == "endless":
            feature = copy.deepcopy(features[0])
            feature["id"] = f"ENDLESS_{token:04d}"
            features = [feature]
        nxt = 1 if self.mode == "repeat" else token + 1
        if self.mode == "bad" and token == 0:
            bad = copy.deepcopy(self.items[1])
            bad["id"], bad["assets"] = "API_BAD_ASSETS", "not an object"
            features.append(bad)
        links = [{"rel": "next", "href": f"{self.url}/search", "method": "POST", "body": {"token": nxt},
                  "merge": True}]
        if self.mode == "bad" and token >= 1:
            links = []
        return 200, {"type": "FeatureCollection", "features": features, "links": links}

    def __enter__(self) -> HostileApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def api_items(base: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    items = make_items(base, tmp_path / "scenes", ids=IDS[:3])
    for item in items:
        item["links"] = []
    return items


def test_a_repeated_next_link_stops_paging(api_items: list[dict[str, Any]], tmp_path: Path) -> None:
    with HostileApi(api_items, "repeat") as api:
        res = run_index("--stac-api", api.url, "--collection", PLATFORM, "--out", str(tmp_path / "out"),
                        timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert api.searches == 2  # the first page, the page that links to itself: then paging stops
    assert "already fetched" in res.stderr and "paging stopped" in res.stderr
    assert sorted(local_indexes(tmp_path / "out")) == sorted(i["id"] for i in api_items[:2])


def test_endless_paging_stops_at_max_pages_and_max_items(api_items: list[dict[str, Any]], tmp_path: Path) -> None:
    with HostileApi(api_items, "endless") as api:
        res = run_index("--stac-api", api.url, "--collection", PLATFORM, "--out", str(tmp_path / "a"),
                        "--max-pages", "4", timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        assert api.searches == 4 and "--max-pages 4 reached" in res.stderr
        assert len(local_indexes(tmp_path / "a")) == 4
        api.searches = 0
        res = run_index("--stac-api", api.url, "--collection", PLATFORM, "--out", str(tmp_path / "b"),
                        "--max-items", "3", timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        assert api.searches == 3 and len(local_indexes(tmp_path / "b")) == 3


def test_http_500_from_the_api_is_exit_1(api_items: list[dict[str, Any]], tmp_path: Path) -> None:
    with HostileApi(api_items, "error") as api:
        res = run_index("--stac-api", api.url, "--collection", PLATFORM, "--out", str(tmp_path / "out"),
                        env={"STACCHIP_RETRIES": "2"}, timeout=120)
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert api.searches == 2  # retried, then given up: worth retrying later, not bad input
    assert "500" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_an_api_page_with_a_bad_item_fails_it_alone(api_items: list[dict[str, Any]], tmp_path: Path) -> None:
    with HostileApi(api_items, "bad") as api:
        res = run_index("--stac-api", api.url, "--collection", PLATFORM, "--out", str(tmp_path / "out"),
                        timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert any("API_BAD_ASSETS" in ln and "not a valid STAC item" in ln for ln in res.stderr.splitlines())
    assert sorted(local_indexes(tmp_path / "out")) == sorted(i["id"] for i in api_items[:2])
