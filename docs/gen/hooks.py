"""MkDocs hooks (mkdocs.yml ``hooks:``): what the site shows that comes from the code.

Pages hold markers, ``<!-- gen: NAME [ARG] -->``, replaced at build time by Markdown made from the
package itself (one source, no copy):

``cli PROG``       every flag of a console script, from its argparse parser, joined with the rows
                   of its settings table (:mod:`stacchip.processors.settings`): environment
                   variables, type, unit, default
``scripts``        the console scripts ``pyproject.toml`` declares, linked to their pages
``environment``    every environment variable: the settings tables' and the others the package reads
``index-schema``   :data:`stacchip.index.SCHEMA`, described by the table in :mod:`stacchip.index`'s docstring
``cube-format``    the arrays of a cube made from the demo scene by :mod:`stacchip.export.cube`
``benchmarks``     ``benchmarks/results.json``: each figure next to its floor, as a chart, with its command
``platforms``      :data:`stacchip.platforms.ALIASES` and :data:`~stacchip.platforms.PLATFORMS`: canonical
                   platform names, the catalog names that mean them, their band order
``io-sources``     the table of :mod:`stacchip.storage.config`'s docstring: where each I/O setting comes from
``layers``         the layer table of ``tests/test_layers.py`` (read, not imported): which layer may import which
``modules``        every module of the package with the first paragraph of its docstring, by layer

Pictures (PNG/SVG under ``assets/generated/``) are made here too, never committed: the demo scene's
quicklook and chips (``stacchip demo`` and ``stacchip preview``, the commands the getting-started
page shows) and the benchmark charts. An unknown marker, a script without a page, a setting without
a description or a variable the package reads that no table or :data:`LIBRARY_VARIABLES` describes
fails the build.
"""

from __future__ import annotations

import argparse
import functools
import html
import importlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mkdocs.exceptions import PluginError  # noqa: E402
from mkdocs.structure.files import File, Files  # noqa: E402

import rst  # noqa: E402

log = logging.getLogger("mkdocs.hooks.stacchip")

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*gen:\s*(?P<name>[\w-]+)(?:\s+(?P<arg>[^\s]+))?\s*-->")
GENERATED = "assets/generated"

#: Environment variables the package reads outside any settings table, and what each does.
#: (Settings-table variables are described by their rows.) The build fails when the package
#: reads a ``STACCHIP_*`` variable that is in neither.
LIBRARY_VARIABLES: dict[str, str] = {
    "AWS_BATCH_JOB_ARRAY_INDEX": "task index of an AWS Batch array job (set by AWS Batch); first of the three "
    "array-index variables that is set wins",
    "JOB_COMPLETION_INDEX": "task index of a Kubernetes Indexed Job (set by Kubernetes)",
    "SLURM_ARRAY_TASK_ID": "task index of a Slurm job array (set by Slurm)",
    "STACCHIP_INDEX_OFFSET": "added to the task index read from the variables above (not to `--index`/`--range`), "
    "to run arrays larger than the scheduler allows in slices",
    "STACCHIP_POOL_SIZE": "worker processes for `--range`/`--all` runs (`--workers`); default 1",
    "STACCHIP_TASKS": "`stacchip index` with many items: how many array tasks share the items (`--tasks`)",
    "STACCHIP_TRACEBACK": "`1`: print the traceback before the one-line error (as `-v` does), for commands "
    "whose command line is fixed",
    "STACCHIP_TILE_CACHE_MB": "decoded-tile cache of the tile read path, in MB; default 256",
    "STACCHIP_DECODE_THREADS": "most threads decoding tiles in a chipper (its `threads` is the other bound); "
    "default one per core",
    "STACCHIP_READER": "`gdal`: read every chip through GDAL instead of the tile path",
    "STACCHIP_SIGN": "processors: sign asset hrefs (`auto`, `none`, `planetary-computer`)",
    "STACCHIP_TMPDIR": "`stacchip compact`: where the DuckDB engine spills its sort (`--temp-dir`); default the "
    "system's temporary directory",
}


# --- console scripts --------------------------------------------------------------------------------


