"""The tile read path: cached COG layouts, tile fetch + decode, nearest-neighbour gathers.

* :mod:`stacchip.tiles.tiff`: TIFF headers read with tifffile into :class:`Layout`
  (and its checked, digested JSON form).
* :mod:`stacchip.tiles.layouts`: the layout cache (in memory, index metadata, JSON
  sidecars), each layout checked against its file's identity before use.
* :mod:`stacchip.tiles.sources`: local, ``s3://`` and ``http(s)://`` byte sources.
* :mod:`stacchip.tiles.decode`: codecs and predictors (imagecodecs).
* :mod:`stacchip.tiles.reader`: the engine (pools, tile cache) and gathers.
"""

from stacchip.tiles.layouts import LayoutStore, item_layouts, sidecar_path
from stacchip.tiles.tiff import Layout, TiffError, parse_layout

__all__ = ["Layout", "LayoutStore", "TiffError", "item_layouts", "parse_layout", "sidecar_path"]
