"""Quicklooks of an index for people: a chip map and a mosaic of sample chips.

* :func:`render_quicklook` draws every chip footprint (lon/lat) coloured by its
  cloud or nodata fraction (0-1, with a colour bar) over the outline of each
  scene (the item's footprint when items are known, else the union of its
  chips), and writes a PNG.
* :func:`render_mosaic` reads a sample of chips through a
  :class:`~stacchip.ml.dataset.ChipDataset` and tiles them into one PNG, three
  assets as RGB (or one as grey) with a percentile stretch computed over the
  whole sample, each tile captioned with its date.

Both need the ``ml`` extra (matplotlib for the map, pillow for the mosaic).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import shapely

from stacchip.console import echo
from stacchip import storage
from stacchip.errors import ConfigError, IndexFileError

logger = logging.getLogger(__name__)

COLOR_COLUMNS = {"cloud": "cloud_cover_percentage", "nodata": "nodata_percentage"}


def _missing_extra(what: str, package: str, exc: ImportError) -> ConfigError:
    """The error raised when an optional plotting package of the ``ml`` extra is missing."""
    return ConfigError(f"{what} needs {package} ({exc}); install it with: pip install 'stacchip[ml]'")


def _geometries(table: pa.Table) -> np.ndarray:
    geom = table.column("geometry")
    chunks = [c.storage if isinstance(c.type, pa.ExtensionType) else c for c in geom.chunks]
    wkb = pa.chunked_array(chunks, pa.binary()).to_pylist()
    return shapely.from_wkb(np.asarray(wkb, dtype=object))


def scene_outlines(table: pa.Table, items: Any = None) -> list[Any]:
    """One outline polygon per distinct scene footprint (lon/lat).

    With ``items`` (an ItemSource) the items' own geometries; otherwise the
    union of each item's chip footprints.
    """
    geoms = _geometries(table)
    item_ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
    platforms = np.asarray(table.column("platform").to_pylist(), dtype=object)
    outlines: dict[bytes, Any] = {}
    for item_id in sorted(set(item_ids.tolist())):
        sel = item_ids == item_id
        shape = None
        if items is not None:
            try:
                item = items.get(str(platforms[sel][0]), item_id)
                if item.geometry:
                    shape = shapely.geometry.shape(item.geometry)
            except Exception as exc:  # noqa: BLE001 - an outline is optional; fall back to chips
                logger.info("preview: no geometry for item %s (%s); using its chips", item_id, exc)
        if shape is None:
            shape = shapely.union_all(geoms[sel])
        outlines.setdefault(shapely.to_wkb(shapely.normalize(shape)), shape)
    return list(outlines.values())


def _rings(shape: Any) -> list[np.ndarray]:
    polys = getattr(shape, "geoms", [shape])
    rings = []
    for poly in polys:
        if hasattr(poly, "exterior"):
            rings.append(np.asarray(poly.exterior.coords))
    return rings


def render_quicklook(
    table: pa.Table,
    dest: str | os.PathLike[str],
    *,
    color_by: str = "cloud",
    items: Any = None,
    size: tuple[int, int] = (1200, 900),
    title: str | None = None,
    max_chips: int = 200_000,
) -> str:
    """Write a PNG map of the index chips coloured by cloud or nodata fraction.

    ``size`` is ``(width, height)`` in pixels. Above ``max_chips`` chips a
    deterministic sample is drawn (the title says so).
    """
    # Figure + Agg canvas directly: no pyplot, no global backend switch.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import PolyCollection
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise _missing_extra("the quicklook map", "matplotlib", exc) from exc

    if color_by not in COLOR_COLUMNS:
        raise ConfigError(f"color_by must be one of {sorted(COLOR_COLUMNS)}, got {color_by!r}")
    if table.num_rows == 0:
        raise IndexFileError("the index has no chips to draw")
    n_total = table.num_rows
    if n_total > max_chips:
        rows = np.sort(np.random.default_rng(0).choice(n_total, max_chips, replace=False))
        table = table.take(pa.array(rows))
    values = table.column(COLOR_COLUMNS[color_by]).to_numpy().astype(np.float64)
    geoms = _geometries(table)
    polys = [np.asarray(g.exterior.coords) for g in geoms]
    order = np.argsort(values, kind="stable")  # cloudiest drawn last (on top)

    width, height = size
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    collection = PolyCollection(
        [polys[k] for k in order], array=values[order], cmap="viridis",
        edgecolors=(1, 1, 1, 0.35), linewidths=0.3,
    )
    collection.set_clim(0.0, 1.0)
    ax.add_collection(collection)
    outlines = scene_outlines(table, items)
    for outline in outlines:
        for ring in _rings(outline):
            ax.plot(ring[:, 0], ring[:, 1], color="black", linewidth=1.0)
    minx, miny, maxx, maxy = shapely.total_bounds(np.concatenate([geoms, np.asarray(outlines, dtype=object)]))
    padx = (maxx - minx) * 0.05 or 0.01
    pady = (maxy - miny) * 0.05 or 0.01
    ax.set_xlim(minx - padx, maxx + padx)
    ax.set_ylim(miny - pady, maxy + pady)
    mid_lat = math.radians((miny + maxy) / 2)
    ax.set_aspect(1.0 / max(math.cos(mid_lat), 0.1))
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    n_items = len(set(table.column("item_id").to_pylist()))
    label = f"{color_by} fraction"
    sampled = f" (sample of {table.num_rows} of {n_total})" if n_total > table.num_rows else ""
    ax.set_title(title or f"{n_total} chips from {n_items} items, coloured by {label}{sampled}")
    cbar = fig.colorbar(collection, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label(label + " (0-1)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    storage.write_bytes(str(dest), buf.getvalue())
    return str(dest)


def stretch(stack: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
    """Scale ``(N, C, H, W)`` pixels to uint8 per channel between two percentiles.

    NaNs and non-finite values become 0.
    """
    out = np.zeros(stack.shape, dtype=np.uint8)
    for c in range(stack.shape[1]):
        band = stack[:, c].astype(np.float64)
        finite = np.isfinite(band)
        if not finite.any():
            continue
        lo, hi = np.percentile(band[finite], percentiles)
        if hi <= lo:
            hi = lo + 1.0
        scaled = np.clip((band - lo) / (hi - lo), 0.0, 1.0) * 255.0
        scaled[~finite] = 0
        out[:, c] = np.round(scaled).astype(np.uint8)
    return out


def render_mosaic(
    dataset: Any,
    dest: str | os.PathLike[str],
    *,
    n: int = 16,
    seed: int = 0,
    tile: int = 160,
    gap: int = 4,
    percentiles: tuple[float, float] = (2.0, 98.0),
    captions: bool = True,
) -> str:
    """Write a PNG mosaic of ``n`` sample chips of ``dataset`` (a ChipDataset).

    The dataset's channels are shown as RGB when it has 3 or more (the first
    three), else the first channel in grey; ``tile`` is the tile side in
    pixels; ``seed`` picks the sample.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise _missing_extra("the chip mosaic", "pillow", exc) from exc

    if len(dataset) == 0:
        raise IndexFileError("the dataset has no chips to show")
    if n < 1 or tile < 8:
        raise ConfigError(f"mosaic needs n >= 1 and tile >= 8 px, got n={n}, tile={tile}")
    count = min(n, len(dataset))
    rows_sel = np.sort(np.random.default_rng(seed).choice(len(dataset), count, replace=False))
    chips = []
    dates = []
    for r in rows_sel:
        pixels = dataset.read_pixels(int(r))
        chips.append(pixels[:3] if pixels.shape[0] >= 3 else pixels[:1])
        dates.append(dataset.metadata(int(r))["datetime"][:10])
    stack = stretch(np.stack(chips), percentiles)
    cols = math.ceil(math.sqrt(count))
    nrows = math.ceil(count / cols)
    canvas = Image.new("RGB", (cols * tile + (cols + 1) * gap, nrows * tile + (nrows + 1) * gap), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for k, chip in enumerate(stack):
        arr = np.repeat(chip, 3, axis=0) if chip.shape[0] == 1 else chip
        img = Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")
        img = img.resize((tile, tile), Image.Resampling.NEAREST)
        x0 = gap + (k % cols) * (tile + gap)
        y0 = gap + (k // cols) * (tile + gap)
        canvas.paste(img, (x0, y0))
        if captions:
            draw.rectangle([x0, y0, x0 + 64, y0 + 11], fill=(0, 0, 0))
            draw.text((x0 + 2, y0), dates[k], fill=(255, 255, 255))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    storage.write_bytes(str(dest), buf.getvalue())
    return str(dest)


# --- command line -----------------------------------------------------------------------


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stacchip preview`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "preview",
        help="quicklook PNG of an index (chips coloured by cloud/nodata) and a mosaic of sample chips",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("index", nargs="+", help="index .parquet files, directories or s3:// prefixes")
    p.add_argument("--out", default="quicklook.png", help="quicklook PNG (default quicklook.png)")
    p.add_argument("--color-by", choices=sorted(COLOR_COLUMNS), default="cloud",
                   help="colour chips by cloud or nodata fraction (default cloud)")
    p.add_argument("--width", type=int, default=1200, help="quicklook width in pixels")
    p.add_argument("--height", type=int, default=900, help="quicklook height in pixels")
    p.add_argument("--mosaic", default=None, help="also write a mosaic PNG of sample chips here")
    p.add_argument("--data-root", default=None,
                   help="data root with {platform}/{item_id}/stac_item.json (default: item_href in the index)")
    p.add_argument("--assets", default="red,green,blue", help="comma-separated assets for the mosaic (RGB)")
    p.add_argument("-n", "--count", type=int, default=16, help="chips in the mosaic (default 16)")
    p.add_argument("--seed", type=int, default=0, help="sample seed for the mosaic")
    p.set_defaults(func=run_cli)
    return p


def _items_for(files: Sequence[str], root: str | None) -> Any:
    from stacchip.ml.items import ItemSource, hrefs_from_index

    if root:
        return ItemSource(root=root)
    hrefs = hrefs_from_index(files)
    return ItemSource(hrefs=hrefs) if hrefs else None


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``stacchip preview``."""
    from stacchip.index import index_files, read_index
    from stacchip.ml.dataset import ChipDataset

    files = index_files(args.index)
    table = read_index(files)
    items = _items_for(files, args.data_root)
    render_quicklook(table, args.out, color_by=args.color_by, items=items, size=(args.width, args.height))
    echo(f"wrote {args.out} ({table.num_rows} chips)")
    if args.mosaic:
        if items is None:
            raise ConfigError("--mosaic needs --data-root (or index files that record item_href)")
        assets = [a for a in args.assets.split(",") if a]
        dataset = ChipDataset(table, items=None, root=args.data_root, assets=assets) if args.data_root else \
            ChipDataset(files, assets=assets)
        render_mosaic(dataset, args.mosaic, n=args.count, seed=args.seed)
        echo(f"wrote {args.mosaic} ({min(args.count, len(dataset))} chips)")
    return 0