def scripts() -> dict[str, str]:
    """``prog -> module:function`` of every console script in ``pyproject.toml``."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"]["scripts"])


class Script(typing.NamedTuple):
    prog: str
    parser: argparse.ArgumentParser
    rows: list[dict[str, Any]]  # settings.table rows (empty: no settings table)
    table_name: str | None


@functools.cache
def script(prog: str) -> Script:
    """The parser and settings-table rows of console script ``prog``."""
    from stacchip.processors import settings

    target = scripts().get(prog)
    if target is None:
        raise PluginError(f"gen: no console script {prog!r} in pyproject.toml")
    module_name = target.split(":")[0]
    if prog == "stacchip":
        from stacchip.cli import build_parser

        return Script(prog, build_parser(), [], None)
    if module_name.endswith("_processor"):
        from stacchip.processors.base import processor_class

        cls = processor_class(prog.removeprefix("stacchip-"))
        return Script(prog, cls.build_parser(), settings.table(cls.settings_type, cls),
                      f"{cls.settings_type.__module__}.{cls.settings_type.__qualname__}")
    module = importlib.import_module(module_name)
    config_type = typing.get_type_hints(module.config_from_args)["return"]
    return Script(prog, module.build_parser(), settings.table(config_type),
                  f"{config_type.__module__}.{config_type.__qualname__}")


def _cell(text: Any) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _pipes(text: Any) -> str:
    """Text for a table cell inside a code span (Markdown escapes nothing else there)."""
    return str(text).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _show_default(value: Any, typ: str) -> str:
    if value is None or value == () or value == "":
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return _code(",".join(str(v) for v in value))
    if isinstance(value, float):
        return _code(f"{value:g}")
    return _code(str(value))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _groups(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if actions:
            out.append((group.title or "options", actions))
    return out


def _flag_table(actions: list[argparse.Action], rows: list[dict[str, Any]]) -> list[str]:
    by_flag = {r["flag"]: r for r in rows if r["flag"]}
    lines = ["| flag | environment variable | value | default | what |", "|---|---|---|---|---|"]
    for action in actions:
        names = action.option_strings or [action.metavar or action.dest]
        flag = ", ".join(f"`{n}`" for n in names)
        row = next((by_flag[n] for n in action.option_strings if n in by_flag), None)
        if row is not None:
            what = row["help"] + (f" ({row['unit']})" if row["unit"] else "")
            if row["required"]:
                what += " **required**"
            env = "<br>".join(f"`{e}`" for e in row["env"])
            default = _show_default(row["default"], row["type"])
            value = _cell(row["type"])
        else:
            what = action.help if action.help and action.help != argparse.SUPPRESS else ""
            env = ""
            if action.nargs == 0:
                value, default = "", ""
            else:
                value = _code(str(action.metavar or (",".join(action.choices) if action.choices else "")))
                if action.choices:
                    value = " \\| ".join(f"`{c}`" for c in action.choices)
                default = "" if action.default in (None, argparse.SUPPRESS) else _show_default(action.default, "")
            if action.required and action.option_strings:
                what += " **required**"
        what = _cell(what) if row is not None or what else ""
        lines.append(f"| {flag} | {env} | {value} | {default} | {what} |")
    return lines


def _env_only(rows: list[dict[str, Any]]) -> list[str]:
    only = [r for r in rows if not r["flag"] and r["env"]]
    if not only:
        return []
    lines = ["", "Set by environment variable only:", "",
             "| environment variable | value | default | what |", "|---|---|---|---|"]
    for r in only:
        what = r["help"] + (f" ({r['unit']})" if r["unit"] else "")
        lines.append(f"| {'<br>'.join(_code(e) for e in r['env'])} | {_cell(r['type'])} | "
                     f"{_show_default(r['default'], r['type'])} | {_cell(what)} |")
    return lines


def _parser_doc(parser: argparse.ArgumentParser, rows: list[dict[str, Any]], level: str) -> list[str]:
    lines = []
    if parser.description:
        lines += [_cell(parser.description), ""]
    usage = parser.format_usage().strip().removeprefix("usage: ")
    lines += ["```text", usage, "```", ""]
    for title, actions in _groups(parser):
        lines += [f"{level} {title.capitalize()}", ""]
        lines += _flag_table(actions, rows)
        lines.append("")
    lines += _env_only(rows)
    return lines


def gen_cli(prog: str | None, page_uri: str) -> str:
    if not prog:
        raise PluginError("gen: cli needs a console script name")
    s = script(prog)
    subs = _subparsers(s.parser)
    lines: list[str] = []
    if s.table_name:
        lines += [f"Every setting below is a row of the settings table `{s.table_name}` "
                  "(flag, environment variable, type, unit, default, help); this page, `--help` and the "
                  "parser are all made from it. A flag wins over its variable; of several variables the "
                  "first one set wins.", ""]
    if not subs:
        return "\n".join(lines + _parser_doc(s.parser, s.rows, "##"))
    from stacchip.cli import build_parser

    lines += [f"`{prog}` has these subcommands:", ""]
    for name in subs:
        lines.append(f"- [`{prog} {name}`](#{prog}-{name})")
    lines.append("")
    for name in subs:
        full = _subparsers(build_parser(name))[name]  # a lazy subcommand gets its flags only when named
        lines += [f"## {prog} {name} {{ #{prog}-{name} }}", ""]
        lines += _parser_doc(full, [], "###")
    return "\n".join(lines)


def gen_scripts(_: str | None, page_uri: str) -> str:
    lines = ["| command | runs |", "|---|---|"]
    for prog, target in scripts().items():
        lines.append(f"| [`{prog}`](cli/{prog}.md) | `{target}` |")
    return "\n".join(lines)


# --- environment variables -------------------------------------------------------------------------


def _read_variables() -> dict[str, list[str]]:
    """Every ``STACCHIP_*`` variable named as a string in the package, and the modules naming it."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "stacchip").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for name in sorted(set(re.findall(r"[\"'](STACCHIP_[A-Z0-9_]+)[\"']", path.read_text()))):
            found.setdefault(name, []).append(module)
    return found


