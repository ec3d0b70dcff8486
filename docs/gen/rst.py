"""The bits of reStructuredText the package's docstrings use, read for the docs site.

The docstrings are written for ``help()`` and Sphinx-style readers: roles such as
``:class:`~stacchip.errors.ConfigError``` and simple tables framed by ``====`` lines.
Markdown (what mkdocstrings renders) knows neither, so :func:`to_markdown` turns roles
into code spans and simple tables into Markdown tables, and :func:`simple_tables` gives
the rows of those tables to the generated reference pages (the index schema and the cube
format are documented once, in their modules' docstrings).
"""

from __future__ import annotations

import re

#: ``:role:`target``` or ``:role:`~a.b.target``` or ``:role:`text <target>```.
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|exc|obj|const):`(?P<body>[^`]+)`")
BORDER = re.compile(r"^(?P<indent>\s*)(?P<cols>=+(?:\s+=+)+)\s*$")


def _role(match: re.Match[str]) -> str:
    body = match.group("body").strip()
    named = re.fullmatch(r"(?P<text>.+?)\s*<(?P<target>[^>]+)>", body)
    if named:
        return f"`{named.group('text')}`"
    if body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    return f"`{body}`"


def roles_to_code(text: str) -> str:
    """Sphinx roles as Markdown code spans (``~`` keeps the last name, as Sphinx shows it)."""
    return ROLE.sub(_role, text)


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, cols: list[tuple[int, int]]) -> list[str]:
    out = []
    for k, (start, _) in enumerate(cols):
        stop = cols[k + 1][0] if k + 1 < len(cols) else len(line)
        out.append(line[start:stop].strip())
    return out


def simple_tables(text: str) -> list[list[list[str]]]:
    """Every headerless RST simple table in ``text``: a list of rows, each a list of cells.

    A line whose first cell is empty continues the row above (its cells are appended with a
    space), as in the docstrings' multi-line descriptions.
    """
    lines = text.splitlines()
    tables: list[list[list[str]]] = []
    i = 0
    while i < len(lines):
        m = BORDER.match(lines[i])
        if not m:
            i += 1
            continue
        cols = _columns(lines[i])
        rows: list[list[str]] = []
        j = i + 1
        while j < len(lines) and not BORDER.match(lines[j]):
            if lines[j].strip():
                cells = _cells(lines[j], cols)
                if rows and not cells[0]:
                    rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
                else:
                    rows.append(cells)
            j += 1
        tables.append(rows)
        i = j + 1
    return tables


def _markdown_table(rows: list[list[str]], indent: str) -> list[str]:
    width = len(rows[0])
    out = [indent + "| " + " | ".join(["&nbsp;"] * width) + " |", indent + "|" + "---|" * width]
    for row in rows:
        out.append(indent + "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return out


def tables_to_markdown(text: str) -> str:
    """Simple tables as Markdown tables (an empty header row: the docstrings' tables have none)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = BORDER.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not BORDER.match(lines[j]):
            j += 1
        rows = simple_tables("\n".join(lines[i:j + 1]))[0]
        if out and out[-1].strip():
            out.append("")
        out.extend(_markdown_table(rows, m.group("indent")) if rows else [])
        out.append("")
        i = j + 1
    return "\n".join(out)


def literal_markers(text: str) -> str:
    """``paragraph::`` (an RST literal block follows) as ``paragraph:``; the indented block
    after it is a code block in Markdown as it is."""
    return re.sub(r"(?m)(\S)::$", r"\1:", text)


def to_markdown(text: str) -> str:
    """A docstring written in the package's reStructuredText habits, as Markdown."""
    return literal_markers(tables_to_markdown(roles_to_code(text)))
