"""End to end: a conversation served by `tao serve` to the official client, its answer and the user's
thumbs-down arrive in the lake, and the next round's pairs learn from them."""

import openai
import pytest
import requests

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.conversation import from_messages
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.prompts import prompt_id_for, split_for
from tests.helpers import write_tiny_config
from tests.serve_helpers import load, running_server

SERVE_AND_SCORE = """
[serve]
swap_poll_seconds = 0.2
log_roll_seconds = 0.5
batch_window_ms = 50
default_max_tokens = 8

[scoring.scorers]
support = {feedback = 1.0, self_consistency = 0.2}
"""


def _conversation_in_train_split(settings) -> list[dict]:
    """A support conversation whose prompt the round trains on (the split is a hash of its content)."""
    for attempt in range(100):
        messages = [
            {"role": "system", "content": "You are a support bot."},
            {"role": "user", "content": "I cannot log in."},
            {"role": "assistant", "content": "Have you tried resetting your password?"},
            {"role": "user", "content": f"Yes. How else can I get in? (ticket {attempt})"},
        ]
        conversation = from_messages(messages, settings.data)
        prompt_id = prompt_id_for(conversation.prompt, conversation.system, None, conversation.history_json)
        if split_for(prompt_id, settings.data.heldout_fraction, settings.data.split_salt) == "train":
            return messages
    raise AssertionError("no conversation in the train split")


@pytest.mark.slow(minutes=1)
def test_a_served_answer_and_its_thumbs_down_shape_the_next_rounds_pairs(tmp_path, tiny_model_dir, monkeypatch):
    config = write_tiny_config(tmp_path, tiny_model_dir)
    config.write_text(config.read_text() + SERVE_AND_SCORE)
    settings = load(config)
    messages = _conversation_in_train_split(settings)
    with running_server(settings) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model="tao", messages=messages, metadata={"task": "support"}, max_tokens=8
        )
        answered = completion.choices[0].message.content
        thumbs_down = requests.post(
            f"{server.url}/feedback", json={"response_id": completion.id, "rating": "down"}, timeout=30
        )
        assert thumbs_down.status_code == 200, thumbs_down.text
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    report = run_round(str(config), echo=lambda *_: None)
    assert report.completed

    lake = Lake(settings.lake_dir)
    logs = lake.sql(f"SELECT * FROM {lake.scan('usage_logs')} WHERE history IS NOT NULL")
    [row] = logs.to_dict("records")
    assert row["response_id"] == completion.id and row["response"] == answered and row["task"] == "support"
    [event] = lake.sql(f"SELECT * FROM {lake.scan('log_events')}").to_dict("records")
    assert event["kind"] == "feedback" and event["response_id"] == completion.id and event["rating"] == -1.0

    candidates = lake.read("candidate_responses", "round-0001")
    mine = candidates[candidates["prompt_id"] == row["prompt_id"]]
    assert len(mine) == settings.generation.num_samples  # the served answer is one of the N samples
    [logged] = mine[mine["finish_reason"] == "logged"].to_dict("records")
    assert logged["response"] == answered and logged["rating"] == -1.0
    assert logged["model_version"] == completion.model
    pairs = lake.read("preference_pairs", "round-0001")
    [pair] = pairs[pairs["prompt_id"] == row["prompt_id"]].to_dict("records")
    assert pair["rejected_response_id"] == logged["response_id"]  # the user's thumbs-down is the rejected answer
    assert pair["history"] == row["history"]

    report_text = (settings.reports_dir / "round-0001" / "report.md").read_text()
    assert "Users' feedback per model version" in report_text
    assert f"| {completion.model} |" in report_text
