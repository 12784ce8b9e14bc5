"""What a round cost: the meter, the stage_costs table, money, cost per point of gain, and a tiny round end to end."""

from __future__ import annotations

import contextvars
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import pandas as pd
import psutil
import pytest

from tao_pipeline.common.profiling import StageMeter, record_usage
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.stage_costs import STAGE_COSTS_TABLE, StageCost, read_stage_costs, record_stage_cost
from tao_pipeline.evaluation import Verdict
from tao_pipeline.evaluation.round_cost import SECTION, add_cost_section, gain_of, round_cost, versions_with_costs
from tao_pipeline.generation import GenerationCache, SamplingParams, lazy_generator
from tao_pipeline.registry import ModelStore
from tao_pipeline.scoring.base import PromptContext
from tao_pipeline.scoring.judge import LLMJudgeScorer
from tao_pipeline.settings import CostSettings, TaoSettings, load_settings
from tests.helpers import three_prompts, write_tiny_config
from tests.judge_server import FakeJudgeServer, openai_judge

CONTEXT = PromptContext("Name a colour. Answer with one word.", "short_answer", "You are a concise assistant.")
BURN = "import time\nstart = time.process_time()\nwhile time.process_time() - start < {seconds}: pass\n"
HEAVY_STAGES = {
    "preflight",
    "candidate_responses",
    "response_scores",
    "tuned_checkpoint",
    "control_checkpoint",
    "checkpoint_evaluation",
}