def gen_environment(_: str | None, page_uri: str) -> str:
    table_vars: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for prog in scripts():
        for row in script(prog).rows:
            for env in row["env"]:
                table_vars.setdefault(env, []).append((prog, row))
    described = set(LIBRARY_VARIABLES) | set(_io_variables())
    missing = sorted(v for v in _read_variables() if v not in table_vars and v not in described)
    if missing:
        raise PluginError(
            "gen: the package reads environment variables that no settings table and no entry of "
            f"LIBRARY_VARIABLES (docs/gen/hooks.py) describes: {', '.join(missing)}"
        )
    lines = ["## Settings of the console scripts", "",
             "From the settings tables; each also has a flag (the flag wins).", "",
             "| variable | flag | commands | value | what |", "|---|---|---|---|---|"]
    for env in sorted(table_vars):
        uses = table_vars[env]
        flags = sorted({r["flag"] for _, r in uses if r["flag"]})
        progs = ", ".join(f"[`{p}`](cli/{p}.md)" for p in dict.fromkeys(p for p, _ in uses))
        row = uses[0][1]
        what = row["help"] + (f" ({row['unit']})" if row["unit"] else "")
        lines.append(f"| `{env}` | {', '.join(_code(f) for f in flags)} | {progs} | {_cell(row['type'])} | "
                     f"{_cell(what)} |")
    lines += ["", "## Read by the library and the job plumbing", "",
              "| variable | what |", "|---|---|"]
    for env in sorted(LIBRARY_VARIABLES):
        if env in table_vars:
            continue
        lines.append(f"| `{env}` | {LIBRARY_VARIABLES[env]} |")
    lines += ["", "## Storage: the one I/O configuration", "",
              "Read once per environment by `stacchip.storage.config` and handed to every client and to GDAL "
              "(from that module's `VARIABLES`).", "", "| variable | what |", "|---|---|"]
    for env, what in sorted(_io_variables().items()):
        lines.append(f"| `{env}` | {_cell(what)} |")
    return "\n".join(lines)


def _io_variables() -> dict[str, str]:
    from stacchip.storage.config import VARIABLES

    return dict(VARIABLES)


# --- formats ---------------------------------------------------------------------------------------


def _described(doc: str, what: str) -> dict[str, str]:
    """``name -> description`` from the first simple table of a module docstring; a row naming
    several (``a``, ``b``) or a pattern (``chip_index_x/_y``) describes each of them."""
    tables = rst.simple_tables(doc)
    if not tables:
        raise PluginError(f"gen: the docstring of {what} has no table to describe its fields")
    out: dict[str, str] = {}
    for row in tables[0]:
        names = re.findall(r"``([^`]+)``", row[0])
        for name in names:
            if "/" in name:  # chip_index_x/_y
                head, *tails = name.split("/")
                stem = head.rsplit("_", 1)[0]
                out[head] = row[-1]
                for tail in tails:
                    out[stem + tail] = row[-1]
            else:
                out[name] = row[-1]
        if len(row) == 3:
            for name in names:
                out[name + ":shape"] = row[1]
    return out


