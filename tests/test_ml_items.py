"""ItemSource keeps a bounded number of parsed items (a pass over a large index)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stacchip.errors import ConfigError
from stacchip.ml.items import ItemSource
from stacchip.utils import item_key
from tests.builders import real_item

PLATFORM = "sentinel-2-l2a"


def _write(root: Path, item_id: str, title: str) -> None:
    item = real_item("sentinel-2")
    item["id"] = item_id
    item["properties"]["title"] = title
    path = root / item_key(PLATFORM, item_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(item))


def test_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    ids = [f"S2X_{i}" for i in range(6)]
    for i in ids:
        _write(tmp_path, i, "first")
    source = ItemSource(root=tmp_path, max_cached=2)
    for i in ids:
        assert source.get(PLATFORM, i).id == i
    assert len(source._cache) == 2
    source.get(PLATFORM, ids[4])  # ids[4] is now the most recent, ids[5] the least
    for i in ids:
        _write(tmp_path, i, "second")
    assert source.get(PLATFORM, ids[4]).properties["title"] == "first"  # still cached
    assert source.get(PLATFORM, ids[0]).properties["title"] == "second"  # evicted: read again
    assert source.get(PLATFORM, ids[5]).properties["title"] == "second"  # evicted by ids[0]
    assert len(source._cache) == 2
    with pytest.raises(ConfigError, match="max_cached"):
        ItemSource(root=tmp_path, max_cached=0)
