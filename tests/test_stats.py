"""stacchip-stats: mergeable per-band statistics from cubes and from the index."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from stacchip import storage
from stacchip.chipper import Chipper
from stacchip.errors import ConfigError
from stacchip.indexer import ChipIndexer
from stacchip.processors import prechip, stats
from stacchip.processors.bands import S2_BANDS
from stacchip.utils import load_item
from tests.builders import PRECHIP_CHIP as CHIP
from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes as build_scenes
from tests.builders import run_all_jobs

pytestmark = pytest.mark.filterwarnings("ignore:Could not parse bucket:UserWarning")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_scenes(tmp_path_factory.mktemp("stats-scenes"))


@pytest.fixture(scope="module")
def cubes(scenes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("stats-cubes")
    cfg = prechip.PrechipConfig(
        data=scenes["data"], index=scenes["index"], output=str(out), platform=PLATFORM,
        cube_size=8, cubes_per_job=4, max_nodata=None, partial=True,
    )
    written = run_all_jobs(cfg)
    return {"root": str(out), "written": written}


def numpy_reference(urls: list[str]) -> dict[str, dict[str, float]]:
    """Per-band count/mean/std/min/max with numpy over all valid pixels at once."""
    pixels, masks = [], []
    for url in urls:
        with np.load(io.BytesIO(storage.read_bytes(url))) as npz:
            pixels.append(npz["pixels"])
            masks.append(npz["nodata_mask"])
    p = np.concatenate(pixels)
    m = np.concatenate(masks)
    out = {}
    for b, band in enumerate(S2_BANDS):
        v = p[:, b][~m[:, b]].astype(np.float64)
        out[band] = {"count": v.size, "mean": v.mean(), "std": v.std(), "min": v.min(), "max": v.max()}
    return out


def check_against(summary: dict[str, dict[str, Any]], ref: dict[str, dict[str, float]]) -> None:
    for band, expected in ref.items():
        got = summary[band]
        assert got["count"] == expected["count"], band
        assert got["mean"] == pytest.approx(expected["mean"], rel=1e-12), band
        assert got["std"] == pytest.approx(expected["std"], rel=1e-10), band
        assert got["min"] == expected["min"] and got["max"] == expected["max"], band


def test_chan_merge_equals_one_pass_and_numpy() -> None:
    rng = np.random.default_rng(0)
    # large offset, small spread: the naive sum-of-squares formula loses everything here
    data = 1e8 + rng.normal(0, 1.5, size=(40, 3, 16, 16))
    mask = rng.random(data.shape) < 0.1
    one = stats.StatsAccumulator(["a", "b", "c"])
    one.update(data, mask)
    parts = []
    for lo, hi in [(0, 7), (7, 8), (8, 25), (25, 40)]:
        acc = stats.StatsAccumulator(["a", "b", "c"])
        acc.update(data[lo:hi], mask[lo:hi])
        parts.append(stats.StatsAccumulator.from_dict(json.loads(json.dumps(acc.to_dict()))))
    merged = parts[3]
    for part in (parts[1], parts[0], parts[2]):
        merged.merge(part)
    for b in range(3):
        v = data[:, b][~mask[:, b]]
        assert one.count[b] == merged.count[b] == v.size
        assert one.mean[b] == pytest.approx(v.mean(), rel=1e-15)
        assert merged.mean[b] == pytest.approx(v.mean(), rel=1e-15)
        assert one.std[b] == pytest.approx(v.std(), rel=1e-9)
        assert merged.std[b] == pytest.approx(v.std(), rel=1e-9)
        assert merged.min[b] == v.min() and merged.max[b] == v.max()
    # empty partials merge as identity
    empty = stats.StatsAccumulator(["a", "b", "c"])
    assert empty.merge(merged).count.tolist() == merged.count.tolist()


def test_percentiles_from_histogram_within_a_bin() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 10000, size=(5, 2, 32, 32)).astype(np.float32)
    acc = stats.StatsAccumulator(["x", "y"], hist_range=(0, 10000), bins=1000)
    acc.update(data[:2])
    other = stats.StatsAccumulator(["x", "y"], hist_range=(0, 10000), bins=1000)
    other.update(data[2:])
    acc.merge(other)
    got = acc.percentiles([1, 50, 99])
    for b in range(2):
        expected = np.percentile(data[:, b], [1, 50, 99])
        assert np.all(np.abs(got[b] - expected) <= 10.0 + 1e-9)  # one bin
    assert acc.hist is not None and int(acc.hist.sum()) == data.size


def test_cube_stats_merged_from_jobs_equal_one_pass_and_numpy(cubes: dict[str, Any], tmp_path: Path) -> None:
    files = stats.cube_files(cubes["root"], PLATFORM)
    assert len(files) == 10 and files == sorted(cubes["written"], key=lambda u: int(Path(u).stem.split("_")[1]))
    ref = numpy_reference(files)
    assert ref["blue"]["count"] < 75 * CHIP * CHIP  # nodata was excluded
    many = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path / "many"), chips=cubes["root"], cubes_per_job=3)
    n_jobs = stats.job_count(many)
    assert n_jobs == 4
    urls = [stats.write_partial(j, many) for j in range(n_jobs)]
    assert all(Path(u).exists() for u in urls)
    merged = stats.write_merged(many)
    assert merged["partials"] == 4
    check_against(merged["bands"], ref)
    one = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path / "one"), chips=cubes["root"], cubes_per_job=100)
    single = stats.job_stats(0, one).summary()
    for band in S2_BANDS:
        assert single[band]["count"] == merged["bands"][band]["count"]
        assert single[band]["mean"] == pytest.approx(merged["bands"][band]["mean"], rel=1e-13)
        assert single[band]["std"] == pytest.approx(merged["bands"][band]["std"], rel=1e-12)
    # metadata.yaml in Clay's layout
    meta = yaml.safe_load((tmp_path / "many" / "stats" / PLATFORM / "metadata.yaml").read_text())
    entry = meta[PLATFORM]
    assert entry["band_order"] == S2_BANDS and entry["rgb_indices"] == [2, 1, 0] and entry["gsd"] == 10.0
    assert set(entry["bands"]) == {"mean", "std", "wavelength"}
    for band in S2_BANDS:
        assert entry["bands"]["mean"][band] == pytest.approx(ref[band]["mean"], rel=1e-12)
        assert entry["bands"]["std"][band] == pytest.approx(ref[band]["std"], rel=1e-10)
    saved = json.loads((tmp_path / "many" / "stats" / PLATFORM / "stats.json").read_text())
    assert saved["bands"]["red"]["count"] == ref["red"]["count"]


def test_index_source_equals_numpy_over_the_chipper(scenes: dict[str, Any], tmp_path: Path) -> None:
    cfg = stats.StatsConfig(
        platform=PLATFORM, output=str(tmp_path), source="index", data=scenes["data"], index=scenes["index"],
        chips_per_job=20, max_nodata=0.5, percentiles=[50],
    )
    n_jobs = stats.job_count(cfg)
    selection = prechip.prepare(prechip.PrechipConfig(
        data=scenes["data"], index=scenes["index"], output=str(tmp_path), platform=PLATFORM, max_nodata=0.5))
    assert n_jobs == -(-selection.table.num_rows // 20) and selection.table.num_rows == 72
    for j in range(n_jobs):
        stats.write_partial(j, cfg, workers=2 if j == 0 else 1)
    merged = stats.write_merged(cfg)["bands"]
    chips = []
    for chipid in selection.table.column("chipid").to_pylist():
        item_id, x, y = chipid.rsplit("-", 2)
        item = load_item(str(Path(scenes["data"]) / PLATFORM / item_id / "stac_item.json"))
        chip = Chipper(ChipIndexer(item, chip_size=CHIP)).chip(int(x), int(y))
        chips.append(np.concatenate([chip[b] for b in S2_BANDS]))
    p = np.stack(chips).astype(np.float64)
    for b, band in enumerate(S2_BANDS):
        v = p[:, b][p[:, b] != 0]  # declared nodata 0
        assert merged[band]["count"] == v.size
        assert merged[band]["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert merged[band]["std"] == pytest.approx(v.std(), rel=1e-10)
        assert merged[band]["min"] == v.min() and merged[band]["max"] == v.max()
        assert abs(merged[band]["p50"] - np.percentile(v, 50)) <= 65536 / stats.DEFAULT_BINS


def test_index_jobs_after_the_first_read_only_their_share(scenes: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--source index: the first job makes the plan (index + every item's STAC JSON, once); a later
    job reads neither the index nor the items outside its share, and covers exactly its chips of
    the seeded shuffle (``max_chips`` cutting the last share)."""
    import shutil

    from stacchip.export import plan as plans
    from stacchip.export import selection as chip_selection

    data = tmp_path / "data"
    shutil.copytree(scenes["data"], data)
    cfg = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path / "out"), source="index", data=str(data),
                            index=scenes["index"], chips_per_job=20, max_chips=50, max_nodata=0.5)
    assert stats.job_count(cfg) == 3  # 72 chips pass, 50 used: 20 + 20 + 10
    folders = sorted((tmp_path / "out" / "stats" / PLATFORM).glob(f"*/{plans.PLAN_FOLDER}/*/plan.json"))
    assert len(folders) == 1
    record = json.loads(folders[0].read_text())
    plan = plans.Plan(record["key"], str(folders[0].parent), record)
    share, _ = plan.share(2)
    selection = prechip.prepare(prechip.PrechipConfig(
        data=scenes["data"], index=scenes["index"], output=str(tmp_path), platform=PLATFORM, max_nodata=0.5))
    expected = selection.table.take(selection.order[40:50]).column("chipid").to_pylist()
    mine = {c.rsplit("-", 2)[0] for c in expected}
    for item in (data / PLATFORM).iterdir():
        if item.name not in mine:
            (item / "stac_item.json").unlink()  # reading it now would fail

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a stats job with a published plan read the whole selection")

    monkeypatch.setattr(chip_selection, "prepare", refuse)
    monkeypatch.setattr(chip_selection, "select_chips", refuse)
    seen: list[str] = []
    real = stats.read_index_chips
    monkeypatch.setattr(stats, "read_index_chips",
                        lambda rows, *a, **k: (seen.extend(rows.column("chipid").to_pylist()), real(rows, *a, **k)))
    url = stats.write_partial(2, cfg)
    assert url is not None and seen == expected
    assert json.loads(Path(url).read_text())["count"][0] > 0


