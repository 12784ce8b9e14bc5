"""Conversations as prompts: parsing, ids, cutting long histories, and the pipeline stages that read them."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.data.conversation import (
    ConversationRejected,
    HistoryCuts,
    build_chat,
    fit_chat,
    fit_chat_to_tokens,
    from_messages,
    history_json,
)
from tao_pipeline.data.feedback import FeedbackRejected, parse_feedback, parse_rating
from tao_pipeline.data.ingest import ingest_file
from tao_pipeline.data.prompts import prompt_id_for, prompts_from_rows
from tao_pipeline.scoring import PromptContext, prompt_context
from tao_pipeline.scoring.composite import CompositeScorer, TaskRecipe
from tao_pipeline.scoring.feedback import FeedbackScorer
from tao_pipeline.scoring.judge import pointwise_call
from tao_pipeline.settings import DataSettings
from tao_pipeline.training.dpo import preference_dataset
from tao_pipeline.training.pairs import build_pairs
from tests.helpers import write_logs

LIMITS = DataSettings()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_a_conversation_is_its_last_user_turn_with_system_and_history():
    conversation = from_messages(
        [{"role": "developer", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("What is 2+2?")], LIMITS
    )
    assert conversation.prompt == "What is 2+2?"
    assert conversation.system == "Be brief."
    assert conversation.history == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"})
    assert conversation.messages()[0] == {"role": "system", "content": "Be brief."}
    assert conversation.messages()[-1] == user("What is 2+2?")


def test_a_single_turn_prompt_keeps_the_id_it_always_had():
    single = from_messages([{"role": "system", "content": "S"}, user("Q")], LIMITS)
    assert single.history_json is None
    assert prompt_id_for(single.prompt, single.system, None, single.history_json) == content_hash("S", "Q", "")
    longer = from_messages([user("A"), assistant("B"), user("Q")], LIMITS)
    assert prompt_id_for("Q", None, None, longer.history_json) != prompt_id_for("Q")


def test_parts_a_text_model_cannot_take_are_left_out_and_counted():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
        {"role": "assistant", "content": "A cat."},
        user("Which colour?"),
    ]
    conversation = from_messages(messages, LIMITS)
    assert conversation.history == (user("What is in this picture?"), assistant("A cat."))
    assert conversation.left_out_text() == "image_url part: 1; tool call: 1; tool message: 1"


def test_turns_left_adjacent_by_a_left_out_tool_exchange_are_joined():
    messages = [
        user("First"),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "content": "out"},
        user("Second"),
    ]
    assert from_messages(messages, LIMITS).prompt == "First\n\nSecond"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([user("Q"), assistant("A")], "ends with an assistant turn"),
        ([user("Q"), assistant(""), user("R")], "message 2 (assistant) is empty"),
        ([user("   ")], "message 1 (user) is empty"),
        ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
        ([{"content": "x"}], "unknown role None"),
        ([user("Q")] * 10_000, "10000 messages > data.max_turns=256"),
        ([user("x" * 100_000)], "message 1 too long"),
        ([], "field 'messages' is empty"),
        ("hello", "must be a list"),
        ([["user", "hi"]], "message 1 must be a JSON object"),
        ([{"role": "user", "content": 5}], "content must be a string or a list of parts"),
        ([{"role": "user", "content": [{"type": "text"}]}], "a text part has no text"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "no user turn with text"),
        ([{"role": "system", "content": "only a system message"}], "no user turn with text"),
    ],
)
def test_a_conversation_a_model_cannot_answer_is_refused_with_its_reason(messages, reason):
    with pytest.raises(ConversationRejected, match=None) as refused:
        from_messages(messages, LIMITS)
    assert reason in str(refused.value)


def test_the_whole_conversation_has_a_size_limit():
    limits = DataSettings(max_conversation_chars=1000)
    turns = [user("u" * 300), assistant("a" * 300), user("u" * 300), assistant("a" * 300), user("last")]
    with pytest.raises(ConversationRejected, match="data.max_conversation_chars=1000"):
        from_messages(turns, limits)


def test_long_histories_lose_their_oldest_turns_and_keep_system_and_question():
    messages = build_chat("Q", "S", [user("u1"), assistant("a1"), user("u2"), assistant("a2")])
    count = len  # one "token" per message
    fitted, cut = fit_chat(messages, count, 4)
    assert fitted == [{"role": "system", "content": "S"}, user("u2"), assistant("a2"), user("Q")] and cut == 2
    fitted, cut = fit_chat(messages, count, 1)
    assert fitted == [{"role": "system", "content": "S"}, user("Q")] and cut == 4


def test_fitting_with_a_real_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    history = []
    for turn in range(30):
        history += [user(f"question {turn} " * 10), assistant(f"answer {turn} " * 10)]
    messages = build_chat("final question", "system rules", history)
    fitted, cut = fit_chat_to_tokens(tokenizer, messages, 200)
    assert cut > 0 and cut % 2 == 0
    assert fitted[0]["content"] == "system rules" and fitted[-1]["content"] == "final question"
    assert len(tokenizer.apply_chat_template(fitted, add_generation_prompt=True, tokenize=True)) <= 200
    assert fit_chat_to_tokens(tokenizer, build_chat("short"), 5) == (build_chat("short"), 0)


def test_the_issues_two_rows_ingest_with_no_settings(tmp_path):
    path = write_logs(
        tmp_path / "app.jsonl",
        [
            {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "You are a support bot."},
                    {"role": "user", "content": "How do I reset my password?"},
                ],
            },
            {
                "request": {"messages": [{"role": "user", "content": "Summarize: the cat sat."}]},
                "response": {"choices": [{"message": {"role": "assistant", "content": "A cat sat."}}]},
            },
        ],
    )
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine.empty, batch.quarantine["reason"].tolist()
    rows = batch.rows.set_index("prompt")
    assert rows.loc["How do I reset my password?", "system"] == "You are a support bot."
    assert rows.loc["Summarize: the cat sat.", "response"] == "A cat sat."
    assert rows["history"].isna().all()


def test_multi_turn_rows_and_their_feedback_reach_the_prompts_table(tmp_path):
    conversation = [user("Hi"), assistant("Hello"), user("2+2?")]
    path = write_logs(
        tmp_path / "chat.jsonl",
        [
            {"id": "r1", "messages": conversation, "response": "4", "feedback": {"rating": "down"}},
            {"id": "r2", "messages": conversation},
            {"prompt": "2+2?"},
        ],
    )
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine.empty
    rows = batch.rows.drop(columns="log_id").rename(columns={"external_id": "log_id"})
    assert rows.loc[0, "rating"] == -1.0 and rows.loc[0, "response"] == "4"
    prompts = prompts_from_rows(rows, DataSettings(heldout_fraction=0.0))
    assert len(prompts) == 2  # the conversation (twice) and the single turn are different prompts
    multi = prompts[prompts["history"].notna()].iloc[0]
    assert json.loads(multi["history"]) == [user("Hi"), assistant("Hello")]
    assert sorted(multi["log_ids"]) == ["r1", "r2"]


def test_bad_feedback_in_a_row_quarantines_only_that_row(tmp_path):
    path = write_logs(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "a", "response": "b", "feedback": {"rating": 7}},
            {"prompt": "a", "response": "b", "feedback": {"rating": "up"}},
            {"feedback": {"rating": "up"}},
        ],
    )
    batch = ingest_file(path, LIMITS)
    assert len(batch.rows) == 1
    reasons = batch.quarantine["reason"].tolist()
    assert "rating 7 is not 'up', 'down' or a number from -1 to 1" in reasons[0]
    assert len(reasons) == 2


@pytest.mark.parametrize(
    ("value", "rating"), [("up", 1.0), ("Thumbs Down", -1.0), (True, 1.0), (False, -1.0), (0.5, 0.5), ("-1", -1.0)]
)
def test_ratings_are_numbers_from_minus_one_to_one(value, rating):
    assert parse_rating(value) == rating


@pytest.mark.parametrize("value", [7, -1.5, float("nan"), "meh", [1], {"up": 1}])
def test_a_rating_out_of_range_is_refused(value):
    with pytest.raises(FeedbackRejected, match="rating"):
        parse_rating(value)


def test_feedback_needs_something_and_bounds_its_text():
    with pytest.raises(FeedbackRejected, match="no rating, comment or correction"):
        parse_feedback({})
    with pytest.raises(FeedbackRejected, match="comment too long"):
        parse_feedback({"rating": 1, "comment": "x" * 5000})
    assert parse_feedback({"correction": " 4 "}).correction == "4"


def test_scorers_and_the_judge_see_the_whole_conversation():
    row = {"prompt": "And 3+3?", "system": "Math tutor", "history": history_json([user("2+2?"), assistant("4")])}
    context = prompt_context(row)
    assert context.history == (user("2+2?"), assistant("4")) and context.task == "general"
    call = pointwise_call(context, "6", "rubric")
    assert call.user.index("[Earlier turns of the conversation]\nUser: 2+2?\n\nAssistant: 4") < call.user.index(
        "[User prompt]\nAnd 3+3?"
    )


def test_the_feedback_scorer_prefers_rated_up_and_is_neutral_elsewhere():
    scorer = FeedbackScorer()
    context = PromptContext("q", "general", feedback={"good": 1.0, "bad": -1.0})
    assert scorer.score_group(context, ["good", "bad", "other"]) == [1.0, 0.0, 0.5]
    composite = CompositeScorer({"feedback": scorer}, {"default": TaskRecipe({"feedback": 1.0})})
    assert composite.score(PromptContext("q", "general"), ["a", "b"]).scores == [0.5, 0.5]


def test_pairs_and_dpo_examples_carry_the_conversation(tiny_model_dir):
    from transformers import AutoTokenizer

    history = history_json([user("old " * 200), assistant("older " * 200), user("Hi"), assistant("Hello")])
    prompts = pd.DataFrame([{"prompt_id": "p", "prompt": "2+2?", "system": "S", "history": history, "task": "math"}])
    candidates = pd.DataFrame(
        [
            {"response_id": "a", "prompt_id": "p", "response": "4"},
            {"response_id": "b", "prompt_id": "p", "response": "5"},
        ]
    )
    scores = pd.DataFrame([{"response_id": "a", "score": 1.0}, {"response_id": "b", "score": 0.0}])
    pairs, _ = build_pairs(prompts, candidates, scores, min_margin=0.1)
    assert pairs.loc[0, "history"] == history
    [example] = preference_dataset(pairs).to_list()
    assert [m["role"] for m in example["prompt"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cuts = HistoryCuts()
    [fitted] = preference_dataset(pairs, tokenizer, max_length=128, cuts=cuts).to_list()
    assert [m["content"] for m in fitted["prompt"]] == ["S", "Hi", "Hello", "2+2?"]
    assert (cuts.turns, cuts.conversations) == (2, 1)  # what the training metadata reports as history_turns_cut


def test_grpo_prompts_lose_their_oldest_turns_to_the_budget_and_count_them(tiny_model_dir):
    from transformers import AutoTokenizer

    from tao_pipeline.training.grpo import prompt_dataset

    long = history_json([user("old " * 200), assistant("older " * 200), user("Hi"), assistant("Hello")])
    prompts = pd.DataFrame(
        [
            {"prompt_id": "long", "prompt": "2+2?", "system": None, "history": long, "task": "math"},
            {"prompt_id": "short", "prompt": "3+3?", "system": None, "history": None, "task": "math"},
        ]
    )
    cuts = HistoryCuts()
    rows = prompt_dataset(prompts, AutoTokenizer.from_pretrained(tiny_model_dir), 96, cuts).to_list()
    assert [m["content"] for m in rows[0]["prompt"]] == ["Hi", "Hello", "2+2?"]
    assert [m["content"] for m in rows[1]["prompt"]] == ["3+3?"]
    assert (cuts.turns, cuts.conversations) == (2, 1)


def test_the_bundled_conversation_demo_ingests_whole_and_every_prompt_has_a_label():
    from importlib.resources import files

    from tao_pipeline.evaluation.labels import label_key, load_labels

    demo = files("tao_pipeline.demo")
    batch = ingest_file(Path(str(demo / "conversations.jsonl")), LIMITS)
    assert batch.quarantine.empty and len(batch.rows) == 346
    assert batch.rows["history"].notna().all() and set(batch.rows["task"]) == {"chat_short_answer", "chat_arithmetic"}
    labels = load_labels(Path(str(demo / "conversation_labels.jsonl")))
    keys = [label_key(row.prompt, row.history) for row in batch.rows.itertuples()]
    assert all(key in labels for key in keys)
    assert len(set(keys)) == 346  # every conversation its own label


def test_labels_of_conversations_are_told_apart_by_their_earlier_turns(tmp_path):
    from tao_pipeline.evaluation.labels import label_key, load_labels

    first = [user("What is 2 + 3?"), assistant("5"), user("Now add 1 to that.")]
    second = [user("What is 4 + 4?"), assistant("8"), user("Now add 1 to that.")]
    path = write_logs(
        tmp_path / "labels.jsonl",
        [{"messages": first, "answer": "6"}, {"messages": second, "answer": "9"}, {"prompt": "1+1?", "answer": "2"}],
    )
    labels = load_labels(path)
    assert labels[label_key("Now add 1 to that.", history_json(first[:2]))] == ["6"]
    assert labels[label_key("Now add 1 to that.", history_json(second[:2]))] == ["9"]
    assert labels[label_key("1+1?")] == ["2"]
    write_logs(path, [{"messages": [user("Q"), assistant("A")], "answer": "x"}])
    with pytest.raises(ValueError, match="labels file .*:1 is malformed: conversation ends with an assistant turn"):
        load_labels(path)