def _md(text: str) -> str:
    return rst.roles_to_code(text).replace("|", "\\|")


def gen_index_schema(_: str | None, page_uri: str) -> str:
    import stacchip.index as index
    import stacchip.schema as schema

    described = _described(schema.__doc__ or "", "stacchip.schema")
    lines = ["| column | Arrow type | upstream | what |", "|---|---|---|---|"]
    for field in index.SCHEMA:
        if field.name not in described:
            raise PluginError(f"gen: column {field.name!r} of stacchip.index.SCHEMA is not described in the "
                              "table of stacchip.schema's docstring")
        upstream = "yes" if field.name in index.UPSTREAM_COLUMNS else "added"
        if field.name in index.OPTIONAL_COLUMNS:
            upstream += " (optional: older files lack it, read as null)"
        lines.append(f"| `{field.name}` | `{_pipes(field.type)}` | {upstream} | {_md(described[field.name])} |")
    return "\n".join(lines)


@functools.cache
def _demo() -> dict[str, Any]:
    """The demo scene, its index and what the docs show of them, made once per build in a temp dir
    with the commands the getting-started page shows."""
    tmp = Path(tempfile.mkdtemp(prefix="stacchip-docs-"))
    demo = tmp / "demo"

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "stacchip.cli", *args], cwd=tmp,
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise PluginError(f"gen: stacchip {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    out = run("demo", "--dir", str(demo))
    index_file = next(demo.glob("index_*.parquet"))
    run("preview", str(index_file), "--out", str(tmp / "quicklook.png"), "--width", "900", "--height", "640",
        "--mosaic", str(tmp / "chips.png"), "--assets", "red,green,blue", "--count", "16")
    return {"dir": tmp, "demo": demo, "index": index_file, "demo_output": out}


def _chip_bands_png() -> bytes:
    """One chip of the demo scene, every asset in its own panel (what ``Chipper.chip`` returns)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from stacchip.chipper import Chipper
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.utils import load_item

    demo = _demo()["demo"]
    item = load_item(str(demo / "stac_item.json"))
    with Chipper(Sentinel2Indexer(item)) as chipper:
        chip = chipper.chip(1, 1)
    keys = list(chip)
    cols = 5
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(cols * 2.0, rows * 2.2), dpi=100)
    FigureCanvasAgg(fig)
    for k, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, k + 1)
        band = chip[key][0]
        ax.imshow(band, cmap="gray" if key != "scl" else "tab10", interpolation="nearest")
        ax.set_title(f"{key} {band.shape[0]}×{band.shape[1]}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle("Chipper.chip(1, 1): one (1, 256, 256) array per asset, all on the 10 m grid", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def gen_cube_format(_: str | None, page_uri: str) -> str:
    """The arrays of a real cube: the demo scene's chips through :func:`stacchip.export.cube.cube_arrays`."""
    import numpy as np

    import stacchip.export.cube as cube
    from stacchip.chipper import Chipper
    from stacchip.index import read_index
    from stacchip.indexer import Sentinel2Indexer
    from stacchip.platforms import platform_bands
    from stacchip.utils import load_item

    demo = _demo()
    described = _described(cube.__doc__ or "", "stacchip.export.cube")
    rows = read_index(str(demo["index"])).slice(0, 4)
    item = load_item(str(demo["demo"] / "stac_item.json"))
    platform = platform_bands("sentinel-2-l2a")
    keys = platform.asset_keys(item)
    bands = list(platform.band_order)
    with Chipper(Sentinel2Indexer(item), assets=keys) as chipper:
        pixels = np.stack([
            platform.stack(item.id, chipper.chip(int(x), int(y)), keys)
            for x, y in zip(rows.column("chip_index_x").to_pylist(), rows.column("chip_index_y").to_pylist(),
                            strict=True)
        ])
    arrays = cube.cube_arrays(rows, pixels, np.zeros(pixels.shape, bool), bands)
    lines = [f"A cube of {rows.num_rows} chips of the demo scene, made by `stacchip.export.cube.cube_arrays` "
             "while this page was built (a real cube holds `--cube-size` chips, 128 by default):", "",
             "| key | shape here | dtype | what |", "|---|---|---|---|"]
    for key, value in arrays.items():
        what = described.get(key)
        if what is None:
            raise PluginError(f"gen: cube key {key!r} is not described in the table of "
                              "stacchip.export.cube's docstring")
        lines.append(f"| `{key}` | `{tuple(value.shape)}` | `{value.dtype}` | {_md(what)} |")
    return "\n".join(lines)


def _relative(page_uri: str, target: str) -> str:
    """``target`` (a path under docs/) as a link from the page ``page_uri``."""
    return "../" * page_uri.count("/") + target


# --- benchmarks ------------------------------------------------------------------------------------


def _results() -> dict[str, Any]:
    return json.loads((ROOT / "benchmarks" / "results.json").read_text())


#: Bar colours: this package, the bare-library floor of the same run, another tool doing the same work.
ROLE_COLORS = {"stacchip": "#3f51b5", "floor": "#9e9e9e", "peer": "#ef6c00"}


def _chart_svg(fig_data: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars = fig_data["bars"]
    labels = [b["label"] for b in bars]
    values = [float(b["value"]) for b in bars]
    colors = [ROLE_COLORS[b["role"]] for b in bars]
    fig = Figure(figsize=(7.5, 0.55 * len(bars) + 1.1), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pos = list(range(len(bars)))[::-1]
    ax.barh(pos, values, color=colors)
    ax.set_yticks(pos, labels, fontsize=9)
    ax.set_xlabel(f"{fig_data['unit']} ({'higher' if fig_data['better'] == 'higher' else 'lower'} is better)")
    top = max(values) if values else 1.0
    for p, v in zip(pos, values, strict=True):
        ax.text(v + top * 0.01, p, f"{v:g}", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.18)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    return buf.getvalue()


def gen_benchmarks(_: str | None, page_uri: str) -> str:
    data = _results()
    lines: list[str] = []
    for fig in data["figures"]:
        lines += [f"## {fig['title']}", "", _md(fig["what"]), ""]
        lines += [f"![{_cell(fig['title'])}]({_relative(page_uri, GENERATED)}/bench-{fig['id']}.svg)", ""]
        lines += ["| case | " + fig["unit"] + " | role |", "|---|---|---|"]
        for bar in fig["bars"]:
            if bar["role"] not in ROLE_COLORS:
                raise PluginError(f"gen: benchmarks/results.json: bar {bar['label']!r} has role {bar['role']!r}, "
                                  f"not one of {sorted(ROLE_COLORS)}")
            lines.append(f"| {_cell(bar['label'])} | {bar['value']:g} | {bar['role']} |")
        lines += ["", "Reproduce:", "", "```bash { .benchmark }", fig["command"], "```", "",
                  f"*Source:* {_md(fig['source'])}", ""]
        if fig.get("note"):
            lines += [f"*Note:* {_md(fig['note'])}", ""]
    return "\n".join(lines)


# --- platforms, storage, the code map -------------------------------------------------------------


def gen_platforms(_: str | None, page_uri: str) -> str:
    from stacchip.platforms import ALIASES, PLATFORMS

    lines = ["| platform (stored in indexes) | also called (catalog collection ids) | channels of a cube, in order |",
             "|---|---|---|"]
    for platform in dict.fromkeys(ALIASES.values()):
        aliases = sorted(a for a, target in ALIASES.items() if target == platform and a != platform)
        bands = PLATFORMS[platform].band_order if platform in PLATFORMS else ()
        lines.append(f"| `{platform}` | {', '.join(_code(a) for a in aliases) or '-'} | "
                     f"{', '.join(_code(b) for b in bands)} |")
    missing = sorted(set(PLATFORMS) - set(ALIASES.values()))
    if missing:
        raise PluginError(f"gen: platforms {missing} of stacchip.platforms.PLATFORMS have no entry in ALIASES")
    return "\n".join(lines)


def gen_io_sources(_: str | None, page_uri: str) -> str:
    import stacchip.storage.config as config

    tables = rst.simple_tables(config.__doc__ or "")
    if not tables:
        raise PluginError("gen: the docstring of stacchip.storage.config has no table of where settings come from")
    lines = ["| setting | from (the first that is set) |", "|---|---|"]
    for row in tables[0]:
        lines.append(f"| {_cell(row[0])} | {_md(row[-1])} |")
    return "\n".join(lines)


def _test_layers() -> tuple[set[str], dict[str, set[str]]]:
    """``CORE`` and ``ALLOWED`` of tests/test_layers.py, read from its source (not imported)."""
    import ast

    tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text())
    found: dict[str, Any] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in ("CORE", "ALLOWED") and node.value is not None:
            found[target.id] = ast.literal_eval(node.value)
    if set(found) != {"CORE", "ALLOWED"}:
        raise PluginError("gen: tests/test_layers.py no longer defines CORE and ALLOWED as literals")
    return set(found["CORE"]), {k: set(v) for k, v in found["ALLOWED"].items()}


#: Layers in the order the code map shows them (top first).
LAYER_ORDER = ("cli", "processors", "ml", "catalog", "export", "core")


def gen_layers(_: str | None, page_uri: str) -> str:
    _, allowed = _test_layers()
    if set(allowed) != set(LAYER_ORDER):
        raise PluginError(f"gen: tests/test_layers.py has layers {sorted(allowed)}; the docs know {LAYER_ORDER}")
    lines = ["| layer | may import (besides itself) |", "|---|---|"]
    for layer in LAYER_ORDER:
        others = [x for x in LAYER_ORDER if x in allowed[layer] and x != layer]
        lines.append(f"| {layer} | {', '.join(others) or 'nothing else'} |")
    return "\n".join(lines)


def _module_layer(parts: tuple[str, ...], core: set[str]) -> str:
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in ("export", "ml", "catalog", "processors", "cli"):
        return top
    if top in core:
        return "core"
    raise PluginError(f"gen: module {'.'.join(parts)} is in no layer of tests/test_layers.py")


def gen_modules(_: str | None, page_uri: str) -> str:
    import ast

    core, _allowed = _test_layers()
    by_layer: dict[str, list[tuple[str, str]]] = {layer: [] for layer in LAYER_ORDER}
    for path in sorted((ROOT / "stacchip").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc:
            raise PluginError(f"gen: {path.relative_to(ROOT)} has no module docstring (the code map shows it)")
        first = " ".join(doc.strip().split("\n\n")[0].split())
        by_layer[_module_layer(parts, core)].append((str(path.relative_to(ROOT)), first))
    lines: list[str] = []
    for layer in LAYER_ORDER:
        lines += [f"### {layer}", "", "| module | what (its docstring) |", "|---|---|"]
        for name, first in by_layer[layer]:
            lines.append(f"| `{name}` | {_md(first)} |")
        lines.append("")
    return "\n".join(lines)


# --- mkdocs events ---------------------------------------------------------------------------------

GENERATORS = {
    "cli": gen_cli,
    "scripts": gen_scripts,
    "environment": gen_environment,
    "index-schema": gen_index_schema,
    "cube-format": gen_cube_format,
    "benchmarks": gen_benchmarks,
    "platforms": gen_platforms,
    "io-sources": gen_io_sources,
    "layers": gen_layers,
    "modules": gen_modules,
}


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pictures; check that every console script has its reference page."""
    for prog in scripts():
        if files.get_file_from_path(f"reference/cli/{prog}.md") is None:
            raise PluginError(f"gen: console script {prog} has no page docs/reference/cli/{prog}.md")
    demo = _demo()
    pictures = {
        "quicklook.png": (demo["dir"] / "quicklook.png").read_bytes(),
        "chips.png": (demo["dir"] / "chips.png").read_bytes(),
        "chip-bands.png": _chip_bands_png(),
    }
    for fig in _results()["figures"]:
        pictures[f"bench-{fig['id']}.svg"] = _chart_svg(fig)
    for name, content in pictures.items():
        files.append(File.generated(config, f"{GENERATED}/{name}", content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise PluginError(f"gen: unknown marker {name!r} in {page.file.src_uri}")
        return GENERATORS[name](match.group("arg"), page.file.src_uri)

    return MARKER.sub(replace, markdown)


def on_post_build(config: Any) -> None:
    """Remove the demo scene's temporary folder (made again by the next build, e.g. of ``mkdocs serve``)."""
    if _demo.cache_info().currsize:
        shutil.rmtree(_demo()["dir"], ignore_errors=True)
        _demo.cache_clear()
