"""stacchip-prechip --format webdataset: tar shards read by the real ``webdataset`` library,
Hugging Face ``datasets``' webdataset loader and the tar tools, from disk, streamed from the
loopback S3 server, and under DDP (2 gloo ranks x 2 DataLoader workers)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stacchip.chipper import Chipper
from stacchip.export import shards
from stacchip.index import query
from stacchip.indexer import ChipIndexer
from stacchip.ml.shards import shard_urls
from stacchip.processors import prechip
from stacchip.processors.bands import S2_BANDS
from stacchip.utils import load_item
from tests.builders import PRECHIP_CHIP as CHIP
from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes, load_cube, run_all_jobs, upload_prechip_bucket

wds = pytest.importorskip("webdataset")

REPO = Path(__file__).resolve().parents[1]
RANK_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_prechip_scenes(tmp_path_factory.mktemp("wds-scenes"))


def config(scenes: dict[str, Any], out: Path | str, **kw: Any) -> prechip.PrechipConfig:
    kw.setdefault("cube_size", 8)
    kw.setdefault("cubes_per_job", 3)
    kw.setdefault("max_nodata", None)
    kw.setdefault("partial", True)
    kw.setdefault("format", "webdataset")
    return prechip.PrechipConfig(data=scenes["data"], index=scenes["index"], output=str(out), platform=PLATFORM, **kw)


@pytest.fixture(scope="module")
def made(scenes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("shards")
    cfg = config(scenes, out)
    written = run_all_jobs(cfg)
    cubes_cfg = config(scenes, tmp_path_factory.mktemp("cubes"), format="npz")
    cubes = {int(Path(u).stem.split("_")[1]): load_cube(u) for u in run_all_jobs(cubes_cfg)}
    return {"cfg": cfg, "out": str(out), "written": written, "cubes": cubes}


def expected_chip(scenes: dict[str, Any], chipid: str) -> np.ndarray:
    item_id, x, y = chipid.rsplit("-", 2)
    item = load_item(str(Path(scenes["data"]) / PLATFORM / item_id / "stac_item.json"))
    chip = Chipper(ChipIndexer(item, chip_size=CHIP)).chip(int(x), int(y))
    return np.concatenate([chip[b] for b in S2_BANDS])


def check_samples(samples: list[dict[str, Any]], scenes: dict[str, Any], made: dict[str, Any]) -> None:
    """Pixels equal the Chipper's (values and dtype), masks and metadata equal the cubes',
    sample ``i`` of shard ``k`` is chip ``i`` of cube ``k``, every chip once."""
    everything = query(scenes["index"]).column("chipid").to_pylist()
    seen = []
    for sample in samples:
        k, i = (int(v) for v in sample["__key__"].split("-"))
        meta = sample["json"]
        cube = made["cubes"][k]
        assert meta["chipid"] == cube["chipids"][i]
        pixels = np.asarray(sample["npy"])
        expected = expected_chip(scenes, meta["chipid"])
        assert pixels.dtype == expected.dtype == np.uint16 and pixels.shape == (10, CHIP, CHIP)
        np.testing.assert_array_equal(pixels, expected)
        np.testing.assert_array_equal(np.asarray(sample["mask.npy"], dtype=bool), cube["nodata_mask"][i])
        np.testing.assert_array_equal(cube["pixels"][i], pixels.astype(np.float32))
        for name in ("lat_norm", "lon_norm", "week_norm", "hour_norm"):
            np.testing.assert_array_equal(np.float32(meta[name]), cube[name][i])
        assert meta["item_id"] == cube["item_ids"][i] and meta["platform"] == PLATFORM
        assert np.datetime64(meta["datetime"].rstrip("Z")) == cube["datetimes"][i]
        assert (meta["lon"], meta["lat"]) == (cube["lon"][i], cube["lat"][i])
        assert meta["bands"] == S2_BANDS and meta["chip_size"] == CHIP
        assert meta["bbox"][0] < meta["lon"] < meta["bbox"][2] and meta["bbox"][1] < meta["lat"] < meta["bbox"][3]
        assert 0.0 <= meta["cloud_fraction"] <= 1.0 and 0.0 <= meta["nodata_fraction"] <= 1.0
        seen.append(meta["chipid"])
    assert len(seen) == len(set(seen)) == len(everything) == 75
    assert sorted(seen) == sorted(everything)


def test_shards_are_the_cubes_chips_in_the_cubes_order(made: dict[str, Any]) -> None:
    names = sorted(Path(u).name for u in made["written"])
    assert names == [f"shard-{k:06d}.tar.gz" for k in range(10)]
    manifest = json.loads(Path(prechip.manifest_url(made["out"], PLATFORM)).read_text())
    assert manifest["format"] == "webdataset"
    assert [o["name"] for o in manifest["outputs"]] == names
    assert [o["samples"] for o in manifest["outputs"]] == [8] * 9 + [3]
    assert shard_urls(made["out"], PLATFORM) == sorted(made["written"])


def test_webdataset_reads_the_shards_from_disk(scenes: dict[str, Any], made: dict[str, Any]) -> None:
    dataset = wds.WebDataset(shard_urls(made["out"], PLATFORM), shardshuffle=False).decode()
    check_samples(list(dataset), scenes, made)


def test_hugging_face_datasets_reads_the_shards_from_disk(scenes: dict[str, Any], made: dict[str, Any],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    urls = shard_urls(made["out"], PLATFORM)
    streamed = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
    check_samples(list(streamed), scenes, made)
    whole = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                                  cache_dir=str(tmp_path / "hf"))
    assert whole.num_rows == 75
    first = whole.with_format("numpy")[0]
    assert first["npy"].shape == (10, CHIP, CHIP)


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar program")
def test_the_tar_tools_read_the_shards(scenes: dict[str, Any], made: dict[str, Any], tmp_path: Path) -> None:
    shard = sorted(made["written"])[0]
    listing = subprocess.run(["tar", "-tzf", shard], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["000000-00000.json", "000000-00000.mask.npy", "000000-00000.npy"]
    assert len(listing) == 3 * 8
    subprocess.run(["tar", "-xzf", shard, "-C", str(tmp_path)], check=True)
    meta = json.loads((tmp_path / "000000-00003.json").read_text())
    np.testing.assert_array_equal(np.load(tmp_path / "000000-00003.npy"), expected_chip(scenes, meta["chipid"]))
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-t", shard]).returncode == 0


def test_level_zero_writes_plain_tar_shards(scenes: dict[str, Any], made: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(scenes, tmp_path, compress_level=0, cubes_per_job=100)
    written = prechip.run_job(0, cfg)
    assert sorted(Path(u).name for u in written) == [f"shard-{k:06d}.tar" for k in range(10)]
    with tarfile.open(written[0], "r:") as tar:  # not compressed
        assert len(tar.getnames()) == 24
    check_samples(list(wds.WebDataset(shard_urls(str(tmp_path), PLATFORM), shardshuffle=False).decode()),
                  scenes, made)


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_reruns_are_byte_identical_skip_whole_shards_and_remake_damaged_ones(
    scenes: dict[str, Any], made: dict[str, Any], tmp_path: Path
) -> None:
    cfg = dataclasses.replace(made["cfg"], output=str(tmp_path))
    first = prechip.run_job(1, cfg, workers=2)
    assert sorted(Path(u).name for u in first) == [f"shard-{k:06d}.tar.gz" for k in (3, 4, 5)]
    by_name = {Path(u).name: u for u in made["written"]}
    assert all(_sha(u) == _sha(by_name[Path(u).name]) for u in first)  # another run, the same bytes
    assert prechip.run_job(1, cfg) == []
    Path(first[0]).write_bytes(Path(first[0]).read_bytes()[:-100])  # truncated
    assert prechip.run_job(1, cfg) == [first[0]]
    assert _sha(first[0]) == _sha(by_name[Path(first[0]).name])
    assert shards.shard_damage(Path(first[1]).read_bytes()[:5000]) is not None
    assert shards.shard_damage(Path(first[1]).read_bytes()) is None


def test_another_format_into_the_same_place_is_refused(scenes: dict[str, Any], made: dict[str, Any]) -> None:
    from stacchip.errors import ConfigError

    with pytest.raises(ConfigError, match="another selection"):
        prechip.run_job(0, dataclasses.replace(made["cfg"], format="npz"))


def test_locality_shards_hold_the_locality_cubes_chips(scenes: dict[str, Any], tmp_path: Path) -> None:
    kw = {"mode": "locality", "items_per_job": 2, "mix_items": 2, "strip_px": 2 * CHIP}
    cubes = {Path(u).stem.split("_")[1]: load_cube(u)["chipids"].tolist()
             for u in run_all_jobs(config(scenes, tmp_path / "c", format="npz", **kw))}
    written = run_all_jobs(config(scenes, tmp_path / "s", **kw))
    assert len(written) == len(cubes) == 7 + 4  # tasks of 50 and 25 chips, partial cubes of 8
    for url in written:
        k = str(int(Path(url).name.split("-")[1].split(".")[0]))
        samples = shards.read_shard(Path(url).read_bytes())
        assert [s["json"]["chipid"] for s in samples] == cubes[k]


def test_cli_format_flag_and_variable(scenes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    base = ["--data", scenes["data"], "--indexpath", scenes["index"], "--platform", PLATFORM, "--cube-size", "8",
            "--max-nodata", "none", "-q"]
    monkeypatch.setenv("STACCHIP_PRECHIP_FORMAT", "webdataset")
    assert prechip.main(base + ["--chips", str(tmp_path / "env"), "--all"]) == 0
    assert len(list((tmp_path / "env").rglob("shard-*.tar.gz"))) == 9
    monkeypatch.delenv("STACCHIP_PRECHIP_FORMAT")
    assert prechip.main(base + ["--chips", str(tmp_path / "flag"), "--format", "webdataset", "--plan"]) == 0
    assert "9 shards of 8 chips in 1 tasks" in capsys.readouterr().out
    assert prechip.main(base + ["--chips", str(tmp_path / "x"), "--format", "tfrecord", "--index", "0"]) == 2
    assert "'tfrecord'" in capsys.readouterr().err


# --- streamed from the loopback S3 server -----------------------------------------------------------


@pytest.fixture
def on_s3(scenes: dict[str, Any], made: dict[str, Any], s3_bucket: str) -> dict[str, Any]:
    upload_prechip_bucket(scenes, s3_bucket)
    cfg = dataclasses.replace(made["cfg"], data=f"s3://{s3_bucket}", index=f"s3://{s3_bucket}/index/",
                              output=f"s3://{s3_bucket}/chips")
    written = run_all_jobs(cfg, workers=2)
    return {"cfg": cfg, "written": written, "chips": f"s3://{s3_bucket}/chips"}


@pytest.mark.services
def test_shards_stream_from_s3_into_webdataset_and_datasets(scenes: dict[str, Any], made: dict[str, Any],
                                                           on_s3: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from stacchip import storage

    assert sorted(u.rsplit("/", 1)[1] for u in on_s3["written"]) == sorted(Path(u).name for u in made["written"])
    for url in on_s3["written"]:  # the same bytes as written locally
        local = next(u for u in made["written"] if Path(u).name == url.rsplit("/", 1)[1])
        assert hashlib.sha256(storage.read_bytes(url)).hexdigest() == _sha(local)
    urls = shard_urls(on_s3["chips"], PLATFORM)
    assert all(u.startswith("http://127.0.0.1:") and "X-Amz-Signature" in u for u in urls)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # presigned: the readers need no credentials
        monkeypatch.delenv(name)
    check_samples(list(wds.WebDataset(urls, shardshuffle=False).decode()), scenes, made)
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    streamed = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
    check_samples(list(streamed), scenes, made)


def _rank_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.services
def test_two_gloo_ranks_with_two_workers_stream_each_sample_once_per_epoch(
    scenes: dict[str, Any], made: dict[str, Any], on_s3: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("torch.distributed")
    world = 2
    urls = shard_urls(on_s3["chips"], PLATFORM)
    out = tmp_path / "seen.json"
    base = {"init": f"file://{tmp_path / 'store'}", "world": world, "urls": urls, "out": str(out),
            "timeout": RANK_TIMEOUT_S // 2}
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.wds_ddp_rank", json.dumps({**base, "rank": r})], cwd=REPO,
                         env=_rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            _, stderr = p.communicate(timeout=RANK_TIMEOUT_S)
            logs.append(stderr[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * world, "\n".join(logs)
    gathered = json.loads(out.read_text())
    assert [g["rank"] for g in gathered] == [0, 1]
    everything = sorted(query(scenes["index"]).column("chipid").to_pylist())
    for epoch in ("0", "1"):
        per_rank = [g["epochs"][epoch] for g in gathered]
        ids = [[chipid for _, chipid, _, _, _ in seen] for seen in per_rank]
        assert all(ids), "a rank saw no sample"
        assert not set(ids[0]) & set(ids[1])  # disjoint
        assert sorted(ids[0] + ids[1]) == everything  # complete: each sample once per epoch
        for g, seen in zip(gathered, per_rank, strict=True):
            readers = {pid for *_, pid in seen}
            assert len(readers) == 2 and g["pid"] not in readers  # read in the rank's two workers
            assert all(shape == [10, CHIP, CHIP] and dtype == "uint16" for _, _, shape, dtype, _ in seen)
            # each rank reads whole shards: keys of one shard never split across ranks
        shard_of = [{key.split("-")[0] for key, *_ in seen} for seen in per_rank]
        assert not shard_of[0] & shard_of[1]


def test_read_shard_and_sample_keys_round_trip() -> None:
    import pyarrow as pa
    import datetime as dt

    rows = pa.table({
        "chipid": ["A.B-1-2"], "item_id": ["A.B"], "platform": [PLATFORM],
        "datetime": pa.array([dt.datetime(2024, 3, 11, 14, 11, 54, 463000, tzinfo=dt.UTC)],
                             pa.timestamp("us", tz="UTC")),
        "chip_index_x": pa.array([1], pa.uint16()), "chip_index_y": pa.array([2], pa.uint16()),
        "chip_size": [4], "cloud_cover_percentage": pa.array([0.25], pa.float32()),
        "nodata_percentage": pa.array([0.0], pa.float32()),
        "bbox": pa.array([{"xmin": 1.0, "ymin": 2.0, "xmax": 3.0, "ymax": 4.0}]),
    })
    pixels = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    data = shards.shard_bytes(7, rows, [(pixels, pixels == 0)], ["a", "b"], level=1)
    (sample,) = shards.read_shard(data)
    assert sample["__key__"] == "000007-00000"  # the chip id's dot does not end up in the key
    np.testing.assert_array_equal(sample["npy"], pixels)
    assert sample["npy"].dtype == np.int16 and sample["mask.npy"].sum() == 1
    assert sample["json"]["chipid"] == "A.B-1-2" and sample["json"]["datetime"] == "2024-03-11T14:11:54.463000Z"
    assert sample["json"]["lon"] == 2.0 and sample["json"]["lat"] == 3.0 and sample["json"]["cloud_fraction"] == 0.25
    assert shards.shard_bytes(7, rows, [(pixels, pixels == 0)], ["a", "b"], level=1) == data
    with tarfile.open(fileobj=io.BytesIO(shards.shard_bytes(7, rows, [(pixels, pixels == 0)], ["a", "b"], 0))) as t:
        assert [m.mtime for m in t.getmembers()] == [0, 0, 0]


def test_croissant_describes_the_shards(scenes: dict[str, Any], made: dict[str, Any]) -> None:
    mlc = pytest.importorskip("mlcroissant")
    from stacchip.cli import main as cli

    folder = str(Path(prechip.manifest_url(made["out"], PLATFORM)).parent)
    out = Path(scenes["root"]) / "croissant-shards.json"
    assert cli(["croissant", scenes["index"], "--out", str(out), "--data-root", scenes["data"],
                "--shards", folder, "--validate"]) == 0
    doc = json.loads(out.read_text())
    tars = [d for d in doc["distribution"] if d.get("encodingFormat") == "application/x-tar"]
    assert [d["name"] for d in tars] == [f"shard-{k:06d}.tar.gz" for k in range(10)]
    for d in tars:
        path = (out.parent / d["contentUrl"]).resolve()
        assert d["sha256"] == _sha(str(path)) and d["contentSize"] == f"{path.stat().st_size} B"
    assert doc["geocr:coordinateReferenceSystem"].startswith("EPSG:")
    dataset = mlc.Dataset(jsonld=str(out))
    assert not dataset.metadata.ctx.issues.errors and not dataset.metadata.ctx.issues.warnings
    records = list(dataset.records("samples"))
    metas = {r["samples/key"].decode(): json.loads(r["samples/metadata"]) for r in records}
    assert sorted(m["chipid"] for m in metas.values()) == sorted(query(scenes["index"]).column("chipid").to_pylist())
    cube = made["cubes"][3]
    assert metas["000003-00005"]["chipid"] == cube["chipids"][5]
    assert metas["000003-00005"]["lon"] == cube["lon"][5]


def test_stats_over_shards_equal_stats_over_cubes(made: dict[str, Any], tmp_path: Path) -> None:
    from stacchip.processors import stats

    cube_root = made["out"]
    assert stats.cube_files(cube_root, PLATFORM) == sorted(made["written"])
    over_shards = stats.job_stats(0, stats.StatsConfig(platform=PLATFORM, output=str(tmp_path), chips=cube_root,
                                                       cubes_per_job=100)).summary()
    pixels = np.concatenate([c["pixels"] for c in made["cubes"].values()])
    masks = np.concatenate([c["nodata_mask"] for c in made["cubes"].values()])
    for b, band in enumerate(S2_BANDS):
        v = pixels[:, b][~masks[:, b]].astype(np.float64)
        assert over_shards[band]["count"] == v.size > 0
        assert over_shards[band]["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert over_shards[band]["min"] == v.min() and over_shards[band]["max"] == v.max()


def test_shard_urls_believe_no_name_the_manifest_gives(made: dict[str, Any], tmp_path: Path) -> None:
    from stacchip.errors import ConfigError

    folder = tmp_path / prechip.VERSION / PLATFORM
    folder.mkdir(parents=True)
    manifest = json.loads(Path(prechip.manifest_url(made["out"], PLATFORM)).read_text())
    manifest["outputs"][2]["name"] = "../../../elsewhere.tar.gz"
    (folder / "prechip_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="elsewhere"):
        shard_urls(str(tmp_path), PLATFORM)
    manifest["format"] = "npz"
    (folder / "prechip_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not WebDataset shards"):
        shard_urls(str(tmp_path), PLATFORM)
    with pytest.raises(ConfigError, match="no prechip manifest"):
        shard_urls(str(tmp_path / "none"), PLATFORM)
    # a run not finished: the shards not there are named (or left out when that is fine)
    manifest = json.loads(Path(prechip.manifest_url(made["out"], PLATFORM)).read_text())
    (folder / "prechip_manifest.json").write_text(json.dumps(manifest))
    for url in sorted(made["written"])[:4]:
        shutil.copy(url, folder)
    with pytest.raises(ConfigError, match="6 of the 10 shards"):
        shard_urls(str(tmp_path), PLATFORM)
    assert [Path(u).name for u in shard_urls(str(tmp_path), PLATFORM, allow_missing=True)] == [
        f"shard-{k:06d}.tar.gz" for k in range(4)]
