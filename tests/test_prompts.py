"""tao_pipeline.data.prompts and .ingest: quarantine, deduplication, the deterministic split, caps and labels."""

from __future__ import annotations

import json

import pytest

from tao_pipeline.data.ingest import QUARANTINE_COLUMNS, load_prompts
from tao_pipeline.data.prompts import DEFAULT_TASK, PROMPT_COLUMNS, prompt_id_for, split_for
from tao_pipeline.demo import DEMO_LABELS, DEMO_LOGS
from tao_pipeline.evaluation import load_labels
from tao_pipeline.settings import DataSettings
from tests.helpers import sample_logs, write_logs

GOOD = [
    {"id": "g1", "prompt": "What is 2 + 2?", "task": "arithmetic"},
    {"id": 7, "prompt": "Name a colour.", "system": "Be brief.", "task": "short_answer"},
    {"prompt": "What is the capital of Peru?"},
]


def write_bytes_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.fixture
def mixed_log(tmp_path):
    """Good rows interleaved with one bad line of every kind; returns (path, {line_number: reason fragment})."""
    lines = [
        json.dumps(GOOD[0]).encode(),  # 1 good
        b"upstream error: connection reset",  # 2 not JSON
        json.dumps({"id": "t", "prompt": "What is 3 + 4?"}).encode()[:20],  # 3 truncated JSON
        json.dumps(["What is 1 + 1?", "arithmetic"]).encode(),  # 4 array
        json.dumps({"id": "m", "task": "arithmetic"}).encode(),  # 5 missing prompt
        json.dumps({"id": "e", "prompt": "  \n\t "}).encode(),  # 6 empty prompt
        json.dumps(GOOD[1]).encode(),  # 7 good
        json.dumps({"prompt": 42}).encode(),  # 8 prompt of wrong type
        json.dumps({"prompt": "Hi there", "task": ["arithmetic"]}).encode(),  # 9 task of wrong type
        json.dumps({"prompt": "Hi there", "system": 3}).encode(),  # 10 system of wrong type
        json.dumps({"prompt": "Hi there", "id": {"a": 1}}).encode(),  # 11 id of wrong type
        json.dumps({"prompt": "x" * 300}).encode(),  # 12 too long
        b'{"prompt": "caf\xe9 au lait"}',  # 13 invalid UTF-8
        b"",  # 14 blank: skipped
        json.dumps(GOOD[2]).encode(),  # 15 good
        b"[" * 100_000,  # 16 nested too deeply
    ]
    expected = {
        2: "not valid JSON",
        3: "not valid JSON",
        4: "must be a JSON object, got list",
        5: "missing required field 'prompt'",
        6: "prompt is empty",
        8: "field 'prompt' must be a string, got int",
        9: "field 'task' must be a string, got list",
        10: "field 'system' must be a string, got int",
        11: "field 'id' must be a string or integer",
        12: "prompt too long",
        13: "not valid UTF-8",
        16: "nested too deeply",
    }
    return write_bytes_lines(tmp_path / "logs.jsonl", lines), expected


def test_every_bad_line_is_quarantined_with_its_reason(mixed_log):
    path, expected = mixed_log
    batch = load_prompts([path], DataSettings(max_prompt_chars=200, heldout_fraction=0.0))
    quarantine = batch.quarantine
    assert list(quarantine.columns) == QUARANTINE_COLUMNS
    assert sorted(quarantine["line_number"]) == sorted(expected)
    for row in quarantine.itertuples():
        assert expected[row.line_number] in row.reason, (row.line_number, row.reason)
        assert row.source_file == str(path)
    assert quarantine.set_index("line_number").loc[2, "raw"] == "upstream error: connection reset"
    assert "caf" in quarantine.set_index("line_number").loc[13, "raw"]  # raw kept, decoded with replacement
    assert all(len(raw) <= 500 for raw in quarantine["raw"])
    assert batch.log_rows == 15  # every non-blank line, good or bad


