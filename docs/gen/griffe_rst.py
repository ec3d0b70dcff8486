"""Griffe extension (mkdocs.yml): the package's docstrings as Markdown for mkdocstrings.

See :mod:`rst` beside this file for what is converted; nothing in ``stacchip/`` changes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rst import to_markdown  # noqa: E402


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring once, when griffe creates its object."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
