"""The exit-status contract of every console script (stacchip/console.py, docs/how-to/exit-codes.md).

0 done; 1 worth retrying (storage, network, a service); 2 bad input or configuration, one line on
stderr naming what was wrong, the traceback only with -v. Each script runs as a subprocess, as a
scheduler runs it; retryable failures come from a closed loopback port with retries turned down.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shapely.geometry import box

from stacchip import console
from stacchip.errors import (
    AssetReadError,
    ConfigError,
    IndexFileError,
    ServiceError,
    StorageError,
    StorageNotFoundError,
)
from stacchip.processors import prechip
from tests.processors_support import write_samples
from tests.services import free_port
from tests.builders import PRECHIP_PLATFORM as PLATFORM
from tests.builders import build_prechip_scenes as build_scenes

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300

#: (console script, module) of the six source processors.
PROCESSORS = [
    ("stacchip-sentinel-2", "stacchip.processors.sentinel_2_processor"),
    ("stacchip-landsat", "stacchip.processors.landsat_processor"),
    ("stacchip-naip", "stacchip.processors.naip_processor"),
    ("stacchip-linz", "stacchip.processors.linz_processor"),
    ("stacchip-sentinel-1", "stacchip.processors.sentinel_1_processor"),
    ("stacchip-modis", "stacchip.processors.modis_processor"),
]
#: Processors that search a STAC API, and whether they read a sample file.
STAC_PROCESSORS = {
    "stacchip-sentinel-2": True, "stacchip-landsat": True, "stacchip-naip": True,
    "stacchip-sentinel-1": True, "stacchip-modis": False,
}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a scheduled run: this tree importable, no stacchip settings or task
    index inherited, loopback without proxies, S3 and HTTP retries turned down."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STACCHIP_", "AWS_")) and k not in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update({
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1", "STACCHIP_RETRIES": "1",
        "GDAL_HTTP_MAX_RETRY": "0", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def run(module: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], env=_env(env), cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def closed_endpoint() -> dict[str, str]:
    """S3 endpoint on a loopback port nothing listens on."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}


def error_line(proc: subprocess.CompletedProcess[str], code: int, prog: str, *names: str,
               alone: bool = True) -> str:
    """Check the contract of a failed run; returns its error line.

    ``alone``: stderr holds nothing but that line (errors found before any work); otherwise
    progress logs may precede it, but it is the last line and the only one of ``prog``.
    """
    detail = f"rc={proc.returncode}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == code, detail
    assert "Traceback" not in proc.stderr, detail
    lines = proc.stderr.strip().splitlines()
    assert lines, detail
    last = lines[-1]
    assert last.startswith(f"{prog}: "), detail
    assert [ln for ln in lines if ln.startswith(f"{prog}: ")] == [last], detail
    if alone:
        assert len(lines) == 1, detail
    for name in names:
        assert name in last, (name, last)
    return last