def test_every_good_row_is_kept(mixed_log):
    path, _ = mixed_log
    batch = load_prompts([path], DataSettings(max_prompt_chars=200, heldout_fraction=0.0))
    prompts = batch.prompts
    assert list(prompts.columns) == PROMPT_COLUMNS
    assert sorted(prompts["prompt"]) == sorted(r["prompt"] for r in GOOD)
    by_prompt = prompts.set_index("prompt")
    assert by_prompt.loc["What is 2 + 2?", "task"] == "arithmetic"
    assert by_prompt.loc["What is 2 + 2?", "log_ids"] == ["g1"]
    assert by_prompt.loc["Name a colour.", "log_ids"] == ["7"]  # integer ids become strings
    assert by_prompt.loc["Name a colour.", "system"] == "Be brief."
    assert by_prompt.loc["What is the capital of Peru?", "task"] == DEFAULT_TASK
    assert len(by_prompt.loc["What is the capital of Peru?", "log_ids"][0]) == 16  # generated id
    assert set(prompts["split"]) == {"train"}
    assert by_prompt.loc["Name a colour.", "prompt_id"] == prompt_id_for("Name a colour.", "Be brief.")


def test_prompt_length_limits_are_settings(tmp_path):
    path = write_logs(tmp_path / "logs.jsonl", [{"prompt": "abc"}, {"prompt": "a" * 20}])
    batch = load_prompts([path], DataSettings(max_prompt_chars=20))
    assert len(batch.prompts) == 2 and batch.quarantine.empty
    batch = load_prompts([path], DataSettings(max_prompt_chars=19, min_prompt_chars=4))
    assert batch.prompts.empty
    reasons = sorted(batch.quarantine["reason"])
    assert "prompt is empty" in reasons[0]
    assert "data.max_prompt_chars=19" in reasons[1]


def test_a_file_of_only_bad_lines_gives_empty_prompts(tmp_path):
    path = write_logs(tmp_path / "logs.jsonl", ["nope", '{"prompt": ""}'])
    batch = load_prompts([path], DataSettings())
    assert batch.prompts.empty
    assert list(batch.prompts.columns) == PROMPT_COLUMNS
    assert len(batch.quarantine) == 2


def test_missing_log_file_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.logs"):
        load_prompts([tmp_path / "missing.jsonl"], DataSettings())


# -- deduplication ----------------------------------------------------------------------


def test_duplicates_merge_log_ids_and_source_files(tmp_path):
    first = write_logs(
        tmp_path / "a.jsonl",
        [
            {"id": "a1", "prompt": "What is 5 + 5?", "task": "arithmetic"},
            {"id": "a2", "prompt": "  What is 5 + 5?  ", "task": "arithmetic"},  # same after strip
            {"id": "a3", "prompt": "What is 5 + 5?", "system": "Be brief."},  # a different system: distinct
        ],
    )
    second = write_logs(tmp_path / "b.jsonl", [{"id": "b1", "prompt": "What is 5 + 5?"}])
    batch = load_prompts([first, second], DataSettings(heldout_fraction=0.0))
    assert len(batch.prompts) == 2
    assert batch.log_rows == 4
    plain = batch.prompts[batch.prompts["system"].isna()].iloc[0]
    assert plain["prompt"] == "What is 5 + 5?"
    assert plain["log_ids"] == ["a1", "a2", "b1"]
    assert plain["source_files"] == [str(first), str(second)]
    assert plain["task"] == "arithmetic"  # first occurrence wins
    with_system = batch.prompts[batch.prompts["system"].notna()].iloc[0]
    assert with_system["log_ids"] == ["a3"]
    assert with_system["prompt_id"] != plain["prompt_id"]
    assert batch.prompts["prompt_id"].is_unique


# -- split and caps ---------------------------------------------------------------------


def many_prompts(tmp_path, count=400):
    return write_logs(tmp_path / "many.jsonl", sample_logs(count))


def test_split_is_deterministic_and_roughly_matches_the_fraction(tmp_path):
    path = many_prompts(tmp_path)
    limits = DataSettings(heldout_fraction=0.25)
    first = load_prompts([path], limits).prompts
    second = load_prompts([path], limits).prompts
    assert len(first) == 400
    assert first.equals(second)
    share = (first["split"] == "heldout").mean()
    assert 0.18 <= share <= 0.32
    for row in first.itertuples():
        assert row.split == split_for(row.prompt_id, 0.25, "tao")


