"""Every scorer option is finite, of its type and in a sane range, and a bad one is one line naming it, at load.

`inf` and `nan` anywhere under scoring.options fail when the settings load; types and ranges when
the scorers are built from them (check_scorers), which `tao round`, `tao preflight`, `tao doctor`,
`tao ui` and the code location all do before anything runs. The SQL scorer's database must be a
DuckDB database file that can be opened: missing, a folder, a FIFO, empty, junk, SQLite, or held
by a writer are each named.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import duckdb
import pytest
from click.testing import CliRunner

from tao_pipeline.cli.commands import main
from tao_pipeline.scoring import check_scorers
from tao_pipeline.scoring.catalog import ScorerOptionsError, build_named_scorer
from tao_pipeline.settings import ScoringSettings, SettingsError, load_settings

JUDGE = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "judge"}


def one_line_error(*args: str, home) -> str:
    result = CliRunner().invoke(main, list(args), env={"TAO_HOME": str(home)})
    assert "Traceback" not in result.output, result.output
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- inf and nan: refused when the settings load -----------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        ("scoring.options.llm_judge.timeout_s=inf", "scoring.options.llm_judge.timeout_s"),
        ("scoring.options.llm_judge.timeout_s=-inf", "scoring.options.llm_judge.timeout_s"),
        ("scoring.options.llm_judge.timeout_s=nan", "scoring.options.llm_judge.timeout_s"),
        ("scoring.options.sql_execution.timeout_s=nan", "scoring.options.sql_execution.timeout_s"),
        ("scoring.options.sql_execution.execution_weight=inf", "scoring.options.sql_execution.execution_weight"),
        ("scoring.options.arithmetic_consistency.no_claims_score=nan",
         "scoring.options.arithmetic_consistency.no_claims_score"),
        ("scoring.options.instruction_following.constraints={max_words=inf}",
         "scoring.options.instruction_following.constraints.max_words"),
        ("scoring.options.json_valid.schema={type='number', maximum=inf}",
         "scoring.options.json_valid.schema.maximum"),
        ("scoring.options.regex_format.list=[1.0, nan]", "scoring.options.regex_format.list[1]"),
    ],
)  # fmt: skip
def test_non_finite_options_fail_at_load_in_one_line(override, named):
    with pytest.raises(SettingsError, match="must be a finite number") as refused:
        load_settings(None, [override])
    assert named + ":" in str(refused.value) and "\n" not in str(refused.value)


def test_tao_round_refuses_an_infinite_judge_timeout_before_anything_runs(tmp_path):
    line = one_line_error("round", "--set", "scoring.options.llm_judge.timeout_s=inf", home=tmp_path)
    assert "scoring.options.llm_judge.timeout_s: must be a finite number" in line
    assert not (tmp_path / "lake").exists()


# -- types and ranges: refused when the scorers are built ------------------------------------------------


@pytest.mark.parametrize(
    "scorer, options, named",
    [
        *[("llm_judge", {**JUDGE, "timeout_s": value}, "timeout_s") for value in (0, -1, 1e9, "60", True)],
        *[("llm_judge", {**JUDGE, "max_retries": value}, "max_retries") for value in (-1, 100, 1.5)],
        *[("llm_judge", {**JUDGE, "max_new_tokens": value}, "max_new_tokens") for value in (0, 8.0, True, 10**9)],
        ("llm_judge", {**JUDGE, "max_concurrency": 0}, "max_concurrency"),
        ("llm_judge", {**JUDGE, "batch_size": 0}, "batch_size"),
        ("llm_judge", {**JUDGE, "max_prompt_tokens": -5}, "max_prompt_tokens"),
        ("llm_judge", {**JUDGE, "rubric": ""}, "rubric"),
        ("llm_judge", {**JUDGE, "trust_remote_code": "yes"}, "trust_remote_code"),
        *[("sql_execution", {"timeout_s": value}, "timeout_s") for value in (0, -2, 1e6, "2")],
        *[("sql_execution", {"max_rows": value}, "max_rows") for value in (0, 1.5, 10**12)],
        *[("sql_execution", {"execution_weight": value}, "execution_weight") for value in (-0.1, 1.5)],
        *[("sql_execution", {"memory_limit": value}, "memory_limit") for value in ("lots", "0B", "1KB", "9999TB", 1)],
        *[("reward_model", {"batch_size": value}, "batch_size") for value in (0, 2.0)],
        ("reward_model", {"max_length": 0}, "max_length"),
        ("embedding_consensus", {"batch_size": -1}, "batch_size"),
        ("embedding_consensus", {"max_length": 0}, "max_length"),
        *[("concise_format", {"max_words": value}, "max_words") for value in (0, 2.5, True)],
        ("number_format", {"max_words": -1}, "max_words"),
        *[("arithmetic_consistency", {"no_claims_score": value}, "no_claims_score") for value in (1.5, -1, "0.5")],
        ("length_limit", {"max_words": -3}, "max_words"),
        ("length_limit", {"min_chars": 2.5}, "min_chars"),
        ("json_valid", {"require_whole_response": "no"}, "require_whole_response"),
        ("regex_format", {"pattern": 7}, "pattern"),
        ("instruction_following", {"constraints": ["max_words"]}, "constraints"),
    ],
)
def test_an_option_of_the_wrong_type_or_out_of_range_is_named_in_one_line(tmp_path, scorer, options, named):
    settings = ScoringSettings(options={scorer: options})
    with pytest.raises(ScorerOptionsError) as refused:
        build_named_scorer(scorer, settings, tmp_path)
    message = str(refused.value)
    assert message.startswith(f"scoring.options.{scorer}") and named in message, message
    assert "\n" not in message and len(message) < 300, message


def test_options_in_range_build(tmp_path):
    database = tmp_path / "ok.duckdb"
    duckdb.connect(str(database)).close()
    for scorer, options in [
        ("llm_judge", {**JUDGE, "timeout_s": 0.5, "max_retries": 0, "max_new_tokens": 1, "rubric": "Be fair."}),
        ("sql_execution", {"database": str(database), "timeout_s": 3600, "max_rows": 1, "execution_weight": 0}),
        ("concise_format", {"max_words": 1}),
        ("arithmetic_consistency", {"no_claims_score": 1}),  # an int where a float goes is fine
        ("length_limit", {"min_words": 0, "max_words": 10}),
    ]:
        build_named_scorer(scorer, ScoringSettings(options={scorer: options}), tmp_path)


# -- the SQL scorer's database ----------------------------------------------------------------------------


def not_a_duckdb_file(tmp_path, kind: str):
    path = tmp_path / f"{kind}.duckdb"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it to read would wait forever for a writer
    elif kind == "empty":
        path.touch()
    elif kind == "junk":
        path.write_bytes(b"this is not a database\n" * 100)
    elif kind == "sqlite":
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE t (i INTEGER)")
    elif kind == "csv":
        path.write_text("id,name\n1,ada\n")
    return path


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("missing", "no DuckDB file at"),
        ("folder", "is not a file"),
        ("fifo", "is not a file"),
        ("empty", "is not a DuckDB database file"),
        ("junk", "is not a DuckDB database file"),
        ("sqlite", "is not a DuckDB database file"),
        ("csv", "is not a DuckDB database file"),
    ],
)
def test_a_database_that_is_not_duckdb_is_named_in_one_line(tmp_path, kind, problem):
    path = not_a_duckdb_file(tmp_path, kind)
    settings = load_settings(None, [f"home='{tmp_path / 'home'}'", "scoring.scorers.sql={sql_execution=1.0}",
                                    f"scoring.options.sql_execution.database='{path}'"])  # fmt: skip
    with pytest.raises(ScorerOptionsError) as refused:
        check_scorers(settings.scoring, settings.cache_dir)
    message = str(refused.value)
    assert message.startswith("scoring.options.sql_execution.database: ") and problem in message, message
    assert "\n" not in message


def test_tao_round_names_a_database_that_is_not_duckdb(tmp_path):
    path = not_a_duckdb_file(tmp_path, "sqlite")
    database = f"scoring.options.sql_execution.database='{path}'"
    line = one_line_error("round", "--set", "scoring.scorers.sql={sql_execution=1.0}", "--set", database,
                          home=tmp_path / "home")  # fmt: skip
    assert f"scoring.options.sql_execution.database: {path} is not a DuckDB database file" in line


def test_a_database_held_by_a_writer_is_named(tmp_path):
    path = tmp_path / "busy.duckdb"
    duckdb.connect(str(path)).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(path)!r}); print('held', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        settings = ScoringSettings(options={"sql_execution": {"database": str(path)}})
        with pytest.raises(ScorerOptionsError) as refused:
            build_named_scorer("sql_execution", settings, tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    message = str(refused.value)
    assert message.startswith(f"scoring.options.sql_execution.database: cannot open {path}: another process holds")
    assert "\n" not in message
