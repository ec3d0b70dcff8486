"""Catalog-scale indexes: bulk indexing, compaction of per-item index files and the manifest readers use.

* :mod:`stacchip.catalog.bulk`: many STAC items (stac-geoparquet, ndjson,
  ItemCollection, STAC API search) indexed at their own hrefs as array tasks
  (``stacchip index SOURCES... --out DIR``);
* :func:`compact` (``stacchip.catalog.compaction``): per-item index files into one
  dataset partitioned by platform and year, rows sorted along a Hilbert curve,
  with a ``_manifest.json`` (``stacchip compact SOURCES... --out DEST``), sorted out
  of core by DuckDB (:mod:`~stacchip.catalog.engine_duckdb`) or on a Dask cluster
  (:mod:`~stacchip.catalog.engine_dask`), committed under a lock
  (:mod:`~stacchip.catalog.commit`);
* :mod:`stacchip.catalog.manifest`: the manifest format, :func:`plan` (files and
  row groups a query may hit), re-exported from :mod:`stacchip.compacted`, which
  :func:`stacchip.index.query` and :func:`stacchip.index.open_index` read through;
* :mod:`stacchip.catalog.hilbert`: the curve, vectorised.

Names are imported on first use, so ``import stacchip.catalog`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compact": "stacchip.catalog.compaction",
    "CompactResult": "stacchip.catalog.compaction",
    "plan": "stacchip.catalog.manifest",
    "open_compacted": "stacchip.catalog.manifest",
    "MANIFEST_NAME": "stacchip.catalog.manifest",
    "hilbert_index": "stacchip.catalog.hilbert",
    "lonlat_hilbert": "stacchip.catalog.hilbert",
}

__all__ = ["CompactResult", "MANIFEST_NAME", "compact", "hilbert_index", "lonlat_hilbert", "open_compacted", "plan"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stacchip.catalog' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
