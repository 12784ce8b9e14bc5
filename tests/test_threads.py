"""torch's threads from the CPUs this process may use and the ones other processes leave free (common/threads.py),
in generation, training and preflight alike; bench/threads.py measures why."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from tao_pipeline.common import threads
from tao_pipeline.common.threads import CpuSample, ThreadChoice, busy_between, choose_threads, use_torch_threads
from tao_pipeline.generation import SamplingParams, build_generator
from tao_pipeline.generation.transformers_backend import TransformersGenerator
from tao_pipeline.settings import GenerationSettings, ModelSettings, SettingsError, load_settings

FOUR_CPUS = {0, 1, 2, 3}


@pytest.fixture
def four_cpus(monkeypatch, tmp_path) -> Path:
    """A process allowed four CPUs, with no cgroup quota (an empty cgroup folder)."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(FOUR_CPUS), raising=False)
    return tmp_path / "cgroup"


@pytest.fixture
def torch_threads_restored(monkeypatch):
    """torch's thread count and the module's measurement put back as they were."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_unset_choices", {})
    monkeypatch.setattr(threads, "_torch_default", None)
    yield
    torch.set_num_threads(before)


def choose(setting, busy: float, cgroup_root: Path, torch_default: int = 4) -> ThreadChoice:
    return choose_threads(
        setting, "generation.threads", torch_default=torch_default, busy_elsewhere=lambda: busy, cgroup_root=cgroup_root
    )


def test_a_setting_is_used_as_given(four_cpus):
    choice = choose(3, busy=3.5, cgroup_root=four_cpus)
    assert choice == ThreadChoice(3, "generation.threads=3")
    assert choice.metadata() == {"torch_threads": 3, "torch_threads_why": "generation.threads=3"}


@pytest.mark.parametrize(
    ("busy", "expected"),
    [(0.0, 4), (0.2, 4), (0.3, 3), (1.0, 3), (1.1, 3), (1.3, 2), (2.9, 1), (3.9, 1), (40.0, 1)],
)
def test_unset_the_pool_gets_the_cpus_others_leave_free(four_cpus, busy, expected):
    """A CPU another process uses more than a quarter of is taken: a thread queued behind it stalls the pool."""
    choice = choose(None, busy=busy, cgroup_root=four_cpus)
    assert choice.threads == expected
    assert "generation.threads unset" in choice.reason and f"busy on {busy:.2f}" in choice.reason


def test_the_cgroup_quota_and_torchs_default_cap_the_pool(four_cpus):
    four_cpus.mkdir()
    (four_cpus / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs, as Kubernetes' limits.cpu: 1500m sets
    assert choose(None, busy=0.0, cgroup_root=four_cpus).threads == 2
    (four_cpus / "cpu.max").write_text("max 100000\n")
    # torch's own default counts physical cores (or OMP_NUM_THREADS): hyperthreads do not add threads.
    assert choose(None, busy=0.0, cgroup_root=four_cpus, torch_default=2).threads == 2
    assert choose(None, busy=0.0, cgroup_root=four_cpus).threads == 4


def test_busy_elsewhere_leaves_this_processs_own_time_out():
    before = CpuSample(busy=100.0, own=10.0, at=50.0)
    # 0.5 s: the CPUs were busy 0.9 s, 0.4 s of it this process's own threads.
    assert busy_between(before, CpuSample(busy=100.9, own=10.4, at=50.5)) == pytest.approx(1.0)
    assert busy_between(before, CpuSample(busy=100.4, own=10.4, at=50.5)) == pytest.approx(0.0)  # all ours
    assert busy_between(before, CpuSample(busy=100.1, own=10.4, at=50.5)) == 0.0  # counters' rounding: never < 0
    assert busy_between(before, before) == 0.0  # no time passed


def test_a_busy_process_on_our_cpus_is_measured():
    """A real busy loop on this process's CPUs shows as (about) one CPU busy elsewhere."""
    cpus = sorted(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, cpus[:1])
        time.sleep(0.2)
        assert threads.busy_elsewhere(0.5) > 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_niced_processes_take_no_cpu_from_a_process_at_nice_0_but_do_from_a_niced_one():
    """The scheduler gives a nice-0 process its core back at once (a nice-19 process weighs 15 against its 1024):
    their time is not counted as taken, unless this process is niced itself. (A real nice-19 spinner's share
    depends on the machine's other load, so the accounting is checked on the counters.)"""
    times = psutil.cpu_times(percpu=False)._replace(user=10.0, nice=30.0, system=5.0, idle=100.0, iowait=2.0)
    counted = threads._busy_seconds(times, niced_take_cpus=True)
    assert threads._busy_seconds(times, niced_take_cpus=False) == pytest.approx(counted - 30.0)
    assert counted == pytest.approx(sum(times) - 102.0 - times.guest - times.guest_nice)


def test_use_torch_threads_sets_torch_and_measures_at_most_every_few_seconds(monkeypatch, torch_threads_restored):
    measured = []
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: measured.append(1) or 0.0)
    monkeypatch.setattr(threads, "usable_cpus", lambda cgroup_root=None: 1)
    first = use_torch_threads(None, "training.threads")
    second = use_torch_threads(None, "training.threads")
    assert first.threads == second.threads == torch.get_num_threads() == 1
    assert len(measured) == 1  # the second call reused the measurement
    assert use_torch_threads(2, "training.threads").threads == torch.get_num_threads() == 2
    assert len(measured) == 1  # a setting needs no measurement


def test_generation_runs_with_the_setting_and_says_so(tiny_model_dir, torch_threads_restored):
    generator = build_generator(
        tiny_model_dir, "tiny-v0", GenerationSettings(threads=1, batch_size=1), ModelSettings(dtype="float32")
    )
    assert isinstance(generator, TransformersGenerator) and generator.threads == 1
    prompts = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["Hi", "Name a colour."], "system": [None, None]})
    generator.generate(prompts, SamplingParams(2, 4), progress=False)
    assert torch.get_num_threads() == 1
    assert generator.stats.threads_metadata() == {"torch_threads": 1, "torch_threads_why": "generation.threads=1"}


def test_unset_generation_follows_the_load(tiny_model_dir, monkeypatch, torch_threads_restored):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    generator = TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2)
    prompts = pd.DataFrame({"prompt_id": ["a"], "prompt": ["Hi"], "system": [None]})
    generator.generate(prompts, SamplingParams(2, 4), progress=False)
    metadata = generator.stats.threads_metadata()
    assert metadata["torch_threads"] == torch.get_num_threads() >= 1
    assert metadata["torch_threads_why"].startswith("generation.threads unset:")


@pytest.mark.parametrize("value", ["0", "-1", "1025", "1.5", "'two'"])
def test_a_bad_thread_count_fails_at_load(value):
    for section in ("generation", "training"):
        with pytest.raises(SettingsError, match=rf"'{section}\.threads'") as error:
            load_settings(overrides=[f"{section}.threads={value}"])
        assert "\n" not in str(error.value)


def test_the_count_is_set_in_the_thread_that_calls(monkeypatch, torch_threads_restored):
    """OpenMP keeps the count per thread: a model run in a worker thread needs the call in that thread."""
    import threading

    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    seen = []

    def worker():
        torch.add(torch.ones(1 << 16), 1)  # the thread's own pool exists now
        use_torch_threads(1, "serve.threads")
        seen.append(torch.get_num_threads())

    runner = threading.Thread(target=worker)
    runner.start()
    runner.join()
    assert seen == [1]
