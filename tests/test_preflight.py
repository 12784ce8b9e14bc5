"""The preflight: is there label-free signal in a task at all, before a round is spent on it?"""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner

from tao_pipeline.cli.commands import main
from tao_pipeline.cli.preflight import next_round_prompts
from tao_pipeline.cli.runner import ingest_new_files, prepare_dagster_home
from tao_pipeline.data.ingest import load_prompts
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.resources import build_resources
from tao_pipeline.evaluation.preflight import NO_SIGNAL, SELF_CONSISTENCY_SIGNAL, assess_signal, run_preflight
from tao_pipeline.generation import generate_candidates
from tao_pipeline.settings import SettingsSource, TaoSettings, load_settings
from tests.helpers import code_location

SAMPLES = 8
# Five prompts per task: "capitals" answers Paris six times out of eight, "guesses" never twice the same.
AGREEING = ["Paris"] * 6 + ["Lyon"] * 2
SCATTERED = ["Oslo", "Rome", "Bern", "Kyiv", "Riga", "Baku", "Doha", "Lima"]


def handwritten(task: str, answers: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"{task}-{i}" for i in range(5)],
            "prompt": [f"{task} question {i}? Answer with one word." for i in range(5)],
            "system": None,
            "task": task,
        }
    )
    responses = pd.DataFrame(
        [
            {
                "response_id": f"{pid}-{k}",
                "prompt_id": pid,
                "sample_index": k,
                "response": answer,
                "completion_tokens": 2,
            }
            for pid in prompts["prompt_id"]
            for k, answer in enumerate(answers)
        ]
    )
    return prompts, responses


def settings_for(**preflight) -> TaoSettings:
    extractors = {"capitals": "short_phrase", "guesses": "short_phrase"}
    return TaoSettings.model_validate(
        {"scoring": {"extractors": extractors}, "preflight": {"min_labeled_prompts": 5, **preflight}}
    )


def assess(labels: dict[str, list[str]] | None = None) -> pd.DataFrame:
    capitals, guesses = handwritten("capitals", AGREEING), handwritten("guesses", SCATTERED)
    prompts, responses = (pd.concat([a, b], ignore_index=True) for a, b in zip(capitals, guesses))
    _, tasks = assess_signal(prompts, responses, settings_for(), labels or {})
    return tasks.set_index("task")


def test_a_clear_majority_has_signal_and_scattered_answers_have_none():
    tasks = assess()
    capitals, guesses = tasks.loc["capitals"], tasks.loc["guesses"]
    assert (capitals["prompts"], capitals["clear_majority"], capitals["pairable"]) == (5, 1.0, 1.0)
    assert capitals["agreement_median"] == pytest.approx(0.75)
    assert capitals["mean_score_spread"] == pytest.approx(0.5)  # Paris 6/8 vs Lyon 2/8
    assert capitals["verdict"] == SELF_CONSISTENCY_SIGNAL and capitals["signal"]
    assert guesses["clear_majority"] == 0.0 and guesses["pairable"] == 0.0
    assert guesses["verdict"] == NO_SIGNAL and not guesses["signal"]
    assert "preflight.min_pairable_share" in guesses["reason"]
    assert "preflight.min_clear_majority_share" in guesses["reason"]
    assert tasks["labeled"].sum() == 0 and tasks["one_sample"].isna().all()


def test_labels_decide_when_they_exist_even_against_a_clear_majority():
    capitals, _ = handwritten("capitals", AGREEING)
    right = assess({text: ["Paris"] for text in capitals["prompt"]}).loc["capitals"]
    assert (right["labeled"], right["one_sample"], right["maj_at_k"], right["best_of_k"]) == (5, 0.75, 1.0, 1.0)
    assert right["verdict"] == SELF_CONSISTENCY_SIGNAL
    wrong = assess({text: ["Lyon"] for text in capitals["prompt"]}).loc["capitals"]
    assert (wrong["one_sample"], wrong["maj_at_k"], wrong["best_of_k"]) == (0.25, 0.0, 0.0)
    assert wrong["verdict"] == NO_SIGNAL and "best-of-k right -0.250" in wrong["reason"]


