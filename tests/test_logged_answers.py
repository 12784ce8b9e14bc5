"""Answers already given and users' feedback, joined in the lake: which answer each rating belongs to,
the Batch API's outputs matched to their inputs, feedback on answers nobody logged, rates per version."""

import pandas as pd

from tao_pipeline.data.answers import feedback_rates, logged_answers
from tao_pipeline.data.ingest import ingest_to_lake
from tao_pipeline.data.lake import Lake
from tao_pipeline.generation.logged import CORRECTION, LOGGED, answer_rows, correction_rows, own_answers, with_ratings
from tao_pipeline.settings import DataSettings
from tests.helpers import write_logs

LIMITS = DataSettings()


def chat_row(row_id, question, answer, model, **extra):
    return {
        "id": row_id,
        "request": {"messages": [{"role": "user", "content": question}]},
        "response": {"id": row_id, "model": model, "choices": [{"index": 0, "message": {"content": answer}}]},
        **extra,
    }


def feedback(response_id, **fields):
    return {"id": f"feedback-{response_id}-{len(fields)}", "feedback": {"response_id": response_id, **fields}}


def lake_with(tmp_path, *files: list[dict]) -> Lake:
    lake = Lake(tmp_path / "lake")
    for number, rows in enumerate(files):
        ingest_to_lake(write_logs(tmp_path / f"batch{number}.jsonl", rows), LIMITS, lake, f"batch-{number}")
    return lake


def test_ratings_from_rows_and_later_events_average_per_answer(tmp_path):
    lake = lake_with(
        tmp_path,
        [
            chat_row("chatcmpl-1", "2+2?", "5", "v1", feedback={"rating": "down"}),
            chat_row("chatcmpl-2", "2+2?", "4", "v1"),
            chat_row("chatcmpl-3", "2+2?", "4", "v2"),  # the same text again: one answer
        ],
        [feedback("chatcmpl-2", rating="up"), feedback("chatcmpl-1", rating=0.0, correction="4")],
    )
    prompt_id = lake.sql(f"SELECT DISTINCT prompt_id FROM {lake.scan('usage_logs')}")["prompt_id"].tolist()
    found = logged_answers(lake, prompt_id)
    answers = found.answers.set_index("response")
    assert answers.loc["5", "rating"] == -0.5 and answers.loc["5", "ratings"] == 2
    assert answers.loc["5", "correction"] == "4"
    assert answers.loc["4", "rating"] == 1.0 and answers.loc["4", "ratings"] == 1
    assert found.unknown_feedback == 0
    rates = feedback_rates(lake).set_index("model version")
    assert rates.loc["v1"].tolist() == [2, 3, 1, 1, 0.0, 1]  # ratings -1, 0 and 1
    assert rates.loc["v2", "answers logged"] == 1 and rates.loc["v2", "rated"] == 0


def test_a_batch_output_answers_its_input_row_by_custom_id(tmp_path):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Capital of France?"}]}
    output = {
        "id": "batch_req_1",
        "custom_id": "task-7",
        "response": {
            "status_code": 200,
            "body": {
                "id": "chatcmpl-9",
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"content": "Paris"}}],
            },
        },
        "error": None,
    }
    lake = lake_with(
        tmp_path,
        [{"custom_id": "task-7", "method": "POST", "url": "/v1/chat/completions", "body": body}],
        [output],
        [feedback("chatcmpl-9", rating="up"), feedback("chatcmpl-unknown", rating="down")],
    )
    prompt_ids = lake.sql(f"SELECT prompt_id FROM {lake.scan('usage_logs')}")["prompt_id"].tolist()
    found = logged_answers(lake, prompt_ids)
    [answer] = found.answers.to_dict("records")
    assert (answer["response"], answer["model"], answer["rating"]) == ("Paris", "gpt-4o-mini", 1.0)
    assert found.unknown_feedback == 1 and found.unknown_examples == ["chatcmpl-unknown"]


def test_lakes_from_before_answers_have_none(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write("usage_logs", "old", pd.DataFrame({"prompt_id": ["p"], "prompt": ["q"], "external_id": ["x"]}))
    assert logged_answers(lake, ["p"]).answers.empty and feedback_rates(lake).empty


def test_the_starting_models_answer_is_a_sample_and_corrections_join_the_candidates():
    answers = pd.DataFrame(
        [
            {"prompt_id": "p", "response_id": "r1", "response": "5", "model": "v1", "rating": -1.0, "ratings": 1,
             "comment": None, "correction": "4"},
            {"prompt_id": "p", "response_id": "r2", "response": "6", "model": "v0", "rating": None, "ratings": 0,
             "comment": None, "correction": None},
        ]
    )  # fmt: skip
    own = own_answers(answers, "v1")
    rows = pd.concat([answer_rows(own, "v1", 3), correction_rows(answers, {"p"}, 4)], ignore_index=True)
    sampled = pd.DataFrame([{"response_id": "s", "prompt_id": "p", "sample_index": 0, "response": "4",
                             "model_version": "v1", "finish_reason": "stop"}])  # fmt: skip
    rated = with_ratings(pd.concat([sampled, rows], ignore_index=True), answers).set_index("finish_reason")
    assert rated.loc[LOGGED, "response"] == "5" and rated.loc[LOGGED, "sample_index"] == 3
    assert rated.loc[LOGGED, "rating"] == -1.0
    assert rated.loc[CORRECTION, "response"] == "4" and rated.loc[CORRECTION, "rating"] == 1.0
    assert pd.isna(rated.loc["stop", "rating"])  # nobody rated the sampled "4" itself
