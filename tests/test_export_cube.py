"""stacchip.export.cube: the npz cube format."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from stacchip.errors import ConfigError
from stacchip.export import cube


def test_npz_levels_load_like_savez_compressed(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    arrays = {
        "pixels": rng.integers(0, 5000, size=(3, 2, 8, 8)).astype(np.float32),
        "chipids": np.asarray(["a-0-1", "b-2-3", "c-4-5"], dtype=str),
        "nodata_mask": rng.random((3, 2, 8, 8)) < 0.2,
    }
    sizes = {}
    for level in (0, 1, 9):
        data = cube.cube_bytes(arrays, level)
        sizes[level] = len(data)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            assert sorted(npz.files) == sorted(arrays)
            for name, value in arrays.items():
                np.testing.assert_array_equal(npz[name], value)
    assert sizes[0] > sizes[1] >= sizes[9]
    with pytest.raises(ConfigError):
        cube.cube_bytes(arrays, 10)