def with_traceback(proc: subprocess.CompletedProcess[str], code: int, prog: str, *names: str) -> None:
    """The same failure under -v: same status, the traceback, then the same error line."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: ") and all(n in last for n in names), last


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three small Sentinel-2 scenes in the bucket layout with their indexes (75 chips)."""
    return build_scenes(tmp_path_factory.mktemp("exit-scenes"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_samples(tmp_path_factory.mktemp("samples") / "samples.geojson",
                         [{"name": "20HNJ", "geometry": box(-63, -34, -62, -33)}])


def _prechip_args(scenes: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return ["--data", scenes["data"], "--indexpath", scenes["index"], "--chips", str(out), *extra]


# --- classification (real exception chains, no command) --------------------------------------------


def _raised(outer: type[Exception], message: str, cause: BaseException) -> Exception:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer(message) from inner
    except Exception as exc:  # noqa: BLE001
        return exc


def test_innermost_cause_decides_the_status() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "ListObjectsV2")

    def via_storage(cause: BaseException) -> Exception:
        return _raised(IndexFileError, "cannot list index files under 's3://b/i'",
                       _raised(StorageError, "cannot list 's3://b/i'", cause))

    cases = [
        (IndexFileError("no .parquet index files under 'x'"), 2),
        (ConfigError("--seed=-1 must be >= 0"), 2),
        (via_storage(EndpointConnectionError(endpoint_url="http://127.0.0.1:9")), 1),
        (via_storage(client_error(503, "SlowDown")), 1),
        (via_storage(client_error(403, "AccessDenied")), 2),
        (via_storage(NoCredentialsError()), 2),
        (_raised(IndexFileError, "cannot list", StorageNotFoundError("cannot list '/x': no such directory")), 2),
        (_raised(StorageError, "cannot write '/ro/x'", PermissionError(13, "Permission denied")), 2),
        (_raised(ConfigError, "cannot list cubes", StorageError("disk on fire")), 1),
        (AssetReadError("cannot read href 's3://b/x.tif'"), 1),
        (ServiceError("STAC API 'http://127.0.0.1:9' is unreachable"), 1),
        (ConnectionRefusedError(111, "Connection refused"), 1),
        (FileNotFoundError(2, "No such file or directory", "/nope"), 2),
    ]
    for exc, code in cases:
        verdict = console.classify(exc)
        assert (verdict.code, verdict.expected) == (code, True), (exc, exc.__cause__, verdict)
    bug = console.classify(ValueError("expected non-negative integer"))
    assert (bug.code, bug.expected) == (1, False)
    assert console.classify(KeyboardInterrupt()).code == 130


def test_error_text_is_one_line() -> None:
    assert console.message(IndexFileError("cannot read index 'x':\n  Invalid: magic bytes\n")) == \
        "cannot read index 'x': Invalid: magic bytes"
    assert console.message(ValueError("bad")) == "ValueError: bad"


# --- the CLI on top: no library module imports it, `stacchip index` loads no ml/processors ------------


def test_no_library_module_imports_the_cli() -> None:
    offenders = []
    for path in sorted((REPO / "stacchip").rglob("*.py")):
        if path == REPO / "stacchip" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "stacchip.cli" or n.startswith("stacchip.cli.") for n in names):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
    from stacchip import cli

    assert cli.echo is console.echo  # the old import path keeps working


@pytest.mark.parametrize("argv", [["index", "--help"], ["chip", "--help"], ["--help"]])
def test_cli_help_loads_no_ml_or_processors(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from stacchip.cli import main\n"
        f"status = main({argv!r})\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('stacchip.ml', 'stacchip.processors')))\n"
        "print('STATUS', status); print('LOADED', loaded)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STATUS 0" in proc.stdout and "usage: stacchip" in proc.stdout
    assert "LOADED []" in proc.stdout, proc.stdout[-2000:]


def test_lazy_subcommands_keep_their_flags() -> None:
    proc = run("stacchip.cli", "croissant", "--help")
    assert proc.returncode == 0 and "--rai-data-collection" in proc.stdout, proc.stderr[-2000:]
    proc = run("stacchip.cli", "preview", "--color-by", "sunshine", "x.parquet")
    error_line(proc, 2, "stacchip preview", "--color-by", "sunshine")


# --- stacchip -------------------------------------------------------------------------------------------


def test_stacchip_demo_succeeds(tmp_path: Path) -> None:
    proc = run("stacchip.cli", "demo", "--dir", str(tmp_path / "demo"), "--size", "300", "--chip-size", "128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chip grid:    2 x 2" in proc.stdout
    assert len(list((tmp_path / "demo").glob("index_*.parquet"))) == 1


@pytest.mark.parametrize("args,prog,names", [
    (["chip", "/nonexistent/index", "--chipid", "a-0-0", "--out", "c.npz"], "stacchip chip", ["/nonexistent/index"]),
    (["index", "item.json", "--out", "i.parquet", "--chip-size", "70000"], "stacchip index", ["--chip-size", "70000"]),
    (["index", "item.json", "--out", "i.parquet", "--chip-size", "0"], "stacchip index", ["--chip-size"]),
    (["index", "item.json", "--out", "i.parquet", "--max-nodata", "nan"], "stacchip index", ["--max-nodata"]),
    (["index", "item.json", "--out", "i.parquet", "--chip-size", "big"], "stacchip index", ["--chip-size", "big"]),
    (["index", "/nonexistent/item.json", "--out", "i.parquet"], "stacchip index", ["/nonexistent/item.json"]),
    (["demo", "--chip-size", "-1"], "stacchip demo", ["--chip-size"]),
    (["dance"], "stacchip", ["dance"]),
])
def test_stacchip_bad_input_exits_2(args: list[str], prog: str, names: list[str], tmp_path: Path) -> None:
    error_line(run("stacchip.cli", *args, cwd=tmp_path), 2, prog, *names)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_stacchip_unreachable_s3_exits_1(tmp_path: Path) -> None:
    args = ["chip", "s3://corpus/index/", "--chipid", "a-0-0", "--out", str(tmp_path / "c.npz")]
    error_line(run("stacchip.cli", *args, env=closed_endpoint()), 1, "stacchip chip", "s3://corpus/index/")
    with_traceback(run("stacchip.cli", *args, "-v", env=closed_endpoint()), 1, "stacchip chip", "s3://corpus/index/")


def test_stacchip_verbose_shows_the_traceback(tmp_path: Path) -> None:
    for args in (["-v", "chip", "/nonexistent/index", "--chipid", "a-0-0", "--out", "c.npz"],
                 ["chip", "/nonexistent/index", "--chipid", "a-0-0", "--out", "c.npz", "-v"]):
        with_traceback(run("stacchip.cli", *args, cwd=tmp_path), 2, "stacchip chip", "/nonexistent/index")


# --- the six processors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prog,module", PROCESSORS)
def test_processor_help_succeeds(prog: str, module: str) -> None:
    proc = run(module, "--help")
    assert proc.returncode == 0 and f"usage: {prog}" in proc.stdout, proc.stderr[-2000:]


def _processor_args(prog: str, samples: Path, out: Path) -> list[str]:
    args = ["--bucket", str(out), "--index", "0"]
    if STAC_PROCESSORS.get(prog):
        args += ["--sample-source", str(samples)]
    if prog == "stacchip-linz":
        args += ["--root", "s3://nz-imagery", "--prefixes", str(samples)]
    return args


@pytest.mark.parametrize("prog,module", PROCESSORS)
def test_processor_bad_configuration_exits_2(prog: str, module: str, samples: Path, tmp_path: Path) -> None:
    error_line(run(module, "--index", "0"), 2, prog, "STACCHIP_BUCKET")
    args = _processor_args(prog, samples, tmp_path / "out")
    error_line(run(module, *args, "--chip-size", "70000"), 2, prog, "--chip-size", "70000")
    error_line(run(module, *args, "--chip-max-nodata", "nan"), 2, prog, "--chip-max-nodata")
    error_line(run(module, *args, "--workers", "0"), 2, prog, "--workers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prog,module", PROCESSORS)
def test_processor_unreachable_service_exits_1(prog: str, module: str, samples: Path, tmp_path: Path) -> None:
    """STAC API (or, for LINZ, the S3 catalog) on a closed loopback port: the task fails, worth retrying."""
    args = _processor_args(prog, samples, tmp_path / "out")
    port = free_port()
    if prog == "stacchip-linz":
        prefixes = tmp_path / "prefixes.txt"
        prefixes.write_text("testregion/testregion_2023_0.1m/\n")
        args[args.index("--prefixes") + 1] = str(prefixes)
        env, names = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}, ["task 0 failed", "s3://nz-imagery"]
    else:
        args += ["--stac-api", f"http://127.0.0.1:{port}/"]
        env, names = {}, ["task 0 failed", f"127.0.0.1:{port}"]
    error_line(run(module, *args, "-q", env=env), 1, prog, *names, alone=False)
    if prog in ("stacchip-sentinel-2", "stacchip-linz"):
        with_traceback(run(module, *args, "-v", env=env), 1, prog, *names)


def test_processor_by_source_name_is_named_after_its_script(samples: Path, tmp_path: Path) -> None:
    proc = run("stacchip.processors", "naip", "--bucket", str(tmp_path), "--sample-source", str(samples),
               "--index", "0", "--chip-size", "0")
    error_line(proc, 2, "stacchip-naip", "--chip-size")


# --- stacchip-prechip ----------------------------------------------------------------------------------------


def test_prechip_succeeds(scenes: dict[str, Any], tmp_path: Path) -> None:
    args = _prechip_args(scenes, tmp_path, "--platform", PLATFORM, "--cube-size", "16", "--max-nodata", "none",
                         "--all", "-q")
    proc = run("stacchip.processors.prechip", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cubes = sorted(p.name for p in (tmp_path / prechip.VERSION / PLATFORM).glob("cube_*.npz"))
    assert cubes == [f"cube_{k}.npz" for k in range(75 // 16)]


@pytest.mark.parametrize("extra,names", [
    (["--all", "--platform", "landsat-c2l2-sr"], ["landsat-c2l2-sr", "75 rows", PLATFORM]),
    (["--all", "--platform", "no-such-platform"], ["no-such-platform"]),
    (["--all", "--max-nodata", "0", "--max-cloud", "0", "--cube-size", "1000"],
     ["75 rows read", "--max-nodata 0 kept", "--max-cloud 0 kept", "--cube-size", "--partial"]),
    (["--all", "--seed", "-1"], ["--seed"]),
    (["--all", "--cube-size", "0"], ["--cube-size"]),
    (["--all", "--workers", "0"], ["--workers"]),
    (["--all", "--compress-level", "12"], ["compression level", "12"]),
    (["--all", "--max-nodata", "nan"], ["--max-nodata"]),
    (["--all", "--seed", "many"], ["--seed", "many"]),
])
def test_prechip_bad_input_exits_2(extra: list[str], names: list[str], scenes: dict[str, Any], tmp_path: Path) -> None:
    error_line(run("stacchip.processors.prechip", *_prechip_args(scenes, tmp_path / "out", *extra, "-q")),
               2, "stacchip-prechip", *names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["global", "locality"])
def test_prechip_task_beyond_the_work_exits_0_with_one_warning(mode: str, scenes: dict[str, Any],
                                                               tmp_path: Path) -> None:
    """An array sized by the user may be larger than the work: a task whose share is empty has
    done its job (exit 0, one warning line, nothing of its own written)."""
    args = _prechip_args(scenes, tmp_path / "out", "--index", "5", "--cube-size", "8", "--max-nodata", "none",
                         "--mode", mode, "--items-per-job", "2", "-q")
    proc = run("stacchip.processors.prechip", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "task 5: nothing to do" in lines[0], lines
    assert not list((tmp_path / "out").rglob("cube_*.npz"))
    # the same array's task 0 makes cubes (and finds the plan task 5 made)
    proc = run("stacchip.processors.prechip", *[a if a != "5" else "0" for a in args])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert list((tmp_path / "out").rglob("cube_*.npz"))


def test_prechip_unusable_index_exits_2(scenes: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    proc = run("stacchip.processors.prechip", "--data", scenes["data"], "--indexpath", str(missing),
               "--chips", str(tmp_path / "out"), "--all", "-q")
    error_line(proc, 2, "stacchip-prechip", str(missing))
    with_traceback(run("stacchip.processors.prechip", "--data", scenes["data"], "--indexpath", str(missing),
                       "--chips", str(tmp_path / "out"), "--all", "-v"), 2, "stacchip-prechip", str(missing))
    junk = tmp_path / "junk"
    junk.mkdir()
    pq.write_table(pa.table({"a": [1, 2, 3]}), junk / "not_an_index.parquet")
    proc = run("stacchip.processors.prechip", "--data", scenes["data"], "--indexpath", str(junk),
               "--chips", str(tmp_path / "out"), "--all", "-q")
    # open_index names the file that is no index and what it lacks, before any selection
    error_line(proc, 2, "stacchip-prechip", str(junk / "not_an_index.parquet"), "not an index table", "chipid")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_prechip_allow_empty(how: str, scenes: dict[str, Any], tmp_path: Path) -> None:
    args = _prechip_args(scenes, tmp_path / "out", "--all", "--platform", "landsat-c2l2-sr", "-q")
    proc = run("stacchip.processors.prechip", *args, *(["--allow-empty"] if how == "flag" else []),
               env={"STACCHIP_ALLOW_EMPTY": "1"} if how == "env" else None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "landsat-c2l2-sr" in proc.stderr  # still says why nothing was done
    assert not (tmp_path / "out").exists()


def test_prechip_unreachable_s3_exits_1(scenes: dict[str, Any], tmp_path: Path) -> None:
    proc = run("stacchip.processors.prechip", "--data", "s3://corpus", "--indexpath", "s3://corpus/index/",
               "--chips", str(tmp_path / "out"), "--all", "-q", env=closed_endpoint())
    error_line(proc, 1, "stacchip-prechip", "s3://corpus/index/")


# --- stacchip-stats ----------------------------------------------------------------------------------------------


def _stats_args(scenes: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return ["--source", "index", "--data", scenes["data"], "--indexpath", scenes["index"], "--output", str(out),
            "--platform", PLATFORM, *extra]


def test_stats_succeeds(scenes: dict[str, Any], tmp_path: Path) -> None:
    proc = run("stacchip.processors.stats", *_stats_args(scenes, tmp_path, "--all", "--chips-per-job", "40", "-q"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "stats" / PLATFORM / "stats.json").read_text())
    assert result["partials"] == 2 and result["bands"]["red"]["count"] > 0


@pytest.mark.parametrize("extra,names", [
    (["--all", "--bins", "0", "--percentiles", "50"], ["--bins"]),
    (["--all", "--bins", "-5"], ["--bins"]),
    (["--all", "--hist-range", "0,inf", "--percentiles", "50"], ["--hist-range", "0,inf"]),
    (["--all", "--hist-range", "5,1", "--percentiles", "50"], ["--hist-range", "5,1"]),
    (["--all", "--seed", "-1"], ["--seed"]),
    (["--all", "--percentiles", "150"], ["150"]),
    (["--all", "--max-nodata", "0", "--max-cloud", "0", "--platform", "naip"], ["'naip'", "75 rows", PLATFORM]),
    (["--all", "--cubes-per-job", "0"], ["--cubes-per-job"]),
])
def test_stats_bad_input_exits_2(extra: list[str], names: list[str], scenes: dict[str, Any], tmp_path: Path) -> None:
    args = _stats_args(scenes, tmp_path / "out", "-q")
    if "--platform" in extra:  # replace the default platform
        i = args.index("--platform")
        del args[i:i + 2]
    error_line(run("stacchip.processors.stats", *args, *extra), 2, "stacchip-stats", *names)
    assert not (tmp_path / "out").exists()


def test_stats_job_beyond_the_work_exits_0_with_one_warning(scenes: dict[str, Any], tmp_path: Path) -> None:
    proc = run("stacchip.processors.stats", *_stats_args(scenes, tmp_path / "out", "--index", "4", "-q"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "job 4: nothing to do" in lines[0], lines
    assert not list((tmp_path / "out").rglob("partial_*.json"))


def test_stats_unusable_index_and_empty_cubes_exit_2(scenes: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    proc = run("stacchip.processors.stats", "--source", "index", "--data", scenes["data"], "--indexpath",
               str(missing), "--output", str(tmp_path / "out"), "--platform", PLATFORM, "--all", "-q")
    error_line(proc, 2, "stacchip-stats", str(missing))
    cubes = tmp_path / "cubes" / prechip.VERSION / PLATFORM
    cubes.mkdir(parents=True)
    args = ["--chips", str(tmp_path / "cubes"), "--platform", PLATFORM, "--all", "-q"]
    error_line(run("stacchip.processors.stats", *args), 2, "stacchip-stats", str(cubes))
    proc = run("stacchip.processors.stats", *args, "--allow-empty")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "cubes" / "stats").exists()


def test_stats_unreachable_s3_exits_1(tmp_path: Path) -> None:
    args = ["--chips", "s3://cubes", "--platform", PLATFORM, "--all", "-q"]
    error_line(run("stacchip.processors.stats", *args, env=closed_endpoint()), 1, "stacchip-stats", "s3://cubes")
    with_traceback(run("stacchip.processors.stats", *args[:-1], "-v", env=closed_endpoint()), 1,
                   "stacchip-stats", "s3://cubes")


# --- installed entry points (the scripts pip wrote) -------------------------------------------------------------


@pytest.mark.parametrize("script", ["stacchip", "stacchip-prechip", "stacchip-stats", *[p for p, _ in PROCESSORS]])
def test_entry_points_keep_the_contract(script: str, tmp_path: Path) -> None:
    path = shutil.which(script)
    if path is None:
        pytest.skip(f"{script} is not installed on PATH (pip install -e .)")
    help_run = subprocess.run([path, "--help"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)
    assert help_run.returncode == 0 and "usage:" in help_run.stdout, help_run.stderr[-2000:]
    args = ["chip", str(tmp_path / "nonexistent"), "--chipid", "a-0-0", "--out", "c.npz"] if script == "stacchip" \
        else ["--index", "0"]
    proc = subprocess.run([path, *args], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    error_line(proc, 2, "stacchip chip" if script == "stacchip" else script)