def test_split_depends_on_salt_and_fraction(tmp_path):
    path = many_prompts(tmp_path)
    base = load_prompts([path], DataSettings(heldout_fraction=0.25)).prompts.set_index("prompt_id")["split"]
    salted = load_prompts([path], DataSettings(heldout_fraction=0.25, split_salt="other")).prompts
    salted = salted.set_index("prompt_id")["split"]
    assert (base != salted.loc[base.index]).any()
    assert set(load_prompts([path], DataSettings(heldout_fraction=0.0)).prompts["split"]) == {"train"}
    bigger = load_prompts([path], DataSettings(heldout_fraction=0.6)).prompts.set_index("prompt_id")["split"]
    assert (bigger == "heldout").mean() > 0.5
    # Raising the fraction only moves prompts from train to held-out, never back.
    assert (bigger.loc[base[base == "heldout"].index] == "heldout").all()


def test_split_is_independent_of_file_order(tmp_path):
    rows = sample_logs(60)
    forward = load_prompts([write_logs(tmp_path / "f.jsonl", rows)], DataSettings(heldout_fraction=0.3)).prompts
    backward = load_prompts([write_logs(tmp_path / "b.jsonl", rows[::-1])], DataSettings(heldout_fraction=0.3)).prompts
    assert dict(zip(forward["prompt_id"], forward["split"])) == dict(zip(backward["prompt_id"], backward["split"]))


def test_max_prompts_and_max_heldout_cap_each_split(tmp_path):
    path = many_prompts(tmp_path, 200)
    full = load_prompts([path], DataSettings(heldout_fraction=0.3)).prompts
    capped = load_prompts([path], DataSettings(heldout_fraction=0.3, max_prompts=10, max_heldout=4)).prompts
    assert (capped["split"] == "train").sum() == 10
    assert (capped["split"] == "heldout").sum() == 4
    # A deterministic subset: the lowest prompt ids of each split.
    for split, cap in (("train", 10), ("heldout", 4)):
        expected = sorted(full.loc[full["split"] == split, "prompt_id"])[:cap]
        assert sorted(capped.loc[capped["split"] == split, "prompt_id"]) == expected
    again = load_prompts([path], DataSettings(heldout_fraction=0.3, max_prompts=10, max_heldout=4)).prompts
    assert capped.equals(again)
    assert list(capped.index) == list(range(len(capped)))


def test_caps_larger_than_the_split_keep_everything(tmp_path):
    path = many_prompts(tmp_path, 30)
    full = load_prompts([path], DataSettings(heldout_fraction=0.3)).prompts
    capped = load_prompts([path], DataSettings(heldout_fraction=0.3, max_prompts=1000, max_heldout=1000)).prompts
    assert sorted(capped["prompt_id"]) == sorted(full["prompt_id"])


# -- labels -----------------------------------------------------------------------------


def test_load_labels(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(
        json.dumps({"prompt": " What is the capital of China? ", "answer": "Beijing", "aliases": ["Peking"]})
        + "\n"
        + "\n"
        + json.dumps({"prompt": "What is 2 + 2?", "answer": 4})
        + "\n",
        encoding="utf-8",
    )
    labels = load_labels(path)
    assert labels == {"What is the capital of China?": ["Beijing", "Peking"], "What is 2 + 2?": ["4"]}
    assert load_labels(None) == {}


def test_load_labels_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.labels"):
        load_labels(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_labels(bad)


# -- the bundled demo data --------------------------------------------------------------


def test_demo_data_loads_with_its_eight_bad_lines_quarantined():
    batch = load_prompts([DEMO_LOGS], DataSettings())
    lines = [line for line in DEMO_LOGS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert batch.log_rows == len(lines)
    assert len(batch.quarantine) == 8
    reasons = " | ".join(batch.quarantine["reason"])
    for fragment in (
        "not valid JSON",
        "must be a JSON object",
        "missing required field 'prompt'",
        "prompt is empty",
        "field 'prompt' must be a string",
        "field 'task' must be a string",
        "prompt too long",
    ):
        assert fragment in reasons
    # Every other line is a prompt; duplicates merge, keeping all their log ids.
    log_ids = [log_id for ids in batch.prompts["log_ids"] for log_id in ids]
    assert len(log_ids) == len(lines) - 8
    assert len(set(log_ids)) == len(log_ids)
    assert len(batch.prompts) < len(log_ids)
    assert batch.prompts["prompt_id"].is_unique
    assert set(batch.prompts["split"]) == {"train", "heldout"}
    assert set(batch.prompts["task"]) == {"arithmetic", "short_answer"}
    # The evaluation labels cover exactly the valid, distinct prompts.
    labels = load_labels(DEMO_LABELS)
    assert set(labels) == set(batch.prompts["prompt"])
