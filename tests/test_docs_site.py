"""The documentation site: built strict, then every page opened in headless Chromium.

The site is built with ``mkdocs build --strict`` into ``site/`` (git-ignored; the CI artifact),
served from that folder on 127.0.0.1 by the standard library's HTTP server, and every page is
opened in the Debian ``chromium`` binary driven by playwright (never a browser playwright would
download). A page fails on a console error or uncaught exception, a request that fails or gets
an HTTP error, a request to anything but the loopback server (the site must load nothing from the
internet), an image that does not load, or a link to a page, file or anchor of the site that is not
there. A screenshot of every page goes to ``site/_screenshots/``.

Chromium or playwright missing: a failure under ``CI=true``, a skip with the reason elsewhere
(:func:`tests.services.service_unavailable`).
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

from tests.services import LOOPBACK, service_unavailable

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
SCREENSHOTS = SITE / "_screenshots"
CHROMIUM = os.environ.get("STACCHIP_DOCS_CHROMIUM", "/usr/bin/chromium")
#: Launch flags that keep Chromium quiet and offline (no updates, sync, QUIC, first-run UI).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
#: Seconds for one page to load (its scripts, images and styles included).
PAGE_TIMEOUT_S = 60
#: Full-page screenshots of pages taller than this (pixels) are cut to this height.
SCREENSHOT_MAX_HEIGHT = 16000


def _mkdocs_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{module} is not installed ({exc}); pip install -e '.[docs]'"
    return None


@pytest.fixture(scope="module")
def built_site() -> Path:
    """``mkdocs build --strict`` of the repository into ``site/``."""
    missing = _mkdocs_missing()
    if missing:
        service_unavailable(missing)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(SITE)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env, check=False,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert (SITE / "index.html").is_file()
    return SITE


def _pages(site: Path) -> list[str]:
    """URL paths of every HTML page of the built site."""
    out = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site)
        if rel.parts[0] == "_screenshots":
            continue
        out.append("/" + str(rel.as_posix()).removesuffix("index.html"))
    return out


def _nav_pages() -> list[str]:
    import yaml

    def walk(node: object) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    return list(walk(config["nav"]))


def test_every_console_script_and_page_is_in_the_nav(built_site: Path) -> None:
    nav = set(_nav_pages())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for prog in scripts:
        assert f"reference/cli/{prog}.md" in nav, f"{prog} has no page in the nav of mkdocs.yml"
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages == nav, f"pages not in the nav: {sorted(pages - nav)}; nav without a page: {sorted(nav - pages)}"


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text())
    return " ".join(parser.parts)


def test_command_reference_is_generated_from_the_settings_tables(built_site: Path) -> None:
    """Every flag and variable of every settings table, and every flag of every parser, is on its page."""
    from stacchip.processors import settings
    from stacchip.processors.base import processor_class
    from stacchip.processors.prechip import PrechipConfig, build_parser as prechip_parser
    from stacchip.processors.stats import StatsConfig, build_parser as stats_parser

    cases = {"stacchip-prechip": (prechip_parser(), settings.table(PrechipConfig)),
             "stacchip-stats": (stats_parser(), settings.table(StatsConfig))}
    for source in ("sentinel-2", "landsat", "naip", "linz", "sentinel-1", "modis"):
        cls = processor_class(source)
        cases[f"stacchip-{source}"] = (cls.build_parser(), settings.table(cls.settings_type, cls))
    environment = _text(built_site / "reference" / "environment" / "index.html")
    for prog, (parser, rows) in cases.items():
        text = _text(built_site / "reference" / "cli" / prog / "index.html")
        flags = [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]
        assert flags
        for flag in flags:
            assert flag in text, f"{prog}: flag {flag} is not on its reference page"
        for row in rows:
            for env in row["env"]:
                assert env in text, f"{prog}: variable {env} is not on its reference page"
                assert env in environment, f"{env} is not on the environment variables page"
    from stacchip.cli import build_parser

    stacchip_text = _text(built_site / "reference" / "cli" / "stacchip" / "index.html")
    for name in ("index", "chip", "upgrade-index", "demo", "croissant", "preview", "compact"):
        sub = next(a for a in build_parser(name)._actions if hasattr(a, "choices") and a.choices)
        for flag in (s for a in sub.choices[name]._actions for s in a.option_strings if s not in ("-h", "--help")):
            assert flag in stacchip_text, f"stacchip {name}: flag {flag} is not on the reference page"


def test_index_schema_page_lists_every_column(built_site: Path) -> None:
    from stacchip.index import SCHEMA

    text = _text(built_site / "reference" / "index-schema" / "index.html")
    for field in SCHEMA:
        assert field.name in text and str(field.type) in text, field.name


# --- the browser --------------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def served_site(built_site: Path) -> Iterator[str]:
    """The built site on 127.0.0.1 (a free port), stopped after the module."""
    handler = functools.partial(_Quiet, directory=str(built_site))
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="docs-site", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Debian Chromium with a fresh profile, driven by playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        service_unavailable(f"playwright is not installed ({exc}); pip install -e '.[docs]'")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        service_unavailable(f"Chromium is not installed at {CHROMIUM} (Debian package `chromium`; bash .ci/setup)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, timeout=PAGE_TIMEOUT_S * 1000,
        )
        try:
            yield context
        finally:
            context.close()


def _visit(context: object, base: str, path: str, shot: Path) -> dict[str, object]:
    """Open one page; what went wrong on it, its links and its element ids."""
    page = context.new_page()  # type: ignore[attr-defined]
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)

    def route(r: object) -> None:
        url = r.request.url  # type: ignore[attr-defined]
        if url.startswith(base + "/") or url == base or url.startswith(("data:", "blob:")):
            r.continue_()  # type: ignore[attr-defined]
        else:
            problems.append(f"request outside the site: {url}")
            r.abort()  # type: ignore[attr-defined]

    page.route("**/*", route)
    try:
        response = page.goto(base + path, wait_until="load", timeout=PAGE_TIMEOUT_S * 1000)
        if response is None or response.status != 200:
            problems.append(f"page status {getattr(response, 'status', None)}")
        page.wait_for_load_state("networkidle", timeout=PAGE_TIMEOUT_S * 1000)
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])")
        for src, complete, width in images:
            if not complete or not width:
                problems.append(f"broken image: {src}")
        links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        ids = page.eval_on_selector_all("[id], a[name]", "els => els.map(e => e.id || e.getAttribute('name'))")
        shot.parent.mkdir(parents=True, exist_ok=True)
        height = page.evaluate("document.documentElement.scrollHeight")
        if height <= SCREENSHOT_MAX_HEIGHT:
            page.screenshot(path=str(shot), full_page=True)
        else:
            page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1280, "height": SCREENSHOT_MAX_HEIGHT},
                            full_page=True)
    finally:
        page.close()
    return {"problems": problems, "links": links, "ids": set(ids)}


def _target_file(site: Path, path: str) -> Path:
    """The file of the built site a link's path names (a folder: its index.html)."""
    target = site / unquote(path).lstrip("/")
    return target / "index.html" if path.endswith("/") or target.is_dir() else target


