"""Spatial train/val/test splits without leakage between neighbours.

Chips are grouped into spatial *blocks* and whole blocks are assigned to a
split, so chips of the same place (neighbouring chips, and the same chip on
other dates) never end up on both sides:

* ``by="grid"``: square cells of ``block_size`` metres on the global equal-area
  EASE-Grid 2.0 (EPSG:6933), or of ``block_size`` degrees with ``units="deg"``;
  a chip belongs to the cell holding its centre. With ``straddle="drop"`` a
  chip whose footprint reaches into a cell of another split gets no split
  (``null``), so no two chips of different splits overlap.
* ``by="tile"``: the scene tile parsed from the item id (MGRS ``T20HNJ``,
  Landsat WRS path/row ``086107``; else the item id), so all dates of a tile
  share a split.
* ``by="item"``: the item id (same place on other dates may differ).

Assignment is deterministic: the split of a block depends only on its id and
``seed`` (a BLAKE2 hash mapped to [0, 1) against the cumulative fractions), so
it is stable across runs, machines and re-indexing, and adding data never moves
existing blocks. The result is the index table with ``split`` and
``split_block`` columns; :func:`stacchip.index.write_index` writes it as is.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyproj
import shapely

from stacchip.encodings import bbox_centres
from stacchip.errors import ConfigError, IndexFileError
from stacchip.index import bbox_array

#: Equal-area CRS in metres used for metric blocks and areas.
EQUAL_AREA_CRS = "EPSG:6933"
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}

_MGRS = re.compile(r"(?:^|_)T?(\d{1,2}[C-HJ-NP-X][A-HJ-NP-Z]{2})(?:_|$)")
_WRS = re.compile(r"_(\d{6})_")


def tile_of(item_id: str) -> str:
    """Scene tile of an item id: MGRS square, Landsat path/row, else the id itself."""
    m = _MGRS.search(item_id)
    if m:
        return m.group(1)
    m = _WRS.search(item_id)
    if m:
        return m.group(1)
    return item_id


def _to_equal_area() -> pyproj.Transformer:
    return pyproj.Transformer.from_crs("OGC:CRS84", EQUAL_AREA_CRS, always_xy=True)


def _project(x: np.ndarray, y: np.ndarray, units: str) -> tuple[np.ndarray, np.ndarray]:
    if units == "deg":
        return x, y
    return _to_equal_area().transform(x, y)


def _cells(x: np.ndarray, y: np.ndarray, size: float) -> np.ndarray:
    ix = np.floor(x / size).astype(np.int64)
    iy = np.floor(y / size).astype(np.int64)
    return np.char.add(np.char.add(ix.astype(str), "_"), iy.astype(str))


def block_ids(
    table: pa.Table,
    *,
    by: str = "grid",
    block_size: float | None = None,
    units: str = "m",
    tile: Callable[[str], str] = tile_of,
) -> np.ndarray:
    """The block id of every row (strings), as described in the module docs."""
    if by == "item":
        return np.asarray(table.column("item_id").to_pylist(), dtype=str)
    if by == "tile":
        ids = table.column("item_id").to_pylist()
        cache: dict[str, str] = {}
        return np.asarray([cache.setdefault(i, tile(i)) for i in ids], dtype=str)
    if by != "grid":
        raise ConfigError(f"split by={by!r}: choose 'grid', 'tile' or 'item'")
    size = _check_size(block_size, units)
    b = bbox_array(table)
    # chip centres; a chip across the antimeridian (bbox wider than 180 degrees) has its
    # centre near +-180, not near 0
    lon, lat = bbox_centres(b)
    cx, cy = _project(lon, lat, units)
    prefix = f"{units}{size:g}:"
    return np.char.add(prefix, _cells(np.asarray(cx), np.asarray(cy), size)) if len(b) else np.zeros(0, dtype=str)


def _check_size(block_size: float | None, units: str) -> float:
    if units not in ("m", "deg"):
        raise ConfigError(f"block units must be 'm' or 'deg', got {units!r}")
    if block_size is None or not float(block_size) > 0:
        raise ConfigError(f"block_size must be a positive number of {units}, got {block_size!r}")
    return float(block_size)


def split_of_blocks(
    blocks: Sequence[str] | np.ndarray, fractions: Mapping[str, float], seed: int = 0
) -> dict[str, str]:
    """Split name of each distinct block id (deterministic in id and ``seed``)."""
    names, cumulative = _fractions(fractions)
    out: dict[str, str] = {}
    for block in np.unique(np.asarray(blocks, dtype=str)):
        digest = hashlib.blake2b(f"{seed}:{block}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        k = int(np.searchsorted(cumulative, u, side="right"))
        out[str(block)] = names[min(k, len(names) - 1)]
    return out


def _fractions(fractions: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    if not fractions:
        raise ConfigError("split fractions are empty")
    names = list(fractions)
    values = np.array([float(fractions[n]) for n in names])
    if np.any(values < 0) or values.sum() <= 0:
        raise ConfigError(f"split fractions must be >= 0 with a positive sum, got {dict(fractions)}")
    return names, np.cumsum(values / values.sum())


def assign_splits(
    table: pa.Table,
    *,
    by: str = "grid",
    block_size: float | None = 10_000.0,
    units: str = "m",
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    straddle: str = "centroid",
    tile: Callable[[str], str] = tile_of,
) -> pa.Table:
    """The index table with a ``split`` column (and the ``split_block`` id).

    ``block_size`` is in metres (``units="m"``, on EPSG:6933) or degrees
    (``units="deg"``) and used with ``by="grid"`` only. ``fractions`` maps split
    names to their share of blocks. ``straddle="drop"`` (grid only) leaves
    ``split`` null for chips whose footprint reaches a block of another split.
    """
    for col in ("item_id", "bbox"):
        if col not in table.column_names:
            raise IndexFileError(f"index lacks column {col!r}")
    if straddle not in ("centroid", "drop"):
        raise ConfigError(f"straddle must be 'centroid' or 'drop', got {straddle!r}")
    blocks = block_ids(table, by=by, block_size=block_size, units=units, tile=tile)
    mapping = split_of_blocks(blocks, fractions, seed)
    split = np.array([mapping[b] for b in blocks], dtype=object)
    if straddle == "drop" and by == "grid" and len(blocks):
        split = _drop_straddling(table, split, float(block_size or 0), units, fractions, seed)
    out = table
    for name, values, typ in (("split_block", blocks.tolist(), pa.string()), ("split", split.tolist(), pa.string())):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, pa.array(values, typ))
    return out


def _drop_straddling(
    table: pa.Table, split: np.ndarray, size: float, units: str,
    fractions: Mapping[str, float], seed: int,
) -> np.ndarray:
    geoms = shapely.from_wkb(_wkb(table))
    if units == "m":
        transformer = _to_equal_area()
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    bounds = shapely.bounds(geoms)
    prefix = f"{units}{size:g}:"
    corner_blocks = []
    for xi, yi in ((0, 1), (2, 1), (0, 3), (2, 3)):
        corner_blocks.append(np.char.add(prefix, _cells(bounds[:, xi], bounds[:, yi], size)))
    # A chip spans at most the cells between its corners; cells of its bounding
    # box corners decide when chips are smaller than blocks (checked below).
    if np.any((bounds[:, 2] - bounds[:, 0]) >= size) or np.any((bounds[:, 3] - bounds[:, 1]) >= size):
        raise ConfigError(f"straddle='drop' needs blocks larger than chips; block_size={size:g} {units}")
    all_blocks = np.unique(np.concatenate(corner_blocks))
    mapping = split_of_blocks(all_blocks, fractions, seed)
    out = split.copy()
    for blocks in corner_blocks:
        other = np.array([mapping[b] for b in blocks], dtype=object)
        out[other != split] = None
    return out


def _wkb(table: pa.Table) -> np.ndarray:
    geom = table.column("geometry")
    chunks = [c.storage if isinstance(c.type, pa.ExtensionType) else c for c in geom.chunks]
    return np.asarray(pa.chunked_array(chunks, pa.binary()).to_pylist(), dtype=object)


def chip_areas_km2(table: pa.Table) -> np.ndarray:
    """Area of each chip footprint in km² (on the equal-area EPSG:6933)."""
    geoms = shapely.from_wkb(_wkb(table))
    transformer = _to_equal_area()
    projected = shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    return shapely.area(projected) / 1e6


def split_report(table: pa.Table, class_column: str | None = None) -> dict[str, dict[str, Any]]:
    """Balance of each split: chips, blocks, area and, optionally, classes.

    Returns ``{split: {"chips", "chip_fraction", "blocks", "area_km2",
    "area_fraction", "mean_cloud", "mean_nodata", "classes"?}}``; chips without
    a split are reported under ``"none"``. ``class_column`` names a categorical
    column (e.g. a per-chip label, or ``platform``); its value counts and
    fractions per split go under ``"classes"``.
    """
    if "split" not in table.column_names:
        raise IndexFileError("index has no 'split' column; run assign_splits first")
    split = np.array(["none" if s is None else s for s in table.column("split").to_pylist()], dtype=object)
    blocks = (np.asarray(table.column("split_block").to_pylist(), dtype=object)
              if "split_block" in table.column_names else None)
    area = chip_areas_km2(table) if table.num_rows else np.zeros(0)
    cloud = table.column("cloud_cover_percentage").to_numpy().astype(np.float64)
    nodata = table.column("nodata_percentage").to_numpy().astype(np.float64)
    classes = None
    if class_column is not None:
        if class_column not in table.column_names:
            raise IndexFileError(f"class column {class_column!r} is not in the index")
        classes = np.asarray([str(v) for v in table.column(class_column).to_pylist()], dtype=object)
    total_chips = max(len(split), 1)
    total_area = float(area.sum()) or 1.0
    report: dict[str, dict[str, Any]] = {}
    for name in sorted(set(split.tolist())):
        sel = split == name
        entry: dict[str, Any] = {
            "chips": int(sel.sum()),
            "chip_fraction": float(sel.sum() / total_chips),
            "blocks": int(len(set(blocks[sel].tolist()))) if blocks is not None else None,
            "area_km2": float(area[sel].sum()),
            "area_fraction": float(area[sel].sum() / total_area),
            "mean_cloud": float(cloud[sel].mean()),
            "mean_nodata": float(nodata[sel].mean()),
        }
        if classes is not None:
            values, counts = np.unique(classes[sel].astype(str), return_counts=True)
            entry["classes"] = {
                str(v): {"chips": int(c), "fraction": float(c / sel.sum())} for v, c in zip(values, counts, strict=True)
            }
        report[name] = entry
    return report


def format_report(report: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table of :func:`split_report` for people."""
    lines = [f"{'split':<8} {'chips':>7} {'chip%':>6} {'blocks':>6} {'km2':>10} {'area%':>6} {'cloud':>6} "
             f"{'nodata':>6}"]
    for name, e in report.items():
        lines.append(
            f"{name:<8} {e['chips']:>7} {100 * e['chip_fraction']:>6.1f} "
            f"{e['blocks'] if e['blocks'] is not None else '-':>6} "
            f"{e['area_km2']:>10.1f} {100 * e['area_fraction']:>6.1f} {e['mean_cloud']:>6.3f} {e['mean_nodata']:>6.3f}"
        )
        for cls, c in (e.get("classes") or {}).items():
            lines.append(f"    {cls}: {c['chips']} ({100 * c['fraction']:.1f}%)")
    return "\n".join(lines)