def test_cli_array_jobs_then_merge(cubes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STACCHIP_PLATFORM", PLATFORM)
    monkeypatch.setenv("STACCHIP_CHIP_BUCKET", cubes["root"])
    monkeypatch.setenv("STACCHIP_STATS_BUCKET", str(tmp_path))
    monkeypatch.setenv("STACCHIP_CUBES_PER_JOB", "4")
    for job in range(3):
        monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", str(job))
        assert stats.main(["-q"]) == 0
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX")
    assert stats.main(["--merge", "-q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    check_against(printed, numpy_reference(stats.cube_files(cubes["root"], PLATFORM)))
    # the same with --all over a process pool
    assert stats.main(["--all", "--workers", "2", "--output", str(tmp_path / "all"), "-q"]) == 0
    again = json.loads(capsys.readouterr().out)
    for band in S2_BANDS:
        assert again[band]["count"] == printed[band]["count"]
        assert again[band]["mean"] == pytest.approx(printed[band]["mean"], rel=1e-13)
    monkeypatch.delenv("STACCHIP_PLATFORM")
    assert stats.main(["--index", "0"]) == 2
    assert "STACCHIP_PLATFORM" in capsys.readouterr().err


def test_upstream_cubes_without_mask_use_the_platform_nodata(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 5, size=(4, 10, 8, 8)).astype(np.float32)
    url = prechip.cube_url(str(tmp_path), PLATFORM, 0)
    storage.write_bytes(url, prechip.cube_bytes({"pixels": pixels}))
    cfg = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path), chips=str(tmp_path))
    summary = stats.job_stats(0, cfg).summary()
    for b, band in enumerate(S2_BANDS):
        v = pixels[:, b][pixels[:, b] != 0]
        assert summary[band]["count"] == v.size and summary[band]["min"] >= 1
        assert summary[band]["mean"] == pytest.approx(v.mean(), rel=1e-12)


@pytest.mark.services
def test_stats_from_cubes_on_s3(cubes: dict[str, Any], s3_bucket: str) -> None:
    import boto3

    client = boto3.client("s3")
    for url in cubes["written"]:
        key = Path(url).relative_to(cubes["root"]).as_posix()
        client.upload_file(url, s3_bucket, f"chips/{key}")
    cfg = stats.StatsConfig(platform=PLATFORM, output=f"s3://{s3_bucket}/out", chips=f"s3://{s3_bucket}/chips",
                            cubes_per_job=6)
    assert stats.job_count(cfg) == 2
    for j in range(2):
        stats.write_partial(j, cfg)
    merged = stats.write_merged(cfg)
    check_against(merged["bands"], numpy_reference(stats.cube_files(cubes["root"], PLATFORM)))
    assert storage.exists(f"s3://{s3_bucket}/out/stats/{PLATFORM}/metadata.yaml")


def test_merge_refuses_stale_and_missing_partials(cubes: dict[str, Any], tmp_path: Path) -> None:
    ref = numpy_reference(stats.cube_files(cubes["root"], PLATFORM))
    first = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path), chips=cubes["root"], cubes_per_job=3)
    for j in range(stats.job_count(first)):  # 4 jobs: partial_00000 .. partial_00003
        stats.write_partial(j, first)
    # re-run in the same place with bigger shares: 2 jobs; partials 2 and 3 of the first run stay behind
    second = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path), chips=cubes["root"], cubes_per_job=5)
    assert stats.job_count(second) == 2
    for j in range(2):
        stats.write_partial(j, second)
    with pytest.raises(ConfigError, match="different settings"):
        stats.write_merged(second)
    assert not (tmp_path / "stats" / PLATFORM / "stats.json").exists()
    folder = tmp_path / "stats" / PLATFORM
    for stale in ("partial_00002.json", "partial_00003.json"):
        (folder / stale).unlink()
    check_against(stats.write_merged(second)["bands"], ref)
    # a failed (missing) job is not merged over
    (folder / "partial_00001.json").unlink()
    (folder / "stats.json").unlink()
    with pytest.raises(ConfigError, match=r"missing jobs \[1\]"):
        stats.write_merged(second)
    assert not (folder / "stats.json").exists()


def test_merge_asking_percentiles_of_partials_without_histogram_fails(cubes: dict[str, Any], tmp_path: Path) -> None:
    plain = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path), chips=cubes["root"], cubes_per_job=100)
    stats.write_partial(0, plain)
    asked = stats.StatsConfig(platform=PLATFORM, output=str(tmp_path), chips=cubes["root"], cubes_per_job=100,
                              percentiles=[2, 98])
    with pytest.raises(ConfigError, match="percentiles need a histogram"):
        stats.write_merged(asked)
    assert not (tmp_path / "stats" / PLATFORM / "stats.json").exists()
    assert "p50" in stats.write_merged(
        stats.StatsConfig(platform=PLATFORM, output=str(tmp_path / "h"), chips=cubes["root"], percentiles=[50]),
        [stats.write_partial(0, stats.StatsConfig(platform=PLATFORM, output=str(tmp_path / "h"),
                                                  chips=cubes["root"], cubes_per_job=100, percentiles=[50]))],
    )["bands"]["red"]
