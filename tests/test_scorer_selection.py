"""The composite is chosen in settings or, per run, in the launchpad's resource config."""

import json

import dagster as dg
import pandas as pd

from tao_pipeline.cli.runner import ingest_new_files, prepare_dagster_home
from tao_pipeline.defs.assets.generation import candidate_responses
from tao_pipeline.defs.assets.prompts import raw_prompts
from tao_pipeline.defs.assets.scoring import response_scores
from tao_pipeline.defs.resources import build_resources
from tao_pipeline.scoring import PromptContext, build_scorer
from tao_pipeline.scoring.instructions import InstructionVerifier
from tao_pipeline.settings import ScoringSettings, SettingsSource, load_settings


def test_launchpad_overrides_pick_the_scorers_for_a_run(tiny_config, monkeypatch):
    monkeypatch.setenv("TAO_CONFIG", str(tiny_config))
    settings = load_settings()
    prepare_dagster_home(settings)
    with dg.instance_for_test() as instance:
        ingest_new_files(instance, settings, SettingsSource(), echo=lambda _: None)
        instance.add_dynamic_partitions("rounds", ["round-0001"])
        assert dg.materialize(
            [raw_prompts, candidate_responses],
            partition_key="round-0001",
            instance=instance,
            resources=build_resources(),
        ).success
        launchpad = {
            "resources": {
                "settings": {
                    "config": {
                        "overrides": [
                            "scoring.scorers={default={length_limit=1.0}, "
                            "arithmetic={length_limit=1.0, arithmetic_consistency=1.0}}",
                            "scoring.options={length_limit={max_words=3}}",
                        ]
                    }
                }
            }
        }
        assert dg.materialize(
            [response_scores],
            partition_key="round-0001",
            instance=instance,
            resources=build_resources(),
            run_config=launchpad,
        ).success
    scores = pd.read_parquet(settings.lake_dir / "response_scores" / "round-0001.parquet")
    parts = {
        task: set(json.loads(scores[scores["task"] == task]["score_parts"].iloc[0])) for task in set(scores["task"])
    }
    assert parts == {"arithmetic": {"length_limit", "arithmetic_consistency"}, "short_answer": {"length_limit"}}


def test_instruction_constraints_per_task_and_per_prompt():
    verifier = InstructionVerifier(constraints={"max_words": 5}, by_task={"shout": {"case": "upper"}})
    assert verifier.score_group(PromptContext("q", "shout"), ["HELLO THERE", "hello there"]) == [1.0, 0.5]
    assert verifier.score_group(PromptContext("q", "chat"), ["hello there"]) == [1.0]
    prompt_level = PromptContext("q", "shout", constraints={"case": None, "required_keywords": ["there"]})
    assert verifier.score_group(prompt_level, ["hello there"]) == [1.0]


def test_settings_choose_the_scorers_per_task():
    scorer = build_scorer(
        ScoringSettings(
            scorers={"default": {"self_consistency": 1.0}, "math": {"arithmetic_consistency": 1.0}},
            extractors={"default": "short_phrase", "math": "last_number"},
        )
    )
    result = scorer.score(PromptContext("2+2?", "math"), ["2 + 2 = 4", "2 + 2 = 5"])
    assert result.scores == [1.0, 0.0] and set(result.parts[0]) == {"arithmetic_consistency"}
