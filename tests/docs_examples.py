"""Pytest plugin: every Python and shell example of the documentation runs (Sybil).

``python -m pytest`` collects ``docs/**/*.md`` (``testpaths`` in pyproject.toml): each fenced
block in ``python`` or ``bash`` is one test, run in the order of its page, the Python blocks of a
page sharing one namespace (a tutorial builds on what it did above), the shell blocks run by
``bash -e -o pipefail`` in the page's working directory with the page's environment.

A block marked in its fence, ```` ```python { .internet } ```` (needs the internet or a cloud
account), ```` ```bash { .cluster } ```` (runs on AWS Batch, Kubernetes or Slurm) or
```` ```bash { .service } ```` (needs an endpoint or proxy of your own) or
```` ```bash { .benchmark } ```` (a benchmark: ``tests/test_docs_examples.py`` checks its module
and flags), is checked for syntax only (``compile()``, ``bash -n``); the site shows the reader why
(docs/assets/extra.css).
Lines ``--8<-- "path"`` (pymdownx.snippets) are replaced by the file they include before a block
runs, so an included script runs as the reader sees it.

What a page's examples start from is set in its front matter::

    ---
    examples:
      setup: [demo, bucket, s3, stac-api, cubes]   # default: [demo]
    ---

``demo``      ``demo/``: the demo scene (``stacchip demo``) and its index ``demo/index_{id}.parquet``
``bucket``    ``bucket/``: three dates of the demo scene in the processors' bucket layout, with
              chip indexes under ``bucket/index/`` (clouds differ by date)
``s3``        the loopback S3 server (tests/services.py ``s3_env``: ``AWS_ENDPOINT_URL`` etc. set)
              holding that bucket as ``s3://demo-bucket/`` (items with ``s3://`` hrefs), and
              ``s3://demo-bucket/http/stac_item.json``, the demo item with plain ``http://`` hrefs
              to the same server (``DEMO_HTTP_ITEM`` holds its URL)
``stac-api``  the loopback STAC API (pgstac) serving the three items as collection
              ``sentinel-2-l2a`` (assets on ``s3://demo-bucket``); ``STAC_API`` holds its URL
``cubes``     ``cubes/``: training cubes of ``bucket/`` (``stacchip-prechip --cube-size 4``)

Every page runs in a fresh temporary directory, removed after its last example, which holds
``processors/`` (a link to the repository's) as a clone of the repository does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

try:
    from sybil import Document, Example, Region, Sybil
    from sybil.evaluators.python import PythonEvaluator
    from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer
except ImportError as exc:  # the docs extra is not installed: see the end of this file
    SYBIL_MISSING: str | None = f"sybil is not installed ({exc}); pip install -e '.[docs]'"
    Document = Example = Region = Any  # type: ignore[misc,assignment]
else:
    SYBIL_MISSING = None

# As tests/conftest.py: the examples never wait for an instance-metadata service.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("GDAL_HTTP_TIMEOUT", "20")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Fence classes whose blocks are checked for syntax only, and why.
SYNTAX_ONLY = {"internet": "needs the internet or a cloud account", "cluster": "runs on a cluster",
               "service": "needs a service of your own (endpoint, proxy)",
               "benchmark": "a benchmark (minutes to hours; tests/test_docs_examples.py checks its flags)"}
LANGUAGES = {"python": "python", "py": "python", "bash": "bash"}
#: Seconds one shell block may take.
SHELL_TIMEOUT_S = 900
DEMO_BUCKET = "demo-bucket"
STAC_COLLECTION = "sentinel-2-l2a"
PLATFORM = "sentinel-2-l2a"
#: The bucket item that also has a copy with plain http:// hrefs (``DEMO_HTTP_ITEM``).
HTTP_ITEM_ID = "S2A_T20HNJ_20240311T140636_L2A_DEMO"
SETUPS = ("demo", "bucket", "s3", "stac-api", "cubes")
#: The dates of the bucket's three items (the demo scene's own first), with the rows their
#: cloud is moved by, so that each date is cloudy somewhere else.
DATES = (("20240311T140636", "2024-03-11T14:11:54.463000Z", 0),
         ("20240410T140636", "2024-04-10T14:11:54.463000Z", 180),
         ("20240510T140636", "2024-05-10T14:11:54.463000Z", 360))

#: What ran in this session: ``{"run": n, "syntax": n, "syntax:<why>": n}`` (terminal summary).
COUNTS: dict[str, int] = {}

INFO = re.compile(r"(?P<language>[\w-]+)(?:[ \t]*\{(?P<attrs>[^}\n]*)\})?[^\n]*$\n", re.MULTILINE)
SNIPPET = re.compile(r"^(?P<indent>[ \t]*)--8<--[ \t]+\"(?P<path>[^\"]+)\"[ \t]*$", re.MULTILINE)


# --- parsing ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    language: str  # python | bash
    classes: frozenset[str]
    source: str

    @property
    def syntax_only(self) -> str | None:
        """Why the block is not run (None: it runs)."""
        return next((SYNTAX_ONLY[c] for c in sorted(self.classes) if c in SYNTAX_ONLY), None)


def fenced_blocks(text: str) -> Iterator[tuple[int, str, frozenset[str], str]]:
    """``(offset, language, classes, source)`` of every fenced block of a Markdown text."""
    doc = Document(text, "<text>")
    for region in RawFencedCodeBlockLexer(info_pattern=INFO)(doc):
        attrs = region.lexemes.get("attrs") or ""
        classes = frozenset(re.findall(r"\.([\w-]+)", attrs))
        yield region.start, region.lexemes["language"], classes, str(region.lexemes["source"])


def include_snippets(source: str) -> str:
    """``--8<-- "path"`` lines replaced by the repository file they name (as pymdownx.snippets does)."""
    def read(match: re.Match[str]) -> str:
        path = (ROOT / match.group("path")).resolve()
        if not (path.is_relative_to(ROOT) and path.is_file()):
            raise FileNotFoundError(f"snippet {match.group('path')!r} is not a file of the repository")
        return path.read_text()

    return SNIPPET.sub(read, source)


class ExampleParser:
    """Sybil parser: the ``python`` and ``bash`` fenced blocks of a page."""

    def __init__(self) -> None:
        self.lexer = RawFencedCodeBlockLexer(info_pattern=INFO)

    def __call__(self, document: Document) -> Iterator[Region]:
        for region in self.lexer(document):
            language = LANGUAGES.get(region.lexemes["language"])
            if language is None:
                continue
            attrs = region.lexemes.get("attrs") or ""
            source = region.lexemes["source"]
            region.parsed = Block(language, frozenset(re.findall(r"\.([\w-]+)", attrs)), source)
            region.evaluator = evaluate
            yield region


def _count(key: str) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + 1


def evaluate(example: Example) -> str | None:
    """Run one block (or check its syntax), in its page's environment; a failure is returned as
    its message (Sybil reports it), a Python exception raised from the example's own code."""
    __tracebackhide__ = True
    block: Block = example.parsed
    source = include_snippets(block.source)
    page: Page = example.namespace["docs_page"]
    why = block.syntax_only
    if why is not None:
        if block.language == "python":
            try:
                compile("\n" * example.line + source, str(example.path), "exec")
            except SyntaxError as exc:
                return f"syntax error in a Python example ({why}): {exc}"
        else:
            proc = subprocess.run(["bash", "-n"], input=source, capture_output=True, text=True, timeout=60,
                                  check=False)
            if proc.returncode != 0:
                return f"bash -n found a syntax error in a shell example ({why}):\n{proc.stderr}"
        _count("syntax")
        _count(f"syntax: {why}")
        return None
    if block.language == "python":
        try:
            PythonEvaluator()(_WithSource(example, source))
        except Exception as exc:  # noqa: BLE001 - reported as the example's failure, its frames only
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(example.path)]
            return ("Python example raised:\n" + "".join(traceback.format_list(frames))
                    + "".join(traceback.format_exception_only(exc)))
    else:
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", source], cwd=page.workdir, env=page.environ(),
            capture_output=True, text=True, timeout=SHELL_TIMEOUT_S, check=False,
        )
        page.outputs.append(proc.stdout)
        if proc.returncode != 0:
            return (f"shell example exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    _count("run")
    return None


class _WithSource:
    """The attributes PythonEvaluator reads, with the block's source (snippets included)."""

    def __init__(self, example: Example, source: str) -> None:
        from sybil import Lexeme

        self.parsed = Lexeme(source, offset=0, line_offset=0)
        self.line = example.line
        self.path = example.path
        self.namespace = example.namespace


# --- what pages start from ----------------------------------------------------------------------


def front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {} if end > 0 else {}


def page_setups(text: str) -> tuple[str, ...]:
    examples = front_matter(text).get("examples") or {}
    setups = tuple(examples.get("setup", ["demo"]))
    unknown = [s for s in setups if s not in SETUPS]
    assert not unknown, f"unknown example setup(s) {unknown}; known: {SETUPS}"
    return setups


@dataclasses.dataclass
class Page:
    """A page's working directory and environment, shared by its examples."""

    workdir: Path
    setups: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    outputs: list[str] = dataclasses.field(default_factory=list)

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def _rewrite_hrefs(item_path: Path, href: Any) -> None:
    item = json.loads(item_path.read_text())
    for key, asset in item["assets"].items():
        asset["href"] = href(key, Path(asset["href"]).name)
    item_path.write_text(json.dumps(item, indent=2))


def _index_item(item_path: Path, out: Path, item_href: str | None) -> None:
    from stacchip.index import write_index
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.utils import load_item

    item = load_item(str(item_path))
    meta = {"item_href": item_href, "item_id": item.id} if item_href else None
    write_index(Sentinel2Indexer(item).create_full_index(), str(out), extra_metadata=meta)


@pytest.fixture(scope="session")
def docs_demo_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo scene, built once (``stacchip.demo.build_demo_scene``)."""
    from stacchip.demo import build_demo_scene

    directory = tmp_path_factory.mktemp("docs-demo") / "demo"
    build_demo_scene(directory)
    return directory


def make_demo(scene: Path, dest: Path) -> None:
    """``dest``: the demo scene and its index, as ``stacchip demo --dir dest`` leaves them."""
    shutil.copytree(scene, dest)
    _rewrite_hrefs(dest / "stac_item.json", lambda key, name: str(dest / name))
    item_id = json.loads((dest / "stac_item.json").read_text())["id"]
    _index_item(dest / "stac_item.json", dest / f"index_{item_id}.parquet", str(dest / "stac_item.json"))


def _moved_scl(src: Path, dest: Path, rows: int) -> None:
    import rasterio

    with rasterio.open(src) as ds:
        profile = ds.profile
        data = ds.read(1)
    moved = np.roll(data, rows, axis=0)
    moved[data == 0] = 0  # the nodata corner stays where the swath edge is
    moved[(moved == 0) & (data != 0)] = 4
    profile.update(driver="COG", compress="DEFLATE", blocksize=256)
    for key in ("tiled", "blockxsize", "blockysize", "interleave"):
        profile.pop(key, None)
    dest.unlink()
    with rasterio.open(dest, "w", **profile) as out:
        out.write(moved, 1)


def make_bucket(scene: Path, root: Path) -> list[dict[str, Any]]:
    """``root``: three dates of the demo scene in the processors' bucket layout; their items."""
    base = json.loads((scene / "stac_item.json").read_text())
    items = []
    for stamp, when, rows in DATES:
        item = json.loads(json.dumps(base))
        item["id"] = base["id"].replace("20240311T140636", stamp)
        item["properties"]["datetime"] = when
        folder = root / PLATFORM / item["id"]
        shutil.copytree(scene, folder, ignore=shutil.ignore_patterns("*.json", "*.parquet"))
        if rows:
            _moved_scl(scene / "SCL.tif", folder / "SCL.tif", rows)
        for asset in item["assets"].values():
            asset["href"] = str(folder / Path(asset["href"]).name)
        (folder / "stac_item.json").write_text(json.dumps(item, indent=2))
        index = root / "index" / PLATFORM / item["id"] / f"index_{item['id']}.parquet"
        index.parent.mkdir(parents=True)
        _index_item(folder / "stac_item.json", index, None)
        items.append(item)
    return items


@pytest.fixture(scope="session")
def docs_bucket(docs_demo_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("docs-bucket") / "bucket"
    return root, make_bucket(docs_demo_scene, root)


_S3_READY: dict[str, str] = {}


def upload_bucket(endpoint: str, root: Path) -> None:
    """``s3://demo-bucket/``: ``root`` with ``s3://`` hrefs, plus the demo item with ``http://`` hrefs."""
    if _S3_READY.get("endpoint") == endpoint:
        return
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=DEMO_BUCKET)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = path.relative_to(root).as_posix()
        body = path.read_bytes()
        if path.name == "stac_item.json":
            item = json.loads(body)
            folder = key.rsplit("/", 1)[0]
            for asset in item["assets"].values():
                asset["href"] = f"s3://{DEMO_BUCKET}/{folder}/{Path(asset['href']).name}"
            body = json.dumps(item, indent=2).encode()
            if item["id"] == HTTP_ITEM_ID:
                for asset in item["assets"].values():
                    asset["href"] = f"{endpoint}/{DEMO_BUCKET}/{folder}/{Path(asset['href']).name}"
                s3.put_object(Bucket=DEMO_BUCKET, Key="http/stac_item.json", Body=json.dumps(item, indent=2).encode(),
                              ACL="public-read")
        # The http copy's files are readable without credentials, as a public bucket's are.
        public = {"ACL": "public-read"} if f"/{HTTP_ITEM_ID}/" in f"/{key}" else {}
        s3.put_object(Bucket=DEMO_BUCKET, Key=key, Body=body, **public)
    _S3_READY["endpoint"] = endpoint


_STAC_READY: dict[str, str] = {}


def load_stac(api: Any, items: list[dict[str, Any]]) -> None:
    """Collection ``sentinel-2-l2a`` on the loopback STAC API: the bucket's items, assets on S3,
    with the fields the Sentinel-2 processor searches by."""
    if _STAC_READY.get("url") == api.url:
        return
    loaded = []
    for item in items:
        item = json.loads(json.dumps(item))
        item["collection"] = STAC_COLLECTION
        item["links"] = []
        folder = f"{PLATFORM}/{item['id']}"
        for asset in item["assets"].values():
            asset["href"] = f"s3://{DEMO_BUCKET}/{folder}/{Path(asset['href']).name}"
        item["properties"].update({"grid:code": "MGRS-20HNJ", "s2:nodata_pixel_percentage": 3.0,
                                   "eo:cloud_cover": 10.0 + 10 * len(loaded)})
        loaded.append(item)
    api.load_collection(api.make_collection(STAC_COLLECTION, loaded))
    api.load_items(loaded)
    _STAC_READY["url"] = api.url


@pytest.fixture
def docs_page(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Page:
    """The page of the running example: made on its first example (working directory and the
    setups of its front matter), then shared by the page's examples; the cwd is the page's."""
    example: Example = request.node.example
    namespace = example.namespace
    page: Page | None = namespace.get("docs_page")
    if page is None:
        setups = page_setups(example.document.text)
        page = Page(Path(tempfile.mkdtemp(prefix="stacchip-docs-page-")), setups)
        namespace["docs_page"] = page
        namespace["_docs_cleanup"] = page.workdir
        # As from a clone of the repository: processors/ holds the job definitions pages include.
        (page.workdir / "processors").symlink_to(ROOT / "processors", target_is_directory=True)
        if "demo" in setups:
            make_demo(request.getfixturevalue("docs_demo_scene"), page.workdir / "demo")
        if {"bucket", "s3", "stac-api", "cubes"} & set(setups):
            root, _ = request.getfixturevalue("docs_bucket")
            if "bucket" in setups or "cubes" in setups:
                shutil.copytree(root, page.workdir / "bucket", symlinks=False)
                for item_json in (page.workdir / "bucket").rglob("stac_item.json"):
                    _rewrite_hrefs(item_json, lambda key, name, d=item_json.parent: str(d / name))
        if "cubes" in setups:
            proc = subprocess.run(
                ["stacchip-prechip", "--data", "./bucket", "--indexpath", "bucket/index", "--chips", "./cubes",
                 "--platform", PLATFORM, "--cube-size", "4", "--all"],
                cwd=page.workdir, capture_output=True, text=True, timeout=600, check=False)
            assert proc.returncode == 0, f"docs setup cubes: stacchip-prechip failed:\n{proc.stderr}"
    if "s3" in page.setups or "stac-api" in page.setups:
        endpoint = request.getfixturevalue("s3_env")  # function scope: set again for every example
        root, items = request.getfixturevalue("docs_bucket")
        upload_bucket(endpoint, root)
        page.env["DEMO_HTTP_ITEM"] = f"{endpoint}/{DEMO_BUCKET}/http/stac_item.json"
        if "stac-api" in page.setups:
            api = request.getfixturevalue("stac_api")
            load_stac(api, items)
            page.env["STAC_API"] = api.url
    for name, value in page.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(page.workdir)
    return page


def _teardown(namespace: dict[str, Any]) -> None:
    workdir = namespace.get("_docs_cleanup")
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _sybil_parsers() -> list[Any]:
    return [ExampleParser()]


if SYBIL_MISSING is None:
    DOCS_SYBIL = Sybil(
        parsers=_sybil_parsers(),
        path=str(DOCS),
        patterns=["*.md"],
        fixtures=["docs_page"],
        teardown=_teardown,
        name="docs",
    )
    pytest_collect_file = DOCS_SYBIL.pytest()
else:
    class _Unavailable(pytest.Item):
        def runtest(self) -> None:
            from tests.services import service_unavailable

            service_unavailable(str(SYBIL_MISSING))

    class _UnavailableFile(pytest.File):
        def collect(self) -> Iterator[pytest.Item]:
            yield _Unavailable.from_parent(self, name="examples")

    def pytest_collect_file(file_path: Path, parent: Any) -> Any:
        if file_path.suffix == ".md" and file_path.is_relative_to(DOCS):
            return _UnavailableFile.from_parent(parent, path=file_path)
        return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    why = ", ".join(f"{k.split(': ', 1)[1]}: {v}" for k, v in sorted(COUNTS.items()) if k.startswith("syntax: "))
    terminalreporter.write_line(
        f"docs examples: {COUNTS.get('run', 0)} run, {COUNTS.get('syntax', 0)} checked for syntax only"
        + (f" ({why})" if why else "")
    )

