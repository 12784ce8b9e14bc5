"""bench/gpu_check.py: the tiny run end to end, and the wheels `make gpu-wheels` carries cover what it imports."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PHASES = ["sampling", "dpo_lora", "dpo_full", "grpo"]
# The GPU machine: what its pip would evaluate a requirement's markers against.
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "extra": ""}


@pytest.fixture(scope="module")
def tiny_check(tiny_model_dir, tmp_path_factory):
    """The check as CI runs it: the tiny model and workload on the CPU, in its own process (~30-60 s)."""
    report_file = tmp_path_factory.mktemp("gpu-check") / "report.json"
    command = [sys.executable, "bench/gpu_check.py", "--tiny", "--tokenizer", str(tiny_model_dir)]
    run = subprocess.run([*command, "--json", str(report_file)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout, json.loads(report_file.read_text())


@pytest.mark.slow
def test_the_tiny_check_prints_one_table_of_positive_figures(tiny_check):
    stdout, report = tiny_check
    rows = {cells[0]: cells for cells in table_rows(stdout)}
    assert list(rows) == [*PHASES, "wall time"]
    for phase in PHASES:
        _, workload, dtype, result, seconds, memory, status = rows[phase]
        assert status == "ok" and workload and dtype
        assert re.fullmatch(r"[\d,.]+ (tok/s|steps/s)", result), result
        assert number(result) > 0 and number(seconds) > 0 and number(memory) > 0
    assert number(rows["wall time"][4]) >= sum(number(rows[phase][4]) for phase in PHASES)
    assert [phase["name"] for phase in report["phases"]] == PHASES
    assert all(phase["value"] > 0 and phase["peak_memory_gib"] > 0 for phase in report["phases"])
    assert report["tiny"] and report["model"]["parameters"] > 0


@pytest.mark.slow
def test_the_carried_wheels_and_the_gpu_image_hold_everything_the_check_imports(tiny_check):
    """What the project requires and the check imported, with the requirements of each such package that
    the GPU image lacks (pip installs the carried wheels with --no-deps), is on the image or carried."""
    _, report = tiny_check
    imported = {canonicalize_name(name) for name in report["distributions"]}
    wheels, image = carried_wheels(), image_packages()
    roots = {canonicalize_name(Requirement(text).name) for text in project_dependencies()} & imported
    assert {"trl", "datasets", "duckdb", "pydantic", "transformers"} <= roots  # the check's own needs, seen
    missing, seen, todo = set(), set(), sorted(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in image:
            continue
        seen.add(name)
        if name not in wheels:
            missing.add(name)
        todo.extend(requirements(name))
    assert not missing, f"add to GPU_WHEELS in the Makefile (neither carried nor on the GPU image): {sorted(missing)}"


def test_a_phase_past_its_time_limit_is_stopped_and_recorded(tmp_path):
    gpu_check = load_gpu_check()
    with gpu_check.peak_rss():  # torch and the profiler imported before the clock starts
        gpu_check.release_memory()
    started = time.perf_counter()
    phase = gpu_check.run_phase("stuck", lambda model, out: time.sleep(30), tmp_path, tmp_path / "out", limit_s=1)
    assert time.perf_counter() - started < 10
    assert phase.status == "PhaseTimeout: stopped after its 1 s limit" and phase.value is None
    assert 1 <= phase.seconds < 10 and phase.peak_memory_gib > 0


def test_the_carried_wheels_are_the_versions_this_venv_tests():
    for name, version in carried_wheels().items():
        assert importlib.metadata.version(name) == version, f"Makefile GPU_WHEELS pins {name}=={version}"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # after the header


def number(text: str) -> float:
    return float(text.split()[0].replace(",", ""))


def carried_wheels() -> dict[str, str]:
    """GPU_WHEELS in the Makefile: name -> pinned version."""
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in makefile.splitlines() if line.startswith("GPU_WHEELS :="))
    pins = [pin.split("==") for pin in line.partition(":=")[2].split()]
    return {canonicalize_name(name): version for name, version in pins}


def image_packages() -> set[str]:
    lines = (REPO / "bench" / "gpu_image_packages.txt").read_text().splitlines()
    return {canonicalize_name(line) for line in lines if line.strip() and not line.startswith("#")}


def project_dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def requirements(name: str) -> list[str]:
    """The installed distribution's own requirements that apply on the GPU machine (no extras)."""
    found = []
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(GPU_PYTHON):
            found.append(canonicalize_name(requirement.name))
    return found


@pytest.mark.slow  # its own process: torch, transformers and trl imported anew (13-24 s on 2 slow cores)
@pytest.mark.parametrize("arms", [[], ["--attention"]])
def test_the_decode_profile_runs_its_arms_on_the_tiny_model(tiny_model_dir, tmp_path, arms):
    """bench/gpu_decode_profile.py, which found cuDNN's per-length attention plans on the H200, still runs."""
    report_file = tmp_path / "profile.json"
    command = [sys.executable, "bench/gpu_decode_profile.py", "--tiny", "--tokenizer", str(tiny_model_dir), *arms]
    run = subprocess.run([*command, "--json", str(report_file)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(report_file.read_text())["arms"]
    expected = "cuDNN allowed (default), new lengths" if arms else "decode, top-p 0.95 (the sampler)"
    assert figures[expected]["tok/s"] > 0


@pytest.mark.slow  # its own process, as above: 23.5 s of its own time in one CI run on 2 slow cores
def test_one_phase_runs_alone(tiny_model_dir, tmp_path):
    report_file = tmp_path / "report.json"
    command = [sys.executable, "bench/gpu_check.py", "--tiny", "--tokenizer", str(tiny_model_dir)]
    command += ["--phases", "sampling"]
    run = subprocess.run([*command, "--json", str(report_file)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [phase["name"] for phase in json.loads(report_file.read_text())["phases"]] == ["sampling"]