def split_counts(table: pa.Table) -> dict[str, int]:
    """Chips per split value (``None`` counted as ``"none"``)."""
    counts = pc.value_counts(table.column("split")).to_pylist()
    return {("none" if c["values"] is None else c["values"]): int(c["counts"]) for c in counts}


def label_class_report(dataset: Any, classes: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Pixel class balance of the label targets per split.

    ``dataset`` is a :class:`~stacchip.ml.dataset.ChipDataset` over an index
    with a ``split`` column and with labels (``label_asset`` or
    ``label_raster``); every chip's target is read once. Returns
    ``{split: {"pixels": n, "classes": {class: {"pixels", "fraction"}}}}``;
    ``classes`` restricts the listed classes (others are still counted in
    ``pixels``).
    """
    from tqdm import tqdm

    if getattr(dataset, "split", None) is None:
        raise IndexFileError("the dataset's index has no 'split' column; run assign_splits first")
    if dataset.label_asset is None and dataset.label_raster is None:
        raise ConfigError("label_class_report needs a dataset with label_asset or label_raster")
    counts: dict[str, dict[int, int]] = {}
    totals: dict[str, int] = {}
    for i in tqdm(range(len(dataset)), desc="label classes", unit="chip", leave=False):
        name = "none" if dataset.split[i] is None else str(dataset.split[i])
        target = np.asarray(dataset.read_target(i))
        values, n = np.unique(target, return_counts=True)
        bucket = counts.setdefault(name, {})
        for v, c in zip(values.tolist(), n.tolist(), strict=True):
            bucket[int(v)] = bucket.get(int(v), 0) + int(c)
        totals[name] = totals.get(name, 0) + int(target.size)
    report: dict[str, dict[str, Any]] = {}
    for name in sorted(counts):
        keep = sorted(counts[name]) if classes is None else [int(c) for c in classes]
        report[name] = {
            "pixels": totals[name],
            "classes": {
                str(c): {"pixels": counts[name].get(c, 0), "fraction": counts[name].get(c, 0) / totals[name]}
                for c in keep
            },
        }
    return report
