"""stacchip.export.cube: the npz cube format."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from stacchip.errors import ConfigError
from stacchip.export import cube


def test_npz_levels_load_like_savez_compressed(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:64, 0:64]
    smooth = 3000 + 1500 * np.sin(x / 9.0) * np.cos(y / 7.0)
    arrays = {
        "pixels": np.round(smooth + rng.normal(0, 40, size=(3, 2, 64, 64))).astype(np.float32),
        "chipids": np.asarray(["a-0-1", "b-2-3", "c-4-5"], dtype=str),
        "nodata_mask": rng.random((3, 2, 64, 64)) < 0.2,
    }
    sizes = {}
    for level in (0, 1, 2, 9):
        data = cube.cube_bytes(arrays, level)
        assert cube.cube_bytes(arrays, level) == data  # the same arrays, the same bytes
        sizes[level] = len(data)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            assert sorted(npz.files) == sorted(arrays)
            for name, value in arrays.items():
                np.testing.assert_array_equal(npz[name], value)
        # a standard zip: DEFLATE members (stored at level 0) whose CRC-32s check out
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            assert zf.testzip() is None
            want = zipfile.ZIP_STORED if level == 0 else zipfile.ZIP_DEFLATED
            assert {i.compress_type for i in zf.infolist()} == {want}
            for info in zf.infolist():  # zlib itself inflates what ISA-L deflated
                assert zlib.crc32(zf.read(info)) == info.CRC
        if shutil.which("unzip"):
            path = tmp_path / f"cube_{level}.npz"
            path.write_bytes(data)
            assert subprocess.run(["unzip", "-tq", str(path)], capture_output=True).returncode == 0
    # ISA-L's levels trade speed for size on large inputs; on these small arrays any level compresses
    assert all(sizes[level] < 0.6 * sizes[0] for level in (1, 2, 9))
    with pytest.raises(ConfigError):
        cube.cube_bytes(arrays, 10)