def burn_cpu(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


# -- the meter ------------------------------------------------------------------------------


def test_meter_counts_cpu_of_this_process_and_its_subprocesses_and_no_gpu_on_cpu():
    with StageMeter() as meter:
        burn_cpu(0.3)
        subprocess.run([sys.executable, "-c", BURN.format(seconds=0.3)], check=True)  # waited for
        # Still running when the block ends (a vLLM engine core, a sandbox): counted up to then.
        running = subprocess.Popen(
            [sys.executable, "-c", BURN.format(seconds=0.3) + "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        while sum(psutil.Process(running.pid).cpu_times()[:2]) < 0.3:  # user + system, as process_time()
            time.sleep(0.02)
    running.communicate(b"")
    assert 0.9 <= meter.cpu_seconds <= meter.seconds * psutil.cpu_count() + 0.5
    assert meter.gpu_seconds == 0.0
    assert meter.metadata().keys() == {"peak_rss_mb", "stage_seconds"}  # PeakMemory's keys, unchanged


def test_meter_leaves_out_cpu_spent_before_it_opened():
    burn_cpu(0.3)
    with StageMeter() as meter:
        time.sleep(0.2)
    assert meter.cpu_seconds < 0.15


def test_usage_reaches_every_meter_open_in_the_context_and_nothing_else():
    record_usage(generated_tokens=5)  # no meter open: nowhere to go
    with StageMeter() as outer:
        with StageMeter() as inner:
            record_usage(generated_tokens=7, judge_calls=1)
        record_usage(judge_prompt_tokens=3)
        with ThreadPoolExecutor(2) as pool:
            pool.submit(contextvars.copy_context().run, record_usage, judge_completion_tokens=2).result()
        stray = threading.Thread(target=record_usage, kwargs={"generated_tokens": 100})  # a fresh context
        stray.start()
        stray.join()
    assert inner.usage.as_dict() == {
        "generated_tokens": 7,
        "judge_calls": 1,
        "judge_prompt_tokens": 0,
        "judge_completion_tokens": 0,
    }
    assert outer.usage.as_dict() == {
        "generated_tokens": 7,
        "judge_calls": 1,
        "judge_prompt_tokens": 3,
        "judge_completion_tokens": 2,
    }


# -- the stage_costs table, money, gain ---------------------------------------------------------


def test_stage_costs_are_read_back_per_round_without_mixing_rounds(tmp_path):
    lake = Lake(tmp_path)
    record_stage_cost(lake, "round-0001", StageCost("candidate_responses", generated_tokens=10, cpu_seconds=1.5))
    record_stage_cost(lake, "round-0001", StageCost("response_scores", judge_calls=4, judge_prompt_tokens=40))
    record_stage_cost(lake, "round-00010", StageCost("candidate_responses", generated_tokens=999))
    record_stage_cost(lake, "round-0001", StageCost("candidate_responses", generated_tokens=12))  # materialized again
    first = {cost.stage: cost for cost in read_stage_costs(lake, "round-0001")}
    assert first == {
        "candidate_responses": StageCost("candidate_responses", generated_tokens=12),
        "response_scores": StageCost("response_scores", judge_calls=4, judge_prompt_tokens=40),
    }
    assert read_stage_costs(lake, "round-00010") == [StageCost("candidate_responses", generated_tokens=999)]
    assert read_stage_costs(lake, "round-0002") == []
    assert type(first["candidate_responses"].generated_tokens) is int  # not numpy's: JSON-serializable
    assert len(lake.query(f"SELECT * FROM {STAGE_COSTS_TABLE} WHERE round = 'round-0001'")) == 2


def test_money_only_when_a_price_is_set_summed_over_what_is_priced():
    tokens = {"generated_tokens": 2000, "judge_prompt_tokens": 1000, "judge_completion_tokens": 500}
    cost = StageCost("x", **tokens, cpu_seconds=7200.0, gpu_seconds=1800.0)
    assert cost.money(CostSettings()) is None
    assert cost.money(CostSettings(per_cpu_hour=0.05)) == pytest.approx(2 * 0.05)
    everything = CostSettings(
        per_1k_generated_tokens=0.5,
        per_1k_judge_prompt_tokens=1.0,
        per_1k_judge_completion_tokens=2.0,
        per_cpu_hour=0.05,
        per_gpu_hour=4.0,
    )
    assert cost.money(everything) == pytest.approx(2 * 0.5 + 1 * 1.0 + 0.5 * 2.0 + 2 * 0.05 + 0.5 * 4.0)
    assert TaoSettings().costs == CostSettings()  # no prices by default


def verdict(win_rate: float, champion: float | None = None, challenger: float | None = None) -> Verdict:
    return Verdict(False, win_rate, champion, challenger, 1.0, "test", heldout=20)


def test_cost_per_point_of_gain_uses_labeled_accuracy_else_the_win_rate_and_is_na_without_gain(tmp_path):
    lake = Lake(tmp_path / "lake")
    record_stage_cost(lake, "r1", StageCost("candidate_responses", generated_tokens=5000, cpu_seconds=3600.0))
    record_stage_cost(lake, "r1", StageCost("checkpoint_evaluation", generated_tokens=1000, cpu_seconds=360.0))
    prices = CostSettings(per_cpu_hour=1.0, currency="EUR")

    labeled = round_cost(lake, "r1", verdict(0.9, champion=0.40, challenger=0.50), prices)
    assert labeled.gain.basis == "labeled accuracy" and labeled.gain.points == pytest.approx(10.0)
    assert labeled.money == pytest.approx(1.1)
    per_point = labeled.per_point()
    assert per_point["generated_tokens"] == pytest.approx(600.0) and per_point["money"] == pytest.approx(0.11)
    assert "0.1100 EUR" in labeled.per_point_text()
    assert list(labeled.table()["stage"]) == ["candidate_responses", "checkpoint_evaluation", "total"]

    unlabeled = round_cost(lake, "r1", verdict(0.6), CostSettings())
    assert unlabeled.gain.points == pytest.approx(10.0) and unlabeled.money is None
    assert "money" not in unlabeled.per_point() and "money (" not in " ".join(unlabeled.table().columns)

    for no_gain in (verdict(0.9, champion=0.5, challenger=0.45), verdict(0.5), verdict(float("nan"))):
        cost = round_cost(lake, "r1", no_gain, prices)
        assert cost.per_point() is None and cost.per_point_text().startswith("n/a: no gain")
    assert gain_of(verdict(float("nan"))).points is None


def test_the_cost_section_is_appended_to_the_report_once(tmp_path):
    lake = Lake(tmp_path / "lake")
    record_stage_cost(lake, "r1", StageCost("response_scores", judge_calls=3))
    report = tmp_path / "report.md"
    report.write_text("# TAO r1\n\nthe verdict\n")
    cost = round_cost(lake, "r1", verdict(0.75), CostSettings())
    add_cost_section(report, cost)
    add_cost_section(report, cost)  # the evaluation materialized again
    text = report.read_text()
    assert text.startswith("# TAO r1\n\nthe verdict\n") and text.count(SECTION) == 1
    assert "| response_scores |" in text and "+25.0 points of win rate above 0.5" in text


# -- where tokens and judge calls are counted ------------------------------------------------------


def usage_reply(body: dict, headers: dict) -> tuple[int, str]:
    completion = {
        "id": "cmpl-test",
        "object": "chat.completion",
        "model": "judge-test",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Score: 7"}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }
    return 200, json.dumps(completion)


def test_openai_judge_counts_the_calls_it_makes_and_not_its_cache_hits(tmp_path):
    server = FakeJudgeServer(usage_reply)
    try:
        with StageMeter() as first:
            openai_judge(server, tmp_path / "judge").score_group(CONTEXT, ["Blue", "Green", "Red"])  # 3 in parallel
        with StageMeter() as again:
            openai_judge(server, tmp_path / "judge").score_group(CONTEXT, ["Blue", "Green", "Red", "Pink"])
    finally:
        server.close()
    assert len(server.requests) == 4
    assert first.usage.as_dict() == {
        "generated_tokens": 0,
        "judge_calls": 3,
        "judge_prompt_tokens": 33,
        "judge_completion_tokens": 9,
    }
    assert (again.usage.judge_calls, again.usage.judge_prompt_tokens) == (1, 11)  # "Pink" only


def test_local_judge_counts_its_tokens_as_judge_tokens_not_generated_ones(tiny_model_dir, tmp_path):
    def judge() -> LLMJudgeScorer:
        return LLMJudgeScorer(model=str(tiny_model_dir), cache_dir=str(tmp_path), max_new_tokens=4, dtype="float32")

    with StageMeter() as first:
        judge().score_group(CONTEXT, ["Blue", "Green"])
    with StageMeter() as cached:
        judge().score_group(CONTEXT, ["Blue", "Green"])
    usage = first.usage
    assert usage.judge_calls == 2 and usage.judge_prompt_tokens > 2 * 20 and 2 <= usage.judge_completion_tokens <= 8
    assert usage.generated_tokens == 0
    assert cached.usage.judge_calls == 0


def test_generated_tokens_are_counted_once_the_cache_answers_for_free(tiny_model_dir, tmp_path):
    settings = TaoSettings(home=tmp_path, model={"base": str(tiny_model_dir), "dtype": "float32"})
    cache = GenerationCache(tmp_path / "cache", shard_prompts=2, max_prompt_tokens=64)
    params = SamplingParams(num_samples=2, max_new_tokens=5, seed=1)
    with StageMeter() as first:
        table, _ = cache.generate(lazy_generator(tiny_model_dir, "tiny", settings), three_prompts(), params, False)
    with StageMeter() as again:
        cache.generate(lazy_generator(tiny_model_dir, "tiny", settings), three_prompts(), params, False)
    assert first.usage.generated_tokens == table["completion_tokens"].sum() > 0
    assert again.usage.generated_tokens == 0


# -- a tiny round end to end -------------------------------------------------------------------


def test_a_round_records_its_cost_per_stage_in_the_report_the_registry_and_tao_versions(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from tao_pipeline.cli import main
    from tao_pipeline.cli.runner import run_round

    config = write_tiny_config(tmp_path, tiny_model_dir)
    prices = ["costs.per_1k_generated_tokens=2.0", "costs.per_cpu_hour=0.5"]
    report = run_round(str(config), prices, echo=lambda *_: None)
    assert report.completed
    settings = load_settings(config, prices)
    lake = Lake(settings.lake_dir)

    costs = {cost.stage: cost for cost in read_stage_costs(lake, report.round_id)}
    assert set(costs) == HEAVY_STAGES
    assert all(cost.wall_seconds > 0 and cost.gpu_seconds == 0 for cost in costs.values())
    assert all(costs[stage].cpu_seconds > 0 for stage in ("preflight", "tuned_checkpoint", "checkpoint_evaluation"))
    # Every candidate token was generated once: by the preflight (which samples the train prompts first) or after.
    candidates = lake.read("candidate_responses", report.round_id)
    generated = costs["preflight"].generated_tokens + costs["candidate_responses"].generated_tokens
    assert generated == candidates["completion_tokens"].sum()
    assert costs["checkpoint_evaluation"].generated_tokens > 0
    assert costs["tuned_checkpoint"].generated_tokens == 0  # DPO samples nothing

    text = (settings.reports_dir / report.round_id / "report.md").read_text()
    assert text.count(SECTION) == 1 and "**Cost per point of gain:**" in text and "| total " in text

    version = lake.read("tuned_checkpoint", report.round_id)["version_id"].iloc[0]
    metrics = json.loads(ModelStore(settings.models_dir).versions().set_index("version_id").loc[version, "metrics"])
    total_tokens = sum(cost.generated_tokens for cost in costs.values())
    assert metrics["cost_generated_tokens"] == total_tokens and metrics["cost_currency"] == "USD"
    total_cpu = sum(cost.cpu_seconds for cost in costs.values())
    assert metrics["cost_money"] == pytest.approx(total_tokens / 1000 * 2.0 + total_cpu / 3600 * 0.5, abs=1e-4)

    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(dg.AssetKey("checkpoint_evaluation"), asset_partitions=[report.round_id]), limit=1
    ).records
    metadata = record.asset_materialization.metadata
    assert "round_cost" in metadata and "cost_per_point_of_gain" in metadata and "cost_cpu_seconds" in metadata

    listed = CliRunner().invoke(main, ["versions", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    header = next(line for line in listed.output.splitlines() if "version_id" in line)
    assert {"tokens", "CPU s", "money"} <= {cell.strip() for cell in header.split("|")}
    row = next(line for line in listed.output.splitlines() if line.startswith(f"| {version}"))
    assert f" {total_tokens} " in row and "USD" in row


def test_versions_without_a_cost_show_a_dash():
    versions = pd.DataFrame({"version_id": ["base", "v1"], "metrics": ["{}", json.dumps({"cost_generated_tokens": 9})]})
    shown = versions_with_costs(versions)
    assert list(shown.columns) == ["version_id", "metrics", "tokens", "CPU s"]
    assert list(shown["tokens"]) == ["-", "9"] and list(shown["CPU s"]) == ["-", "-"]
