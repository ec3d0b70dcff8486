"""Small Sentinel-2 scenes for the training-side tests (stacchip.ml).

From the real Earth Search item in tests/data, scaled down 30x
(10 m bands become 366 px at 300 m), written as COGs under a data root in the
bucket layout ``{platform}/{item_id}/stac_item.json``, and indexed with the
core Sentinel2Indexer into ``index/{platform}/{item_id}/index_{item_id}.parquet``.

Tile ``20HNJ`` has several dates (time stacks); tile ``20HPJ`` is the same grid
shifted 99 960 m east (the real MGRS spacing), for spatial splits.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.builders import coded_pixels, materialize, real_item

FACTOR = 30
CHIP_SIZE = 60
KEEP_ASSETS = ("red", "green", "blue", "nir", "swir16", "scl")
#: Class count of the synthetic label asset.
LABEL_CLASSES = 5


def label_pixels(shape: tuple[int, int]) -> np.ndarray:
    """Synthetic classes in 13 x 13 pixel blocks, varying in both axes."""
    r = np.arange(shape[0])[:, None] // 13
    c = np.arange(shape[1])[None, :] // 13
    return ((r * 3 + c) % LABEL_CLASSES).astype(np.uint8)


def scl_pixels(shape: tuple[int, int], date_no: int) -> np.ndarray:
    """SCL classes: vegetation, a cloud rectangle moving with the date, nodata strip on date 0."""
    scl = np.full(shape, 4, dtype=np.uint8)
    rows, cols = shape
    r0 = (date_no * 37) % max(rows - 60, 1)
    c0 = (date_no * 53) % max(cols - 60, 1)
    size = 30 + 15 * date_no
    scl[r0:r0 + size, c0:c0 + size] = 9  # cloud high probability
    if date_no == 0:
        scl[:, : cols // 8] = 0  # nodata strip: first chip column mostly nodata
    return scl


@dataclass
class Scene:
    """Where a built scene lives and what it holds."""

    root: Path
    index_dir: Path
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    index_files: list[Path] = field(default_factory=list)
    platform: str = ""

    def item_ids(self, tile: str) -> list[str]:
        return sorted(i for i in self.items if f"_T{tile}_" in i)


def s2_item(tile: str, when: dt.datetime, shift_x: float = 0.0, label: bool = True) -> dict[str, Any]:
    """The real item re-identified for ``tile`` and ``when``, with a subset of assets."""
    item = copy.deepcopy(real_item("sentinel-2"))
    stamp = when.strftime("%Y%m%dT%H%M%S")
    item["id"] = f"S2A_T{tile}_{stamp}_L2A"
    item["properties"]["datetime"] = when.isoformat().replace("+00:00", "Z")
    item["assets"] = {k: v for k, v in item["assets"].items() if k in KEEP_ASSETS}
    # Local hrefs carry no bucket: drop the storage extension (pystac would warn migrating it).
    item["stac_extensions"] = [e for e in item.get("stac_extensions", []) if "/storage/" not in e]
    for fields in [item["properties"], *item["assets"].values()]:
        for key in [k for k in fields if k.startswith("storage:")]:
            del fields[key]
    if label:
        lab = copy.deepcopy(item["assets"]["scl"])
        lab["title"] = "Synthetic land-cover label"
        lab["roles"] = ["data", "labels"]
        lab["raster:bands"] = [{"data_type": "uint8", "spatial_resolution": 20}]
        item["assets"]["label"] = lab
    if shift_x:
        import pyproj
        import shapely

        to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32720", always_xy=True)
        to_ll = pyproj.Transformer.from_crs("EPSG:32720", "EPSG:4326", always_xy=True)

        def move(xy: np.ndarray) -> np.ndarray:
            x, y = to_utm.transform(xy[:, 0], xy[:, 1])
            return np.column_stack(to_ll.transform(np.asarray(x) + shift_x, y))

        footprint = shapely.transform(shapely.geometry.shape(item["geometry"]), move)
        item["geometry"] = shapely.geometry.mapping(footprint)
        item["bbox"] = list(footprint.bounds)
        for asset in item["assets"].values():
            t = list(asset["proj:transform"])
            t[2] += shift_x
            asset["proj:transform"] = t
    return item


def build_scene(
    directory: Path,
    dates_a: int = 4,
    dates_b: int = 2,
    label: bool = True,
) -> Scene:
    """Write the scenes and their indexes under ``directory``."""
    from stacchip.index import write_index
    from stacchip.indexer import Sentinel2Indexer

    root = directory / "data"
    index_dir = directory / "index"
    scene = Scene(root=root, index_dir=index_dir)
    start = dt.datetime(2024, 3, 11, 14, 6, 36, tzinfo=dt.timezone.utc)
    plan = [("20HNJ", 0.0, k) for k in range(dates_a)] + [("20HPJ", 99960.0, k) for k in range(dates_b)]
    for tile, shift, k in plan:
        when = start + dt.timedelta(days=25 * k + (3 if tile == "20HPJ" else 0))
        item = s2_item(tile, when, shift, label=label)
        platform = item["collection"]
        item_dir = root / platform / item["id"]

        def pixels(key: str, asset: dict[str, Any], shape: tuple[int, int], k: int = k) -> np.ndarray:
            if key == "scl":
                return scl_pixels(shape, k)
            if key == "label":
                return label_pixels(shape)
            salt = 10 * k + KEEP_ASSETS.index(key) + (500 if shift else 0)
            return coded_pixels(shape, 1, "uint16", salt)

        item = materialize(item, item_dir, factor=FACTOR, pixels=pixels)
        item_json = item_dir / "stac_item.json"
        item_json.write_text(json.dumps(item))
        indexer = Sentinel2Indexer(item, chip_size=CHIP_SIZE)
        table = indexer.create_full_index()
        dest = index_dir / platform / item["id"] / f"index_{item['id']}.parquet"
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_index(table, dest, extra_metadata={"item_href": str(item_json), "item_id": item["id"]})
        scene.items[item["id"]] = item
        scene.index_files.append(dest)
        scene.platform = platform
    return scene


def scene_fixture(name: str, **kwargs: Any) -> Any:
    """A module-scoped fixture ``scene``: :func:`build_scene` (``kwargs``) once per test module,
    in a temp dir named ``name``, with pystac's storage-extension migration warnings silenced.

    Use as ``scene = scene_fixture("ml_stacks", dates_a=5, dates_b=2)`` in a test module.
    """

    @pytest.fixture(scope="module")
    def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pystac storage-extension migration notes
            return build_scene(tmp_path_factory.mktemp(name), **kwargs)

    return scene