def test_the_round_reuses_the_preflight_samples(tiny_config):
    settings = load_settings(tiny_config, ["preflight.prompts_per_task=3"])
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    model = settings.model.base
    report = run_preflight(prompts, model, "base-tiny", settings)
    assert report.tasks["prompts"].tolist() == [3, 3] and len(report.prompts) == 6
    assert report.cache.generated_prompts == 6 and report.generation.new_tokens > 0
    assert report.round_prompts == (prompts["split"] == "train").sum()
    assert report.round_generation_minutes() > 0
    histogram = report.agreement_histogram()
    assert histogram["agree"].tolist() == [f"{v}/4" for v in range(5)]
    assert histogram[["arithmetic", "short_answer"]].sum().tolist() == pytest.approx([1.0, 1.0])

    train = prompts[prompts["split"] == "train"]
    candidates = generate_candidates(train, model, "base-tiny", settings)  # what candidate_responses calls
    assert candidates.cache.cached_prompts == 6
    assert candidates.cache.generated_prompts == len(train) - 6


def test_tao_preflight_prints_the_table_and_the_verdicts(tiny_config, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(load_settings(tiny_config).dagster_home))  # restored after the test
    result = CliRunner().invoke(main, ["preflight", "--config", str(tiny_config)])
    assert result.exit_code == 0, result.output  # a report: 0 with or without signal
    header = next(line for line in result.output.splitlines() if line.startswith("| task "))
    assert [cell.strip() for cell in header.strip("|").split("|")][-4:] == [
        "labeled",
        "one sample",
        "maj@k",
        "best-of-k",
    ]
    assert "agreement p10/p50/p90" in header and "\n| agree " in result.output
    for task in ("arithmetic", "short_answer"):
        assert any(line.startswith(f"{task}: ") for line in result.output.splitlines()), result.output
    assert "min of generation" in result.output


def test_tao_preflight_without_prompts_says_so_in_one_line(tmp_path, tiny_model_dir, monkeypatch):
    config = tmp_path / "tao.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[data]\nlogs = []\n[model]\nbase = "{tiny_model_dir}"\n')
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))  # restored after the test
    result = CliRunner().invoke(main, ["preflight", "--config", str(config)])
    assert result.exit_code == 1
    [line] = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert line.startswith("Error: no usage logs yet: list log files in data.logs or drop them into")
    assert "Traceback" not in result.output


def test_once_every_prompt_was_used_the_preflight_samples_them_all_as_a_replay(tiny_config, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = load_settings(tiny_config)
    prepare_dagster_home(settings)
    with dg.DagsterInstance.get() as instance:
        ingest_new_files(instance, settings, SettingsSource(str(tiny_config)), echo=lambda _: None)
    lake, said = Lake(settings.lake_dir), []
    fresh = next_round_prompts(lake, [], settings, said.append)
    assert len(fresh) == 24 and not said
    lake.write("raw_prompts", "round-0001", fresh.assign(round="round-0001"))  # a round took every prompt
    replayed = next_round_prompts(lake, ["round-0001"], settings, said.append)
    assert set(replayed["prompt_id"]) == set(fresh["prompt_id"])
    assert said == ["every ingested prompt was used by an earlier round: sampling them all, as a replaying round would"]


def test_the_check_is_registered_non_blocking_and_runs_before_generation():
    definitions = code_location()
    key = dg.AssetCheckKey(dg.AssetKey("raw_prompts"), "preflight_signal")
    [spec] = [spec for checks in definitions.asset_checks for spec in checks.check_specs if spec.key == key]
    assert not spec.blocking
    job = definitions.resolve_job_def("tao_round")
    assert key in job.asset_layer.asset_graph.asset_check_keys
    assert job.graph.node_named("raw_prompts_preflight_signal").definition.tags["dagster/priority"] == "1"


def test_the_check_warns_without_failing_and_generation_reuses_its_samples(tiny_config, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = load_settings(tiny_config)
    prepare_dagster_home(settings)
    definitions = code_location()
    by_name = {asset.key.to_user_string(): asset for asset in definitions.assets}
    [check] = [checks for checks in definitions.asset_checks if "preflight_signal" in str(checks.check_keys)]
    with dg.DagsterInstance.get() as instance:
        ingest_new_files(instance, settings, SettingsSource(str(tiny_config)), echo=lambda _: None)
        instance.add_dynamic_partitions("rounds", ["round-0001"])
        result = dg.materialize(
            [by_name["raw_prompts"], by_name["candidate_responses"], check],
            partition_key="round-0001",
            instance=instance,
            resources=build_resources(str(tiny_config)),
        )
    assert result.success
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.severity == dg.AssetCheckSeverity.WARN and evaluation.metadata["ran"].value
    assert evaluation.metadata["tasks"].value == 2 and "| task " in evaluation.metadata["per_task"].value
    generated = result.asset_materializations_for_node("candidate_responses")[0].metadata
    assert generated["prompts_generated"].value == 0  # the check ran first and sampled every train prompt
    assert generated["prompts_from_cache"].value == evaluation.metadata["prompts_sampled"].value
