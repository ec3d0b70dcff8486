"""``stacchip.ml.preview`` without its optional plotting packages: a named error, not a traceback."""

from __future__ import annotations

import sys

import pyarrow as pa
import pytest

from stacchip.errors import ConfigError
from stacchip.ml.preview import render_mosaic, render_quicklook


def test_quicklook_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    # a None entry in sys.modules makes the import fail as if the package were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ConfigError, match=r"matplotlib.*stacchip\[ml\]"):
        render_quicklook(pa.table({"chipid": pa.array([], pa.string())}), tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_mosaic_without_pillow_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match=r"pillow.*stacchip\[ml\]"):
        render_mosaic([], tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()
