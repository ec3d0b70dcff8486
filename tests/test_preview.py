"""``stacchip preview``: quicklook map and chip mosaic PNGs render with content."""

from __future__ import annotations

import numpy as np
import pytest

from stacchip.cli import main
from stacchip.errors import ConfigError
from stacchip.index import read_index
from stacchip.ml.dataset import ChipDataset
from stacchip.ml.items import ItemSource
from stacchip.ml.preview import render_mosaic, render_quicklook, scene_outlines, stretch
from tests.ml_scenes import scene_fixture

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


scene = scene_fixture("preview", dates_a=3, dates_b=1)


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_quicklook_has_size_and_coloured_chips(scene, tmp_path):
    table = read_index(scene.index_dir)
    out = tmp_path / "quick.png"
    render_quicklook(table, out, color_by="cloud", items=ItemSource(root=scene.root), size=(800, 600))
    pixels = _png(out)
    assert pixels.shape == (600, 800, 3)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # chips in several colours, outline, axes, colour bar
    # viridis at 0 (clear chips) is dark purple: it fills a good part of the map
    purple = np.all(np.abs(pixels.astype(int) - [68, 1, 84]) < 12, axis=-1)
    assert purple.mean() > 0.05
    # the cloudy chips show the yellow-green end of the scale somewhere
    assert np.any((pixels[..., 1] > 180) & (pixels[..., 2] < 120))


def test_quicklook_by_nodata_and_sampling(scene, tmp_path):
    table = read_index(scene.index_dir)
    out = tmp_path / "nodata.png"
    render_quicklook(table, out, color_by="nodata", size=(640, 480), max_chips=20)
    assert _png(out).shape == (480, 640, 3)
    with pytest.raises(ConfigError, match="color_by"):
        render_quicklook(table, out, color_by="snow")


def test_scene_outlines_from_chips_and_items(scene):
    table = read_index(scene.index_dir)
    from_chips = scene_outlines(table)
    footprints = {}
    for item_id, x, y in zip(*(table.column(c).to_pylist() for c in ("item_id", "chip_index_x", "chip_index_y"))):
        footprints.setdefault(item_id, set()).add((item_id.split("_")[1], x, y))
    # one outline per distinct footprint (dates with the same chips share one)
    distinct = {frozenset((t, x, y) for t, x, y in v) for v in footprints.values()}
    assert len(from_chips) == len(distinct) < len(footprints)
    total = sum(o.area for o in from_chips)
    assert total > 0
    from_items = scene_outlines(table, ItemSource(root=scene.root))
    assert 1 <= len(from_items) <= 3


def test_mosaic_tiles_and_stretch(scene, tmp_path):
    ds = ChipDataset(read_index(scene.index_dir), root=scene.root, assets=["red", "green", "blue"])
    out = tmp_path / "mosaic.png"
    render_mosaic(ds, out, n=9, tile=64, gap=4)
    pixels = _png(out)
    assert pixels.shape == (3 * 64 + 4 * 4, 3 * 64 + 4 * 4, 3)
    tile = pixels[4:68, 4:68]
    assert tile.std() > 10  # stretched chip content, not a flat fill
    assert pixels[0, 0].tolist() == [32, 32, 32]  # background between tiles
    grey = ChipDataset(read_index(scene.index_dir), root=scene.root, assets=["nir"])
    render_mosaic(grey, tmp_path / "grey.png", n=2, tile=32, captions=False)
    g = _png(tmp_path / "grey.png")
    assert g.shape == (32 + 8, 2 * 32 + 12, 3)
    inner = g[4:36, 4:36].astype(int)
    assert np.array_equal(inner[..., 0], inner[..., 1]) and inner.std() > 10
    s = stretch(np.array([[[[0.0, 50.0], [100.0, np.nan]]]]), (0, 100))
    assert s.tolist() == [[[[0, 128], [255, 0]]]]


def test_cli_writes_both_pngs(scene, tmp_path, capsys):
    quick, mosaic = tmp_path / "q.png", tmp_path / "m.png"
    rc = main(["preview", str(scene.index_dir), "--out", str(quick), "--mosaic", str(mosaic),
               "--width", "500", "--height", "400", "-n", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert str(quick) in text and str(mosaic) in text
    assert _png(quick).shape == (400, 500, 3)
    assert _png(mosaic).shape[0] > 100
