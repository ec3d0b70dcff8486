"""Grid blocks of a chip across the antimeridian are taken at its centre near +-180."""

from __future__ import annotations

import datetime as dt

import numpy as np
import shapely

from stacchip.index import index_table
from stacchip.ml.splits import block_ids


def test_chip_across_the_antimeridian_is_blocked_at_180_not_0() -> None:
    # east of 179.96, across (its corners at 179.98 and -179.98: bbox -179.98 .. 179.98), west of -179.96
    polys = np.array([
        shapely.box(179.94, 10.0, 179.98, 10.04),
        shapely.Polygon([(179.98, 10.0), (-179.98, 10.0), (-179.98, 10.04), (179.98, 10.04)]),
        shapely.box(-179.98, 10.0, -179.94, 10.04),
    ])
    table = index_table(
        item_id="S2A_T01PAB_20240101_0_L2A", platform="sentinel-2-l2a",
        datetime=dt.datetime(2024, 1, 1, tzinfo=dt.UTC), chip_size=64, xs=np.arange(3), ys=np.zeros(3),
        cloud=np.zeros(3), nodata=np.zeros(3), polygons=polys,
    )
    bbox = table.column("bbox").combine_chunks()
    assert bbox.field("xmin")[1].as_py() < -179 and bbox.field("xmax")[1].as_py() > 179
    deg = block_ids(table, block_size=1.0, units="deg").tolist()
    assert deg == ["deg1:179_10", "deg1:-180_10", "deg1:-180_10"]
    metres = block_ids(table, block_size=50_000.0).tolist()
    assert metres[1] == metres[2] and not metres[1].startswith("m50000:0_") and not metres[1].startswith("m50000:-1_")