def test_every_page_in_chromium(built_site: Path, served_site: str, browser_context: object) -> None:
    pages = _pages(built_site)
    assert len(pages) >= 30, pages
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    visited: dict[str, dict[str, object]] = {}
    for path in pages:
        name = (path.strip("/") or "index").replace("/", "__").removesuffix(".html")
        visited[path] = _visit(browser_context, served_site, path, SCREENSHOTS / f"{name}.png")
    failures = [f"{path}: {p}" for path, v in visited.items() for p in v["problems"]]  # type: ignore[attr-defined]
    checked = 0
    for path, info in visited.items():
        for link in info["links"]:  # type: ignore[attr-defined]
            url, fragment = urldefrag(link)
            parts = urlsplit(url)
            if f"{parts.scheme}://{parts.netloc}" != served_site:
                continue  # outside the site: not followed (the docs tests run offline)
            checked += 1
            target = _target_file(built_site, parts.path)
            if not target.is_file():
                failures.append(f"{path}: broken link {link}")
                continue
            key = next((k for k in (parts.path, parts.path + "/", parts.path.removesuffix("index.html"))
                        if k in visited), None)
            if fragment and key is not None and unquote(fragment) not in visited[key]["ids"]:  # type: ignore[operator]
                failures.append(f"{path}: link {link}: no element with id {fragment!r} on {key}")
    assert checked > 100, f"only {checked} internal links checked"
    shots = sorted(SCREENSHOTS.glob("*.png"))
    assert len(shots) == len(pages) and all(s.stat().st_size > 5000 for s in shots)
    assert not failures, "\n".join(failures)


def test_the_browser_check_sees_broken_things(served_site: str, browser_context: object, built_site: Path) -> None:
    """The checks above can fail: a page with a console error, a missing image, an outside request
    and a broken link is reported as such."""
    bad = built_site / "_screenshots" / "bad-page"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "index.html").write_text(
        "<html><body><h1 id='here'>bad</h1><img src='missing.png'>"
        "<img src='https://example.invalid/x.png'><a href='/nowhere/'>x</a>"
        "<script>console.error('boom')</script></body></html>"
    )
    with tempfile.TemporaryDirectory() as tmp:
        info = _visit(browser_context, served_site, "/_screenshots/bad-page/", Path(tmp) / "bad.png")
        assert (Path(tmp) / "bad.png").stat().st_size > 0
    problems = "\n".join(info["problems"])  # type: ignore[arg-type]
    assert "console error: boom" in problems
    assert "broken image: missing.png" in problems
    assert "HTTP 404" in problems
    assert "request outside the site: https://example.invalid/x.png" in problems
    assert f"{served_site}/nowhere/" in info["links"]  # type: ignore[operator]
    assert not _target_file(built_site, "/nowhere/").is_file()
    assert "here" in info["ids"]  # type: ignore[operator]
    shutil.rmtree(bad)
