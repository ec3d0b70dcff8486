"""The benchmark scene builder, at a small size (no timings here)."""

import json
import os

import numpy as np
import rasterio

from benchmarks.scene import BANDS, SceneSpec, build_scene, load_scene


def test_small_scene_has_the_earth_search_layout(tmp_path):
    spec = SceneSpec(size10=384, blocksize=128, copies=2)
    scene = build_scene(tmp_path, spec)
    assert len(scene.item_paths) == 2
    assert len(set(scene.item_ids)) == 2
    first, second = (json.loads(p.read_text()) for p in scene.item_paths)
    for key, (name, res) in BANDS.items():
        href = first["assets"][key]["href"]
        assert os.path.basename(href) == name
        with rasterio.open(href) as ds:
            assert ds.crs.to_epsg() == 32720
            assert (ds.width, ds.height) == (384 * 10 // res, 384 * 10 // res)
            assert ds.transform.a == res and ds.transform.c == 499980 and ds.transform.f == 6400000
            assert ds.block_shapes[0] == (128, 128)
            structure = ds.tags(ns="IMAGE_STRUCTURE")
            assert structure["LAYOUT"] == "COG" and structure["COMPRESSION"] == "DEFLATE"
            assert structure.get("PREDICTOR") == "2" or key == "scl"
            assert first["assets"][key]["proj:shape"] == [ds.height, ds.width]
            data = ds.read(1)
        assert data.std() > 0  # structured content, not a constant
        other = second["assets"][key]["href"]
        assert other != href  # distinct paths, same bytes (hard link or copy)
        with open(other, "rb") as a, open(href, "rb") as b:
            assert a.read() == b.read()
    scl = rasterio.open(first["assets"]["scl"]["href"]).read(1)
    assert {0, 4}.issubset(set(np.unique(scl)))  # nodata corner and vegetation
    # A valid cache is reused, not rebuilt.
    again = load_scene(tmp_path, spec)
    assert again is not None and again.item_paths == scene.item_paths
