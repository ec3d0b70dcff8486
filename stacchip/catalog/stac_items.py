"""What a STAC item must look like before it is indexed: the JSON type of each field.

Shared by every source of items (files, stac-geoparquet rows, STAC API pages): an entry that
is not structurally an item fails alone, named, as bad input (exit status 2), and the others
are still indexed.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Fields of a STAC item and the JSON types they must have (None allowed where STAC allows it).
_SHAPES: dict[str, tuple[type, ...]] = {
    "properties": (dict,), "assets": (dict,), "links": (list,), "stac_extensions": (list,),
    "bbox": (list, type(None)), "geometry": (dict, type(None)), "collection": (str, type(None)),
}


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def structure_problem(item: Mapping[str, Any]) -> str | None:
    """Why ``item`` is not structurally a STAC item (a field of the wrong JSON type, an asset
    that is no object or has no string ``href``, a link that is no object), or None."""
    for name, kinds in _SHAPES.items():
        if name in item and not isinstance(item[name], kinds):
            return f"its {name!r} is {_kind(item[name])}, not {_kind(kinds[0]())}"
    for key, asset in (item.get("assets") or {}).items():
        if not isinstance(asset, dict):
            return f"its asset {key!r} is {_kind(asset)}, not an object"
        if not isinstance(asset.get("href"), str) or not asset["href"]:
            return f"its asset {key!r} has no string 'href'"
    for n, link in enumerate(item.get("links") or []):
        if not isinstance(link, dict):
            return f"its link #{n} is {_kind(link)}, not an object"
    return None
