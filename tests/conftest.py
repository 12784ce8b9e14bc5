"""Shared fixtures (a tiny random llama, no download; the embedded model converted once; small-round
settings in isolated homes) and the test run's own rules: the hypothesis profiles, the number of xdist
workers, the long tests first, the time budget of a test not marked slow (tests/time_budget.py) and
the fuzzing summary line."""

from __future__ import annotations

import fcntl
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import FUZZ_CASES, FUZZ_FULL, FUZZ_SMALL, build_tiny_model, fuzz_scale, write_tiny_config

pytest_plugins = ["tests.time_budget"]  # the time budget of a test not marked slow

FUZZ_MODES = ("small", "full")  # TAO_FUZZ: small (unset) on every run, full in `make test-full`
_FUZZ_SETTINGS = {
    "deadline": None,  # a case's time depends on the machine's load, not on the code
    "database": None,  # no .hypothesis/ folder shared between xdist workers and runs
    "print_blob": True,  # a failure prints the @reproduce_failure line that replays it
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
}


def pytest_configure(config: pytest.Config) -> None:
    mode = os.environ.get("TAO_FUZZ") or "small"
    if mode not in FUZZ_MODES:
        raise pytest.UsageError(f"TAO_FUZZ={mode!r}: use 'full' (each property's full size) or leave it unset")
    try:
        scale = fuzz_scale()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    settings.register_profile("small", max_examples=max(1, round(FUZZ_SMALL * scale)), **_FUZZ_SETTINGS)
    settings.register_profile("full", max_examples=max(1, round(FUZZ_FULL * scale)), **_FUZZ_SETTINGS)
    settings.load_profile(mode)
    budget = config.pluginmanager.get_plugin("tests.time_budget")
    config.stash[budget.FUZZ_SCALED_UP] = mode == "full" or scale > 1  # property tests then run long on purpose


LONG_MARKERS = ("slow", "ui")  # minutes each (`minutes=` says how many): started first, longest first


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (--dist loadscope: a module's tests, or a class's, are one unit on one worker, so its
    module-scoped fixtures are built once): the long units first, longest first. xdist hands each worker
    one unit, then one more to queue behind it: those queued ones are short, so that no worker holds two
    long units while another runs dry. pytest-randomly shuffled before this (in its hook wrapper): the
    order is otherwise its random one."""
    worker = getattr(config, "workerinput", None)
    if worker is None:
        return
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(item.nodeid.rsplit("::", 1)[0], []).append(item)  # xdist's loadscope unit
    long_units = sorted((unit for unit in units.values() if _minutes(unit)), key=_minutes, reverse=True)
    short_units = [unit for unit in units.values() if not _minutes(unit)]
    workers = int(worker["workercount"])
    ordered = long_units[:workers] + short_units[:workers] + long_units[workers:] + short_units[workers:]
    items[:] = [item for unit in ordered for item in unit]


def _minutes(unit: list[pytest.Item]) -> float:
    """The unit's expected minutes from its tests' slow/ui marks (1 each unless they say), 0 if none is long."""
    total = 0.0
    for item in unit:
        mark = next((item.get_closest_marker(name) for name in LONG_MARKERS if item.get_closest_marker(name)), None)
        total += float(mark.kwargs.get("minutes", 1)) if mark is not None else 0.0
    return total


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per CPU this run may use (affinity mask and cgroup quota), not per core, and one
    more: many tests wait on servers, a daemon or a browser, and the extra worker runs on the CPU they leave
    idle (on 2 cores, 2026-12-04: 760 s with 2 workers, 637 s with 3, 670 s with 4). Each worker's torch
    sizes its pool to the CPUs the others leave free (common/threads.use_torch_threads)."""
    from tao_pipeline.common.threads import usable_cpus

    return usable_cpus() + 1


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """How many hypothesis cases ran, by kind, added up over every test (and every xdist worker)."""
    cases: Counter[str] = Counter()
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "teardown":  # it has every property the test recorded
                for name, value in getattr(report, "user_properties", ()):
                    if name == FUZZ_CASES:
                        kind, count = value
                        cases[kind] += count
    if cases:
        detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(cases.items()))
        profile = os.environ.get("TAO_FUZZ") or "small"
        hint = "" if profile == "full" else "; TAO_FUZZ=full (`make test-full`) runs each property's full size"
        terminalreporter.write_line(f"hypothesis: {cases.total()} cases ran, profile {profile} ({detail}){hint}")


@pytest.fixture(autouse=True)
def _no_dagster_home_from_elsewhere(monkeypatch):
    """Each test starts without DAGSTER_HOME: not the developer's own instance, and not the one a round run
    earlier in the same process (or xdist worker) pointed it at (run_round sets it for the process, as
    `tao round` must). Restored after the test."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded_model_dir(request, tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M converted to safetensors once and kept in pytest's cache folder
    (.pytest_cache/d/embedded-model), read-only for the tests that use it: a fresh clone (CI) converts it
    on its first run, later runs reuse it. A lock file keeps two runs from converting it at once."""
    from tao_pipeline.registry.embedded import EMBEDDED_NAME, convert_embedded_model

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: then this run's own folder
    folder = cache.mkdir("embedded-model") if cache is not None else tmp_path_factory.mktemp("embedded-model")
    model = folder / EMBEDDED_NAME
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (model / "model.safetensors").is_file():
            convert_embedded_model(model, log=lambda line: None)
    return model


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir) -> Path:
    """A settings file for a small round on the tiny model, in an isolated home folder."""
    return write_tiny_config(tmp_path, tiny_model_dir)
